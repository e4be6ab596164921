"""Data shards: bad input is named and leaves nothing behind; JSONL, globs, manifest, content-keyed cache."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from swarmfold.peer.corpus import write_stdlib_shards
from swarmfold.peer.data import DataError, DataOptions, Shard
from swarmfold.peer.tokenizer import ByteTokenizer

SEQ = 16
TEXT = "def f(x):\n    return x * 2\n" * 20  # 560 bytes: plenty of 17-token windows


def make_shard(paths: list[str | Path], seq_len: int = SEQ, **options: object) -> Shard:
    return Shard(paths, ByteTokenizer(), seq_len=seq_len, val_fraction=0.1,
                 options=DataOptions(**options))  # type: ignore[arg-type]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A token cache of this test's own, so that 'nothing written' can be checked."""
    path = tmp_path / "cache"
    monkeypatch.setenv("SWARMFOLD_CACHE", str(path))
    return path


def _cache_files(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.rglob("*")) if cache.exists() else []


# Each case makes a bad shard in a folder and returns (the --data argument, the file the error must name).
def _missing(d: Path) -> tuple[Path, Path]:
    return d / "absent.txt", d / "absent.txt"


def _empty_folder(d: Path) -> tuple[Path, Path]:
    (d / "shard").mkdir()
    return d / "shard", d / "shard"


def _empty_file(d: Path) -> tuple[Path, Path]:
    (d / "empty.txt").write_bytes(b"")
    return d / "empty.txt", d / "empty.txt"


def _too_short(d: Path) -> tuple[Path, Path]:
    (d / "short.txt").write_text("x = 1\n")
    return d / "short.txt", d / "short.txt"


def _binary(d: Path) -> tuple[Path, Path]:
    (d / "good.py").write_text(TEXT)
    (d / "model.bin").write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00" + bytes(range(256)))
    return d, d / "model.bin"


def _undecodable(d: Path) -> tuple[Path, Path]:
    (d / "good.py").write_text(TEXT)
    (d / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me br\u00fbl\u00e9e\n".encode("latin-1") * 10)
    return d, d / "latin1.txt"


def _bad_jsonl(d: Path) -> tuple[Path, Path]:
    (d / "docs.jsonl").write_text(json.dumps({"text": TEXT}) + "\n{not json\n")
    return d / "docs.jsonl", d / "docs.jsonl"


def _jsonl_without_text(d: Path) -> tuple[Path, Path]:
    (d / "docs.jsonl").write_text(json.dumps({"text": TEXT}) + "\n" + json.dumps({"body": "x"}) + "\n")
    return d / "docs.jsonl", d / "docs.jsonl"


def _empty_glob(d: Path) -> tuple[Path, Path]:
    return d / "*.nothing", d / "*.nothing"


BAD: dict[str, tuple[Callable[[Path], tuple[Path, Path]], str]] = {
    "missing path": (_missing, "no such file or folder"),
    "empty folder": (_empty_folder, "empty shard"),
    "empty file": (_empty_file, "empty shard"),
    "too little text": (_too_short, "too little text"),
    "binary file": (_binary, "binary file"),
    "undecodable text": (_undecodable, "not valid UTF-8"),
    "bad JSONL": (_bad_jsonl, ":2: not valid JSON"),
    "JSONL without text": (_jsonl_without_text, 'string field "text"'),
    "glob matching nothing": (_empty_glob, "matches no files"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_names_the_file_and_writes_nothing(case: str, tmp_path: Path, cache: Path) -> None:
    """--strict: today's refusal, at the first bad file, naming it."""
    make, message = BAD[case]
    data = tmp_path / "data"
    data.mkdir()
    arg, culprit = make(data)
    with pytest.raises(DataError) as info:
        make_shard([arg], strict=True)
    assert str(culprit) in str(info.value)
    assert message in str(info.value)
    assert _cache_files(cache) == []


SKIPPED = {"binary file": "binary file", "undecodable text": "not valid UTF-8 at byte 3",
           "bad JSONL": "line 2: not valid JSON", "JSONL without text": 'line 2: no string field "text"'}


@pytest.mark.parametrize("case", SKIPPED)
def test_by_default_a_bad_file_is_skipped_with_its_reason(case: str, tmp_path: Path, cache: Path) -> None:
    make, _ = BAD[case]
    data = tmp_path / "data"
    data.mkdir()
    arg, culprit = make(data)
    (data / "more.py").write_text(TEXT)
    shard = make_shard([data])
    assert culprit.name not in [e.name for e in shard.manifest]
    assert [s["name"] for s in shard.skipped_json()] == [culprit.name]
    assert SKIPPED[case] in shard.skipped_json()[0]["reason"]
    if arg == culprit:  # given alone, the file leaves nothing: an error that gives the reason
        with pytest.raises(DataError, match="empty shard, no file can be used") as info:
            make_shard([arg])
        assert str(culprit) in str(info.value) and "1 skipped" in str(info.value)


def test_jsonl_text_field_documents_are_joined_by_end_of_text(tmp_path: Path, cache: Path) -> None:
    docs = [TEXT, "print('héllo')\n" * 30, "import os\n" * 40]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)) + "\n")
    shard = make_shard([path])
    tok = ByteTokenizer()
    expected = np.concatenate([np.append(tok.encode(d), tok.eos_id) for d in docs])
    assert np.array_equal(np.asarray(shard.tokens), expected)


