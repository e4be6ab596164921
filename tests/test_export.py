"""`swarmfold export`: a folder transformers loads, with the same logits as swarmfold's own model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import fast_spec
from transformers import AutoModelForCausalLM

from swarmfold.averaging.base import SoloAverager
from swarmfold.cli import main
from swarmfold.peer.checkpoint import resolve_checkpoint
from swarmfold.peer.inference import export
from swarmfold.peer.local import LocalPeer, model_from_checkpoint

# the tests here share a module- or session-scoped fixture: one xdist worker runs them all (built once)
pytestmark = pytest.mark.xdist_group("test_export")


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, shards: list[Path]) -> Path:
    work = tmp_path_factory.mktemp("export") / "work"
    peer = LocalPeer(fast_spec(), [shards[1]], peer_id="local", threads=1, workdir=work)
    peer.run_round(SoloAverager())  # trained weights, not genesis: the test must see real values
    peer.save()
    return work


def test_exported_folder_loads_with_transformers_and_gives_the_same_logits(workdir: Path, tmp_path: Path) -> None:
    ckpt = resolve_checkpoint(workdir)
    out = export(ckpt, tmp_path / "hf")
    loaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    _spec, ours = model_from_checkpoint(ckpt)
    ids = torch.tensor([list(b"def export(ckpt, out):\n    return out\n")], dtype=torch.long)
    with torch.no_grad():
        expected = ours(input_ids=ids).logits
        actual = loaded(input_ids=ids).logits
    assert actual.shape == expected.shape == (1, ids.shape[1], 257)
    assert torch.max(torch.abs(actual - expected)).item() <= 1e-6
    info = json.loads((out / "swarmfold.json").read_text())
    assert info["swarmfold_round"] == 1 and info["model_sha256"] == ckpt.meta["model_sha256"]


def test_cli_export_prints_one_line_without_progress_bars(workdir: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "hf"
    assert main(["export", str(workdir), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("\n") == 1 and "from_pretrained" in captured.out
    assert "it/s" not in captured.err and "%|" not in captured.err
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert not list(tmp_path.glob(".hf.tmp-*"))
    # Exporting again replaces an earlier export whole.
    assert main(["export", str(workdir), "--out", str(out)]) == 0


def test_export_refuses_to_replace_a_folder_that_is_not_an_export(workdir: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep")
    assert main(["export", str(workdir), "--out", str(precious)]) == 2
    assert "not a swarmfold export" in capsys.readouterr().err
    assert [p.name for p in precious.iterdir()] == ["notes.txt"]
    with pytest.raises(FileExistsError):
        export(resolve_checkpoint(workdir), precious)
