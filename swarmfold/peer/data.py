"""Data shards: files, folders or globs of text, code, JSONL, Parquet or Arrow, tokenized once into a memmap cache.

A shard resolves its paths in a fixed order (folders are walked by swarmfold/manifest.py,
which leaves out hidden, version-control and tool folders, virtualenvs and .gitignore'd
paths) and checks every file. By default a file that cannot be used is skipped, with its
reason: binary (NUL bytes), not valid UTF-8, over the size cap (DataOptions.max_file_mb,
text and JSONL files only: Parquet and Arrow are streamed), or structured data without the
text field. `strict` refuses the shard at the first such file instead, naming it. The
files used are listed with their sha256 in the manifest, the skipped ones beside it.

Formats, by suffix: `.jsonl` (one JSON object a line, its `text_field` string is a
document), `.parquet` and `.arrow` (the `text_field` column; Arrow as `datasets` writes it
with `save_to_disk`, IPC stream or file format; the metadata JSON beside the .arrow files
is skipped), anything else is one UTF-8 text document. Parquet and Arrow are read one
record batch at a time, and only the text column (pyarrow, the `swarmfold[data]` extra).

The tokens of all documents, separated by end-of-text, are written once to a cache keyed
by (manifest hash, tokenizer) and then memory-mapped. The stream is cut into windows of
seq_len + 1 tokens (inputs and shifted targets). A deterministic, manifest-seeded subset
of windows is the held-out validation slice.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from swarmfold.errors import UserError
from swarmfold.fsutil import write_atomic
from swarmfold.hashing import file_sha256
from swarmfold.manifest import DEFAULT_TEXT_FIELD, Skip, manifest_hash, walk_folder
from swarmfold.peer.seeds import derive_seed, make_generator
from swarmfold.peer.tokenizer import Tokenizer
from swarmfold.progress import Progress

logger = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: meta.json carries the sha256 of the tokens
DEFAULT_MAX_FILE_MB = 16.0
ARROW_SUFFIXES = (".parquet", ".arrow")
DATASETS_METADATA = frozenset({"state.json", "dataset_info.json", "dataset_dict.json"})
BATCH_ROWS = 1024  # Parquet/Arrow rows read at a time
INSTALL_PYARROW = "pip install 'swarmfold[data]'  (or: pip install pyarrow)"


class DataError(UserError):
    """A shard cannot be used; the message names the file and says what to do."""


@dataclass(frozen=True)
class DataOptions:
    """How a shard reads its files (per peer: these are not part of the spec)."""

    text_field: str = DEFAULT_TEXT_FIELD  # the field of JSONL lines / column of Parquet and Arrow files
    max_file_mb: float = DEFAULT_MAX_FILE_MB  # text and JSONL files larger than this are skipped
    strict: bool = False  # refuse the shard at the first file that cannot be used, instead of skipping it

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_mb * 1024 * 1024)


@dataclass(frozen=True)
class ManifestEntry:
    name: str  # path relative to the argument it came from (stable across machines)
    path: Path
    sha256: str
    size: int


def cache_dir() -> Path:
    env = os.environ.get("SWARMFOLD_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "swarmfold" / "tokens"


def resolve_paths(args: Sequence[str | Path]) -> tuple[list[tuple[str, Path]], list[Skip]]:
    """(stable name, path) for every file named by files, folders or globs, in a fixed order, and
    what the folder walks left out (hidden, tool folders, virtualenvs, .gitignore'd)."""
    if not args:
        raise DataError("no data given; pass one or more files, folders or globs with --data")
    out: list[tuple[str, Path]] = []
    skips: list[Skip] = []
    for arg in args:
        s = str(arg)
        if any(ch in s for ch in "*?["):
            matches = sorted(glob.glob(s, recursive=True))
            files = [Path(m) for m in matches if Path(m).is_file()]
            if not files:
                raise DataError(f"{s}: the glob matches no files; check the pattern and quote it in the shell")
            out += [(os.path.basename(f) if len(files) == 1 else os.path.relpath(f, _glob_root(s)), f) for f in files]
        else:
            p = Path(s)
            if p.is_file():
                out.append((p.name, p))
            elif p.is_dir():
                named, left_out = walk_folder(p)  # swarmfold/manifest.py: shared with the public data's fetcher
                if not named and not left_out:
                    raise DataError(f"{p}: empty shard, the folder holds no files")
                out += named
                skips += left_out
            else:
                raise DataError(f"{p}: no such file or folder; check the --data path")
    return out, skips


def _glob_root(pattern: str) -> str:
    parts = Path(pattern).parts
    root = []
    for part in parts:
        if any(ch in part for ch in "*?["):
            break
        root.append(part)
    return str(Path(*root)) if root else "."


def _pyarrow(path: Path) -> Any:
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError as e:
        raise DataError(f"{path}: reading Parquet and Arrow files needs pyarrow, which is not installed; "
                        f"install it with: {INSTALL_PYARROW}") from e
    return pyarrow


class _Unusable(Exception):
    """A file a shard cannot use: `reason` for the manifest's skip list, `fix` for the error (strict mode)."""

    def __init__(self, detail: str, fix: str, line: int | None = None):
        super().__init__(detail)
        self.detail, self.fix, self.line = detail, fix, line

    @property
    def reason(self) -> str:
        return self.detail if self.line is None else f"line {self.line}: {self.detail}"

    def message(self, path: Path) -> str:
        where = "" if self.line is None else f":{self.line}"
        return f"{path}{where}: {self.detail}; {self.fix}"


def _arrow_schema(path: Path) -> Any:
    pa = _pyarrow(path)
    try:
        if path.suffix.lower() == ".parquet":
            return pa.parquet.ParquetFile(path).schema_arrow
        with pa.memory_map(str(path)) as source:
            try:
                return pa.ipc.open_stream(source).schema
            except pa.ArrowInvalid:
                source.seek(0)
                return pa.ipc.open_file(source).schema
    except (pa.ArrowException, OSError) as e:
        kind = "Parquet" if path.suffix.lower() == ".parquet" else "Arrow"
        raise _Unusable(f"not a readable {kind} file ({e})", "replace it or remove it from the shard") from e


def _check_columnar(path: Path, text_field: str) -> None:
    pa = _pyarrow(path)
    schema = _arrow_schema(path)
    if text_field not in schema.names:
        cols = ", ".join(schema.names[:12]) or "none"
        raise _Unusable(f"no column {text_field!r} (columns: {cols})",
                        "name the text column with --text-field NAME")
    typ = schema.field(text_field).type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
        raise _Unusable(f"column {text_field!r} holds {typ}, not strings", "name a string column with --text-field")


def _jsonl_documents(text: str, text_field: str) -> list[str]:
    docs = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise _Unusable(f"not valid JSON ({e.msg})", "each line must be an object", lineno) from e
        if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
            raise _Unusable(f"no string field {json.dumps(text_field)}",
                            "a JSONL line needs one; name the field that holds the text with --text-field NAME",
                            lineno)
        docs.append(obj[text_field])
    return docs


def _decode(raw: bytes) -> str:
    if b"\x00" in raw[:65536]:
        raise _Unusable("binary file (contains NUL bytes)", "remove it from the shard")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Unusable(f"not valid UTF-8 at byte {e.start}", "convert it to UTF-8 or remove it") from e


def _is_datasets_metadata(path: Path) -> bool:
    """state.json / dataset_info.json / dataset_dict.json of a `save_to_disk` folder (beside its .arrow files)."""
    if path.name not in DATASETS_METADATA:
        return False
    folder = path.parent
    return path.name == "dataset_dict.json" or any(folder.glob("*.arrow"))


def _check(path: Path, options: DataOptions) -> tuple[str, int]:
    """(sha256, size) of a usable file, or _Unusable."""
    suffix = path.suffix.lower()
    if suffix in ARROW_SUFFIXES:
        _check_columnar(path, options.text_field)
        return file_sha256(path), path.stat().st_size
    if _is_datasets_metadata(path):
        raise _Unusable("datasets metadata (the .arrow files beside it hold the data)", "remove it from the shard")
    size = path.stat().st_size
    if size > options.max_file_bytes:
        raise _Unusable(f"over the size cap ({size / 2**20:.1f} MiB > {options.max_file_mb:g} MiB)",
                        "raise the cap with --max-file-mb, split the file, or remove it")
    raw = path.read_bytes()
    text = _decode(raw)
    if suffix == ".jsonl":
        _jsonl_documents(text, options.text_field)
    return hashlib.sha256(raw).hexdigest(), len(raw)


def iter_documents(path: Path, text_field: str = DEFAULT_TEXT_FIELD) -> Iterator[str]:
    """The documents of one file (see the module docstring), or DataError naming the file."""
    suffix = path.suffix.lower()
    try:
        if suffix in ARROW_SUFFIXES:
            yield from _columnar_documents(path, text_field)
            return
        text = _decode(path.read_bytes())
        if suffix == ".jsonl":
            yield from _jsonl_documents(text, text_field)
        elif text:
            yield text
    except _Unusable as e:
        raise DataError(e.message(path)) from e


def read_documents(path: Path, text_field: str = DEFAULT_TEXT_FIELD) -> list[str]:
    """All the documents of one file, or DataError naming the file (binary, undecodable, bad JSONL)."""
    return list(iter_documents(path, text_field))


def _columnar_documents(path: Path, text_field: str) -> Iterator[str]:
    """The non-empty strings of `text_field`, one record batch at a time (only that column is read)."""
    pa = _pyarrow(path)
    _check_columnar(path, text_field)
    if path.suffix.lower() == ".parquet":
        batches: Iterator[Any] = pa.parquet.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS,
                                                                           columns=[text_field])
        for batch in batches:
            yield from (d for d in batch.column(0).to_pylist() if d)
        return
    with pa.memory_map(str(path)) as source:  # mapped: a batch's other columns are never read
        try:
            reader: Any = pa.ipc.open_stream(source)
            stream: Iterator[Any] = iter(reader)
        except pa.ArrowInvalid:
            source.seek(0)
            file_reader = pa.ipc.open_file(source)
            stream = (file_reader.get_batch(i) for i in range(file_reader.num_record_batches))
        for batch in stream:
            column = batch.column(text_field)
            for start in range(0, len(column), BATCH_ROWS):
                yield from (d for d in column.slice(start, BATCH_ROWS).to_pylist() if d)


