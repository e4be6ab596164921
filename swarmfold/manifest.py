"""A shard's manifest hash and which files of a folder a shard takes, in what order: one definition for all.

peer/data.py (Shard) hashes the shards it trains on with these, and averaging/datashare.py
checks the public data it fetches from peers with the same ones, so that a fetched copy,
laid out as a folder, is named, ordered and hashed exactly as the original.

The manifest hash is sha256 of the canonical JSON of [[name, sha256], ..., ["tokenizer",
ident]] in the shard's file order, with ["text_field", NAME] added before the tokenizer
when the text field of JSONL/Parquet/Arrow files is not the default `text`. Only the files
used are hashed; skipped files are listed beside it (Shard.skipped_json) but do not enter
it, so two peers with copies of one folder agree, and so does a fetched copy (which holds
the used files only).

A folder's files are named by their path relative to the folder ('/'-separated) and
ordered by the parts of that path, which is how pathlib sorts paths with a common prefix.
The walk (walk_folder) leaves out, deterministically and with a reason for each:
  - hidden files and folders (a part that starts with '.'), which covers .git, .venv, .tox;
  - version-control and tool folders (SKIP_DIRS), whatever their place;
  - virtualenvs and conda environments (a folder holding pyvenv.cfg or conda-meta/);
  - paths matched by .gitignore files inside the folder (git's rules: the deepest
    .gitignore with a matching pattern decides, the last matching pattern wins, `!` re-
    includes, an ignored folder is not entered). .gitignore files above the folder, and
    .git/info/exclude, are not read: the shard must not depend on where the folder sits.
A skipped folder is one entry (its name ends with '/'); its files are not listed one by one.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePath

import pathspec

from swarmfold.spec import canonical_hash

SKIP_DIRS = frozenset({"__pycache__", ".git", ".hg", ".svn", ".bzr", "_darcs", "CVS", "node_modules",
                       "__pypackages__"})
DEFAULT_TEXT_FIELD = "text"


@dataclass(frozen=True)
class Skip:
    """A file or folder (name ends with '/') that a shard leaves out, and why."""

    name: str
    reason: str


def manifest_hash(files: Iterable[tuple[str, str]], tokenizer_ident: str,
                  text_field: str = DEFAULT_TEXT_FIELD) -> str:
    """The manifest hash of (name, sha256) pairs in shard order, tokenized with `tokenizer_ident`."""
    extra = [] if text_field == DEFAULT_TEXT_FIELD else [["text_field", text_field]]
    return canonical_hash([[name, sha] for name, sha in files] + extra + [["tokenizer", tokenizer_ident]])


def skipped(rel: PurePath) -> bool:
    """True for a path (relative to a data folder) that a shard leaves out by name: hidden or a tool folder."""
    return any(part in SKIP_DIRS or part.startswith(".") for part in rel.parts)


def layout_key(name: str) -> tuple[str, ...]:
    """The sort key of a file named `name` inside a folder (pathlib's order for a common prefix)."""
    return tuple(name.split("/"))


def _name_reason(part: str, is_dir: bool) -> str | None:
    if part in SKIP_DIRS:
        return "version-control or tool folder"
    if part.startswith("."):
        return "hidden folder" if is_dir else "hidden file"
    return None


def _is_environment(path: Path) -> bool:
    return (path / "pyvenv.cfg").is_file() or (path / "conda-meta").is_dir()


def _gitignore(folder: Path) -> pathspec.GitIgnoreSpec | None:
    path = folder / ".gitignore"
    if not path.is_file():
        return None
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    return pathspec.GitIgnoreSpec.from_lines(lines)


def _ignored(rules: list[tuple[str, pathspec.GitIgnoreSpec]], rel: str, is_dir: bool) -> str | None:
    """The .gitignore (relative name) that ignores `rel`, or None; the deepest file with a matching rule decides."""
    for base, spec in reversed(rules):
        sub = rel[len(base) + 1:] if base else rel
        result = spec.check_file(sub + "/" if is_dir else sub)
        if result.include is not None:
            return (f"{base}/.gitignore" if base else ".gitignore") if result.include else None
    return None


def walk_folder(folder: Path) -> tuple[list[tuple[str, Path]], list[Skip]]:
    """(name, path) of every file a shard may take from `folder`, in shard order, and what the walk left out."""
    files: list[tuple[str, Path]] = []
    skips: list[Skip] = []

    def walk(directory: Path, rel: str, rules: list[tuple[str, pathspec.GitIgnoreSpec]]) -> None:
        spec = _gitignore(directory)
        if spec is not None:
            rules = [*rules, (rel, spec)]
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as e:
            skips.append(Skip(rel + "/" if rel else "./", f"unreadable folder ({e.strerror})"))
            return
        for entry in entries:
            name = f"{rel}/{entry.name}" if rel else entry.name
            is_dir = entry.is_dir(follow_symlinks=False)  # a linked folder is not entered (rglob's way)
            if not is_dir and not entry.is_file():
                if entry.is_symlink() and entry.is_dir():
                    skips.append(Skip(name + "/", "symbolic link to a folder (not followed)"))
                continue  # sockets, fifos, broken links: not files
            reason = _name_reason(entry.name, is_dir)
            if reason is None:
                source = _ignored(rules, name, is_dir)
                if source is not None:
                    reason = f"matched by {source}"
            if reason is None and is_dir and _is_environment(Path(entry.path)):
                reason = "virtualenv or conda environment"
            if reason is not None:
                skips.append(Skip(name + "/" if is_dir else name, reason))
            elif is_dir:
                walk(Path(entry.path), name, rules)
            else:
                files.append((name, Path(entry.path)))

    walk(folder, "", [])
    files.sort(key=lambda item: layout_key(item[0]))
    skips.sort(key=lambda s: layout_key(s.name.rstrip("/")))
    return files, skips


def folder_files(folder: Path) -> list[tuple[str, Path]]:
    """(name, path) of every file a shard may take from `folder`, in shard order (see walk_folder)."""
    return walk_folder(folder)[0]
