"""The embedded default corpus: the running Python's standard library, split by top-level module.

Each top-level module or package goes whole to one shard, so shards are non-overlapping
and differ in kind (one holds `email`, another `asyncio`...). Test suites, site-packages
and non-Python files are left out. Modules are dealt largest-first to the lightest shard,
which keeps shard sizes close.
"""

from __future__ import annotations

import logging
import os
import shutil
import sysconfig
from pathlib import Path

logger = logging.getLogger(__name__)

_EXCLUDE = {"test", "encodings", "tests", "site-packages", "dist-packages", "idlelib", "lib2to3", "turtledemo",
            "tkinter", "ensurepip", "config-3.11-x86_64-linux-gnu", "__pycache__", "pydoc_data"}


def stdlib_modules(root: Path | None = None) -> dict[str, list[Path]]:
    """Top-level module name -> its .py files (sorted)."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    mods: dict[str, list[Path]] = {}
    for entry in sorted(root.iterdir()):
        name = entry.name
        if name in _EXCLUDE or name.startswith((".", "config-", "lib-")):
            continue
        if entry.is_file() and entry.suffix == ".py":
            mods[entry.stem] = [entry]
        elif entry.is_dir() and (entry / "__init__.py").exists():
            files = sorted(f for f in entry.rglob("*.py")
                           if not ({"test", "tests", "__pycache__"} & set(f.relative_to(entry).parts)))
            if files:
                mods[name] = files
    return mods


def write_stdlib_shards(num_shards: int, out: Path, *, max_bytes_per_shard: int = 3_000_000) -> list[Path]:
    """Write DIR/shard-0 .. shard-{N-1}; each shard folder appears whole or not at all."""
    if num_shards < 1:
        raise ValueError("--shards must be at least 1")
    mods = stdlib_modules()
    sizes = {m: sum(f.stat().st_size for f in files) for m, files in mods.items()}
    loads = [0] * num_shards
    assignment: list[list[str]] = [[] for _ in range(num_shards)]
    for mod in sorted(mods, key=lambda m: (-sizes[m], m)):
        k = min(range(num_shards), key=lambda i: (loads[i], i))
        if loads[k] + sizes[mod] > max_bytes_per_shard:
            continue
        assignment[k].append(mod)
        loads[k] += sizes[mod]
    out.mkdir(parents=True, exist_ok=True)
    root = Path(sysconfig.get_paths()["stdlib"])
    written = []
    for k, modules in enumerate(assignment):
        final = out / f"shard-{k}"
        tmp = out / f".shard-{k}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        for mod in sorted(modules):
            for f in mods[mod]:
                dest = tmp / f.relative_to(root)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, dest)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        logger.info("wrote %s: %d modules, %.1f MB", final, len(modules), loads[k] / 1e6)
        written.append(final)
    return written
