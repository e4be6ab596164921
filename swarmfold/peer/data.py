"""Data shards: files, folders or globs of text, code or JSONL, tokenized once into a memmap cache.

A shard resolves its paths in a fixed order, checks every file (exists, not binary,
valid UTF-8, JSONL lines carry a `text` string), and lists each file with its sha256 in a
manifest. The tokens of all documents, separated by end-of-text, are written once to a
cache keyed by (manifest hash, tokenizer) and then memory-mapped.

The stream is cut into windows of seq_len + 1 tokens (inputs and shifted targets). A
deterministic, manifest-seeded subset of windows is the held-out validation slice.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from swarmfold.errors import UserError
from swarmfold.fsutil import write_atomic
from swarmfold.hashing import file_sha256
from swarmfold.manifest import folder_files, manifest_hash
from swarmfold.peer.seeds import derive_seed, make_generator
from swarmfold.peer.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: meta.json carries the sha256 of the tokens


class DataError(UserError):
    """A shard cannot be used; the message names the file and says what to do."""


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


def resolve_paths(args: Sequence[str | Path]) -> list[tuple[str, Path]]:
    """(stable name, path) for every file named by files, folders or globs, in a fixed order."""
    if not args:
        raise DataError("no data given; pass one or more files, folders or globs with --data")
    out: list[tuple[str, Path]] = []
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
                named = folder_files(p)  # swarmfold/manifest.py: shared with the public data's fetcher
                if not named:
                    raise DataError(f"{p}: empty shard, the folder holds no files")
                out += named
            else:
                raise DataError(f"{p}: no such file or folder; check the --data path")
    return out


def _glob_root(pattern: str) -> str:
    parts = Path(pattern).parts
    root = []
    for part in parts:
        if any(ch in part for ch in "*?["):
            break
        root.append(part)
    return str(Path(*root)) if root else "."



def read_documents(path: Path) -> list[str]:
    """The documents of one file, or DataError naming the file (binary, undecodable, bad JSONL)."""
    raw = path.read_bytes()
    if b"\x00" in raw[:65536]:
        raise DataError(f"{path}: binary file (contains NUL bytes); remove it from the shard")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 at byte {e.start}; convert it to UTF-8 or remove it") from e
    if path.suffix == ".jsonl":
        docs = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be an object") from e
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise DataError(f"{path}:{lineno}: a JSONL line needs a string field \"text\"")
            docs.append(obj["text"])
        return docs
    return [text] if text else []


class Shard:
    """A tokenized, memory-mapped shard with its manifest and train/validation windows."""

    def __init__(self, paths: Sequence[str | Path], tokenizer: Tokenizer, *, seq_len: int, val_fraction: float):
        self.seq_len = seq_len
        self.tokenizer = tokenizer
        named = resolve_paths(paths)
        self.manifest = [ManifestEntry(name, p, file_sha256(p), p.stat().st_size) for name, p in named]
        self.manifest_hash = manifest_hash([(e.name, e.sha256) for e in self.manifest], tokenizer.ident)
        self.tokens = self._load_or_build()
        num_windows = self._check_windows(len(self.tokens))
        n_val = max(1, math.ceil(val_fraction * num_windows))
        n_val = min(n_val, num_windows - 1)
        g = make_generator(derive_seed(0, "val-split", self.manifest_hash))
        perm = torch.randperm(num_windows, generator=g)
        self.val_windows = torch.sort(perm[:n_val]).values
        self.train_windows = torch.sort(perm[n_val:]).values

    def _check_windows(self, count: int) -> int:
        """The number of windows in `count` tokens, or DataError if too few to train and validate."""
        num_windows = (count - 1) // self.seq_len
        if num_windows < 2:
            raise DataError(
                f"{self._describe()}: too little text, {count} tokens make fewer than 2 windows of "
                f"{self.seq_len + 1} tokens (one to train, one to validate); add more text"
            )
        return num_windows

    def _describe(self) -> str:
        paths = ", ".join(str(e.path) for e in self.manifest[:3])
        more = f" and {len(self.manifest) - 3} more" if len(self.manifest) > 3 else ""
        return f"shard {paths}{more}"

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
        for entry in self.manifest:
            for doc in read_documents(entry.path):
                pieces.append(self.tokenizer.encode(doc).astype(dtype))
                pieces.append(eos)
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
        return [{"name": e.name, "sha256": e.sha256, "size": e.size} for e in self.manifest]


