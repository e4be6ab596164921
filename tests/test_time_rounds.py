"""Time-boxed rounds (round.mode = "time"): a slow peer's work counts (issue 11, item 2).

Each peer trains as many inner steps as fit in round.seconds of its own clock, declares the
count in its part header, and is weighted by the tokens it trained. The real-process test
runs a verifying swarm (verify.fraction = 1, every peer on the public data) of two peers at
full power, one at `power = "light"` (a quarter duty cycle) and one that declares a step
more than it trained. Every round the three honest peers commit one model; the slow peer's
recorded steps are fewer; `simulate` with the steps of the round logs gives the same bits;
the replay passes the slow peer and rejects the liar.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import fast_spec, write_spec
from swarm_helpers import log_tail, model_hashes, peer_script, start_peer, wait_exit, wait_ready

from swarmfold.averaging.identity import load_or_create_identity
from swarmfold.cli import main
from swarmfold.peer.contribute import threads_set
from swarmfold.peer.data import Shard
from swarmfold.peer.roundlog import ROUND_LOG, RoundLogError, append_round, read_rounds, steps_from
from swarmfold.peer.simulate import simulate
from swarmfold.peer.tokenizer import load_tokenizer
from swarmfold.spec import (
    PRESET_ROUND_SECONDS,
    PRESETS,
    Spec,
    SpecError,
    load_spec,
    preset,
    spec_from_dict,
    validate,
)

NET = {"matchmaking_timeout": 10.0, "join_timeout": 4.0, "allreduce_timeout": 10.0, "commit_timeout": 4.0}
TIME = {"mode": "time", "seconds": 2.0, "min_steps": 1, "inner_steps": 400}


def _time_spec(public: Path) -> Spec:
    probe = fast_spec()
    manifest = Shard([public], load_tokenizer(probe.tokenizer), seq_len=probe.data.seq_len,
                     val_fraction=probe.data.val_fraction).manifest_hash
    return fast_spec(averaging={**NET, "min_group_size": 3, "group_size": 4}, round=TIME,
                     verify={"fraction": 1.0, "public_data": manifest})


# ---- fast checks ------------------------------------------------------------------------------------

def test_time_mode_is_validated_and_steps_mode_hashes_as_before() -> None:
    plain = fast_spec()
    assert plain.spec_hash == fast_spec(round={"seconds": 9.0, "min_steps": 3}).spec_hash, \
        "in steps mode the time fields are not part of the swarm's identity"
    assert fast_spec(round=TIME).spec_hash != plain.spec_hash
    for bad, words in (({"mode": "clock"}, "round.mode"), ({**TIME, "seconds": 0.0}, "round.seconds"),
                       ({**TIME, "min_steps": 401}, "round.min_steps")):
        with pytest.raises(SpecError, match=words):
            fast_spec(round=bad)
    assert validate(fast_spec(round=TIME)) == []


# the presets' swarm ids since time mode became their default (the steps-mode ids are pinned in
# test_lr_schedule.py); a change here forks every swarm made from a preset: say so in docs/results.md
TIME_PRESET_HASHES = {
    "tiny": "8f011ad69bffb2f7c0ecb5a069db339a37b8538b284a0bee7a839e59e21616b4",
    "small": "945d4735d676608f997cc4c55c2114a0c1213d022a61eb1fb1d827653e527bfb",
    "base": "8986335274ce18b70d4b6dc483eb128218b8960a0a19eaec9c9fbedc2771144e",
    "1b": "bdbcadf41ade8db326cd39e2ce6148a4bd1a0239a34d4e3e9938ffba8997065f",
}
TINY_STEPS_HASH = "0d6d56bcc023a84f90305b00095c21f97c35ef41f9ac6a6c6d648e7396bdb8af"  # as before time rounds


def test_presets_default_to_time_mode_and_a_file_without_mode_is_steps_mode(tmp_path: Path) -> None:
    for name in PRESETS:
        spec = preset(name)
        assert (spec.round.mode, spec.round.seconds, spec.round.min_steps) == ("time", PRESET_ROUND_SECONDS[name], 1)
        assert spec.spec_hash == TIME_PRESET_HASHES[name]
        assert spec_from_dict(spec.to_dict()).spec_hash == spec.spec_hash
        assert spec.round_min_steps == 1 and spec.token_cap == spec.round.inner_steps * spec.tokens_per_step
    # a spec file written before time rounds existed (no mode, seconds or min_steps) keeps its meaning
    # and its swarm id: steps mode
    raw = preset("tiny").to_dict()
    for key in ("mode", "seconds", "min_steps"):
        raw["round"].pop(key)
    assert spec_from_dict(raw).round.mode == "steps"
    path = tmp_path / "old.toml"
    path.write_text("[round]\ninner_steps = 25\n")  # the tiny preset's other fields are the spec defaults
    loaded = load_spec(path)
    assert loaded.round.mode == "steps" and loaded.round_min_steps == loaded.round.inner_steps
    assert loaded.spec_hash == preset("tiny").replace(round={"mode": "steps"}).spec_hash == TINY_STEPS_HASH


def test_init_writes_time_mode_and_mode_steps_gives_the_old_default(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["init", "--preset", "small", "--out", str(tmp_path / "t.toml")]) == 0
    assert load_spec(tmp_path / "t.toml").spec_hash == preset("small").spec_hash
    assert main(["init", "--preset", "small", "--mode", "steps", "--out", str(tmp_path / "s.toml")]) == 0
    steps = load_spec(tmp_path / "s.toml")
    assert steps.round.mode == "steps" and steps.spec_hash == preset("small").replace(round={"mode": "steps"}).spec_hash
    capsys.readouterr()


def test_round_logs_merge_and_refuse_what_does_not_fit(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for w in (a, b):
        w.mkdir()
    append_round(a, {"round": 0, "status": "committed", "steps": {"pa": 7, "pb": 3}})
    append_round(a, {"round": 1, "status": "rolled_back", "steps": {"pa": 9}})  # entered no model: not counted
    append_round(a, {"round": 1, "status": "committed", "steps": {"pa": 8, "pb": 2}})  # redone after a restart
    (a / ROUND_LOG).open("a").write('{"round": 2, "sta')  # a torn last line (a crash mid-write)
    append_round(b, {"round": 0, "status": "committed", "steps": {"pa": 7, "pb": 3}})
    assert read_rounds(a)[1]["steps"] == {"pa": 8, "pb": 2} and 2 not in read_rounds(a)
    assert steps_from([a, b / ROUND_LOG]) == {0: {"pa": 7, "pb": 3}, 1: {"pa": 8, "pb": 2}}
    append_round(b, {"round": 1, "status": "committed", "steps": {"pa": 8, "pb": 5}})
    with pytest.raises(RoundLogError, match="trained 2 steps"):
        steps_from([a, b])
    with pytest.raises(RoundLogError, match="cannot read the round log"):
        steps_from([tmp_path / "nowhere"])


# ---- real peers --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_slow_peer_counts_and_a_false_step_count_is_caught(tmp_path: Path, shards: list[Path],
                                                             procs: list[subprocess.Popen]) -> None:
    spec = _time_spec(shards[0])
    spec_path = write_spec(spec, tmp_path / "spec.toml")
    rounds = 3
    fast = [tmp_path / "fast-0", tmp_path / "fast-1"]
    slow, liar = tmp_path / "slow", tmp_path / "liar"
    slow.mkdir()
    (slow / "settings.toml").write_text('power = "light"\n')  # a quarter duty cycle: rests 3x each step
    start_peer(procs, fast[0], spec_path, shards[0], rounds=rounds)
    first = wait_ready(fast[0])["maddrs"][:1]
    start_peer(procs, fast[1], spec_path, shards[0], rounds=rounds, initial=first)
    start_peer(procs, slow, spec_path, shards[0], rounds=rounds, initial=first)
    liar_proc = start_peer(procs, liar, spec_path, shards[0], rounds=rounds, initial=first,
                           script=peer_script("false_steps_peer"))
    honest = [*fast, slow]
    for p, w in zip(procs[:3], honest, strict=True):
        assert wait_exit(p, w, timeout=300) == 0, log_tail(w)
    os.killpg(liar_proc.pid, signal.SIGKILL)  # its whole group: the DHT child and its daemon too
    ids = [load_or_create_identity(w / "identity.key").peer_id for w in honest]
    bad = load_or_create_identity(liar / "identity.key").peer_id
    logs = {w: read_rounds(w) for w in honest}

    # every round the three honest peers commit one model together, and the liar is never in it
    for r in range(rounds):
        entries = [logs[w][r] for w in honest]
        assert all(e["status"] == "committed" and e["included"] == sorted(ids) for e in entries), entries
        assert len({e["model_sha256"] for e in entries}) == 1, entries
    steps = steps_from(honest)
    fast_ids, slow_id = ids[:2], ids[2]
    # Per round the counts follow the load of the machine (under a loaded CI host the first, cold
    # step alone can fill a round, and everyone trains min_steps); over the run the slow peer,
    # resting three times each step's length, trains fewer.
    total = {p: sum(steps[r][p] for r in range(rounds)) for p in ids}
    assert all(steps[r][p] >= TIME["min_steps"] for r in range(rounds) for p in ids), steps
    assert total[slow_id] < min(total[f] for f in fast_ids), steps
    assert max(max(s.values()) for s in steps.values()) < TIME["inner_steps"], "the clock ends the rounds, not the cap"

    # the replay checked the slow peer's declared steps and passed it, and caught the liar
    text = {w: (w / "peer.log").read_text() for w in honest}
    assert "false steps: trained" in (liar / "peer.log").read_text(), log_tail(liar)
    assert all(f"replayed {slow_id[-8:]}: replayed bits match (bitwise)" in text[w] for w in fast), \
        [log_tail(w) for w in fast]
    assert any(f"rejected the contribution of {bad[-8:]}: verify_failed" in t for t in text.values()), \
        [log_tail(w) for w in honest]

    # the swarm is `simulate` of the three, given the steps each declared
    with threads_set(1):
        _, sim = simulate(spec, [[shards[0]]] * 3, rounds=rounds, threads=1, peer_ids=ids, save_checkpoints=False,
                          steps=steps)
    want = {r + 1: sim.per_round[r][ids[0]]["model_sha256"] for r in range(rounds)}
    for w in honest:
        got = {r: json.loads((w / "checkpoints" / f"round-{r:06d}" / "meta.json").read_text())["model_sha256"]
               for r in range(1, rounds + 1)}
        assert got == want, (w, got, want)
        assert set(model_hashes(w)) >= set(range(rounds + 1))
