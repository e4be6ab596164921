"""Model sizes: the presets, genesis without transformers' init, micro-batches with gradient
accumulation, activation checkpointing, and the `base` preset training a round on the CPU."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import fast_spec

from swarmfold.averaging.base import SoloAverager
from swarmfold.cli import main
from swarmfold.peer.local import LocalPeer
from swarmfold.peer.memory import count_parameters, estimate
from swarmfold.peer.model import build_config, build_model, flat_params, genesis_init, tensor_sha256
from swarmfold.spec import PRESETS, SpecError, preset


@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("qwen2", False), ("mistral", True)])
def test_genesis_equals_transformers_build_then_genesis(arch: str, tied: bool) -> None:
    """Skipping transformers' own init changes nothing: the same weights, buffers and logits as
    building the model the slow way and overwriting every weight."""
    from transformers import AutoModelForCausalLM

    spec = preset("tiny").replace(model={"architecture": arch, "tie_embeddings": tied, "num_kv_heads": 2})
    fast = build_model(spec, 257, 256)
    with torch.random.fork_rng(devices=[]):
        slow = AutoModelForCausalLM.from_config(build_config(spec, 257, 256), dtype=torch.float32)
    genesis_init(slow, spec)
    assert [n for n, _ in fast.named_parameters()] == [n for n, _ in slow.named_parameters()]
    assert tensor_sha256(flat_params(fast)) == tensor_sha256(flat_params(slow))
    fb, sb = dict(fast.named_buffers()), dict(slow.named_buffers())
    assert fb.keys() == sb.keys() and all(torch.equal(fb[k], sb[k]) for k in fb)
    ids = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(fast(input_ids=ids).logits, slow(input_ids=ids).logits)
    if tied:
        assert fast.get_output_embeddings().weight is fast.get_input_embeddings().weight


def test_preset_sizes() -> None:
    sizes = {name: count_parameters(preset(name), 257, 256) for name in PRESETS}
    assert sizes["tiny"] < 1e6 < sizes["small"] < 2e7
    assert 100e6 < sizes["base"] < 130e6  # GPT-2 small's body with byte tokens
    assert 0.9e9 < sizes["1b"] < 1.1e9
    for name in ("base", "1b"):  # settings that fit a 24 GB GPU
        assert estimate(preset(name), 257, 256).device_bytes < 22 * 2**30, name


def test_init_prints_memory_per_device_kind(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["init", "--preset", "base", "--out", str(tmp_path / "s.toml")]) == 0
    out = capsys.readouterr().out
    assert "113.5M parameters" in out and "cpu:" in out and "cuda/mps:" in out and "GiB" in out


def test_micro_batch_size_is_validated_and_hashed() -> None:
    base = fast_spec()
    assert "micro_batch_size" not in base.hashed_dict()["inner"]  # 0: hashed as before micro-batches
    assert base.replace(inner={"micro_batch_size": 4}).spec_hash != base.spec_hash
    with pytest.raises(SpecError, match="must divide inner.batch_size"):
        base.replace(inner={"micro_batch_size": 3})
    with pytest.raises(SpecError, match="between 0"):
        base.replace(inner={"micro_batch_size": 9})


def _train(spec, shard: Path, rounds: int = 2, **kw) -> tuple[list[float], torch.Tensor]:  # noqa: ANN001
    peer = LocalPeer(spec, [shard], peer_id="p", threads=1, **kw)
    losses: list[float] = []
    for _ in range(rounds):
        phase = peer.train_phase()
        losses += phase.stats.losses
        peer.finish_round(phase, SoloAverager().average(peer.request(phase)))
    return losses, peer.theta


def test_micro_batches_follow_the_big_batch_and_are_bitwise_run_to_run(shards: list[Path]) -> None:
    spec = fast_spec(inner={"batch_size": 8})
    big_losses, big = _train(spec, shards[0])
    for mb in (4, 2):
        micro = spec.replace(inner={"micro_batch_size": mb})
        losses, theta = _train(micro, shards[0])
        # the same math, another float32 summation order: the same trajectory within rounding
        assert len(losses) == len(big_losses)
        assert all(math.isclose(a, b, rel_tol=1e-4) for a, b in zip(losses, big_losses, strict=True)), \
            (losses, big_losses)
        assert torch.allclose(theta, big, rtol=0, atol=1e-4)
        again_losses, again = _train(micro, shards[0])
        assert again_losses == losses and tensor_sha256(again) == tensor_sha256(theta)  # bitwise run to run


def test_activation_checkpointing_gives_the_same_bits(shards: list[Path]) -> None:
    spec = fast_spec(inner={"micro_batch_size": 4})
    losses, theta = _train(spec, shards[0], rounds=1)
    ck_losses, ck_theta = _train(spec, shards[0], rounds=1, activation_checkpointing=True)
    assert ck_losses == losses and tensor_sha256(ck_theta) == tensor_sha256(theta)


def test_base_preset_trains_one_round_on_the_cpu(tmp_path: Path, shards: list[Path]) -> None:
    """The real `base` model (113.5M parameters), with its batch shrunk to seconds: two sequences of
    16 tokens in micro-batches of one, one inner step, and its checkpoint written."""
    spec = preset("base").replace(data={"seq_len": 16},
                                  inner={"batch_size": 2, "micro_batch_size": 1, "warmup_steps": 1},
                                  round={"inner_steps": 1})
    peer = LocalPeer(spec, [shards[0]], peer_id="p", threads=1, workdir=tmp_path / "w", keep_checkpoints=1)
    genesis = peer.theta_sha256
    report = peer.run_round(SoloAverager())
    assert report.status == "alone" and math.isfinite(report.train_loss) and report.model_sha256 != genesis
    path = peer.save()
    assert (path / "model.safetensors").stat().st_size > 4 * 113e6
