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
               netns: str | None = None, host: str = LOOPBACK, announce: str | None = None,
               extra: list[str] | None = None) -> subprocess.Popen:
    """One peer with one thread and no control API, in its own session (killed whole by kill_all);
    its output goes to workdir/peer.log. `netns`: run it inside that network namespace;
    `announce`: the address it announces (an EmulatedLink's port for it); `extra`: more `run` arguments."""
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "swarmfold", "run", "--spec", str(spec_path), "--data", str(shard),
           "--workdir", str(workdir), "--host-maddrs", host, "--rounds", str(rounds), "--threads", "1",
           "--keep", str(keep), "--api-port", "0"]
    if initial:
        cmd += ["--initial-peers", *initial]
    if announce:
        cmd += ["--announce-maddrs", announce]
    cmd += extra or []
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


class EmulatedLink:
    """`swarmfold.devtools.linkemu` as a child process: one emulated access link per peer.

    `ports[i]` holds peer i's `host_maddr` (where it listens) and `announce_maddr` (the
    emulator's port for it, which it announces), so that every connection between peers
    crosses the link. With `data`, each peer also has its own address 127.0.1.(i+1) and the ports of
    its direct streams (`data_port`, where it listens; `announce_data`, the emulator's port for them).
    `stop()` ends it and returns its counters (bytes per peer, connections) with the CPU seconds it used."""

    def __init__(self, link: str, peers: int, root: Path, *, timeout: float = 30.0, data: bool = False):
        root.mkdir(parents=True, exist_ok=True)
        self.ports_path, self.stats_path = root / "link-ports.json", root / "link-stats.json"
        self.log = root / "linkemu.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "swarmfold.devtools.linkemu", "--link", link, "--peers", str(peers),
             "--ports", str(self.ports_path), "--stats", str(self.stats_path), *(["--data"] if data else [])],
            stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self.ports_path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"the link emulator did not start ({link!r}):\n{self.log.read_text()}")
            time.sleep(0.05)
        self.ports: list[dict[str, str]] = json.loads(self.ports_path.read_text())

    def stop(self) -> dict[str, Any]:
        cpu = float("nan")
        try:
            import psutil

            t = psutil.Process(self.proc.pid).cpu_times()
            cpu = t.user + t.system
        except Exception:  # psutil missing or the process gone: the CPU figure is just absent
            pass
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        stats: dict[str, Any] = json.loads(self.stats_path.read_text()) if self.stats_path.exists() else {}
        stats["emulator_cpu_seconds"] = round(cpu, 2)
        return stats
