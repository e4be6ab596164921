"""Credit: which of a peer's trained tokens reached a committed swarm model (peer/credit.py), driven
through a real LocalPeer by a scripted averager; the invariant trained == counted + pending + wasted;
meta.json round trips, old checkpoints; and what status, records and /metrics make of it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import fast_spec

from swarmfold.averaging.base import AverageRequest, AverageResult
from swarmfold.peer.checkpoint import load_latest
from swarmfold.peer.credit import Credit
from swarmfold.peer.local import LocalPeer


class Scripted:
    """An averager that answers each round with the next outcome of its script."""

    def __init__(self, me: str, script: list[str]):
        self.me, self.script = me, list(script)

    def average(self, req: AverageRequest) -> AverageResult:
        outcome = self.script.pop(0)
        if outcome == "rolled_back":
            return AverageResult(status="rolled_back", aggregate=None, reason="scripted")
        if outcome == "alone":
            return AverageResult(status="alone", aggregate=req.delta, reason="scripted")
        included = [self.me, "other"] if outcome == "included" else ["other"]
        return AverageResult(status="committed", aggregate=req.delta * 0.5, group_id="g",
                             members=sorted([self.me, "other"]), included=sorted(included))


def _check(peer: LocalPeer) -> dict[str, int]:
    c = peer.credit
    assert c.trained == peer.tokens_total == c.counted + c.pending + c.wasted
    assert min(c.counted, c.wasted, c.carried, c.local, c.committed) >= 0
    assert peer.carried_tokens == c.carried
    return {"counted": c.counted, "pending": c.pending, "wasted": c.wasted}


@pytest.fixture
def peer(shards: list[Path], tmp_path: Path) -> LocalPeer:
    spec = fast_spec(round={"inner_steps": 1})
    return LocalPeer(spec, [shards[0]], peer_id="me", threads=1, workdir=tmp_path / "w")


def _round(peer: LocalPeer, outcome: str) -> int:
    """One round with the scripted outcome; returns the tokens it trained."""
    report = peer.run_round(Scripted(peer.peer_id, [outcome]))
    _check(peer)
    return report.tokens


def test_a_commit_counts_once_the_next_round_trains_on_it(peer: LocalPeer) -> None:
    t = _round(peer, "included")
    assert _check(peer) == {"counted": 0, "pending": t, "wasted": 0}  # in the group's model, not yet confirmed
    peer.train_phase()  # the next round starts from the commit's θ: confirmed
    assert _check(peer) == {"counted": t, "pending": 0, "wasted": 0}


def test_carried_and_alone_tokens_count_with_the_next_confirmed_commit(peer: LocalPeer) -> None:
    t1 = _round(peer, "rolled_back")
    assert peer.credit.carried == t1 and _check(peer)["pending"] == t1
    t2 = _round(peer, "alone")
    assert peer.credit.local == t1 + t2 and peer.credit.carried == 0
    t3 = _round(peer, "rolled_back")
    t4 = _round(peer, "included")
    assert _check(peer) == {"counted": 0, "pending": t1 + t2 + t3 + t4, "wasted": 0}
    _round(peer, "rolled_back")  # its train phase confirmed the commit
    assert _check(peer)["counted"] == t1 + t2 + t3 + t4


def test_a_commit_without_us_wastes_our_delta_not_our_base(peer: LocalPeer) -> None:
    t1 = _round(peer, "alone")  # in θ_r, the base the group's model is built on
    t2 = _round(peer, "rolled_back")
    t3 = _round(peer, "excluded")
    assert _check(peer) == {"counted": 0, "pending": t1, "wasted": t2 + t3}
    assert peer.carried_tokens == 0
    peer.train_phase()
    assert _check(peer) == {"counted": t1, "pending": 0, "wasted": t2 + t3}


def test_a_sync_wastes_everything_pending(peer: LocalPeer) -> None:
    t1 = _round(peer, "included")
    t2 = _round(peer, "included")  # its train phase confirmed t1's commit
    t3 = _round(peer, "alone")  # ... and this one t2's
    t4 = _round(peer, "rolled_back")
    assert _check(peer) == {"counted": t1 + t2, "pending": t3 + t4, "wasted": 0}
    theta = peer.theta.clone() + 1.0  # another model: the swarm moved on
    peer.load_shared_state(peer.round + 3, theta, peer.outer.state_dict(), source="someone")
    assert _check(peer) == {"counted": t1 + t2, "pending": 0, "wasted": t3 + t4}
    t5 = _round(peer, "included")
    peer.load_shared_state(peer.round, peer.theta.clone() + 1.0, peer.outer.state_dict(), source="larger group")
    assert _check(peer) == {"counted": t1 + t2, "pending": 0, "wasted": t3 + t4 + t5}  # never confirmed
    peer.train_phase()  # the synced model is no commit of ours: nothing more counts
    assert _check(peer)["counted"] == t1 + t2


def test_a_replayable_round_drops_the_carried_delta(peer: LocalPeer) -> None:
    t1 = _round(peer, "rolled_back")
    peer._start_replayable_round()
    assert _check(peer) == {"counted": 0, "pending": 0, "wasted": t1}


def test_credit_survives_a_restart_and_old_checkpoints_load(peer: LocalPeer, shards: list[Path]) -> None:
    for outcome in ("included", "rolled_back", "alone", "excluded", "rolled_back"):
        _round(peer, outcome)
    peer.save()
    again = LocalPeer(peer.spec, [shards[0]], peer_id="me", threads=1, workdir=peer.workdir)
    assert again.resume()
    assert again.credit == peer.credit and again.tokens_total == peer.tokens_total
    _check(again)
    ckpt = load_latest(peer.workdir)
    assert ckpt is not None
    del ckpt.meta["credit"]  # a checkpoint written before credit was kept
    old = LocalPeer(peer.spec, [shards[0]], peer_id="me", threads=1)
    old.restore(ckpt)
    view = _check(old)
    assert view == {"counted": peer.tokens_total - peer.carried_tokens, "pending": peer.carried_tokens, "wasted": 0}
    assert old.credit.assumed == view["counted"]
    assert torch.equal(flat(old), flat(again))


def flat(p: LocalPeer) -> torch.Tensor:
    return torch.cat([x.detach().reshape(-1) for x in p.model.parameters()])


def test_credit_from_meta_tolerates_old_and_odd_meta() -> None:
    assert Credit.from_meta({}) == Credit()
    assert Credit.from_meta({"tokens_total": 10, "carried_tokens": 4}).view() == {
        "tokens_counted": 6, "tokens_wasted": 0, "tokens_pending": 4}
    c = Credit.from_meta({"credit": {"counted": 5, "wasted": "x", "commit_sha256": None}})
    assert (c.counted, c.wasted, c.commit_sha256) == (5, 0, "")
    with pytest.raises(ValueError, match="unknown round status"):
        Credit().on_round("synced", 1, included=True, theta_sha256="")


def test_in_a_simulated_swarm_every_commit_but_the_last_has_reached_the_model(shards: list[Path]) -> None:
    """`simulate`: two peers commit every round; a round's tokens count once the next round trains on its
    model, so after R rounds each peer has R - 1 rounds counted and its last one pending."""
    from swarmfold.peer.simulate import simulate

    spec = fast_spec(round={"inner_steps": 1})
    peers, _ = simulate(spec, [[shards[0]], [shards[1]]], rounds=3, threads=1, save_checkpoints=False)
    for p in peers:
        per_round = p.tokens_total // 3
        assert _check(p) == {"counted": 2 * per_round, "pending": per_round, "wasted": 0}
