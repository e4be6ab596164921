"""Real folders and ecosystem formats: what a shard skips and why, and Parquet/Arrow/JSONL giving the same tokens."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import fast_spec, write_spec

from swarmfold.cli import main
from swarmfold.peer.checkpoint import list_checkpoints
from swarmfold.peer.data import DataError, DataOptions, Shard
from swarmfold.peer.tokenizer import ByteTokenizer

SEQ = 16
CODE = "def f(x):\n    return x * 2\n" * 20
TEXT_FILES = {"README.md": "# a project\n" * 40, "src/main.py": CODE, "src/util.py": CODE.replace("2", "3")}


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("SWARMFOLD_CACHE", str(path))
    return path


def shard_of(paths: list[Path], **options: object) -> Shard:
    return Shard(paths, ByteTokenizer(), seq_len=SEQ, val_fraction=0.1,
                 options=DataOptions(**options))  # type: ignore[arg-type]


def messy_folder(root: Path, *, reverse: bool = False) -> Path:
    """A project folder as people have them: three text files among things a shard must not train on."""
    png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(64)
    pyc = b"\xa7\r\r\n\x00\x00\x00\x00" + bytes(range(256))
    makers = [
        *[(name, text.encode()) for name, text in TEXT_FILES.items()],
        (".git/HEAD", b"ref: refs/heads/main\n"), (".git/objects/ab/cdef0123", b"x\x01\x00binary"),
        (".git/config", b"[core]\n"),
        ("docs/logo.png", png),
        ("src/__pycache__/main.cpython-311.pyc", pyc), ("src/stray.pyc", pyc),
        ("include/latin1.h", "/* caf\u00e9 cr\u00e8me */\n".encode("latin-1") * 10),
        (".gitignore", b"build/\n*.log\n!keep.log\n"), ("build/out.txt", CODE.encode()),
        ("build/lib/gen.py", CODE.encode()), ("run.log", b"log line\n" * 10),
        ("node_modules/left-pad/index.js", b"module.exports = 1;\n"),
        ("venv/pyvenv.cfg", b"home = /usr/bin\n"), ("venv/lib/site.py", CODE.encode()),
    ]
    for name, data in reversed(makers) if reverse else makers:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    with open(root / "big.txt", "wb") as f:
        f.truncate(50 * 1024 * 1024)  # 50 MiB, sparse: nothing is written, and nothing must read it
    return root


EXPECTED_SKIPS = {
    ".git/": "version-control or tool folder",
    ".gitignore": "hidden file",
    "big.txt": "over the size cap (50.0 MiB > 16 MiB)",
    "build/": "matched by .gitignore",
    "docs/logo.png": "binary file (contains NUL bytes)",
    "include/latin1.h": "not valid UTF-8 at byte 6",
    "node_modules/": "version-control or tool folder",
    "run.log": "matched by .gitignore",
    "src/__pycache__/": "version-control or tool folder",
    "src/stray.pyc": "binary file (contains NUL bytes)",
    "venv/": "virtualenv or conda environment",
}


def test_a_messy_folder_trains_on_exactly_its_text_files(tmp_path: Path, cache: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    folder = messy_folder(tmp_path / "project")
    shard = shard_of([folder])
    assert [e.name for e in shard.manifest] == sorted(TEXT_FILES)
    assert {s["name"]: s["reason"] for s in shard.skipped_json()} == EXPECTED_SKIPS
    tok = ByteTokenizer()
    expected = np.concatenate([np.append(tok.encode(TEXT_FILES[n]), tok.eos_id) for n in sorted(TEXT_FILES)])
    assert np.array_equal(np.asarray(shard.tokens), expected)

    # a second peer with a copy of the folder (made in another order, elsewhere) gets the same manifest hash
    copy = messy_folder(tmp_path / "elsewhere" / "copy", reverse=True)
    assert shard_of([copy]).manifest_hash == shard.manifest_hash

    # the peer trains on it: `swarmfold train` prints the summary and its checkpoint lists files and skips
    spec = write_spec(fast_spec(data={"seq_len": SEQ}), tmp_path / "spec.toml")
    assert main(["train", "--spec", str(spec), "--data", str(folder), "--workdir", str(tmp_path / "w"),
                 "--rounds", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert (f"data: 3 files, {sum(len(t) for t in TEXT_FILES.values()) / 1e3:.1f} kB, {len(expected):,} tokens; "
            "11 skipped (tool folder 3, .gitignore 2, binary 2, hidden 1, not UTF-8 1, too big 1, virtualenv 1) "
            f"(manifest {shard.manifest_hash[:12]})") in out
    meta = json.loads((list_checkpoints(tmp_path / "w")[0] / "meta.json").read_text())
    assert meta["manifest_hash"] == shard.manifest_hash
    assert [f["name"] for f in meta["manifest"]] == sorted(TEXT_FILES)
    assert {s["name"]: s["reason"] for s in meta["manifest_skipped"]} == EXPECTED_SKIPS


def test_strict_refuses_the_messy_folder_naming_its_first_bad_file(tmp_path: Path, cache: Path) -> None:
    folder = messy_folder(tmp_path / "project")
    with pytest.raises(DataError) as info:
        shard_of([folder], strict=True)
    # shard order: README.md, big.txt, docs/..., include/..., src/...
    assert str(info.value).startswith(f"{folder / 'big.txt'}: over the size cap (50.0 MiB > 16 MiB)")
    assert "--max-file-mb" in str(info.value)
    assert not cache.exists() or not any(cache.iterdir())
    # a raised cap lets strict mode reach the next bad file (the zeros of big.txt are NUL bytes)
    with pytest.raises(DataError, match="big.txt: binary file"):
        shard_of([folder], strict=True, max_file_mb=64)


def test_gitignore_rules_follow_git(tmp_path: Path, cache: Path) -> None:
    root = tmp_path / "repo"
    files = {"a.py": CODE, "keep.log": CODE, "x.log": CODE, "sub/b.py": CODE, "sub/c.tmp": CODE,
             "sub/deeper/d.tmp": CODE, "sub/deeper/e.py": CODE, "out/f.py": CODE}
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / ".gitignore").write_text("*.log\n!keep.log\n/out/\n")
    (root / "sub" / ".gitignore").write_text("*.tmp\n!deeper/d.tmp\ne.py\n")
    shard = shard_of([root])
    assert [e.name for e in shard.manifest] == ["a.py", "keep.log", "sub/b.py", "sub/deeper/d.tmp"]
    assert {s["name"]: s["reason"] for s in shard.skipped_json()} == {
        ".gitignore": "hidden file", "out/": "matched by .gitignore", "sub/.gitignore": "hidden file",
        "sub/c.tmp": "matched by sub/.gitignore", "sub/deeper/e.py": "matched by sub/.gitignore",
        "x.log": "matched by .gitignore"}


# ---- Parquet, Arrow (as `datasets` writes them) and JSONL --------------------------------------------------------
DOCS = [CODE, "print('h\u00e9llo w\u00f6rld \u2603')\n" * 30, "import os\n" * 40, "x = 1\n" * 50, "# end\n" * 60]


def _table(pa: object) -> object:
    return pa.table({"id": list(range(len(DOCS))), "content": DOCS,  # type: ignore[attr-defined]
                     "score": [0.5] * len(DOCS)})


def write_parquet(path: Path) -> Path:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(_table(pa), path, row_group_size=2)  # several row groups: read batch by batch
    return path


def write_arrow_dataset(folder: Path) -> Path:
    """A folder laid out as `datasets.Dataset.save_to_disk` lays it out: IPC-stream .arrow shards + metadata."""
    pa = pytest.importorskip("pyarrow")
    folder.mkdir(parents=True)
    table = _table(pa)
    halves = [table.slice(0, 3), table.slice(3)]  # type: ignore[attr-defined]
    names = []
    for i, part in enumerate(halves):
        name = f"data-{i:05d}-of-{len(halves):05d}.arrow"
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, part.schema) as writer:
            for batch in part.to_batches(max_chunksize=2):
                writer.write_batch(batch)
        names.append(name)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names],
                                                   "_fingerprint": "0", "_split": None}))
    (folder / "dataset_info.json").write_text(json.dumps({"features": {"content": {"dtype": "string"}}}))
    return folder


def write_jsonl(path: Path, field: str = "content") -> Path:
    path.write_text("".join(json.dumps({"id": i, field: d}) + "\n" for i, d in enumerate(DOCS)))
    return path


def test_parquet_and_arrow_give_the_same_tokens_as_jsonl(tmp_path: Path, cache: Path) -> None:
    parquet = write_parquet(tmp_path / "train.parquet")
    arrow = write_arrow_dataset(tmp_path / "saved")
    jsonl = write_jsonl(tmp_path / "train.jsonl")
    tok = ByteTokenizer()
    expected = np.concatenate([np.append(tok.encode(d), tok.eos_id) for d in DOCS])
    shards = {kind: shard_of([path], text_field="content")
              for kind, path in (("jsonl", jsonl), ("parquet", parquet), ("arrow", arrow))}
    for kind, shard in shards.items():
        assert np.array_equal(np.asarray(shard.tokens), expected), kind
    assert [e.name for e in shards["arrow"].manifest] == ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
    assert {s["name"] for s in shards["arrow"].skipped_json()} == {"dataset_info.json", "state.json"}
    # the text field is part of what the hash covers: another field of the same files is another shard
    (tmp_path / "b").mkdir()
    write_jsonl(tmp_path / "b" / "train.jsonl", "text")
    assert shard_of([tmp_path / "b" / "train.jsonl"]).manifest_hash != shards["jsonl"].manifest_hash


def test_a_missing_text_column_is_skipped_or_refused_with_the_fix(tmp_path: Path, cache: Path) -> None:
    (tmp_path / "d").mkdir()
    parquet = write_parquet(tmp_path / "d" / "train.parquet")
    (tmp_path / "d" / "notes.md").write_text(CODE)
    shard = shard_of([tmp_path / "d"])
    assert shard.skipped_json() == [{"name": "train.parquet", "reason": "no column 'text' (columns: id, content, score)"}]
    with pytest.raises(DataError, match=r"train.parquet: no column 'text' .*--text-field NAME") as info:
        shard_of([parquet], strict=True)
    assert str(parquet) in str(info.value)
    with pytest.raises(DataError, match="column 'score' holds double, not strings"):
        shard_of([parquet], strict=True, text_field="score")


def test_parquet_and_arrow_train_with_the_text_field_flag(tmp_path: Path, cache: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    spec = write_spec(fast_spec(data={"seq_len": SEQ}, inner={"batch_size": 2}), tmp_path / "spec.toml")
    for kind, path in (("parquet", write_parquet(tmp_path / "train.parquet")),
                       ("arrow", write_arrow_dataset(tmp_path / "saved"))):
        work = tmp_path / f"w-{kind}"
        assert main(["train", "--spec", str(spec), "--data", str(path), "--workdir", str(work), "--rounds", "1",
                     "--threads", "1", "--text-field", "content"]) == 0, kind
        assert list_checkpoints(work)
        assert "done: 1 rounds" in capsys.readouterr().out


def test_without_pyarrow_the_error_names_the_install_command(tmp_path: Path, cache: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    parquet = write_parquet(tmp_path / "train.parquet")
    for name in [m for m in sys.modules if m == "pyarrow" or m.startswith("pyarrow.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow` now fails as if not installed
    with pytest.raises(DataError, match=r"needs pyarrow.*pip install 'swarmfold\[data\]'"):
        shard_of([parquet], text_field="content")


def test_data_prepare_prints_the_skips_and_the_summary(tmp_path: Path, cache: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    folder = messy_folder(tmp_path / "project")
    assert main(["data", "prepare", "--data", str(folder)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("data: 3 files,")
    assert "skipped include/latin1.h: not valid UTF-8 at byte 6" in out
    assert main(["data", "prepare", "--data", str(folder), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [f["name"] for f in doc["files"]] == sorted(TEXT_FILES)
    assert {s["name"]: s["reason"] for s in doc["skipped"]} == EXPECTED_SKIPS
    assert main(["data", "prepare", "--data", str(folder), "--strict"]) == 2
    assert "big.txt: over the size cap" in capsys.readouterr().err


def test_family_shards_differ_by_language(tmp_path: Path) -> None:
    """The non-IID stress: four disjoint shards, one per language family or domain."""
    from swarmfold.peer.corpus import FAMILIES, write_family_shards

    paths = write_family_shards(tmp_path, max_bytes_per_shard=60_000)
    assert [p.name for p in paths] == [f"family-{f}" for f in FAMILIES]
    texts = {p.name: "".join(f.read_text() for f in sorted(p.rglob("*")) if f.is_file()) for p in paths}
    assert all(50_000 <= len(t.encode()) <= 60_000 for t in texts.values())
    assert "def " in texts["family-python"] and "#define" in texts["family-c"]
    assert sum(c.isdigit() for c in texts["family-numeric"]) > 5 * sum(c.isdigit() for c in texts["family-prose"])
    assert write_family_shards(tmp_path, max_bytes_per_shard=60_000) == paths  # rewritten the same way
