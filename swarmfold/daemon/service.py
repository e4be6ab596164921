"""One peer as a service: lock the workdir, log, settings, signals, API, resource watcher, round loop.

`swarmfold run` calls `run_service(options, foreground=True)`; `swarmfold start` runs
`python -m swarmfold.daemon ARGS` detached, which calls it with foreground=False.

Signals: SIGTERM and SIGINT ask the round loop to leave the round cleanly, checkpoint and
exit 0 (a second SIGINT interrupts at once); SIGHUP re-reads the settings.

Exit codes (as the CLI's): 0 stopped cleanly, 1 runtime failure, 2 bad input (spec,
data, settings), 3 the workdir is held by another peer, 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import logging.handlers
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from swarmfold.daemon.api import (
    API_FILE,
    ControlApi,
    RemoteBindRefused,
    ensure_token,
    write_api_file,
)
from swarmfold.daemon.lifecycle import (
    LOG_DIR,
    LOG_FILE,
    WorkdirLock,
    WorkdirLocked,
    end_leftover_children,
    newest_sound_meta,
    record_children,
    write_exit_file,
)
from swarmfold.daemon.options import PeerOptions, add_peer_arguments, options_from_args
from swarmfold.daemon.resources import DutyCycle, ResourceWatcher
from swarmfold.daemon.settings import Settings, SettingsError, load_settings, reload_settings
from swarmfold.daemon.state import Controls, PeerStatus
from swarmfold.errors import LOG_FORMAT, ExitCode, UserError, setup_logging
from swarmfold.peer.checkpoint import CheckpointError
from swarmfold.peer.credit import Credit
from swarmfold.peer.data import DataError
from swarmfold.spec import SpecError

logger = logging.getLogger(__name__)

LOG_MAX_BYTES, LOG_BACKUPS = 5_000_000, 3

RunPeer = Callable[..., int]


def _default_runner() -> RunPeer:
    from swarmfold.daemon.runner import run_peer

    return run_peer


# ---- logging -------------------------------------------------------------------------
@contextmanager
def service_logging(workdir: Path, *, foreground: bool) -> Iterator[Path]:
    """The rotating log in W/logs/, and stderr only in the foreground (a detached peer's stderr
    is its stdio file, which would only duplicate the log)."""
    path = Path(workdir) / LOG_DIR / LOG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    handler = logging.handlers.RotatingFileHandler(path, maxBytes=LOG_MAX_BYTES, backupCount=LOG_BACKUPS,
                                                   encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(handler)
    removed: list[logging.Handler] = []
    if not foreground:
        removed = [h for h in root.handlers if type(h) is logging.StreamHandler]
        for h in removed:
            root.removeHandler(h)
    elif not any(type(h) is logging.StreamHandler for h in root.handlers):
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(stream)
        removed = []
    try:
        yield path
    finally:
        root.removeHandler(handler)
        handler.close()
        for h in removed:
            root.addHandler(h)


# ---- signals -------------------------------------------------------------------------
@contextmanager
def signal_handlers(*, status: PeerStatus, controls: Controls, settings: Settings, workdir: Path) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        logger.warning("not in the main thread: signals are not handled (stop through Controls)")
        yield
        return

    def on_stop(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if controls.stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        logger.info("%s: leaving the round cleanly, writing a checkpoint and exiting", name)
        controls.request_stop()
        status.set_state("stopping", f"received {name}")

    def on_hup(signum: int, frame: FrameType | None) -> None:
        reload_settings(settings, workdir)
        controls.reload.set()

    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hup)
    _ours.update({signal.SIGTERM: on_stop, signal.SIGINT: on_stop, signal.SIGHUP: on_hup})
    try:
        yield
    finally:
        _ours.clear()
        for s, h in previous.items():
            signal.signal(s, h)


# A process forked from the peer (hivemind's DHT process) must not inherit these handlers: it
# would answer SIGTERM by logging "leaving the round" and living on, instead of ending.
_ours: dict[int, Callable[[int, FrameType | None], None]] = {}


def _default_signals_in_child() -> None:
    for signum, handler in list(_ours.items()):
        with contextlib.suppress(ValueError, OSError):
            if signal.getsignal(signum) is handler:
                signal.signal(signum, signal.SIG_DFL)
    _ours.clear()


os.register_at_fork(after_in_child=_default_signals_in_child)


# ---- joining through another peer's API ---------------------------------------------
def peers_from_api(urls: Sequence[str], *, timeout: float = 180.0, stop: threading.Event | None = None) -> list[str]:
    """The multiaddrs that the peers at these control-API URLs announce, waiting for them to come up."""
    out: list[str] = []
    for url in urls:
        status_url = url.rstrip("/") + ("" if url.rstrip("/").endswith("/api/status") else "/api/status")
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(status_url, timeout=5) as r:
                    maddrs = [str(a) for a in json.loads(r.read()).get("visible_maddrs", [])]
                if maddrs:
                    out += maddrs
                    break
            except (OSError, ValueError, urllib.error.URLError) as e:
                logger.info("waiting for the peer at %s (%s)", status_url, e)
            if time.monotonic() > deadline:
                raise ConnectionError(f"no peer answered at {status_url} within {timeout:.0f} s; "
                                      "check the URL, or join with --initial-peers MULTIADDR")
            if stop is not None and stop.wait(2.0):
                return out
            if stop is None:
                time.sleep(2.0)
    return out


# ---- the service ---------------------------------------------------------------------
def apply_settings(options: PeerOptions, settings: Settings) -> None:
    """Settings fill in what the command line left open; the command line wins."""
    if not options.threads_explicit and settings.threads is not None:
        options.threads = settings.threads
    if not options.device_explicit and settings.device is not None:
        options.device = settings.device
    if options.api_port is None:
        options.api_port = settings.api_port
    if options.api_host is None:
        options.api_host = settings.api_host
    options.allow_remote_api = options.allow_remote_api or settings.allow_remote_api


def _start_api(options: PeerOptions, *, status: PeerStatus, controls: Controls,
               settings: Settings) -> ControlApi | None:
    if not options.api_port:
        logger.info("control API disabled (api_port 0)")
        return None
    api = ControlApi(status=status, controls=controls, settings=settings, workdir=options.workdir,
                     token=ensure_token(options.workdir), host=options.api_host or "127.0.0.1",
                     port=options.api_port, allow_remote=options.allow_remote_api)
    api.start()
    write_api_file(options.workdir, api)
    return api


def run_service(options: PeerOptions, *, foreground: bool, runner: RunPeer | None = None) -> int:
    """Run one peer until it is stopped or its rounds are done; returns the exit code."""
    workdir = Path(options.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    lock = WorkdirLock(workdir)
    try:
        lock.acquire()
    except WorkdirLocked as e:
        logger.error("%s", e)
        return ExitCode.LOCKED
    code: int = ExitCode.FAILURE
    status = PeerStatus()
    done = threading.Event()
    try:
        with service_logging(workdir, foreground=foreground) as log:
            logger.info("swarmfold peer starting in %s (pid %d, log %s)", workdir, os.getpid(), log)
            end_leftover_children(workdir)
            threading.Thread(target=_track_children, args=(workdir, done), name="swarmfold-children",
                             daemon=True).start()
            code = _serve(options, status=status, runner=runner or _default_runner())
    finally:
        done.set()
        with contextlib.suppress(Exception):  # what is still running now is for the next start to end
            record_children(workdir)
        snap = status.snapshot()
        (workdir / API_FILE).unlink(missing_ok=True)
        write_exit_file(workdir, code, round=snap["round"], checkpoint=snap["last_checkpoint_path"] or None)
        lock.release()
    return code


def prefill_status(status: PeerStatus, workdir: Path) -> None:
    """Show the round, model and lifetime tokens of the checkpoint the peer resumes from, from the start
    (the round loop updates them as rounds finish; tokens_total then counts on from the checkpoint's)."""
    meta = newest_sound_meta(workdir)
    if meta is None:
        return
    credit = Credit.from_meta(meta)
    status.update(round=int(meta["round"]), tokens_total=credit.trained, model_sha256=str(meta.get("model_sha256", "")),
                  **credit.view())
    status.on_checkpoint(str(meta["path"]), float(meta.get("written_at") or time.time()))


def _track_children(workdir: Path, done: threading.Event, interval: float = 2.0) -> None:
    """Keep W/daemon.children.json current, for `end_leftover_children` after a kill -9."""
    known: set[tuple[int, float]] | None = None
    while not done.is_set():
        try:
            known = record_children(workdir, known)
        except Exception as e:  # bookkeeping only: never take the peer down
            logger.debug("could not record child processes: %s", e)
        done.wait(interval)


def _serve(options: PeerOptions, *, status: PeerStatus, runner: RunPeer) -> int:
    try:
        settings = load_settings(options.workdir)
    except SettingsError as e:
        logger.error("%s", e)
        return ExitCode.BAD_INPUT
    apply_settings(options, settings)
    controls = Controls()
    prefill_status(status, options.workdir)
    api: ControlApi | None = None
    watcher = ResourceWatcher(settings=settings, controls=controls)
    with signal_handlers(status=status, controls=controls, settings=settings, workdir=options.workdir):
        try:
            api = _start_api(options, status=status, controls=controls, settings=settings)
            watcher.start()
            if options.initial_peers_from:
                options.initial_peers = [*options.initial_peers,
                                         *peers_from_api(options.initial_peers_from, stop=controls.stop)]
            if controls.stop.is_set():
                return ExitCode.OK
            logger.info("settings from %s: %s", settings.source, settings.to_dict())
            return int(runner(options, status=status, controls=controls, settings=settings,
                              step_hook=DutyCycle(settings, controls)) or 0)
        except (RemoteBindRefused, SpecError, DataError, CheckpointError, UserError, FileNotFoundError) as e:
            logger.error("%s", e)
            return ExitCode.BAD_INPUT
        except ConnectionError as e:
            logger.error("%s", e)
            return ExitCode.FAILURE
        except KeyboardInterrupt:
            logger.warning("interrupted: exiting without a final checkpoint")
            return ExitCode.INTERRUPTED
        finally:
            watcher.halt()
            if api is not None:
                api.stop()
            if status.state != "stopped":
                status.set_state("stopped", "exited")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of a detached peer: `python -m swarmfold.daemon ARGS` (what `start` runs)."""
    parser = argparse.ArgumentParser(prog="swarmfold-daemon", description="a detached swarmfold peer")
    add_peer_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging(os.environ.get("SWARMFOLD_LOG_LEVEL", "INFO"))
    return run_service(options_from_args(args), foreground=False)
