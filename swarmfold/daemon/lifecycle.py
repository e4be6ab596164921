"""Background lifecycle: the workdir lock, starting detached, stopping, offline status, logs.

Files in the workdir W:
  daemon.pid        the pid of the running peer; the peer holds an flock on it while it runs,
                    so a stale file (after kill -9 or a reboot) never blocks a new start
  daemon.exit.json  how the last run ended: pid, exit code, time
  daemon.children.json  the peer's child processes (DHT, libp2p daemon), so that a start after
                    a kill -9 of the peer can end the children it left behind
  api.json          where the running peer's control API listens (written by the peer)
  control.token     the token that API changes need (mode 0600)
  logs/swarmfold.log   the rotating log (also written when running in the foreground)
  logs/daemon.out      stdout/stderr of a detached peer (tracebacks, native libraries)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from swarmfold.fsutil import write_json_atomic

logger = logging.getLogger(__name__)

PID_FILE = "daemon.pid"
EXIT_FILE = "daemon.exit.json"
LOG_DIR = "logs"
LOG_FILE = "swarmfold.log"
STDIO_FILE = "daemon.out"
CHILDREN_FILE = "daemon.children.json"

# Lock files held by this process. A forked child (hivemind's DHT process) inherits the open
# file, and with it the flock: it would keep the workdir "running" after a kill -9 of the peer.
# So every fork closes its copies at once.
_held: dict[str, IO[str]] = {}


def _close_inherited_locks() -> None:
    for f in _held.values():
        try:  # point the fd at /dev/null: drops this copy of the lock, and the file object stays closable
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, f.fileno())
            os.close(devnull)
        except OSError:
            pass
    _held.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


class WorkdirLocked(RuntimeError):
    """Another peer holds this workdir."""

    def __init__(self, workdir: Path, pid: int | None):
        self.workdir, self.pid = workdir, pid
        who = f"pid {pid}" if pid else "another process"
        super().__init__(f"a swarmfold peer ({who}) is already running in {workdir}; "
                         f"stop it with `swarmfold stop --workdir {workdir}`, or use another --workdir")


def log_path(workdir: Path) -> Path:
    return Path(workdir) / LOG_DIR / LOG_FILE


def _read_pid(f: IO[str]) -> int | None:
    f.seek(0)
    text = f.read().strip()
    return int(text) if text.isdigit() else None


class WorkdirLock:
    """An flock on W/daemon.pid, held for the life of the peer; the file holds the pid."""

    def __init__(self, workdir: Path):
        self.path = Path(workdir) / PID_FILE
        self._file: IO[str] | None = None

    def acquire(self, *, attempts: int = 5) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held open for the peer's lifetime
        for i in range(attempts):  # a `status` probe may hold it for a moment
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if i == attempts - 1:
                    pid = _read_pid(f)
                    f.close()
                    raise WorkdirLocked(self.path.parent, pid) from None
                time.sleep(0.1)
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        os.fsync(f.fileno())
        self._file = f
        _held[str(self.path.resolve())] = f

    def release(self) -> None:
        if self._file is not None:
            _held.pop(str(self.path.resolve()), None)
            self._file.seek(0)
            self._file.truncate()
            self._file.close()  # closing drops the flock
            self._file = None


def running_pid(workdir: Path) -> int | None:
    """The pid of the peer holding `workdir`, or None when none does (whatever the pid file says)."""
    path = Path(workdir) / PID_FILE
    try:
        f = open(path, encoding="utf-8")  # noqa: SIM115
    except FileNotFoundError:
        return None
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(f) or -1
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        return None


def write_exit_file(workdir: Path, code: int, **extra: Any) -> None:
    path = Path(workdir) / EXIT_FILE
    write_json_atomic(path, {"pid": os.getpid(), "code": code, "time": time.time(), **extra}, indent=None)


def read_exit_file(workdir: Path) -> dict[str, Any] | None:
    try:
        info = json.loads((Path(workdir) / EXIT_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return info if isinstance(info, dict) else None


# ---- children left behind ---------------------------------------------------------------
def record_children(workdir: Path, known: set[tuple[int, float]] | None = None) -> set[tuple[int, float]]:
    """Write this process's descendants (pid, start time) to W/daemon.children.json if they changed."""
    import psutil

    found: set[tuple[int, float]] = set()
    for child in psutil.Process().children(recursive=True):
        try:
            found.add((child.pid, child.create_time()))
        except psutil.Error:
            continue
    if found != known:
        path = Path(workdir) / CHILDREN_FILE
        write_json_atomic(path, {"parent": os.getpid(), "children": sorted(found)}, indent=None)
    return found


