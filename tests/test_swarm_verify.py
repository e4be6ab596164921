"""Verification in the live swarm (issue 6, item 4): replay, exclusion, deny records.

The real-process test runs two honest peers and one that inflates its Δ, all on the
spec's public data with verify.fraction = 1; the honest peers must end bit-identical to
`simulate` of the two of them, and keep the cheater out by a deny record afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import fast_spec, write_spec
from swarm_helpers import (
    connected_swarms,
    last_rounds,
    log_tail,
    peer_script,
    start_peer,
    wait_exit,
    wait_ready,
)

from swarmfold.averaging import codec
from swarmfold.averaging.base import AverageResult
from swarmfold.averaging.identity import Identity, load_or_create_identity
from swarmfold.averaging.receipt import build_deny_record
from swarmfold.averaging.records import encode_record
from swarmfold.averaging.verification import denied_from_values, judge_span
from swarmfold.daemon.replay import PublicDataError, make_swarm_verifier
from swarmfold.peer.contribute import threads_set
from swarmfold.peer.data import Shard
from swarmfold.peer.local import LocalPeer
from swarmfold.peer.simulate import simulate
from swarmfold.peer.tokenizer import load_tokenizer
from swarmfold.spec import Spec

NET = {"matchmaking_timeout": 5.0, "join_timeout": 4.0, "allreduce_timeout": 8.0, "commit_timeout": 4.0}


def _public_spec(shard: Path, **averaging: object) -> Spec:
    probe = fast_spec()
    manifest = Shard([shard], load_tokenizer(probe.tokenizer), seq_len=probe.data.seq_len,
                     val_fraction=probe.data.val_fraction).manifest_hash
    return fast_spec(averaging={**NET, **averaging}, verify={"fraction": 1.0, "public_data": manifest})


# ---- fast checks ------------------------------------------------------------------------------------

def test_judge_span_topk() -> None:
    """Same class: bits. Another class: honest drift passes; inflating, zeroing or flipping a span fails
    (a 1% scale stays inside topk's wide cells: only the same class catches that)."""
    g = torch.Generator().manual_seed(0)
    replay = torch.randn(5000, generator=g) * 1e-3
    sent = codec.roundtrip("topk32", replay)
    assert judge_span(sent, replay, compression="topk32", bitwise=True, tolerance=1e-4).passed
    assert not judge_span(codec.roundtrip("topk32", replay * 1.01), replay, compression="topk32", bitwise=True,
                          tolerance=1e-4).passed
    drifted = codec.roundtrip("topk32", replay * (1 + 1e-6))
    assert judge_span(drifted, replay, compression="topk32", bitwise=False, tolerance=1e-4).passed
    for cheat in (codec.roundtrip("topk32", replay * 3), torch.zeros(5000), codec.roundtrip("topk32", -replay)):
        bad = judge_span(cheat, replay, compression="topk32", bitwise=False, tolerance=1e-4)
        assert not bad.passed and bad.distance is not None and bad.distance > 1e-2, bad.reason


@pytest.mark.parametrize("compression", ["none", "fp16", "int8"])
def test_judge_span_bitwise_and_by_tolerance(compression: str) -> None:
    g = torch.Generator().manual_seed(0)
    replay = torch.randn(5000, generator=g) * 1e-3
    sent = codec.roundtrip(compression, replay)
    assert judge_span(sent, replay, compression=compression, bitwise=True, tolerance=1e-4).passed
    assert not judge_span(codec.roundtrip(compression, replay * 1.01), replay, compression=compression,
                          bitwise=True, tolerance=1e-4).passed
    # another environment class: an honest replay that drifted by 1e-6 passes, a 1% scale does not
    drifted = codec.roundtrip(compression, replay * (1 + 1e-6))
    ok = judge_span(drifted, replay, compression=compression, bitwise=False, tolerance=1e-4)
    assert ok.passed and ok.mode == "tolerance", ok.reason
    bad = judge_span(codec.roundtrip(compression, replay * 1.01), replay, compression=compression, bitwise=False,
                     tolerance=1e-4)
    assert not bad.passed and bad.distance is not None and bad.distance > 1e-3, bad.reason


def test_a_verifying_swarms_round_replays_bitwise_after_rounds_of_state(shards: list[Path]) -> None:
    """Round 2 of a member (after two outer steps, with AdamW state and a compression residual
    that a non-verifying swarm would carry) replays bit-identically from θ_2 alone."""
    spec = _public_spec(shards[0])
    with threads_set(1):  # what a peer started with --threads 1 runs with
        member = LocalPeer(spec, [shards[0]], peer_id="member", threads=1)
        verifier_peer = LocalPeer(spec, [shards[0]], peer_id="verifier", threads=1)
        verifier = make_swarm_verifier(verifier_peer)
        for _ in range(2):
            for p in (member, verifier_peer):
                phase = p.train_phase()
                p.finish_round(phase, AverageResult(status="committed", aggregate=phase.delta * 0 + 1e-4,
                                                    compressed=True))
        assert member.theta_sha256 == verifier_peer.theta_sha256 and member.residual is not None
        phase = member.train_phase()
        h = spec.round.inner_steps
        replay = verifier.replay("member", member.round, member.theta_sha256, h)
        assert torch.equal(replay, phase.delta)
        assert not torch.equal(verifier.replay("someone-else", member.round, member.theta_sha256, h), phase.delta)
        with pytest.raises(ValueError, match="not round"):
            verifier.replay("member", member.round + 1, member.theta_sha256, h)


def test_a_time_mode_round_replays_from_its_declared_steps_and_a_false_count_fails(shards: list[Path]) -> None:
    """In time mode a member trains what fits in round.seconds and declares the count; the
    verifier replays exactly that many steps (bit-identical), while one step more or less, the
    cheat of a peer that claims more work than it did, replays to other bits and another weight."""
    spec = _public_spec(shards[0]).replace(round={"mode": "time", "seconds": 0.3, "min_steps": 2,
                                                  "inner_steps": 400})
    with threads_set(1):
        member = LocalPeer(spec, [shards[0]], peer_id="member", threads=1)
        verifier = make_swarm_verifier(LocalPeer(spec, [shards[0]], peer_id="verifier", threads=1))
        phase = member.train_phase()
        k = phase.steps
        assert 2 <= k < 400, "a 0.3 s round of the tiny preset stops on the clock, far below the cap"
        assert member.request(phase).steps == k and phase.weight == verifier.weight_for(k)
        assert torch.equal(verifier.replay("member", 0, member.theta_sha256, k), phase.delta)
        for false in (k - 1, k + 1):
            assert not torch.equal(verifier.replay("member", 0, member.theta_sha256, false), phase.delta)
            assert verifier.weight_for(false) != phase.weight
        with pytest.raises(ValueError, match="1 to round.inner_steps"):
            member.train_phase(steps=401)


def test_a_verifying_swarm_needs_the_public_data(shards: list[Path]) -> None:
    spec = _public_spec(shards[0])
    with pytest.raises(PublicDataError, match="Pass the public shard"):
        make_swarm_verifier(LocalPeer(spec, [shards[1]], peer_id="p", threads=1))


def test_deny_records_need_a_quorum_and_expire(tmp_path: Path) -> None:
    keys = [load_or_create_identity(tmp_path / f"{i}.key") for i in range(3)]

    def deny(k: Identity, who: str, ttl: float = 100.0) -> bytes:
        return encode_record(build_deny_record(k, swarm_id="s", denied=who, round_idx=1, reason="r",
                                               evidence={"distance": 0.5}, ttl=ttl, now=0.0))

    values = [deny(keys[0], "x"), deny(keys[1], "x"), deny(keys[0], "y"), b"junk", deny(keys[2], "z", ttl=10)]
    assert denied_from_values(values, swarm_id="s", max_ttl=100, quorum=1, now=50.0) == {
        "x": sorted([keys[0].peer_id, keys[1].peer_id]), "y": [keys[0].peer_id]}
    assert set(denied_from_values(values, swarm_id="s", max_ttl=100, quorum=2, now=50.0)) == {"x"}
    assert denied_from_values(values, swarm_id="other", max_ttl=100, quorum=1, now=50.0) == {}


# ---- real DHTs -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_deny_record_travels_through_the_dht(tmp_path: Path, shards: list[Path]) -> None:
    """Peer a publishes a deny record; peer b (another DHT node) reads it and leaves the peer out."""
    from swarmfold.averaging.verification import SpanVerdict

    spec = _public_spec(shards[0])
    with connected_swarms(spec, tmp_path, ["a", "b"]) as (a, b):
        cheat = load_or_create_identity(tmp_path / "c.key").peer_id

        async def deny() -> None:
            a.directory.deny(cheat, 3, SpanVerdict(False, "bitwise", "replay differs", 0.5),
                             {"group_id": "g", "span": 0, "base_sha256": "0" * 64})

        a.run_coroutine(deny())
        deadline = time.monotonic() + 30
        seen: set[str] = set()
        while cheat not in seen:
            assert time.monotonic() < deadline, "b never saw the deny record"
            seen = b.run_coroutine(b.directory.refresh_denied(4))
            time.sleep(0.3)
        assert a.run_coroutine(a.directory.refresh_denied(4)) == {cheat}, "the issuer refuses it too"


@pytest.mark.slow
def test_a_cheater_is_caught_by_replay_excluded_and_denied(tmp_path: Path, shards: list[Path],
                                                           procs: list[subprocess.Popen]) -> None:
    # every reducer replays both other members' rounds before it reduces: on 2 cores shared with other
    # swarm tests that can take longer than NET's 8 s, and a round that times out rolls back, which a
    # comparison with `simulate` of the two (every round committed) cannot follow; the bound costs
    # nothing when nothing is wrong. The round after the rejection is where a retry must wait for a
    # survivor still replaying in the failed attempt (CI, 2026-12-07: with a retry window of 2 x join,
    # "leader did not propose in time" twice, and both honest peers gave round 0 up; the component test
    # test_a_retry_waits_for_a_survivor_still_finishing_the_failed_attempt pins the rule)
    spec = _public_spec(shards[0], min_group_size=2, group_size=3, allreduce_timeout=30.0)
    spec_path = write_spec(spec, tmp_path / "spec.toml")
    rounds = 5
    honest = [tmp_path / "honest-0", tmp_path / "honest-1"]
    start_peer(procs, honest[0], spec_path, shards[0], rounds=rounds)
    first = wait_ready(honest[0])["maddrs"][:1]
    start_peer(procs, honest[1], spec_path, shards[0], rounds=rounds, initial=first)
    cheat_dir = tmp_path / "cheater"
    cheater = start_peer(procs, cheat_dir, spec_path, shards[0], rounds=rounds, initial=first,
                         script=peer_script("cheating_peer"))
    for p, w in zip(procs[:2], honest, strict=True):
        assert wait_exit(p, w, timeout=300) == 0, log_tail(w)
    os.killpg(cheater.pid, signal.SIGKILL)  # its whole group: the DHT child and its daemon too
    bad = load_or_create_identity(cheat_dir / "identity.key").peer_id
    ids = [load_or_create_identity(w / "identity.key").peer_id for w in honest]
    logs = [(w / "peer.log").read_text() for w in honest]
    assert "cheater: sending" in (cheat_dir / "peer.log").read_text(), log_tail(cheat_dir)
    assert any(f"rejected the contribution of {bad[-8:]}: verify_failed" in log for log in logs), \
        [log_tail(w) for w in honest]
    assert any(f"published a deny record against {bad[-8:]}" in log for log in logs)
    for other, log in ((ids[1], logs[0]), (ids[0], logs[1])):
        assert f"replayed {other[-8:]}: replayed bits match (bitwise)" in log, "honest peers pass each other's replay"
        assert "leaving out denied peer(s)" in log and bad[-8:] in log.split("leaving out denied peer(s)", 1)[1]
    for w in honest:
        info = last_rounds(w)
        assert all(bad not in r.get("included", []) for r in info.values())
        caught = [r for r, i in info.items() if i.get("rejected", {}).get(bad, "").startswith("verify_failed")]
        assert len(caught) <= 1, f"after the first failed replay the deny record keeps it out: {caught}"
    with threads_set(1):
        _, sim = simulate(spec, [[shards[0]], [shards[0]]], rounds=rounds, threads=1, peer_ids=ids,
                          save_checkpoints=False)
    want = {r + 1: sim.per_round[r][ids[0]]["model_sha256"] for r in range(rounds)}
    for w in honest:
        got = {r: json.loads((w / "checkpoints" / f"round-{r:06d}" / "meta.json").read_text())["model_sha256"]
               for r in range(1, rounds + 1)}
        rounds_seen = {r: {k: i.get(k) for k in ("status", "included", "attempts", "reason")}
                       for r, i in sorted(last_rounds(w).items())}
        assert got == want, ("the honest peers hold exactly what the two of them alone would have trained",
                             w.name, [r for r in want if got.get(r) != want[r]], rounds_seen, log_tail(w, 60))
