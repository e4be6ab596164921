"""The inner learning-rate schedule (`inner.lr_schedule`): values, validation, hashing, and the
simulate path stepping through the one `lr_at`."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import fast_spec, inner_spec_errors

from swarmfold.peer import trainer as trainer_mod
from swarmfold.peer.simulate import simulate
from swarmfold.peer.trainer import lr_at
from swarmfold.spec import PRESETS, preset, spec_from_dict

# the presets' swarm ids before lr schedules and time-boxed rounds existed: in steps mode (the old
# default) with 'constant' they must hash exactly as before
PRESET_HASHES = {
    "tiny": "0d6d56bcc023a84f90305b00095c21f97c35ef41f9ac6a6c6d648e7396bdb8af",
    "small": "a81bc6ed6a91ce1d6e6d50d72288ab8ffdd5d4e49ad764114ec464aa5e0a620a",
    "base": "2dbb834800647f6237317755348f99bf9756fa733e77e0a0509394e8258b8ce9",
    "1b": "3e1b16f3bee6f9fede5f634b4f4b326f22398c15910a9c70d65615a17264a6de",
}


def inner(**kw: object):  # noqa: ANN201
    return preset("tiny").replace(inner={"lr": 1.0, "warmup_steps": 10, **kw}).inner


def test_constant_is_the_default_and_keeps_the_preset_hashes() -> None:
    for name in PRESETS:
        spec = preset(name)
        assert spec.inner.lr_schedule == "constant"
        assert spec.replace(round={"mode": "steps"}).spec_hash == PRESET_HASHES[name]
        assert "lr_schedule" not in spec.hashed_dict()["inner"]
    i = inner()
    assert [lr_at(i, s) for s in (0, 4, 9, 10, 10_000)] == [0.1, 0.5, 1.0, 1.0, 1.0]


def test_schedules_are_hashed() -> None:
    base = preset("tiny")
    cos = base.replace(inner={"lr_schedule": "cosine", "decay_steps": 300})
    assert cos.spec_hash != base.spec_hash
    assert cos.replace(inner={"decay_steps": 600}).spec_hash != cos.spec_hash
    assert cos.replace(inner={"min_lr_ratio": 0.0}).spec_hash != cos.spec_hash
    wsd = base.replace(inner={"lr_schedule": "wsd", "decay_steps": 300})
    assert wsd.spec_hash not in (base.spec_hash, cos.spec_hash)
    assert wsd.replace(inner={"wsd_decay_fraction": 0.5}).spec_hash != wsd.spec_hash
    assert spec_from_dict(wsd.to_dict()).spec_hash == wsd.spec_hash


def test_cosine_values() -> None:
    i = inner(lr_schedule="cosine", decay_steps=110, min_lr_ratio=0.1)
    assert lr_at(i, 0) == pytest.approx(0.1)  # the warm-up is the same for every schedule
    assert lr_at(i, 9) == pytest.approx(1.0)
    assert lr_at(i, 10) == pytest.approx(1.0)
    assert lr_at(i, 60) == pytest.approx(0.55)  # half way: the middle of lr and the floor
    assert lr_at(i, 110) == pytest.approx(0.1)
    assert lr_at(i, 10_000) == pytest.approx(0.1)  # the floor after the run's length
    values = [lr_at(i, s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    assert lr_at(i, 35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))


def test_wsd_values() -> None:
    i = inner(lr_schedule="wsd", decay_steps=100, min_lr_ratio=0.0, wsd_decay_fraction=0.2)
    assert lr_at(i, 5) == pytest.approx(0.6)
    assert [lr_at(i, s) for s in (10, 50, 79, 80)] == [1.0, 1.0, 1.0, 1.0]
    assert lr_at(i, 90) == pytest.approx(0.5)
    assert lr_at(i, 100) == pytest.approx(0.0)
    assert lr_at(i, 500) == pytest.approx(0.0)
    floor = inner(lr_schedule="wsd", decay_steps=100, min_lr_ratio=0.25)
    assert lr_at(floor, 100) == pytest.approx(0.25)


@pytest.mark.parametrize(("fields", "words"), [
    ({"lr_schedule": "linear"}, "inner.lr_schedule: 'linear' is unknown"),
    ({"lr_schedule": "cosine"}, "inner.decay_steps (0) must exceed inner.warmup_steps (20)"),
    ({"lr_schedule": "cosine", "decay_steps": 20}, "inner.decay_steps (20) must exceed"),
    ({"lr_schedule": "cosine", "decay_steps": 300, "min_lr_ratio": 1.5}, "inner.min_lr_ratio: must be in [0, 1]"),
    ({"lr_schedule": "wsd", "decay_steps": 300, "wsd_decay_fraction": 0.0}, "inner.wsd_decay_fraction: must be in"),
    ({"lr_schedule": "wsd", "decay_steps": 100, "wsd_decay_fraction": 0.9}, "inside the warm-up (20 steps)"),
    ({"decay_steps": -1}, "inner.decay_steps: must be >= 0"),
])
def test_validation_errors(fields: dict[str, object], words: str) -> None:
    errors = inner_spec_errors(fields)
    assert any(words in e for e in errors), errors


def test_simulate_steps_through_lr_at(shards: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Every inner step of a simulated swarm takes its lr from `lr_at` at the swarm's step, which is
    the peer's own step count too (each peer trained every round)."""
    spec = fast_spec(inner={"lr_schedule": "cosine", "decay_steps": 10, "warmup_steps": 2, "min_lr_ratio": 0.0})
    calls: list[tuple[int, float]] = []
    real = trainer_mod.lr_at

    def recording(i, step, local=None):  # noqa: ANN001, ANN202
        assert local == step
        value = real(i, step, local)
        calls.append((step, value))
        return value

    monkeypatch.setattr(trainer_mod, "lr_at", recording)
    peers, _ = simulate(spec, [[shards[0]], [shards[1]]], rounds=2, threads=1, save_checkpoints=False)
    assert sorted(s for s, _ in calls) == sorted(list(range(10)) * 2)
    assert [p.trainer.step_count for p in peers] == [10, 10]
    # the optimizer ran at the last value: the cosine's end, not the peak
    assert peers[0].trainer.optimizer.param_groups[0]["lr"] == pytest.approx(real(spec.inner, 9))
    assert real(spec.inner, 9) < 0.05 * spec.inner.lr


