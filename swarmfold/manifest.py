"""A shard's manifest hash and how a folder's files are named and ordered: one definition for all.

peer/data.py (Shard) hashes the shards it trains on with these, and averaging/datashare.py
checks the public data it fetches from peers with the same ones, so that a fetched copy,
laid out as a folder, is named, ordered and hashed exactly as the original.

The manifest hash is sha256 of the canonical JSON of [[name, sha256], ..., ["tokenizer",
ident]], in the shard's file order. A folder's files are named by their path relative to
the folder ('/'-separated) and ordered by the parts of that path, which is how pathlib
sorts paths with a common prefix. Hidden files and folders (a part that starts with '.')
and tool folders (SKIP_DIRS) are left out.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path, PurePath

from swarmfold.spec import canonical_hash

SKIP_DIRS = frozenset({"__pycache__", ".git", ".hg", ".svn", "node_modules"})


def manifest_hash(files: Iterable[tuple[str, str]], tokenizer_ident: str) -> str:
    """The manifest hash of (name, sha256) pairs in shard order, tokenized with `tokenizer_ident`."""
    return canonical_hash([[name, sha] for name, sha in files] + [["tokenizer", tokenizer_ident]])


def skipped(rel: PurePath) -> bool:
    """True for a path (relative to a data folder) that a shard leaves out: hidden or a tool folder."""
    return any(part in SKIP_DIRS or part.startswith(".") for part in rel.parts)


def layout_key(name: str) -> tuple[str, ...]:
    """The sort key of a file named `name` inside a folder (pathlib's order for a common prefix)."""
    return tuple(name.split("/"))


def folder_files(folder: Path) -> list[tuple[str, Path]]:
    """(name, path) of every file a shard takes from `folder`, in shard order."""
    named = [(f.relative_to(folder).as_posix(), f) for f in folder.rglob("*")
             if f.is_file() and not skipped(f.relative_to(folder))]
    return sorted(named, key=lambda item: layout_key(item[0]))