def end_leftover_children(workdir: Path, *, grace: float = 3.0) -> list[int]:
    """End the processes a previous peer in `workdir` left running (its DHT, its libp2p daemon)
    when it was killed with SIGKILL. Only processes whose pid *and* start time match are touched."""
    import psutil

    path = Path(workdir) / CHILDREN_FILE
    try:
        entries = json.loads(path.read_text(encoding="utf-8")).get("children", [])
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return []
    leftovers = []
    for pid, started in entries:
        try:
            proc = psutil.Process(int(pid))
            if (pid != os.getpid() and abs(proc.create_time() - float(started)) < 1e-3
                    and proc.status() != psutil.STATUS_ZOMBIE):  # a zombie is dead already
                leftovers.append(proc)
        except (psutil.Error, TypeError, ValueError):
            continue
    for proc in leftovers:
        logger.warning("ending pid %d (%s), left running by the previous peer in %s", proc.pid,
                       _describe(proc), workdir)
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(leftovers, timeout=grace)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=grace)
    path.unlink(missing_ok=True)
    return [p.pid for p in leftovers]


def _describe(proc: Any) -> str:
    import psutil

    try:
        return " ".join(proc.cmdline()[:3])
    except psutil.Error:
        return "?"


# ---- start ---------------------------------------------------------------------------
@dataclass
class Started:
    pid: int
    api: dict[str, Any] | None  # the peer's api.json (None when the API is disabled)
    status: dict[str, Any] | None  # its /api/status once it joined the swarm


class StartFailed(RuntimeError):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def start_detached(service_argv: Sequence[str], workdir: Path, *, api_enabled: bool,
                   ready_timeout: float = 120.0) -> Started:
    """Start `python -m swarmfold.daemon ARGV` in its own session and wait until it holds the lock and,
    with its API, has joined the swarm. WorkdirLocked if a peer already runs there; StartFailed if it
    exits first (with its exit code) or is not ready in time."""
    from swarmfold.daemon.api import API_FILE, read_api_file

    workdir = Path(workdir)
    pid = running_pid(workdir)
    if pid is not None:
        raise WorkdirLocked(workdir, pid)
    (workdir / LOG_DIR).mkdir(parents=True, exist_ok=True)
    for stale in (API_FILE, EXIT_FILE):
        (workdir / stale).unlink(missing_ok=True)
    stdio = workdir / LOG_DIR / STDIO_FILE
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(stdio, "ab") as out:
        out.write(f"\n==== swarmfold start {time.strftime('%Y-%m-%d %H:%M:%S')} ====\n".encode())
        out.flush()
        proc = subprocess.Popen([sys.executable, "-m", "swarmfold.daemon", *service_argv],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True, env=env, cwd=workdir)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            log = workdir / LOG_DIR / LOG_FILE
            raise StartFailed(f"the peer exited with code {code} while starting; last lines of {log}:\n"
                              + "\n".join(tail_lines(log, 8) + tail_lines(stdio, 8)), code)
        if running_pid(workdir) == proc.pid:
            api = read_api_file(workdir)
            if not api_enabled:
                return Started(pid=proc.pid, api=None, status=None)
            if api is not None and api.get("pid") == proc.pid:
                status = _joined(api["url"])
                if status is not None:
                    return Started(pid=proc.pid, api=api, status=status)
        time.sleep(0.3)
    raise StartFailed(f"the peer (pid {proc.pid}) did not get ready within {ready_timeout:.0f} s; it is still "
                      f"running: see `swarmfold logs --workdir {workdir}` or stop it with `swarmfold stop`", 1)


def _joined(url: str) -> dict[str, Any] | None:
    """The peer's status once it has joined the swarm (it knows its addresses), else None."""
    import urllib.request

    try:
        with urllib.request.urlopen(url.rstrip("/") + "/api/status", timeout=5) as r:
            snap = json.loads(r.read())
    except (OSError, ValueError):
        return None
    return dict(snap) if snap.get("visible_maddrs") or snap.get("state") not in ("starting",) else None


