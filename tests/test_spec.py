"""The swarm spec: presets, `swarmfold init` output, validation that lists every error, the swarm id."""

from __future__ import annotations

import dataclasses
import subprocess
import tomllib
from pathlib import Path

import pytest
from conftest import swarmfold_cmd

from swarmfold.cli import main
from swarmfold.peer.model import build_model, num_parameters
from swarmfold.spec import PRESETS, Spec, SpecError, load_spec, preset, spec_from_dict, to_toml

# Three independent mistakes: a wrong type, a value out of range, a misspelt field.
THREE_MISTAKES = """
[model]
hidden_size = "wide"

[inner]
lr = -0.5

[round]
inner_stepz = 10
"""


def _fields(spec: Spec) -> list[tuple[str, str]]:
    """(section, field) for every leaf field of the spec tree ("" is the top level)."""
    out = []
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        if dataclasses.is_dataclass(value):
            out += [(f.name, g.name) for g in dataclasses.fields(value)]
        else:
            out.append(("", f.name))
    return out


@pytest.mark.parametrize("name,low,high", [("tiny", 0.5e6, 1.5e6), ("small", 7e6, 14e6)])
def test_presets_are_valid_and_sized(name: str, low: float, high: float) -> None:
    spec = preset(name)
    assert spec_from_dict(spec.to_dict()).spec_hash == spec.spec_hash
    assert low <= num_parameters(build_model(spec, 257, 256)) <= high


def test_unknown_preset_is_an_error() -> None:
    with pytest.raises(SpecError, match="tiny"):
        preset("huge")


@pytest.mark.parametrize("name", PRESETS)
def test_init_writes_every_field_with_a_comment_and_loads_back(tmp_path: Path, name: str,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "spec.toml"
    assert main(["init", "--preset", name, "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    text = out.read_text(encoding="utf-8")
    lines = text.splitlines()
    section = ""
    seen = set()
    for i, line in enumerate(lines):
        if line.startswith("["):
            section = line.strip("[]")
        elif line and not line.startswith("#"):
            key = line.split("=", 1)[0].strip()
            comment = lines[i - 1]
            assert comment.startswith("# ") and len(comment) > 10, f"{section}.{key} has no comment"
            seen.add((section, key))
    spec = preset(name)
    assert seen == set(_fields(spec))
    assert load_spec(out).spec_hash == spec.spec_hash
    assert spec.swarm_id in stdout


def test_init_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "spec.toml"
    out.write_text("keep me")
    assert main(["init", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert out.read_text() == "keep me"


def test_three_mistakes_are_all_reported(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(THREE_MISTAKES)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    errors = info.value.errors
    assert len(errors) == 3, errors
    assert any(e.startswith("model.hidden_size: expected an integer") for e in errors)
    assert any(e.startswith("inner.lr: must be positive") for e in errors)
    assert any(e.startswith("round.inner_stepz: unknown field") and "inner_steps" in e for e in errors)
    assert str(path) in str(info.value)


def test_cli_with_three_mistakes_exits_nonzero_and_writes_nothing(tmp_path: Path, shards: list[Path]) -> None:
    # A real process: the exit status and stderr are what a user sees.
    path = tmp_path / "bad.toml"
    path.write_text(THREE_MISTAKES)
    workdir = tmp_path / "work"
    before = sorted(p.name for p in tmp_path.iterdir())
    run = subprocess.run(swarmfold_cmd("train", "--spec", str(path), "--data", str(shards[0]),
                                       "--workdir", str(workdir), "--rounds", "1", "--threads", "1"),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "3 problem(s)" in run.stderr
    for field in ("model.hidden_size", "inner.lr", "round.inner_stepz"):
        assert field in run.stderr
    assert "Traceback" not in run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert not workdir.exists()


def test_cross_field_rules_give_fix_hints() -> None:
    with pytest.raises(SpecError) as info:
        preset("tiny").replace(model={"hidden_size": 130, "num_heads": 4},
                               averaging={"min_group_size": 9, "group_size": 8})
    text = str(info.value)
    assert "divisible by model.num_heads" in text
    assert "min_group_size" in text


def test_compression_names_the_sparse_codecs() -> None:
    spec = preset("tiny").replace(averaging={"compression": "topk32"})
    assert spec.averaging.compression == "topk32" and spec.swarm_id != preset("tiny").swarm_id
    for bad in ("topk33", "topk", "int4"):
        with pytest.raises(SpecError, match=r"averaging.compression: .* use one of none, fp16, int8, topk8, topk16, topk32, topk64, sign1"):
            preset("tiny").replace(averaging={"compression": bad})


def test_not_valid_toml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.toml"
    bad.write_text("[model\nhidden_size = 4")
    with pytest.raises(SpecError, match="not valid TOML"):
        load_spec(bad)
    with pytest.raises(SpecError, match="swarmfold init"):
        load_spec(tmp_path / "absent.toml")


def test_swarm_id_covers_training_fields_but_not_network() -> None:
    base = preset("tiny")
    assert base.replace(network={"bootstrap_peers": ["/ip4/1.2.3.4/tcp/1/p2p/QmPeer"]}).spec_hash == base.spec_hash
    assert base.replace(seed=base.seed + 1).spec_hash != base.spec_hash
    assert base.replace(inner={"lr": 1e-3}).spec_hash != base.spec_hash


def test_to_toml_is_parseable_toml_with_the_same_values() -> None:
    spec = preset("small").replace(network={"bootstrap_peers": ["/ip4/1.2.3.4/tcp/1/p2p/QmPeer"]})
    raw = tomllib.loads(to_toml(spec))
    assert spec_from_dict(raw).to_dict() == spec.to_dict()
