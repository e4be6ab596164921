"""The control API and dashboard of one peer: stdlib HTTP on 127.0.0.1.

  GET  /             the live dashboard (one self-contained page, no CDN)
  GET  /api/status   the peer's state, its history and the swarm summary, as JSON
  GET  /metrics      Prometheus text format
  POST /api/pause    pause training (stays in the DHT and serves state sync)
  POST /api/resume   lift the user's pause

A POST needs `Authorization: Bearer <token>`, the token kept in W/control.token (mode
0600); without it the answer is 401. Reads need no token. The server refuses to listen on
a non-loopback address unless `allow_remote` is set, and while on loopback it answers only
requests whose Host header names loopback (a web page cannot reach it by DNS rebinding).
"""

from __future__ import annotations

import errno
import hmac
import ipaddress
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from swarmfold.daemon.settings import Settings
from swarmfold.daemon.state import Controls, PeerStatus
from swarmfold.daemon.summary import swarm_summary
from swarmfold.fsutil import write_atomic, write_json_atomic

logger = logging.getLogger(__name__)

TOKEN_FILE = "control.token"
API_FILE = "api.json"


class RemoteBindRefused(ValueError):
    """Asked to listen on an address other machines can reach, without saying so explicitly."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind_host(host: str, *, allow_remote: bool) -> None:
    if not is_loopback(host) and not allow_remote:
        raise RemoteBindRefused(
            f"refusing to serve the control API on {host}: other machines could reach it. Use 127.0.0.1, "
            "or set allow_remote_api = true in settings.toml (or pass --allow-remote-api) if you mean it; "
            "changes still need the token")


def ensure_token(workdir: Path) -> str:
    """The control token of this workdir, created (mode 0600) on first use.

    A token file readable by others is replaced: whoever could read it could steer the peer.
    """
    path = Path(workdir) / TOKEN_FILE
    if path.is_file():
        st = path.stat()
        token = path.read_text(encoding="utf-8").strip()
        if st.st_mode & 0o077 == 0 and st.st_uid == os.getuid() and len(token) >= 32:
            return token
        logger.warning("%s is readable by others or malformed; writing a new token", path)
        path.unlink()
    token = secrets.token_urlsafe(32)
    write_atomic(path, token + "\n", mode=0o600)
    return token


def read_token(workdir: Path) -> str:
    path = Path(workdir) / TOKEN_FILE
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no control token; is a peer running in {workdir}?") from None


def dashboard_html() -> bytes:
    return (resources.files("swarmfold.daemon") / "static" / "dashboard.html").read_bytes()


def live_snapshot(status: PeerStatus, controls: Controls) -> dict[str, Any]:
    """The status snapshot with the pause requests in force (the loop may not have reached them yet)."""
    snap = status.snapshot()
    snap["pause_reasons"] = controls.pause_reasons()
    snap["paused"] = controls.paused or snap["state"] == "paused"
    snap["stop_requested"] = controls.stop.is_set()
    return snap


class ControlApi:
    """The HTTP server thread. `start()` binds (falling back to a free port if the one asked is taken)."""

    def __init__(self, *, status: PeerStatus, controls: Controls, settings: Settings, workdir: Path,
                 token: str, host: str = "127.0.0.1", port: int = 0, allow_remote: bool = False,
                 extra: Callable[[], dict[str, Any]] | None = None):
        check_bind_host(host, allow_remote=allow_remote)
        self.status, self.controls, self.settings = status, controls, settings
        self.workdir, self.host, self.port, self.allow_remote = Path(workdir), host, port, allow_remote
        self._token = token
        self._extra = extra or dict
        # imported here: the metrics need torch (protocol's rejection labels), and the CLI's
        # status, pause and resume read this module's files without serving anything
        from swarmfold.daemon.metrics import make_registry

        self.registry = make_registry(self.metrics_snapshot)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- what it serves ------------------------------------------------------------
    def status_payload(self) -> dict[str, Any]:
        snap = live_snapshot(self.status, self.controls)
        snap["summary"] = swarm_summary(snap)
        snap["settings"] = self.settings.to_dict()
        snap["api"] = {"url": self.url}
        snap["workdir"] = str(self.workdir)
        snap["pid"] = os.getpid()
        snap["server_time"] = time.time()
        snap.update(self._extra())
        return snap

    def metrics_snapshot(self) -> dict[str, Any]:
        snap = live_snapshot(self.status, self.controls)
        snap["allreduce_seconds"] = self.status.allreduce_observations()
        return snap

    def authorized(self, header: str | None) -> bool:
        if not header or not header.startswith("Bearer "):
            return False
        return hmac.compare_digest(header[len("Bearer "):].strip().encode(), self._token.encode())

    def host_allowed(self, host_header: str | None) -> bool:
        if self.allow_remote:
            return True
        if not host_header:
            return False
        name = urlsplit(f"//{host_header}").hostname or ""
        return is_loopback(name)

    # ---- lifecycle -----------------------------------------------------------------
    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> None:
        handler = _make_handler(self)
        try:
            server = _Server((self.host, self.port), handler)
        except OSError as e:
            if e.errno != errno.EADDRINUSE or self.port == 0:
                raise
            logger.warning("port %d on %s is taken (another peer?); serving the API on a free port instead "
                           "(see %s)", self.port, self.host, self.workdir / API_FILE)
            server = _Server((self.host, 0), handler)
        self._server = server
        self.port = int(server.server_address[1])
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.25},
                                        name="swarmfold-api", daemon=True)
        self._thread.start()
        logger.info("dashboard and control API at %s", self.url)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]):
        if ":" in address[0]:
            self.address_family = __import__("socket").AF_INET6
        super().__init__(address, handler)


def _make_handler(api: ControlApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "swarmfold"
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
            logger.debug("api %s - " + format, self.address_string(), *args)

        def _send(self, code: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, code: int, obj: Any, headers: dict[str, str] | None = None) -> None:
            body = json.dumps(obj, allow_nan=False, default=_json_default).encode()
            self._send(code, body, "application/json", headers)

        def _guard(self) -> bool:
            if not api.host_allowed(self.headers.get("Host")):
                self._json(HTTPStatus.FORBIDDEN, {"error": "the control API answers only to 127.0.0.1/localhost"})
                return False
            return True

        def do_GET(self) -> None:  # noqa: N802 - stdlib name
            if not self._guard():
                return
            path = urlsplit(self.path).path
            if path in ("/", "/index.html"):
                self._send(HTTPStatus.OK, dashboard_html(), "text/html; charset=utf-8",
                           {"Content-Security-Policy": "default-src 'self'; style-src 'unsafe-inline'; "
                                                       "script-src 'unsafe-inline'; img-src 'self' data:"})
            elif path == "/api/status":
                self._json(HTTPStatus.OK, _finite(api.status_payload()))
            elif path == "/metrics":
                from swarmfold.daemon.metrics import render

                self._send(HTTPStatus.OK, render(api.registry), "text/plain; version=0.0.4; charset=utf-8")
            else:
                self._json(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint {path}"})

        do_HEAD = do_GET  # noqa: N815 - stdlib name

        def do_POST(self) -> None:  # noqa: N802 - stdlib name
            if not self._guard():
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(min(length, 1 << 16))
            path = urlsplit(self.path).path
            if path not in ("/api/pause", "/api/resume"):
                self._json(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint {path}"})
                return
            if not api.authorized(self.headers.get("Authorization")):
                self._json(HTTPStatus.UNAUTHORIZED,
                           {"error": f"changes need 'Authorization: Bearer <token>' with the token in "
                                     f"{api.workdir / TOKEN_FILE}"},
                           {"WWW-Authenticate": 'Bearer realm="swarmfold"'})
                return
            if path == "/api/pause":
                api.controls.pause("user", "paused by the user")
                logger.info("paused by the user (control API)")
            else:
                api.controls.resume("user")
                logger.info("user pause lifted (control API); pauses still in force: %s",
                            api.controls.pause_reasons() or "none")
            self._json(HTTPStatus.OK, {"paused": api.controls.paused,
                                       "pause_reasons": api.controls.pause_reasons()})

    return Handler


def _json_default(obj: Any) -> Any:
    if isinstance(obj, set | tuple):
        return list(obj)
    return str(obj)


def _finite(obj: Any) -> Any:
    """JSON has no NaN/Inf: send them as null."""
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def write_api_file(workdir: Path, api: ControlApi) -> Path:
    """W/api.json tells CLI commands where this peer's API is."""
    path = Path(workdir) / API_FILE
    write_json_atomic(path, {"url": api.url, "host": api.host, "port": api.port, "pid": os.getpid(),
                             "started_at": time.time()}, indent=None)
    return path


def read_api_file(workdir: Path) -> dict[str, Any] | None:
    try:
        info = json.loads((Path(workdir) / API_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return info if isinstance(info, dict) and isinstance(info.get("url"), str) else None
