"""Background peers for tests: `swarmfold start/stop/...` as a user runs them, and cleanup.

`swarmfold start` detaches the peer (its own session), so it is not a child of the test:
the `daemons` fixture finds each one through its workdir's lock and kills its process
group, then ends anything it left behind (hivemind's DHT process, the libp2p daemon).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from swarmfold.daemon.api import read_api_file
from swarmfold.daemon.lifecycle import end_leftover_children, running_pid
from swarmfold.daemon.state import PeerStatus, RoundRecord

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
# short network timeouts, so a lonely peer steps alone quickly and a dead one is noticed fast
NET = {"matchmaking_timeout": 3.0, "join_timeout": 2.0, "allreduce_timeout": 5.0, "commit_timeout": 3.0}


def swarmfold(*args: str, timeout: float = 240.0, check: bool = False) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([sys.executable, "-m", "swarmfold", *args], capture_output=True, text=True,
                       timeout=timeout, env=dict(os.environ))
    if check and p.returncode != 0:
        raise AssertionError(f"swarmfold {' '.join(args)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


def start(workdir: Path, spec: Path, shard: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return swarmfold("start", "--spec", str(spec), "--data", str(shard), "--workdir", str(workdir),
                     "--threads", "1", "--host-maddrs", LOOPBACK, "--keep", "10", *extra)


def api_status(workdir: Path) -> dict[str, Any] | None:
    info = read_api_file(workdir)
    if info is None:
        return None
    try:
        with urllib.request.urlopen(info["url"] + "api/status", timeout=5) as r:
            return dict(json.loads(r.read()))
    except OSError:
        return None


def log_tail(workdir: Path, lines: int = 40) -> str:
    out = []
    for name in ("logs/swarmfold.log", "logs/daemon.out"):
        path = workdir / name
        if path.exists():
            out.append(f"--- {path}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
    return "\n".join(out) or "(no log)"


def wait_status(workdir: Path, what: str, pred: Callable[[dict[str, Any]], bool], timeout: float = 180.0,
                also: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Poll `workdir`'s status until `pred` holds; on a timeout, fail with its log and those of `also`."""
    deadline = time.monotonic() + timeout
    last: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        snap = api_status(workdir)
        if snap is not None:
            last = snap
            if pred(snap):
                return snap
        time.sleep(0.5)
    brief = {k: (last or {}).get(k) for k in ("state", "reason", "round", "rounds", "peers_seen", "loss")}
    logs = "\n".join(log_tail(w) for w in (workdir, *also))
    raise AssertionError(f"{workdir}: timed out waiting for {what}; last status {brief}\n{logs}")


def finished_rounds(snap: dict[str, Any]) -> int:
    return sum(snap.get("rounds", {}).values())


def kill_daemon(workdir: Path) -> None:
    pid = running_pid(workdir)
    if pid and pid > 0:
        try:
            os.killpg(pid, signal.SIGKILL)  # `start` made the peer a session (and group) leader
        except (ProcessLookupError, PermissionError):
            pass
        deadline = time.monotonic() + 10
        while running_pid(workdir) is not None and time.monotonic() < deadline:
            time.sleep(0.1)
    end_leftover_children(workdir, grace=1.0)


def fed_status(peer_id: str = "12D3KooWself") -> PeerStatus:
    """A PeerStatus after two rounds, one rejection and a two-peer swarm view."""
    st = PeerStatus(peer_id=peer_id, swarm_id="abc123", spec_hash="f" * 64, device="cpu", precision="bf16")
    for r, (loss, status) in enumerate([(4.5, "committed"), (4.1, "rolled_back")]):
        st.on_round(RoundRecord(round=r, status=status, train_loss=loss, tokens=1000, tokens_per_second=500.0,
                                group_size=2, model_sha256=f"h{r}", finished_at=time.time(),
                                timings={"train": 2.0, "matchmaking": 0.5, "allreduce": 0.3, "commit": 0.1}),
                    bytes_sent=1234, bytes_received=2345, rejected={"12D3KooWbad": "nonfinite: NaN in span 0"},
                    allreduce_seconds=0.3)
    st.update(tokens_counted=1000, tokens_pending=1000, tokens_wasted=0)  # round 0 confirmed, round 1 carried
    st.on_checkpoint("/w/checkpoints/round-000002", time.time() - 5)
    st.set_swarm({
        peer_id: {"round": 2, "model_sha256": "h1", "metrics": {"loss": 4.1, "tokens_total": 2000,
                                                               "tokens_per_second": 500.0}, "time": time.time()},
        "12D3KooWother": {"round": 2, "model_sha256": "h1", "metrics": {"loss": 4.3, "tokens_total": 6000,
                                                                       "tokens_counted": 3000, "tokens_wasted": 2500,
                                                                       "tokens_per_second": 1500.0},
                          "time": time.time()},
    })
    return st


@pytest.fixture
def daemons() -> Iterator[list[Path]]:
    """Workdirs of background peers a test starts; every one is killed afterwards."""
    workdirs: list[Path] = []
    yield workdirs
    for w in workdirs:
        kill_daemon(w)