def check_files(named: Sequence[tuple[str, Path]], options: DataOptions) -> tuple[list[ManifestEntry], list[Skip]]:
    """The usable files with their sha256, and the others with their reason (strict: DataError at the first)."""
    used: list[ManifestEntry] = []
    skips: list[Skip] = []
    with Progress("checking files", total=len(named), unit="file", log=logger) as bar:
        for name, path in named:
            try:
                sha, size = _check(path, options)
            except _Unusable as e:
                if options.strict:
                    raise DataError(e.message(path) + " (without --strict such files are skipped)") from e
                skips.append(Skip(name, e.reason))
                bar.update(1)
                continue
            used.append(ManifestEntry(name, path, sha, size))
            bar.update(1, B=size)
    return used, skips


def _reason_kind(reason: str) -> str:
    for prefix, kind in (("binary", "binary"), ("not valid UTF-8", "not UTF-8"), ("over the size cap", "too big"),
                         ("matched by", ".gitignore"), ("version-control", "tool folder"),
                         ("virtualenv", "virtualenv"), ("hidden", "hidden"), ("datasets metadata", "metadata"),
                         ("line ", "bad JSONL"), ("no column", "no text column"), ("column", "no text column")):
        if reason.startswith(prefix):
            return kind
    return "other"


def _human_bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


