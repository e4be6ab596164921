"""The swarm with real peers: separate processes, real hivemind DHTs on 127.0.0.1, real SIGKILL.

Bitwise claims are checked with sha256 of model.safetensors against `simulate`, the
in-process reference that runs the same round code.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import fast_spec, write_spec
from swarm_helpers import last_rounds, log_tail, model_hashes, start_peer, wait_exit, wait_ready

from swarmfold.averaging.identity import load_or_create_identity
from swarmfold.peer.simulate import simulate

pytestmark = pytest.mark.slow

NET = {"matchmaking_timeout": 5.0, "join_timeout": 4.0, "allreduce_timeout": 5.0, "commit_timeout": 4.0,
       "state_sync_timeout": 30.0}


def _ids(workdirs: list[Path]) -> list[str]:
    return [load_or_create_identity(w / "identity.key").peer_id for w in workdirs]


def _start_swarm(procs: list[subprocess.Popen], tmp: Path, spec: Path, shards: list[Path], rounds: int,
                 env_of: dict[int, dict[str, str]] | None = None) -> list[Path]:
    workdirs = [tmp / f"peer-{i}" for i in range(len(shards))]
    start_peer(procs, workdirs[0], spec, shards[0], rounds=rounds, env=(env_of or {}).get(0))
    first = wait_ready(workdirs[0])["maddrs"][:1]
    for i in range(1, len(shards)):
        start_peer(procs, workdirs[i], spec, shards[i], rounds=rounds, initial=first, env=(env_of or {}).get(i))
    return workdirs


def test_swarm_equals_simulation(tmp_path: Path, shards: list[Path], procs: list[subprocess.Popen]) -> None:
    spec = fast_spec(averaging={**NET, "min_group_size": 3})
    spec_path = write_spec(spec, tmp_path / "spec.toml")
    rounds = 3
    workdirs = _start_swarm(procs, tmp_path, spec_path, shards[:3], rounds)
    for p, w in zip(procs, workdirs, strict=True):
        assert wait_exit(p, w) == 0, log_tail(w)
    ids = _ids(workdirs)
    simulate(spec, [[s] for s in shards[:3]], rounds=rounds, threads=1, out=tmp_path / "sim", peer_ids=ids)
    sim = model_hashes(tmp_path / "sim" / "peer-0")
    for w in workdirs:
        got = model_hashes(w)
        assert all(got[r] == sim[r] for r in range(1, rounds + 1)), (w, got, sim)
        assert all(v["status"] == "committed" and len(v["included"]) == 3
                   for r, v in last_rounds(w).items() if r >= 1)


@pytest.mark.parametrize("phase", ["matchmaking", "send", "reduce", "commit"])
def test_kill_in_every_phase(phase: str, tmp_path: Path, shards: list[Path], procs: list[subprocess.Popen]) -> None:
    spec = fast_spec(averaging={**NET, "min_group_size": 2})
    spec_path = write_spec(spec, tmp_path / "spec.toml")
    rounds, kill_round, victim = 20, 3, 2
    workdirs = _start_swarm(procs, tmp_path, spec_path, shards[:3], rounds,
                            env_of={victim: {"SWARMFOLD_TEST_FAULT": f"{phase}@{kill_round}"}})
    # the victim SIGKILLs its own process group at that point of its first round >= kill_round
    assert wait_exit(procs[victim], workdirs[victim], timeout=180) == -9, log_tail(workdirs[victim])
    assert f"fault injection: SIGKILL in phase {phase}" in log_tail(workdirs[victim])
    # it restarts from its last checkpoint and must rejoin through state sync
    restarted = start_peer(procs, workdirs[victim], spec_path, shards[victim], rounds=rounds,
                           initial=[wait_ready(w)["maddrs"][0] for i, w in enumerate(workdirs) if i != victim])
    survivors = [w for i, w in enumerate(workdirs) if i != victim]
    for i, w in enumerate(workdirs):
        if i != victim:
            assert wait_exit(procs[i], w) == 0, log_tail(w)
    assert wait_exit(restarted, workdirs[victim]) == 0, log_tail(workdirs[victim])

    a, b = (model_hashes(w) for w in survivors)
    ia, ib = (last_rounds(w) for w in survivors)
    assert max(a) == max(b) == rounds, "the round counter moves on"
    # the round the victim died in: both survivors redid it without the victim (or both rolled back)
    died = min(r for r in range(kill_round + 1, rounds + 1)
               if ia[r]["status"] != "committed" or len(ia[r]["included"]) < 3)
    assert ia[died]["status"] == ib[died]["status"] and a[died] == b[died], (ia[died], ib[died])
    assert ia[died]["status"] == "rolled_back" or sorted(ia[died]["included"]) == sorted(_ids(survivors))
    # no mixed state, ever: members of the same committed group hold the same bits
    for r in range(1, rounds + 1):
        if ia[r]["status"] == "committed" and ia[r]["group_id"] == ib[r]["group_id"]:
            assert a[r] == b[r], f"round {r}: same group, different weights"
        # the killed peer rejoined: synced, then averaged with the survivors within 2 rounds
    log = (workdirs[victim] / "peer.log").read_text()
    assert "synced to round" in log, log_tail(workdirs[victim])
    victim_hashes = model_hashes(workdirs[victim])
    victim_info = last_rounds(workdirs[victim])
    joined = [r for r, info in victim_info.items() if info.get("status") == "committed" and len(info["included"]) == 3
              and r > kill_round + 1]
    assert joined, victim_info
    sync_round = min(r for r in victim_hashes if r > kill_round and victim_hashes[r] == a.get(r))
    assert min(joined) <= sync_round + 2
    assert victim_hashes[rounds] == a[rounds]


def test_mismatched_spec_is_refused(tmp_path: Path, shards: list[Path], procs: list[subprocess.Popen]) -> None:
    good = write_spec(fast_spec(averaging=NET), tmp_path / "good.toml")
    other = write_spec(fast_spec(averaging=NET, inner={"lr": 1e-3}), tmp_path / "other.toml")
    host = start_peer(procs, tmp_path / "host", good, shards[0], rounds=50)
    maddr = wait_ready(tmp_path / "host")["maddrs"][:1]
    joiner = start_peer(procs, tmp_path / "joiner", other, shards[1], rounds=1, initial=maddr)
    assert wait_exit(joiner, tmp_path / "joiner", timeout=120) == 2
    joiner_log = (tmp_path / "joiner" / "peer.log").read_text()
    assert "refused by" in joiner_log and "same spec file" in joiner_log
    host_log = (tmp_path / "host" / "peer.log").read_text()
    assert "refused peer" in host_log and "spec hash" in host_log
    host.kill()


def test_hostile_contributions_are_rejected(tmp_path: Path, shards: list[Path],
                                            procs: list[subprocess.Popen]) -> None:
    """A peer sending every kind of bad contribution is left out with a named error each time,
    and the honest peers' weights stay bit-identical to a swarm without it."""
    from peers.hostile_peer import FAULTS

    spec = fast_spec(averaging={**NET, "min_group_size": 2, "group_size": 3, "max_message_bytes": 2 * 2**20})
    spec_path = write_spec(spec, tmp_path / "spec.toml")
    rounds = 16
    honest = [tmp_path / "honest-0", tmp_path / "honest-1"]
    start_peer(procs, honest[0], spec_path, shards[0], rounds=rounds)
    first = wait_ready(honest[0])["maddrs"][:1]
    start_peer(procs, honest[1], spec_path, shards[1], rounds=rounds, initial=first)
    hostile_dir = tmp_path / "hostile"
    hostile = start_peer(procs, hostile_dir, spec_path, shards[2], rounds=rounds, initial=first,
                         script=[sys.executable, str(Path(__file__).parent / "peers" / "hostile_peer.py")])
    for p, w in zip(procs[:2], honest, strict=True):
        assert wait_exit(p, w, timeout=400) == 0, log_tail(w)
    hostile.kill()
    bad_id = load_or_create_identity(hostile_dir / "identity.key").peer_id
    logs = [(w / "peer.log").read_text() for w in honest]
    for fault in FAULTS:
        assert f"hostile: sending {fault.name}" in (hostile_dir / "peer.log").read_text(), \
            f"the hostile peer never got to send {fault.name}; log:\n{log_tail(hostile_dir)}"
        assert any(f"rejected the contribution of {bad_id[-8:]}: {fault.label}" in log for log in logs), fault
    ids = _ids(honest)
    simulate(spec, [[shards[0]], [shards[1]]], rounds=rounds, threads=1, out=tmp_path / "sim", peer_ids=ids)
    sim = model_hashes(tmp_path / "sim" / "peer-0")
    for w in honest:
        got = model_hashes(w)
        assert {r: got[r] for r in range(1, rounds + 1)} == {r: sim[r] for r in range(1, rounds + 1)}
        assert all(bad_id not in info.get("included", []) for info in last_rounds(w).values())
