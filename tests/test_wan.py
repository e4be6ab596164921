"""A swarm over an emulated WAN: 2 real peers commit rounds at 100 ms RTT with 1% segment loss.

Every byte between the two peers crosses swarmfold.devtools.linkemu: each peer listens on a
real port and announces only the emulator's port for it (`--announce-maddrs`). The test
waits on state (the peers' exit after their rounds, then their checkpoints), not on time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import fast_spec, write_spec

from swarmfold.devtools.linkemu import LinkEmulator, LinkSpec, Node

ROUNDS = 2
# generous bounds: a round trip costs 100 ms here and a lost segment 200 ms more
WAN = {"min_group_size": 2, "group_size": 2, "matchmaking_timeout": 30.0, "join_timeout": 10.0,
       "allreduce_timeout": 60.0, "commit_timeout": 20.0, "record_ttl": 120.0}


def start(procs: list[subprocess.Popen], workdir: Path, spec: Path, shard: Path, node: Node,
          initial: list[str]) -> subprocess.Popen:
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "swarmfold", "run", "--spec", str(spec), "--data", str(shard),
           "--workdir", str(workdir), "--rounds", str(ROUNDS), "--threads", "1", "--api-port", "0",
           "--host-maddrs", node.host_maddr, "--announce-maddrs", node.announce_maddr]
    if initial:
        cmd += ["--initial-peers", *initial]
    p = subprocess.Popen(cmd, stdout=open(workdir / "peer.log", "ab"), stderr=subprocess.STDOUT,
                         start_new_session=True, env=dict(os.environ))
    procs.append(p)
    return p


def tail(workdir: Path) -> str:
    path = workdir / "peer.log"
    return "\n".join(path.read_text(errors="replace").splitlines()[-30:]) if path.exists() else "(no log)"


def wait_peer_json(workdir: Path, p: subprocess.Popen, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert p.poll() is None, f"the peer exited with {p.returncode}:\n{tail(workdir)}"
        try:
            return dict(json.loads((workdir / "peer.json").read_text()))
        except (FileNotFoundError, json.JSONDecodeError):
            time.sleep(0.2)
    raise TimeoutError(f"{workdir} never joined:\n{tail(workdir)}")


@pytest.mark.slow
def test_two_peers_commit_rounds_at_100ms_rtt_with_1pct_loss(tmp_path: Path, shards: list[Path],
                                                             procs: list[subprocess.Popen]) -> None:
    spec_path = write_spec(fast_spec(averaging=WAN), tmp_path / "spec.toml")
    emu = LinkEmulator(LinkSpec.parse("rtt=100ms,loss=1%,seed=13"))
    nodes = [emu.add_node("a"), emu.add_node("b")]
    workdirs = [tmp_path / "a", tmp_path / "b"]
    with emu:
        first = start(procs, workdirs[0], spec_path, shards[0], nodes[0], [])
        maddrs = wait_peer_json(workdirs[0], first)["maddrs"]
        assert maddrs and all(f"/tcp/{nodes[0].announce_port}/" in m for m in maddrs), \
            f"the peer must announce only the emulator's port: {maddrs}"
        start(procs, workdirs[1], spec_path, shards[1], nodes[1], maddrs[:1])
        for p, w in zip(procs, workdirs, strict=True):
            try:
                assert p.wait(timeout=600) == 0, tail(w)
            except subprocess.TimeoutExpired as e:
                raise AssertionError(f"{w} did not finish {ROUNDS} rounds:\n{tail(w)}") from e
    metas = [[json.loads((w / "checkpoints" / f"round-{r:06d}" / "meta.json").read_text()) for r in range(1, ROUNDS + 1)]
             for w in workdirs]
    for r in range(ROUNDS):
        a, b = metas[0][r], metas[1][r]
        assert a["last_round"]["status"] == "committed" == b["last_round"]["status"], (a["last_round"], b["last_round"])
        assert len(a["last_round"]["included"]) == 2
        assert a["model_sha256"] == b["model_sha256"], f"round {r}: the two peers hold different models"
    stats = emu.stats
    assert stats.unattributed_connections == 0, "every connection came from a peer's own listen port"
    lost = sum(n.segments_lost_up for n in stats.nodes.values())
    sent = [n.bytes_up for n in stats.nodes.values()]
    assert lost > 0, "the loss path was exercised"
    # each round moves half of an int8 delta each way at least; the tiny model has ~0.3M parameters
    assert min(sent) > ROUNDS * 100_000, f"the rounds' bytes crossed the emulated link: {sent}"
