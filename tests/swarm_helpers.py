"""Starting real peers for multi-process tests: `python -m swarmfold run` on 127.0.0.1."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
TESTS = Path(__file__).resolve().parent


def peer_script(module: str) -> list[str]:
    """The command of a test peer in tests/peers/ (a Swarm subclass behind `swarmfold run`'s arguments);
    start_peer puts tests/ on its PYTHONPATH."""
    return [sys.executable, "-m", f"peers.{module}"]


def start_peer(procs: list[subprocess.Popen], workdir: Path, spec: Path, shard: Path | None, *, rounds: int,
               initial: list[str] | None = None, env: dict[str, str] | None = None,
               script: list[str] | None = None, extra: list[str] | None = None) -> subprocess.Popen:
    """Start one peer in its own process group (so a test can SIGKILL it whole); log in workdir/peer.log.
    With `shard` None the peer gets no --data (a verifying swarm's peer then fetches the public data)."""
    workdir.mkdir(parents=True, exist_ok=True)
    base = script or [sys.executable, "-m", "swarmfold"]
    data = ["--data", str(shard)] if shard is not None else []
    cmd = [*base, "run", "--spec", str(spec), *data, "--workdir", str(workdir),
           "--host-maddrs", LOOPBACK, "--rounds", str(rounds), "--threads", "1", "--keep", "100",
           "--api-port", "0", *(extra or [])]
    if initial:
        cmd += ["--initial-peers", *initial]
    log = open(workdir / "peer.log", "ab")
    path = {"PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))} if script else {}
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                         env={**os.environ, **path, **(env or {})})
    procs.append(p)
    return p


def wait_ready(workdir: Path, timeout: float = 120) -> dict:
    """peer.json, written once the peer has joined the DHT."""
    path = workdir / "peer.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            try:
                return json.loads(path.read_text())
            except json.JSONDecodeError:
                pass
        time.sleep(0.2)
    raise TimeoutError(f"{workdir} did not become ready; log:\n{log_tail(workdir)}")


def wait_exit(p: subprocess.Popen, workdir: Path, timeout: float = 300) -> int:
    try:
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise TimeoutError(f"peer in {workdir} did not finish; log:\n{log_tail(workdir)}") from e


def log_tail(workdir: Path, lines: int = 40) -> str:
    path = workdir / "peer.log"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"


def model_hashes(workdir: Path) -> dict[int, str]:
    """round -> sha256 of that checkpoint's model.safetensors."""
    out = {}
    for d in sorted((workdir / "checkpoints").glob("round-*")):
        f = d / "model.safetensors"
        if f.exists() and (d / "meta.json").exists():
            out[int(d.name[6:])] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def last_rounds(workdir: Path) -> dict[int, dict]:
    """round -> meta.json's `last_round` (what happened in the round that produced it)."""
    out = {}
    for d in sorted((workdir / "checkpoints").glob("round-*")):
        if (d / "meta.json").exists():
            out[int(d.name[6:])] = json.loads((d / "meta.json").read_text()).get("last_round", {})
    return out


def provenances(workdir: Path) -> dict[int, dict]:
    """round -> meta.json's `provenance` (where that checkpoint's θ came from)."""
    out = {}
    for d in sorted((workdir / "checkpoints").glob("round-*")):
        if (d / "meta.json").exists():
            out[int(d.name[6:])] = json.loads((d / "meta.json").read_text()).get("provenance", {})
    return out


@contextlib.contextmanager
def connected_swarms(spec: Any, keys: Path, names: Sequence[str]) -> Iterator[list[Any]]:
    """Real in-process `Swarm`s on 127.0.0.1 (identity keys `keys/<name>.key`), each joined through the
    first; all shut down, last first, however the block ends."""
    from swarmfold.averaging.identity import load_or_create_identity
    from swarmfold.averaging.swarm import Swarm

    swarms: list[Swarm] = []
    try:
        for name in names:
            s = Swarm(spec, load_or_create_identity(keys / f"{name}.key"),
                      initial_peers=swarms[0].maddrs if swarms else None)
            s.start()
            swarms.append(s)
        yield swarms
    finally:
        for s in reversed(swarms):
            s.shutdown()
