"""`inner.optimizer = "muon"`: Muon for the hidden matrices, AdamW for the rest. Hashing (the default
keeps every swarm id), validation, the parameter split, the state through checkpoints (a resume equals an
unbroken run bit for bit) and a deterministic `simulate`."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import fast_spec, inner_spec_errors, swarmfold_cmd, write_spec
from safetensors.torch import load_file

from swarmfold.peer.memory import estimate
from swarmfold.peer.model import build_model, flat_params, tensor_sha256
from swarmfold.peer.simulate import simulate
from swarmfold.peer.trainer import InnerTrainer, lr_at, muon_parameters
from swarmfold.spec import PRESETS, preset, spec_from_dict

# the presets' swarm ids before Muon existed (the same pins as tests/test_lr_schedule.py, steps mode)
PRESET_HASHES = {
    "tiny": "0d6d56bcc023a84f90305b00095c21f97c35ef41f9ac6a6c6d648e7396bdb8af",
    "small": "a81bc6ed6a91ce1d6e6d50d72288ab8ffdd5d4e49ad764114ec464aa5e0a620a",
    "base": "2dbb834800647f6237317755348f99bf9756fa733e77e0a0509394e8258b8ce9",
    "1b": "3e1b16f3bee6f9fede5f634b4f4b326f22398c15910a9c70d65615a17264a6de",
}
TENSOR_FILES = ("model.safetensors", "inner_optimizer.safetensors", "outer_optimizer.safetensors")


def muon_spec(**inner: object):  # noqa: ANN201
    return fast_spec(inner={"optimizer": "muon", **inner})


def test_adamw_is_the_default_and_keeps_the_preset_hashes() -> None:
    for name in PRESETS:
        spec = preset(name)
        assert spec.inner.optimizer == "adamw"
        assert spec.replace(round={"mode": "steps"}).spec_hash == PRESET_HASHES[name]
        # Muon's settings do nothing under AdamW, so they do not fork the swarm
        assert spec.replace(inner={"muon_lr": 0.5}).spec_hash == spec.spec_hash


def test_muon_and_its_settings_change_the_swarm_id() -> None:
    base = preset("tiny")
    muon = base.replace(inner={"optimizer": "muon"})
    assert muon.spec_hash != base.spec_hash
    for change in ({"muon_lr": 0.04}, {"muon_momentum": 0.9}, {"muon_nesterov": False},
                   {"muon_weight_decay": 0.0}, {"muon_adjust_lr": "match_rms_adamw"}):
        assert muon.replace(inner=change).spec_hash != muon.spec_hash, change
    assert spec_from_dict(muon.to_dict()).spec_hash == muon.spec_hash


@pytest.mark.parametrize(("fields", "words"), [
    ({"optimizer": "sgd"}, "use 'adamw' or 'muon'"),
    ({"optimizer": "muon", "muon_lr": 0.0}, "inner.muon_lr: must be positive"),
    ({"optimizer": "muon", "muon_momentum": 1.0}, "inner.muon_momentum: must be in [0, 1)"),
    ({"optimizer": "muon", "muon_weight_decay": -0.1}, "inner.muon_weight_decay: must be >= 0"),
    ({"optimizer": "muon", "muon_adjust_lr": "rms"}, "use 'original' or 'match_rms_adamw'"),
    ({"optimizer": "muon", "muon_nesterov": "yes"}, "expected true or false"),
])
def test_validation_errors(fields: dict[str, object], words: str) -> None:
    errors = inner_spec_errors(fields)
    assert any(words in e for e in errors), errors


def test_muon_trains_the_hidden_matrices_and_adamw_the_rest() -> None:
    spec = muon_spec()
    model = build_model(spec, 257, 256)
    trainer = InnerTrainer(model, spec.inner)
    assert trainer.muon is not None
    in_muon = {n for n, p in model.named_parameters() if any(p is q for q in trainer.muon.param_groups[0]["params"])}
    in_adamw = {n for n, p in model.named_parameters()
                if any(p is q for g in trainer.optimizer.param_groups for q in g["params"])}
    names = {n for n, _ in model.named_parameters()}
    assert in_muon | in_adamw == names and not in_muon & in_adamw  # each parameter has one optimizer
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= in_adamw
    assert all("norm" not in n for n in in_muon)
    assert any(n.endswith("q_proj.weight") for n in in_muon) and any(n.endswith("down_proj.weight") for n in in_muon)
    assert [p for p in muon_parameters(model)] == trainer.muon.param_groups[0]["params"]
    # AdamW alone: no Muon group
    assert InnerTrainer(build_model(fast_spec(), 257, 256), fast_spec().inner).muon is None


def test_lr_at_drives_both_groups() -> None:
    spec = muon_spec(warmup_steps=4, lr_schedule="cosine", decay_steps=12)
    trainer = InnerTrainer(build_model(spec, 257, 256), spec.inner)
    gen = torch.Generator().manual_seed(0)
    for step in range(6):
        trainer.step(torch.randint(0, 256, (2, 17), generator=gen))
        assert trainer.optimizer.param_groups[0]["lr"] == lr_at(spec.inner, step)
        assert trainer.muon is not None
        assert trainer.muon.param_groups[0]["lr"] == lr_at(spec.replace(inner={"lr": spec.inner.muon_lr}).inner, step)
    assert trainer.muon.param_groups[0]["lr"] / trainer.optimizer.param_groups[0]["lr"] == pytest.approx(
        spec.inner.muon_lr / spec.inner.lr)


def test_state_round_trips_and_refuses_another_optimizers_state() -> None:
    spec = muon_spec()
    trainer = InnerTrainer(build_model(spec, 257, 256), spec.inner)
    trainer.step(torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0)))
    state = trainer.state_tensors()
    assert any(k.endswith(".momentum_buffer") for k in state) and any(k.endswith(".exp_avg") for k in state)
    other = InnerTrainer(build_model(spec, 257, 256), spec.inner)
    other.load_state_tensors(state, 1)
    again = other.state_tensors()
    assert sorted(again) == sorted(state) and all(torch.equal(again[k], state[k]) for k in state)
    adamw = InnerTrainer(build_model(fast_spec(), 257, 256), fast_spec().inner)
    with pytest.raises(ValueError, match="another inner.optimizer"):
        adamw.load_state_tensors(state, 1)


def test_memory_estimate_counts_one_buffer_for_muons_matrices() -> None:
    adamw, muon = preset("tiny"), preset("tiny").replace(inner={"optimizer": "muon"})
    model = build_model(muon, 257, 256)
    matrices = sum(p.numel() for p in muon_parameters(model))
    assert estimate(adamw, 257, 256).cpu_bytes - estimate(muon, 257, 256).cpu_bytes == 4 * matrices


def model_digest(spec_rounds: int, shards: list[Path]) -> str:
    peers, _ = simulate(muon_spec(), [[shards[0]], [shards[1]]], rounds=spec_rounds, threads=1,
                        save_checkpoints=False)
    digests = {tensor_sha256(flat_params(p.model)) for p in peers}
    assert len(digests) == 1  # the members hold one model
    return digests.pop()


def test_simulate_with_muon_is_deterministic_and_is_not_adamw(shards: list[Path]) -> None:
    before = torch.get_num_threads()
    try:
        first, second = model_digest(2, shards), model_digest(2, shards)
        peers, _ = simulate(fast_spec(), [[shards[0]], [shards[1]]], rounds=2, threads=1, save_checkpoints=False)
    finally:
        torch.set_num_threads(before)
    assert first == second
    assert tensor_sha256(flat_params(peers[0].model)) != first


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train(spec: Path, data: Path, workdir: Path, rounds: int) -> None:
    proc = subprocess.run(swarmfold_cmd("train", "--spec", str(spec), "--data", str(data), "--workdir", str(workdir),
                                        "--rounds", str(rounds), "--threads", "1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow  # three `swarmfold train` processes
def test_resumed_muon_run_equals_an_unbroken_one(tmp_path: Path, shards: list[Path]) -> None:
    """Muon's momentum buffers go through the checkpoint: 1 round, stop, then on to 2 == 2 straight."""
    spec = write_spec(muon_spec(), tmp_path / "spec.toml")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(spec, shards[0], straight, 2)
    train(spec, shards[0], resumed, 1)
    train(spec, shards[0], resumed, 2)
    final = "round-000002"
    for name in TENSOR_FILES:
        assert sha256(straight / "checkpoints" / final / name) == sha256(resumed / "checkpoints" / final / name), name
    inner = load_file(str(straight / "checkpoints" / final / "inner_optimizer.safetensors"))
    assert any(k.endswith(".momentum_buffer") for k in inner)  # the Muon state was in the bits compared
