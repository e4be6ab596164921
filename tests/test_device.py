"""Devices and precision: resolving --device, the missing-device error, bf16 on the CPU, the
environment class with the device in it, and the device settings.

Every test here runs on whatever machine the suite runs on: where a branch depends on the
hardware (is there a GPU?), the test takes the branch this machine offers and checks it,
so it passes on a CPU-only box and on a GPU box alike. No test needs a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, fast_spec, write_spec

from swarmfold.averaging.base import SoloAverager
from swarmfold.averaging.verification import ENVIRONMENT_CLASS, environment_class, same_class
from swarmfold.cli import main
from swarmfold.daemon.options import PeerOptions
from swarmfold.daemon.service import apply_settings
from swarmfold.daemon.settings import Settings, SettingsError, settings_from_dict
from swarmfold.peer.checkpoint import load_latest
from swarmfold.peer.data import Shard
from swarmfold.peer.device import DeviceError, available_devices, resolve_device
from swarmfold.peer.local import LocalPeer, environment
from swarmfold.peer.tokenizer import ByteTokenizer
from swarmfold.peer.trainer import lm_loss
from swarmfold.spec import Spec, SpecError, spec_from_dict

# the tests here share a module- or session-scoped fixture: one xdist worker runs them all (built once)
pytestmark = pytest.mark.xdist_group("test_device")


@pytest.fixture(scope="module")
def shard(shards: list[Path]) -> Shard:
    spec = fast_spec()
    return Shard([shards[0]], ByteTokenizer(), seq_len=spec.data.seq_len, val_fraction=spec.data.val_fraction)


def _train(spec: Spec, shard: Shard, rounds: int, workdir: Path | None = None) -> LocalPeer:
    peer = LocalPeer(spec, [], peer_id="dev", threads=1, shard=shard, tokenizer=shard.tokenizer,
                     workdir=workdir, device="cpu")
    peer.resume()
    while peer.round < rounds:
        peer.run_round(SoloAverager())
        if workdir is not None:
            peer.save()
    return peer


# ---- resolving a device string ------------------------------------------------------------

def test_cpu_and_auto_resolve_to_devices_this_machine_has() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    found = available_devices()
    assert found[-1] == "cpu"
    assert resolve_device("auto") == torch.device(found[0])  # CUDA first, then MPS, then the CPU


def test_a_missing_device_is_a_clear_error_naming_what_was_found() -> None:
    found = ", ".join(available_devices())
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        with pytest.raises(DeviceError, match=f"has {count} CUDA device"):
            resolve_device(f"cuda:{count}")
    else:
        with pytest.raises(DeviceError) as err:
            resolve_device("cuda")
        assert "torch.cuda.is_available() is False" in str(err.value)
        assert torch.__version__ in str(err.value) and f"found devices: {found}" in str(err.value)
    if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        with pytest.raises(DeviceError, match=f"mps requested.*found devices: {found}"):
            resolve_device("mps")
    with pytest.raises(DeviceError, match="unknown; use auto, cpu, cuda, cuda:N or mps"):
        resolve_device("tpu")
    with pytest.raises(DeviceError, match="cuda:N with N a GPU index"):
        resolve_device("cuda:x")


def test_train_with_a_missing_device_exits_2_before_training(tmp_path: Path, shards: list[Path],
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    missing = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    spec = write_spec(fast_spec(), tmp_path / "spec.toml")
    rc = main(["train", "--spec", str(spec), "--data", str(shards[0]), "--workdir", str(tmp_path / "w"),
               "--rounds", "1", "--threads", "1", "--device", missing])
    err = capsys.readouterr().err
    assert rc == 2
    assert "swarmfold train: error:" in err and "found devices:" in err
    assert not (tmp_path / "w" / "checkpoints").exists()


# ---- precision ----------------------------------------------------------------------------

def test_precision_is_validated_and_part_of_the_spec_hash() -> None:
    fp32, bf16 = fast_spec(), fast_spec(inner={"precision": "bf16"})
    assert fp32.inner.precision == "fp32" and bf16.inner.precision == "bf16"
    assert fp32.spec_hash != bf16.spec_hash
    assert fast_spec(inner={"allow_tf32": True}).spec_hash != fp32.spec_hash
    raw = fp32.to_dict()
    raw["inner"]["precision"] = "fp16"
    with pytest.raises(SpecError, match="inner.precision: 'fp16' is unknown; use 'fp32' or 'bf16'"):
        spec_from_dict(raw)


def test_bf16_really_autocasts_with_a_float32_loss(shard: Shard) -> None:
    peer = LocalPeer(fast_spec(), [], peer_id="dev", threads=1, shard=shard, tokenizer=shard.tokenizer)
    windows = shard.train_batch(list(range(4)))
    seen: list[torch.dtype] = []
    head = peer.model.get_output_embeddings()
    handle = head.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    try:
        loss32, loss16 = lm_loss(peer.model, windows, "fp32"), lm_loss(peer.model, windows, "bf16")
    finally:
        handle.remove()
    assert seen == [torch.float32, torch.bfloat16]
    assert loss32.dtype == loss16.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in peer.model.parameters())  # master weights stay float32


def test_bf16_on_the_cpu_is_bitwise_deterministic_and_differs_from_fp32(shard: Shard) -> None:
    bf16 = fast_spec(inner={"precision": "bf16"})
    a, b = _train(bf16, shard, rounds=2), _train(bf16, shard, rounds=2)
    fp32 = _train(fast_spec(), shard, rounds=2)
    assert a.theta_sha256 == b.theta_sha256  # sha256 of the float32 parameter bytes
    assert a.theta_sha256 != fp32.theta_sha256
    assert a.theta.dtype == torch.float32 and all(
        v.dtype == torch.float32 for v in a.trainer.state_tensors().values())


def test_bf16_resume_equals_straight_through(tmp_path: Path, shard: Shard) -> None:
    spec = fast_spec(inner={"precision": "bf16"})
    straight = _train(spec, shard, rounds=2)
    _train(spec, shard, rounds=1, workdir=tmp_path / "w")
    resumed = _train(spec, shard, rounds=2, workdir=tmp_path / "w")  # a new process would do the same
    assert resumed.round == 2 and resumed.theta_sha256 == straight.theta_sha256
    ckpt = load_latest(tmp_path / "w")
    assert ckpt is not None and ckpt.meta["spec"]["inner"]["precision"] == "bf16"


# ---- the environment class ----------------------------------------------------------------

def test_environment_class_holds_the_device() -> None:
    env = environment(1, "cpu")
    assert set(ENVIRONMENT_CLASS) <= env.keys()
    assert {"device", "device_name", "compute_capability", "cuda", "cudnn", "driver"} <= set(ENVIRONMENT_CLASS)
    assert env["device"] == "cpu" and env["device_name"] == env["cuda"] == ""
    # a record written before devices were recorded is a CPU record: the same class as ours
    old = {k: env[k] for k in ("torch", "threads", "cpu_capability")}
    assert environment_class(old) == environment_class(env) and same_class(old, env)
    gpu = dict(env, device="cuda", device_name="NVIDIA H200", compute_capability="9.0", cuda="12.4",
               cudnn="90100", driver="550.54")
    assert not same_class(gpu, env)
    assert not same_class(dict(gpu, driver="560.1"), gpu)  # another driver: judged by tolerance


def test_the_trainer_state_and_theta_are_cpu_tensors(shard: Shard) -> None:
    peer = _train(fast_spec(), shard, rounds=1)
    assert peer.theta.device.type == "cpu"
    assert all(t.device.type == "cpu" for t in peer.trainer.state_tensors().values())
    assert peer.meta()["environment"]["device"] == "cpu"


# ---- settings and options -----------------------------------------------------------------

def test_settings_device_is_validated_and_fills_in_an_absent_flag() -> None:
    assert settings_from_dict({"device": "cuda:1"}).device == "cuda:1"
    with pytest.raises(SettingsError, match="device = 'gpu'; use auto, cpu, cuda, cuda:N or mps"):
        settings_from_dict({"device": "gpu"})
    opts = PeerOptions(spec=Path("s"), data=[], workdir=Path("w"), device="auto", device_explicit=False)
    apply_settings(opts, Settings(device="cpu"))
    assert opts.device == "cpu"
    explicit = PeerOptions(spec=Path("s"), data=[], workdir=Path("w"), device="auto", device_explicit=True)
    apply_settings(explicit, Settings(device="cpu"))
    assert explicit.device == "auto"  # the command line wins


# ---- scripts/device_check.sh ------------------------------------------------------------

DEVICE_CHECK = REPO / "scripts" / "device_check.sh"


def test_device_check_script_is_valid_bash_and_refuses_a_missing_device(tmp_path: Path) -> None:
    assert subprocess.run(["bash", "-n", str(DEVICE_CHECK)], capture_output=True, text=True).returncode == 0
    missing = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    env = dict(os.environ, SWARMFOLD_PYTHON=sys.executable)
    out = subprocess.run(["bash", str(DEVICE_CHECK), "--device", missing, "--out", str(tmp_path / "dc.json")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 2, out.stderr
    assert f"no Python here has a torch that sees {missing}" in out.stderr
    assert not (tmp_path / "dc.json").exists()


@pytest.mark.slow
def test_device_check_dry_run_on_the_cpu_passes_every_check(tmp_path: Path) -> None:
    """The GPU check's own code, end to end, on the CPU (`--dry`): real train/run/simulate processes."""
    out = tmp_path / "device_check.json"
    env = dict(os.environ, SWARMFOLD_PYTHON=sys.executable)
    done = subprocess.run(["bash", str(DEVICE_CHECK), "--dry", "--out", str(out)], capture_output=True, text=True,
                          env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["passed"] and report["device"] == "cpu"
    assert set(report["checks"]) == {"train_twice", "resume", "bf16_deterministic", "swarm_equals_simulate",
                                     "inner_loop_speed"}
    assert all(c["passed"] for c in report["checks"].values())
    twice = report["checks"]["train_twice"]
    assert twice["run_a"] == twice["run_b"] and twice["checkpoint_environment"]["device"] == "cpu"
    assert report["checks"]["bf16_deterministic"]["differs_from_fp32"] is True
    assert [c["precision"] for c in report["checks"]["inner_loop_speed"]["configs"]] == ["fp32", "bf16"]