class Shard:
    """A tokenized, memory-mapped shard with its manifest and train/validation windows."""

    def __init__(self, paths: Sequence[str | Path], tokenizer: Tokenizer, *, seq_len: int, val_fraction: float,
                 options: DataOptions | None = None):
        self.seq_len = seq_len
        self.tokenizer = tokenizer
        self.options = options or DataOptions()
        named, walked_past = resolve_paths(paths)
        self.manifest, unusable = check_files(named, self.options)
        self.skipped: list[Skip] = walked_past + unusable
        if not self.manifest:
            raise DataError(f"{self._describe(paths)}: empty shard, no file can be used"
                            + (f" ({self.skipped_text()}); see the reasons with `swarmfold data prepare --data ...`"
                               if self.skipped else "; add text files"))
        self.manifest_hash = manifest_hash([(e.name, e.sha256) for e in self.manifest], tokenizer.ident,
                                           self.options.text_field)
        self.tokens = self._load_or_build()
        num_windows = self._check_windows(len(self.tokens))
        n_val = max(1, math.ceil(val_fraction * num_windows))
        n_val = min(n_val, num_windows - 1)
        g = make_generator(derive_seed(0, "val-split", self.manifest_hash))
        perm = torch.randperm(num_windows, generator=g)
        self.val_windows = torch.sort(perm[:n_val]).values
        self.train_windows = torch.sort(perm[n_val:]).values

    def skipped_text(self) -> str:
        """'12 skipped (tool folder 7, binary 3, .gitignore 2)' (a folder counts once), or 'none skipped'."""
        if not self.skipped:
            return "none skipped"
        kinds = Counter(_reason_kind(s.reason) for s in self.skipped)
        by_count = sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0]))
        return f"{len(self.skipped)} skipped (" + ", ".join(f"{k} {n}" for k, n in by_count) + ")"

    def summary(self) -> str:
        """One line: files used, bytes, tokens, and what was skipped by reason."""
        size = sum(e.size for e in self.manifest)
        return (f"data: {len(self.manifest)} files, {_human_bytes(size)}, {len(self.tokens):,} tokens; "
                f"{self.skipped_text()} (manifest {self.manifest_hash[:12]})")

    def _check_windows(self, count: int) -> int:
        """The number of windows in `count` tokens, or DataError if too few to train and validate."""
        num_windows = (count - 1) // self.seq_len
        if num_windows < 2:
            raise DataError(
                f"{self._describe()}: too little text, {count} tokens make fewer than 2 windows of "
                f"{self.seq_len + 1} tokens (one to train, one to validate); add more text"
            )
        return num_windows

    def _describe(self, given: Sequence[str | Path] | None = None) -> str:
        items = [str(e.path) for e in self.manifest] if given is None else [str(p) for p in given]
        more = f" and {len(items) - 3} more" if len(items) > 3 else ""
        return f"shard {', '.join(items[:3])}{more}"

    # ---- cache ---------------------------------------------------------------------
    @property
    def cache_key(self) -> str:
        return hashlib.sha256(f"{CACHE_VERSION}:{self.manifest_hash}".encode()).hexdigest()[:32]

    def _load_or_build(self) -> np.ndarray:
        directory = cache_dir()
        tok_path = directory / f"{self.cache_key}.tokens"
        meta_path = directory / f"{self.cache_key}.json"
        dtype = np.uint16 if self.tokenizer.vocab_size <= 65535 else np.uint32
        if tok_path.exists() and meta_path.exists():
            try:
                meta = json.loads(meta_path.read_text())
                if meta["count"] * np.dtype(dtype).itemsize == tok_path.stat().st_size:
                    tokens = np.memmap(tok_path, dtype=dtype, mode="r", shape=(meta["count"],))
                    # Checked on every load (a few ms per MB): a flipped bit would silently change training.
                    if hashlib.sha256(tokens.view(np.uint8).data).hexdigest() == meta["sha256"]:
                        logger.debug("token cache hit: %s", tok_path)
                        return tokens
            except (ValueError, KeyError, OSError):
                pass
            logger.warning("token cache %s is damaged; rebuilding it", tok_path)
        built = self._tokenize(dtype)
        self._check_windows(len(built))  # bad input leaves nothing in the cache
        directory.mkdir(parents=True, exist_ok=True)
        blob = built.tobytes()
        write_atomic(tok_path, blob)
        write_atomic(meta_path, json.dumps({"count": int(len(built)), "dtype": np.dtype(dtype).name,
                                              "sha256": hashlib.sha256(blob).hexdigest(),
                                              "manifest_hash": self.manifest_hash}).encode())
        return np.memmap(tok_path, dtype=dtype, mode="r", shape=(len(built),))

    def _tokenize(self, dtype: type) -> np.ndarray:
        pieces: list[np.ndarray] = []
        eos: np.ndarray = np.array([self.tokenizer.eos_id], dtype=dtype)
        total = 0
        with Progress("tokenizing", total=len(self.manifest), unit="file", log=logger) as bar:
            for entry in self.manifest:
                before = total
                for doc in iter_documents(entry.path, self.options.text_field):
                    ids: np.ndarray = self.tokenizer.encode(doc).astype(dtype)
                    pieces += [ids, eos]
                    total += len(ids) + 1
                bar.update(1, tokens=total - before)
        if not pieces:
            raise DataError(f"{self._describe()}: empty shard, the files hold no text; add text files")
        return np.concatenate(pieces)

    # ---- windows -------------------------------------------------------------------
    def windows(self, indices: torch.Tensor) -> torch.Tensor:
        """(len(indices), seq_len + 1) int64 tensor of token windows."""
        T = self.seq_len
        rows = [np.asarray(self.tokens[i * T : i * T + T + 1], dtype=np.int64) for i in indices.tolist()]
        return torch.from_numpy(np.stack(rows))

    def train_batch(self, positions: torch.Tensor) -> torch.Tensor:
        """Training windows at `positions` (indices into the list of training windows)."""
        return self.windows(self.train_windows[positions])

    def val_batches(self, batch_size: int, max_windows: int | None = None) -> Iterator[torch.Tensor]:
        idx = self.val_windows if max_windows is None else self.val_windows[:max_windows]
        for start in range(0, len(idx), batch_size):
            yield self.windows(idx[start : start + batch_size])

    def manifest_json(self) -> list[dict[str, object]]:
        """The files used, in shard order: what the manifest hash covers."""
        return [{"name": e.name, "sha256": e.sha256, "size": e.size} for e in self.manifest]

    def skipped_json(self) -> list[dict[str, str]]:
        """The files and folders (name ends with '/') left out, with the reason for each."""
        return [{"name": s.name, "reason": s.reason} for s in self.skipped]

    def manifest_document(self) -> dict[str, Any]:
        """The whole manifest: hash, options, files used, files skipped."""
        return {"manifest_hash": self.manifest_hash, "tokenizer": self.tokenizer.ident,
                "text_field": self.options.text_field, "max_file_mb": self.options.max_file_mb,
                "tokens": int(len(self.tokens)), "files": self.manifest_json(), "skipped": self.skipped_json()}