def test_contribute_and_verify_replay_a_decaying_schedule(shards: list[Path], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A contribution under 'wsd' steps through `lr_at` and replays bit for bit."""
    from swarmfold.averaging.base import SoloAverager
    from swarmfold.averaging.identity import load_or_create_identity
    from swarmfold.peer.checkpoint import resolve_checkpoint
    from swarmfold.peer.contribute import contribute, threads_set
    from swarmfold.peer.local import LocalPeer
    from swarmfold.peer.verify import verify_file

    spec = fast_spec(inner={"lr_schedule": "wsd", "decay_steps": 10, "warmup_steps": 2,
                            "wsd_decay_fraction": 0.5, "min_lr_ratio": 0.0})
    with threads_set(1):
        peer = LocalPeer(spec, [shards[2]], peer_id="local", threads=1, workdir=tmp_path / "base")
        peer.run_round(SoloAverager())
        peer.save()
        base = resolve_checkpoint(tmp_path / "base")
        ident = load_or_create_identity(tmp_path / "id.key")
        steps: list[tuple[int, int]] = []
        real = trainer_mod.lr_at
        monkeypatch.setattr(trainer_mod, "lr_at", lambda i, s, loc: steps.append((s, loc)) or real(i, s, loc))
        made = contribute(ckpt=base, data=[shards[0]], identity=ident, out=tmp_path / "c.safetensors", threads=1)
        # a fresh inner state (someone else's base) on round 1: the decay at the swarm's steps 5..9,
        # the warm-up from the contributor's own step 0
        assert steps == [(5 + k, k) for k in range(5)]
        report = verify_file(made.delta_path, ckpt=base, data=[shards[0]])
    assert report.passed and report.mode == "bitwise", report.reason
    assert steps[5:] == steps[:5]  # the replay went through the same function


def test_the_decay_follows_the_swarm_and_the_warm_up_the_peer() -> None:
    i = inner(lr_schedule="cosine", decay_steps=110, min_lr_ratio=0.1)
    for step in (0, 3, 9, 10, 60, 200):  # a peer that trained every round: the usual schedule, the same bits
        assert lr_at(i, step, step) == lr_at(i, step)
    assert lr_at(i, 60, 100) == pytest.approx(0.55)  # past its warm-up: the swarm's step decides
    assert lr_at(i, 60, 0) == pytest.approx(0.055)  # a fresh joiner at step 60: warms up to the decayed lr
    assert lr_at(i, 60, 9) == pytest.approx(0.55)
    assert lr_at(inner(), 500, 4) == pytest.approx(0.5)  # constant: only its own warm-up


def test_a_peer_synced_to_a_later_round_trains_at_that_rounds_lr(shards: list[Path],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The bug this fixes: a late joiner counted the schedule from its own step 0, and so restarted a
    decaying schedule at the swarm's round k."""
    from swarmfold.peer.local import LocalPeer

    spec = fast_spec(inner={"lr_schedule": "cosine", "decay_steps": 40, "warmup_steps": 2, "min_lr_ratio": 0.0})
    peer = LocalPeer(spec, [shards[0]], peer_id="late", threads=1)
    peer.load_shared_state(6, peer.theta.clone(), {})  # as a sync to round 6 leaves it
    calls: list[tuple[int, int]] = []
    real = trainer_mod.lr_at
    monkeypatch.setattr(trainer_mod, "lr_at", lambda i, s, loc: calls.append((s, loc)) or real(i, s, loc))
    peer.train_phase()
    h = spec.round.inner_steps
    assert calls == [(6 * h + k, k) for k in range(h)]
    assert peer.trainer.optimizer.param_groups[0]["lr"] == real(spec.inner, 6 * h + h - 1, h - 1)
    assert real(spec.inner, 6 * h + h - 1, h - 1) < real(spec.inner, h - 1)  # decayed, not restarted