# ---- stop ----------------------------------------------------------------------------
def stop_daemon(workdir: Path, *, timeout: float, force: bool = False) -> tuple[str, int]:
    """SIGTERM the peer and wait for it to leave the round, checkpoint and exit.

    Returns (what happened, exit code for the CLI): 0 stopped cleanly or was not running,
    1 it exited with an error or did not exit in time (then SIGKILLed if `force`)."""
    pid = running_pid(workdir)
    if pid is None:
        return f"no peer is running in {workdir}", 0
    if pid <= 0:
        return f"{workdir / PID_FILE} is locked but holds no pid; find the process with `fuser`", 1
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if running_pid(workdir) is None:
            _wait_gone(pid, max(1.0, deadline - time.monotonic()))
            info = read_exit_file(workdir) or {}
            if info.get("pid") == pid and info.get("code") == 0:
                ckpt = info.get("checkpoint") or "no checkpoint"
                return f"stopped peer (pid {pid}) cleanly; last checkpoint: {ckpt}", 0
            return f"peer (pid {pid}) exited with code {info.get('code', 'unknown')}; see swarmfold logs", 1
        time.sleep(0.2)
    if force:
        os.kill(pid, signal.SIGKILL)
        return (f"peer (pid {pid}) did not exit within {timeout:.0f} s; killed it (SIGKILL). The next start "
                "resumes from the newest valid checkpoint"), 1
    return (f"peer (pid {pid}) is still running after {timeout:.0f} s (it may be finishing a round); wait, "
            f"or run `swarmfold stop --force --workdir {workdir}`"), 1


def _wait_gone(pid: int, timeout: float) -> None:
    """After the lock is released the process is tearing down; wait until it is gone (or a zombie)."""
    import psutil

    deadline = time.monotonic() + min(timeout, 30.0)
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.1)


# ---- offline status ------------------------------------------------------------------
def newest_checkpoint(workdir: Path) -> dict[str, Any] | None:
    """Round, path and time of the newest checkpoint on disk (not verified; for display only)."""
    from swarmfold.peer.checkpoint import list_checkpoints

    for path in list_checkpoints(workdir):
        try:
            meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
            when = float(meta.get("written_at") or (path / "meta.json").stat().st_mtime)
        except (OSError, ValueError, json.JSONDecodeError):
            continue
        return {"round": int(meta.get("round", int(path.name[6:]))), "path": str(path), "time": when}
    return None


def newest_sound_meta(workdir: Path) -> dict[str, Any] | None:
    """meta.json of the newest checkpoint whose files match their hashes: the one a restart resumes from."""
    from swarmfold.peer.checkpoint import file_sha256, list_checkpoints

    for path in list_checkpoints(workdir):
        try:
            meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
            files = meta["files"]
            if isinstance(files, dict) and all(file_sha256(path / n) == h for n, h in files.items()):
                return dict(meta, path=str(path))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


# ---- logs ----------------------------------------------------------------------------
def tail_lines(path: Path, n: int) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max(4096, n * 400)))
            data = f.read()
    except FileNotFoundError:
        return []
    return data.decode("utf-8", errors="replace").splitlines()[-n:] if n > 0 else []


def follow(path: Path, *, poll: float = 0.5, stop: Any = None) -> Iterator[str]:
    """Yield lines appended to `path`, across rotations (the file replaced or truncated)."""
    f: IO[bytes] | None = None
    inode = None
    while stop is None or not stop():
        if f is None:
            try:
                f = open(path, "rb")  # noqa: SIM115
                inode = os.fstat(f.fileno()).st_ino
                f.seek(0, os.SEEK_END)
            except FileNotFoundError:
                time.sleep(poll)
                continue
        line = f.readline()
        if line:
            yield line.decode("utf-8", errors="replace").rstrip("\n")
            continue
        try:
            st = os.stat(path)
            rotated = st.st_ino != inode or st.st_size < f.tell()
        except FileNotFoundError:
            rotated = True
        if rotated:
            rest = f.read()
            if rest:
                yield from rest.decode("utf-8", errors="replace").splitlines()
            f.close()
            f = None
            try:
                f = open(path, "rb")  # noqa: SIM115 - a new file: read it from its start
                inode = os.fstat(f.fileno()).st_ino
            except FileNotFoundError:
                f = None
            continue
        time.sleep(poll)
    if f is not None:
        f.close()
