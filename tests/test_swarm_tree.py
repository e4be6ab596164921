"""The tree with real peers (N > G): five processes with G = 3 form two groups a round, whose
delegates join them into one model; every peer equals `simulate` bit for bit."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import fast_spec, write_spec
from swarm_helpers import (
    last_rounds,
    log_tail,
    model_hashes,
    peer_script,
    start_peer,
    wait_exit,
    wait_ready,
)

from swarmfold.averaging.base import partition_groups
from swarmfold.averaging.identity import load_or_create_identity
from swarmfold.peer.simulate import simulate

pytestmark = pytest.mark.slow

NET = {"matchmaking_timeout": 20.0, "join_timeout": 8.0, "allreduce_timeout": 5.0, "commit_timeout": 4.0}
N = 5


def test_five_peers_in_groups_of_three_commit_one_model_equal_to_simulate(
        tmp_path: Path, shards: list[Path], procs: list[subprocess.Popen]) -> None:
    spec = fast_spec(averaging={**NET, "group_size": 3})
    spec_path = write_spec(spec, tmp_path / "spec.toml")
    rounds = 2
    data = [shards[i % len(shards)] for i in range(N)]
    workdirs = [tmp_path / f"peer-{i}" for i in range(N)]
    env = {"SWARMFOLD_TEST_PEERS": str(N)}  # every peer in round 0's matchmaking (tests/peers/patient_peer.py)
    script = peer_script("patient_peer")
    start_peer(procs, workdirs[0], spec_path, data[0], rounds=rounds, env=env, script=script)
    first = wait_ready(workdirs[0])["maddrs"][:1]
    for i in range(1, N):
        start_peer(procs, workdirs[i], spec_path, data[i], rounds=rounds, initial=first, env=env, script=script)
    for p, w in zip(procs, workdirs, strict=True):
        assert wait_exit(p, w) == 0, log_tail(w)
    ids = [load_or_create_identity(w / "identity.key").peer_id for w in workdirs]
    groups = partition_groups(ids, 3)
    assert [len(g) for g in groups] == [2, 3]
    simulate(spec, [[d] for d in data], rounds=rounds, threads=1, out=tmp_path / "sim", peer_ids=ids,
             keep_checkpoints=1000)
    sim = model_hashes(tmp_path / "sim" / "peer-0")
    for w, pid in zip(workdirs, ids, strict=True):
        got = model_hashes(w)
        assert all(got[r] == sim[r] for r in range(1, rounds + 1)), (w, got, sim, log_tail(w))
        mine = next(g for g in groups if pid in g)
        for r, v in last_rounds(w).items():
            if r < 1:
                continue
            assert v["status"] == "committed" and sorted(v["included"]) == mine and v["digest"], (w, r, v)
            (level,) = v["tree"]  # one level above the groups: their two delegates
            assert level["level"] == 2 and level["included"] == sorted(g[0] for g in groups), (w, r, v)
            assert level["weights"][mine[0]] == sum(v["weights"].values())


def test_a_member_killed_in_the_bigger_group_leaves_every_survivor_on_one_model(
        tmp_path: Path, shards: list[Path], procs: list[subprocess.Popen]) -> None:
    """The group of three loses a member mid-send in round 1: it redoes its attempt among the two
    survivors, whose retry still carries the round's delegates, so its delegate joins the level above
    and all four survivors commit one model (tests/peers/patient_peer.py is also a crashing peer)."""
    spec = fast_spec(averaging={**NET, "group_size": 3})
    spec_path = write_spec(spec, tmp_path / "spec.toml")
    rounds = 2
    data = [shards[i % len(shards)] for i in range(N)]
    workdirs = [tmp_path / f"peer-{i}" for i in range(N)]
    ids = [load_or_create_identity(w / "identity.key").peer_id for w in workdirs]  # known before they start
    victim = ids.index(max(ids))  # in the group of three (the largest ids), not its delegate
    script = peer_script("patient_peer")
    for i in range(N):
        env = {"SWARMFOLD_TEST_PEERS": str(N), **({"SWARMFOLD_TEST_FAULT": "send@1"} if i == victim else {})}
        initial = None if i == 0 else wait_ready(workdirs[0])["maddrs"][:1]
        start_peer(procs, workdirs[i], spec_path, data[i], rounds=rounds, env=env, script=script, initial=initial)
    survivors = [i for i in range(N) if i != victim]
    for i in survivors:
        assert wait_exit(procs[i], workdirs[i]) == 0, log_tail(workdirs[i])
    procs[victim].wait(timeout=30)
    after = {i: model_hashes(workdirs[i]) for i in survivors}
    for r in (1, 2):
        assert len({after[i][r] for i in survivors}) == 1, (r, after, [log_tail(workdirs[i]) for i in survivors])
    big = sorted(ids)[2:]
    for i in survivors:
        v = last_rounds(workdirs[i])[2]
        assert v["status"] == "committed" and len(v["tree"]) == 1, (i, v)
        if ids[i] in big:
            assert sorted(v["included"]) == sorted(set(big) - {ids[victim]}) and v["attempts"] == 2, (i, v)


@pytest.mark.parametrize(("phase", "whose"), [("matchmaking", "three"), ("send", "two"), ("reduce", "three"),
                                              ("commit", "two")])
def test_a_delegate_killed_in_each_phase_of_the_level_above_leaves_every_survivor_on_one_model(
        phase: str, whose: str, tmp_path: Path, shards: list[Path], procs: list[subprocess.Popen]) -> None:
    """Round 1's level 2 (the two groups' delegates) loses one of them in `phase`: the delegate of the
    group of three, or of the group of two (which leads level 2). The other delegate's level-2 round
    fails or finds nobody and its top is its own group's aggregate (or, killed in commit, the top that
    both made); the dead delegate's group mates, unable to reach it, ask the other delegate for the
    round's top. All four survivors end round 1 on one model, and the ones whose aggregate did not
    reach that model are not credited with its tokens."""
    spec = fast_spec(averaging={**NET, "group_size": 3})
    spec_path = write_spec(spec, tmp_path / "spec.toml")
    rounds = 2
    data = [shards[i % len(shards)] for i in range(N)]
    workdirs = [tmp_path / f"peer-{i}" for i in range(N)]
    ids = [load_or_create_identity(w / "identity.key").peer_id for w in workdirs]
    groups = partition_groups(sorted(ids), 3)
    two, three = (g for g in sorted(groups, key=len))
    victim_id = (three if whose == "three" else two)[0]  # each group's delegate is its first member
    victim = ids.index(victim_id)
    script = peer_script("patient_peer")
    for i in range(N):
        env = {"SWARMFOLD_TEST_PEERS": str(N), **({"SWARMFOLD_TEST_FAULT": f"{phase}@1@2"} if i == victim else {})}
        initial = None if i == 0 else wait_ready(workdirs[0])["maddrs"][:1]
        start_peer(procs, workdirs[i], spec_path, data[i], rounds=rounds, env=env, script=script, initial=initial)
    survivors = [i for i in range(N) if i != victim]
    for i in survivors:
        assert wait_exit(procs[i], workdirs[i]) == 0, log_tail(workdirs[i])
    procs[victim].wait(timeout=30)
    assert "fault injection" in (workdirs[victim] / "peer.log").read_text(), log_tail(workdirs[victim])
    after = {i: model_hashes(workdirs[i]) for i in survivors}
    for r in (1, 2):
        assert len({after[i][r] for i in survivors}) == 1, (r, after, [log_tail(workdirs[i]) for i in survivors])
    orphans = [i for i in survivors if ids[i] in (three if whose == "three" else two)]
    for i in survivors:
        v = last_rounds(workdirs[i])[2]
        assert v["status"] == "committed" and v["included"] == sorted(
            next(g for g in groups if ids[i] in g)), (i, v)  # level 1 of round 1 committed whole
        if phase != "commit":  # the dead delegate never carried its group up
            assert victim_id not in json.dumps(v.get("tree", [])), (i, v)
            if i in orphans:
                assert v["tree"] and v["tree"][0]["included"] == [(two if whose == "three" else three)[0]], (i, v)
    credit = {i: json.loads((workdirs[i] / "checkpoints" / "round-000002" / "meta.json").read_text())["credit"]
              for i in survivors}
    if phase != "commit":  # the orphans' round-1 tokens did not reach the model they now hold; the rest did
        assert all((credit[i]["wasted"] > 0) == (i in orphans) for i in survivors), credit
