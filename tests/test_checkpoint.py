"""Checkpoints: layout, recorded metadata, atomic writes, pruning, and falling back past damage."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import fast_spec
from safetensors import safe_open

from swarmfold.averaging.base import SoloAverager
from swarmfold.peer.checkpoint import (
    CheckpointError,
    file_sha256,
    list_checkpoints,
    load_checkpoint_dir,
    load_latest,
    resolve_checkpoint,
    save_checkpoint,
)
from swarmfold.peer.data import Shard
from swarmfold.peer.local import LocalPeer, model_from_checkpoint
from swarmfold.peer.model import flat_params, tensor_sha256
from swarmfold.peer.tokenizer import ByteTokenizer

ROUNDS = 3


# the tests here share a module- or session-scoped fixture: one xdist worker runs them all (built once)
pytestmark = pytest.mark.xdist_group("test_checkpoint")


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    # Two intra-op threads on a loaded 2-core machine run ~10x slower than one.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def shard(shards: list[Path]) -> Shard:
    spec = fast_spec()
    return Shard([shards[0]], ByteTokenizer(), seq_len=spec.data.seq_len, val_fraction=spec.data.val_fraction)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, shard: Shard) -> tuple[Path, dict[int, str]]:
    """A workdir with checkpoints of rounds 1..3 (keep 3) and the model hash of each round."""
    workdir = tmp_path_factory.mktemp("ckpt") / "work"
    peer = LocalPeer(fast_spec(), [], peer_id="local", threads=1, workdir=workdir, shard=shard)
    hashes = {}
    for _ in range(ROUNDS):
        peer.run_round(SoloAverager())
        peer.save()
        hashes[peer.round] = peer.theta_sha256
    return workdir, hashes


@pytest.fixture
def workdir(trained: tuple[Path, dict[int, str]], tmp_path: Path) -> Path:
    """A private copy of the trained workdir, free to damage."""
    copy = tmp_path / "work"
    shutil.copytree(trained[0], copy)
    return copy


def test_layout_and_metadata(trained: tuple[Path, dict[int, str]]) -> None:
    workdir, hashes = trained
    newest = workdir / "checkpoints" / "round-000003"
    assert [p.name for p in list_checkpoints(workdir)] == ["round-000003", "round-000002", "round-000001"]
    assert sorted(p.name for p in newest.iterdir()) == [
        "inner_optimizer.safetensors", "meta.json", "model.safetensors", "outer_optimizer.safetensors"]
    meta = json.loads((newest / "meta.json").read_text())
    assert meta["round"] == 3
    assert meta["step"] == 3 * fast_spec().round.inner_steps
    assert meta["spec_hash"] == fast_spec().spec_hash
    assert meta["model_sha256"] == hashes[3]
    assert len(meta["manifest_hash"]) == 64 and meta["manifest"]
    assert meta["data_cursor"]["round"] == 3
    assert meta["rng"]["torch_cpu"]
    env = meta["environment"]
    assert env["threads"] == 1
    assert env["torch"] == torch.__version__
    assert {"transformers", "cpu_capability"} <= env.keys()
    assert env["device"] == "cpu" and {"device_name", "compute_capability", "cuda", "cudnn", "driver"} <= env.keys()
    for name, digest in meta["files"].items():
        assert file_sha256(newest / name) == digest


def test_tensor_files_are_safetensors_not_pickle(trained: tuple[Path, dict[int, str]]) -> None:
    newest = list_checkpoints(trained[0])[0]
    for f in newest.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            list(st.keys())
        assert not f.read_bytes().startswith(b"\x80")  # a pickle stream starts with PROTO 0x80
    _spec, model = model_from_checkpoint(load_checkpoint_dir(newest))
    assert tensor_sha256(flat_params(model)) == trained[1][3]


def _damage(path: Path, how: str) -> None:
    if how == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "bit-flip":
        blob = bytearray(path.read_bytes())
        blob[-100] ^= 0x10
        path.write_bytes(bytes(blob))
    elif how == "delete":
        path.unlink()
    elif how == "garbage":
        path.write_text("{ not json")


@pytest.mark.parametrize("target,how", [
    ("model.safetensors", "truncate"),
    ("model.safetensors", "bit-flip"),
    ("inner_optimizer.safetensors", "bit-flip"),
    ("outer_optimizer.safetensors", "delete"),
    ("meta.json", "garbage"),
    ("meta.json", "delete"),
])
def test_damaged_newest_falls_back_to_previous_with_a_warning(
        workdir: Path, trained: tuple[Path, dict[int, str]], shard: Shard, target: str, how: str,
        caplog: pytest.LogCaptureFixture) -> None:
    newest = workdir / "checkpoints" / "round-000003"
    _damage(newest / target, how)
    with pytest.raises(CheckpointError):
        load_checkpoint_dir(newest)
    ckpt = load_latest(workdir)
    assert ckpt is not None and ckpt.round == 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and "round-000003" in warnings[0].getMessage()

    peer = LocalPeer(fast_spec(), [], peer_id="local", threads=1, workdir=workdir, shard=shard)
    assert peer.resume()
    assert peer.round == 2
    assert peer.theta_sha256 == trained[1][2]


def test_every_checkpoint_damaged_gives_none(workdir: Path) -> None:
    for ckpt in list_checkpoints(workdir):
        _damage(ckpt / "model.safetensors", "truncate")
    assert load_latest(workdir) is None
    with pytest.raises(CheckpointError, match="no sound checkpoint"):
        resolve_checkpoint(workdir)


def test_interrupted_write_is_ignored_and_cleaned(workdir: Path) -> None:
    root = workdir / "checkpoints"
    partial = root / ".round-000004.tmp-99999"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half a file")
    assert load_latest(workdir).round == 3  # type: ignore[union-attr]
    ckpt = load_checkpoint_dir(root / "round-000003")
    save_checkpoint(workdir, round_idx=4, model=ckpt.model, inner=ckpt.inner, outer=ckpt.outer, local=None,
                    meta=dict(ckpt.meta), keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["round-000003", "round-000004"]  # pruned to 2, temp gone


def test_checkpoint_of_another_spec_is_refused(workdir: Path, shard: Shard) -> None:
    other = fast_spec(inner={"lr": 1e-3})
    peer = LocalPeer(other, [], peer_id="local", threads=1, workdir=workdir, shard=shard)
    with pytest.raises(CheckpointError, match="fresh --workdir"):
        peer.resume()