def test_globs_folders_and_files_resolve_in_a_fixed_order(tmp_path: Path, cache: Path) -> None:
    (tmp_path / "src" / "pkg").mkdir(parents=True)
    for name in ("b.py", "a.py", "pkg/c.py"):
        (tmp_path / "src" / name).write_text(TEXT + name)
    (tmp_path / "src" / "notes.md").write_text(TEXT)
    (tmp_path / "src" / ".hidden.py").write_text(TEXT)
    shard = make_shard([str(tmp_path / "src" / "**" / "*.py")])
    assert [e.name for e in shard.manifest] == ["a.py", "b.py", "pkg/c.py"]
    folder = make_shard([tmp_path / "src"])
    assert [e.name for e in folder.manifest] == ["a.py", "b.py", "notes.md", "pkg/c.py"]  # hidden files skipped
    single = make_shard([tmp_path / "src" / "a.py", tmp_path / "src" / "notes.md"])
    assert [e.name for e in single.manifest] == ["a.py", "notes.md"]


def test_manifest_lists_every_file_with_its_sha256(tmp_path: Path, cache: Path) -> None:
    for i in range(3):
        (tmp_path / f"f{i}.py").write_text(TEXT * (i + 1))
    shard = make_shard([tmp_path])
    manifest = shard.manifest_json()
    assert [m["name"] for m in manifest] == ["f0.py", "f1.py", "f2.py"]
    for m in manifest:
        data = (tmp_path / str(m["name"])).read_bytes()
        assert m["sha256"] == hashlib.sha256(data).hexdigest()
        assert m["size"] == len(data)


def test_cache_is_reused_and_keyed_by_content(tmp_path: Path, cache: Path) -> None:
    src = tmp_path / "a"
    src.mkdir()
    (src / "x.py").write_text(TEXT)
    (src / "y.py").write_text(TEXT.upper())
    first = make_shard([src])
    files = sorted(cache.iterdir())
    assert len(files) == 2  # tokens + their count
    stamps = [(f.stat().st_ino, f.stat().st_mtime_ns) for f in files]

    again = make_shard([src])
    assert sorted(cache.iterdir()) == files
    assert [(f.stat().st_ino, f.stat().st_mtime_ns) for f in files] == stamps  # read, not rewritten
    assert np.array_equal(np.asarray(again.tokens), np.asarray(first.tokens))

    moved = tmp_path / "elsewhere"
    shutil.copytree(src, moved)
    assert make_shard([moved]).cache_key == first.cache_key  # same content, another place: same entry
    assert len(list(cache.iterdir())) == 2

    (moved / "y.py").write_text(TEXT.lower())
    changed = make_shard([moved])
    assert changed.cache_key != first.cache_key
    assert len(list(cache.iterdir())) == 4


@pytest.mark.parametrize("damage", ["truncate", "bit-flip"])
def test_damaged_cache_entry_is_rebuilt(damage: str, tmp_path: Path, cache: Path,
                                        caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "x.py").write_text(TEXT)
    first = make_shard([tmp_path / "x.py"])
    expected = np.array(first.tokens)
    del first  # drop the memory map before the file is damaged
    tokens_file = next(cache.glob("*.tokens"))
    blob = bytearray(tokens_file.read_bytes())
    if damage == "truncate":
        del blob[-10:]
    else:
        blob[len(blob) // 2] ^= 0x01
    tokens_file.unlink()
    tokens_file.write_bytes(bytes(blob))
    again = make_shard([tmp_path / "x.py"])
    assert "damaged" in caplog.text
    assert np.array_equal(np.asarray(again.tokens), expected)


def test_validation_slice_is_deterministic_and_held_out(tmp_path: Path, cache: Path) -> None:
    (tmp_path / "x.py").write_text(TEXT * 5)
    a, b = make_shard([tmp_path / "x.py"]), make_shard([tmp_path / "x.py"])
    assert torch.equal(a.val_windows, b.val_windows)
    val, train = set(a.val_windows.tolist()), set(a.train_windows.tolist())
    assert not val & train
    assert val | train == set(range((len(a.tokens) - 1) // SEQ))
    assert len(val) == pytest.approx(0.1 * (len(val) + len(train)), abs=1)
    assert a.train_batch(torch.tensor([0, 1])).shape == (2, SEQ + 1)


def test_stdlib_shards_do_not_overlap(tmp_path: Path) -> None:
    shards = write_stdlib_shards(3, tmp_path / "data", max_bytes_per_shard=200_000)
    assert [p.name for p in shards] == ["shard-0", "shard-1", "shard-2"]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["shard-0", "shard-1", "shard-2"]  # no temp
    tops = [{f.relative_to(s).parts[0] for f in s.rglob("*.py")} for s in shards]
    for i in range(3):
        assert tops[i], f"shard-{i} is empty"
        for j in range(i + 1, 3):
            assert not tops[i] & tops[j]
