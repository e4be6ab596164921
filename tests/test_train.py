"""`swarmfold train` through the CLI: bitwise determinism, resume == straight through, damaged checkpoints;
and the inner loop against a hand-written one."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import fast_spec, swarmfold_cmd, write_spec

from swarmfold.peer.data import Shard
from swarmfold.peer.seeds import batch_order
from swarmfold.peer.tokenizer import ByteTokenizer

ROUNDS, FIRST = 3, 1
TENSOR_FILES = ("model.safetensors", "inner_optimizer.safetensors", "outer_optimizer.safetensors")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ckpt(workdir: Path, round_idx: int) -> Path:
    return workdir / "checkpoints" / f"round-{round_idx:06d}"


def train_cmd(spec: Path, data: Path, workdir: Path, rounds: int) -> list[str]:
    return swarmfold_cmd("train", "--spec", str(spec), "--data", str(data), "--workdir", str(workdir),
                         "--rounds", str(rounds), "--threads", "1")


def run_train(spec: Path, data: Path, workdir: Path, rounds: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(train_cmd(spec, data, workdir, rounds), capture_output=True, text=True, timeout=300)


class Runs:
    """Three workdirs trained by real `swarmfold train` processes, and what they printed."""

    def __init__(self, root: Path, spec: Path, data: Path):
        self.root, self.spec, self.data = root, spec, data
        self.a, self.b, self.c = root / "a", root / "b", root / "c"
        # a and b: R2 rounds straight through, run at the same time; c: R1 rounds, then on to R2.
        procs = [subprocess.Popen(train_cmd(spec, data, w, r), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for w, r in ((self.a, ROUNDS), (self.b, ROUNDS), (self.c, FIRST))]
        outs = [p.communicate(timeout=300) for p in procs]
        for p, (_out, err) in zip(procs, outs, strict=True):
            assert p.returncode == 0, err
        self.out_a, self.out_b = outs[0][0], outs[1][0]
        self.resumed = run_train(spec, data, self.c, ROUNDS)
        assert self.resumed.returncode == 0, self.resumed.stderr


# the tests here share a module- or session-scoped fixture: one xdist worker runs them all (built once)
pytestmark = pytest.mark.xdist_group("test_train")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, shards: list[Path]) -> Runs:
    root = tmp_path_factory.mktemp("train")
    spec = write_spec(fast_spec(), root / "spec.toml")
    return Runs(root, spec, shards[0])


@pytest.mark.slow
def test_same_spec_data_threads_give_identical_model_bits(runs: Runs) -> None:
    for name in TENSOR_FILES:
        assert sha256(ckpt(runs.a, ROUNDS) / name) == sha256(ckpt(runs.b, ROUNDS) / name), name
    final = [re.search(r"model sha256 (\w+)", out).group(1) for out in (runs.out_a, runs.out_b)]  # type: ignore[union-attr]
    assert final[0] == final[1]


@pytest.mark.slow
def test_continuing_in_the_same_workdir_equals_straight_through(runs: Runs) -> None:
    assert f"resuming at round {FIRST}" in runs.resumed.stdout
    for name in TENSOR_FILES:
        assert sha256(ckpt(runs.c, ROUNDS) / name) == sha256(ckpt(runs.a, ROUNDS) / name), name
    meta_a = json.loads((ckpt(runs.a, ROUNDS) / "meta.json").read_text())
    meta_c = json.loads((ckpt(runs.c, ROUNDS) / "meta.json").read_text())
    # Not "rng": torch seeds its global generator randomly per process, and training draws nothing from it.
    for key in ("step", "model_sha256", "spec_hash", "manifest_hash", "data_cursor", "tokens_total"):
        assert meta_a[key] == meta_c[key], key


@pytest.mark.slow
def test_rounds_print_a_falling_loss_and_record_threads(runs: Runs) -> None:
    losses = [float(x) for x in re.findall(r"round +\d+ +loss ([\d.]+)", runs.out_a)]
    assert len(losses) == ROUNDS
    assert losses[-1] < losses[0]
    meta = json.loads((ckpt(runs.a, ROUNDS) / "meta.json").read_text())
    assert meta["environment"]["threads"] == 1
    assert meta["step"] == ROUNDS * fast_spec().round.inner_steps


# The tests below run the CLI in this process (`swarmfold.cli.main`), which saves a
# process start each; the determinism tests above use real `python -m swarmfold` processes.

def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    from swarmfold.cli import main

    rc = main(list(args))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def train_args(runs: Runs, workdir: Path, rounds: int) -> list[str]:
    return train_cmd(runs.spec, runs.data, workdir, rounds)[3:]  # drop `python -m swarmfold`


def test_already_trained_workdir_trains_nothing_more(runs: Runs, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "done"
    shutil.copytree(runs.a, work)
    before = sha256(ckpt(work, ROUNDS) / "model.safetensors")
    rc, out, _err = cli(capsys, *train_args(runs, work, ROUNDS))
    assert rc == 0
    assert f"resuming at round {ROUNDS}" in out
    assert "loss" not in out.split("resuming", 1)[1].split("done:", 1)[0]
    assert sha256(ckpt(work, ROUNDS) / "model.safetensors") == before


def test_truncated_newest_checkpoint_continues_from_the_previous_one(
        runs: Runs, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    work = tmp_path / "damaged"
    shutil.copytree(runs.a, work)
    model = ckpt(work, ROUNDS) / "model.safetensors"
    model.write_bytes(model.read_bytes()[:1000])
    rc, out, _err = cli(capsys, *train_args(runs, work, ROUNDS))
    assert rc == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("round-000003" in w and "truncated or corrupted" in w for w in warnings), warnings
    assert f"resuming at round {ROUNDS - 1}" in out
    # The round is trained again from round 2, and gives the same bits as before the damage.
    assert sha256(model) == sha256(ckpt(runs.a, ROUNDS) / "model.safetensors")


def test_every_checkpoint_damaged_is_refused(runs: Runs, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "ruined"
    shutil.copytree(runs.a, work)
    for d in (work / "checkpoints").iterdir():
        flip = bytearray((d / "model.safetensors").read_bytes())
        flip[-1] ^= 0xFF
        (d / "model.safetensors").write_bytes(bytes(flip))
    listing = sorted(p.name for p in (work / "checkpoints").iterdir())
    rc, _out, err = cli(capsys, *train_args(runs, work, ROUNDS + 1))
    assert rc == 2
    assert "every checkpoint is damaged" in err
    assert sorted(p.name for p in (work / "checkpoints").iterdir()) == listing  # nothing pruned or added


def test_inner_trainer_equals_a_hand_written_loop_bitwise(shards: list[Path]) -> None:
    """The inner-loop benchmark's baseline computes the same thing (else its ratio means nothing)."""
    path = Path(__file__).resolve().parent.parent / "scripts" / "bench_inner_loop.py"
    module_spec = importlib.util.spec_from_file_location("bench_inner_loop", path)
    assert module_spec is not None and module_spec.loader is not None
    bench = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(bench)

    spec = fast_spec(inner={"warmup_steps": 2})  # steps both in and past the warm-up
    shard = Shard([shards[0]], ByteTokenizer(), seq_len=spec.data.seq_len, val_fraction=spec.data.val_fraction)
    order = batch_order(spec.seed, 0, "t", num_windows=len(shard.train_windows), steps=4,
                        batch_size=spec.inner.batch_size)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seconds, _cpu, weights = bench.lockstep(spec, 257, 256, [shard.train_batch(row) for row in order])
    finally:
        torch.set_num_threads(before)
    assert len(seconds["swarmfold"]) == len(seconds["plain"]) == 4
    assert torch.equal(weights["swarmfold"], weights["plain"])
