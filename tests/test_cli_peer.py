"""The single-peer CLI: data stdlib, eval, generate, and usage errors (run in this process via `main`)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import fast_spec, write_spec

from swarmfold.cli import main
from swarmfold.peer.checkpoint import resolve_checkpoint
from swarmfold.peer.data import Shard
from swarmfold.peer.local import evaluate_model, model_from_checkpoint
from swarmfold.peer.tokenizer import ByteTokenizer

# the tests here share a module- or session-scoped fixture: one xdist worker runs them all (built once)
pytestmark = pytest.mark.xdist_group("test_cli_peer")


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, shards: list[Path]) -> Path:
    """Two rounds trained through `swarmfold train` (in this process)."""
    root = tmp_path_factory.mktemp("cli")
    spec = write_spec(fast_spec(), root / "spec.toml")
    work = root / "work"
    assert main(["train", "--spec", str(spec), "--data", str(shards[2]), "--workdir", str(work),
                 "--rounds", "2", "--threads", "1"]) == 0
    return work


def test_data_stdlib_writes_the_shard_folders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "stdlib", "--shards", "2", "--out", str(tmp_path / "data")]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "data" / "shard-0"), str(tmp_path / "data" / "shard-1")]
    assert all(any(Path(p).rglob("*.py")) for p in printed)


def test_eval_json_matches_the_library(workdir: Path, shards: list[Path],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", str(workdir), "--data", str(shards[3]), "--json", "--max-windows", "16",
                 "--threads", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["round"] == 2
    ckpt = resolve_checkpoint(workdir)
    spec, model = model_from_checkpoint(ckpt)
    shard = Shard([shards[3]], ByteTokenizer(), seq_len=spec.data.seq_len, val_fraction=spec.data.val_fraction)
    loss = evaluate_model(model, shard, spec.inner.batch_size, 16)
    assert result["val_loss"] == loss
    assert result["perplexity"] == math.exp(loss)
    assert result["manifest_hash"] == shard.manifest_hash


def test_eval_of_a_checkpoint_folder_and_plain_output(workdir: Path, shards: list[Path],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    folder = workdir / "checkpoints" / "round-000001"
    assert main(["eval", str(folder), "--data", str(shards[3]), "--max-windows", "8", "--threads", "1"]) == 0
    assert capsys.readouterr().out.startswith("round 1: validation loss ")


def test_generate_is_seeded(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    texts = []
    for seed in ("1", "1", "2"):
        assert main(["generate", str(workdir), "--prompt", "def ", "--tokens", "40", "--seed", seed,
                     "--threads", "1"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1]
    assert texts[0].startswith("def ")
    assert texts[0] != texts[2]


def test_missing_checkpoint_is_a_clear_error(tmp_path: Path, shards: list[Path],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", str(tmp_path / "nowhere"), "--data", str(shards[0])]) == 2
    assert "no such workdir or checkpoint folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["generate", str(tmp_path / "empty"), "--prompt", "x"]) == 2
    assert "train first" in capsys.readouterr().err


def test_bad_data_is_a_clear_error(workdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", str(workdir), "--data", str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "absent") in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [
    ["train", "--spec", "s.toml", "--data", "d", "--workdir", "w", "--rounds", "0"],
    ["train", "--spec", "s.toml", "--data", "d", "--workdir", "w", "--rounds", "2", "--threads", "0"],
    ["data", "stdlib", "--shards", "zero", "--out", "x"],
    ["generate", "w", "--prompt", "x", "--tokens", "-3"],
])
def test_bad_arguments_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "must be at least 1" in err or "expected a whole number" in err
