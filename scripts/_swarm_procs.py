"""Real `swarmfold run` peers as child processes, for the swarm benchmarks (bench_round, bench_scale)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

LOOPBACK = "/ip4/127.0.0.1/tcp/0"


def start_peer(workdir: Path, spec_path: Path, shard: Path, rounds: int, initial: list[str], *, keep: int,
               netns: str | None = None, host: str = LOOPBACK) -> subprocess.Popen:
    """One peer with one thread and no control API, in its own session (killed whole by kill_all);
    its output goes to workdir/peer.log. `netns`: run it inside that network namespace."""
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "swarmfold", "run", "--spec", str(spec_path), "--data", str(shard),
           "--workdir", str(workdir), "--host-maddrs", host, "--rounds", str(rounds), "--threads", "1",
           "--keep", str(keep), "--api-port", "0"]
    if initial:
        cmd += ["--initial-peers", *initial]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    log = open(workdir / "peer.log", "ab")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)


def log_tail(workdir: Path, lines: int = 30) -> str:
    p = workdir / "peer.log"
    return "\n".join(p.read_text(errors="replace").splitlines()[-lines:]) if p.exists() else "(no log)"


def wait_ready(workdir: Path, proc: subprocess.Popen, timeout: float) -> dict[str, Any]:
    """The peer's peer.json (its id and addresses) once it has joined; raises if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"peer in {workdir} exited with {proc.returncode}:\n{log_tail(workdir)}")
        try:
            return dict(json.loads((workdir / "peer.json").read_text()))
        except (FileNotFoundError, json.JSONDecodeError):
            time.sleep(0.2)
    raise TimeoutError(f"peer in {workdir} did not join within {timeout:.0f}s:\n{log_tail(workdir)}")


def kill_all(procs: list[subprocess.Popen]) -> None:
    """SIGKILL every peer's whole session (its DHT child and libp2p daemon too) and reap them."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                p.kill()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
