"""The embedded default corpus: the running Python's standard library, split by top-level module.

Each top-level module or package goes whole to one shard, so shards are non-overlapping
and differ in kind (one holds `email`, another `asyncio`...). Test suites, site-packages
and non-Python files are left out. Modules are dealt largest-first to the lightest shard,
which keeps shard sizes close.

`write_family_shards` is the non-IID stress: one shard per language family or domain
(Python, C, English prose, numeric test vectors), all from the Python installation.
"""

from __future__ import annotations

import ast
import logging
import math
import os
import shutil
import sysconfig
from collections.abc import Iterator
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


# ---- the non-IID stress: one shard per language family / domain --------------------------

FAMILIES = ("python", "c", "prose", "numeric")


def write_family_shards(out: Path, *, max_bytes_per_shard: int = 1_500_000,
                        families: tuple[str, ...] = FAMILIES) -> list[Path]:
    """Write DIR/family-<name> for each family, shards that differ as languages and domains do.

    All of it comes from the running Python's installation, so it is offline and the same on
    every machine with the same Python:

    - `python`: Python source, the even-numbered stdlib modules (sorted by name) of
      `stdlib_modules`;
    - `c`: C, the interpreter's headers (`include/python3.x/**/*.h`) and the C files of the
      stdlib's test folder; where the headers are missing, the system's `/usr/include`;
    - `prose`: English, the docstrings (module, class and function) of the odd-numbered stdlib
      modules, so no text is also in the `python` shard, plus the stdlib's `.txt`/`.rst`
      files and the help topics of `pydoc_data`;
    - `numeric`: numeric test vectors, the stdlib tests' `decimaltestdata/*.decTest` and
      `*_testcases.txt`; where the test suite is not installed, deterministic tables of
      elementary-function values written here.

    Files are taken in sorted order until a shard holds `max_bytes_per_shard` bytes. Each
    shard folder appears whole or not at all; a family with under 50 kB of text is an error.
    """
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown families {unknown}; choose from {', '.join(FAMILIES)}")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for fam in families:
        final = out / f"family-{fam}"
        tmp = out / f".family-{fam}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        total = 0
        for name, text in _family_texts(fam):
            if total >= max_bytes_per_shard:
                break
            data = text.encode("utf-8", errors="replace")[: max_bytes_per_shard - total]
            if not data.strip():
                continue
            dest = tmp / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
            total += len(data)
        if total < 50_000:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RuntimeError(f"family {fam!r}: only {total} bytes of text found in this Python installation")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        logger.info("wrote %s: %.2f MB", final, total / 1e6)
        written.append(final)
    return written


def _family_texts(fam: str) -> Iterator[tuple[str, str]]:
    """(relative file name, text) of one family, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    mods = stdlib_modules(root)
    names = sorted(mods)
    if fam == "python":
        for mod in names[0::2]:
            for f in mods[mod]:
                yield str(f.relative_to(root)), f.read_text(encoding="utf-8", errors="replace")
    elif fam == "c":
        include = Path(sysconfig.get_paths()["include"])
        headers = sorted(include.rglob("*.h")) if include.is_dir() else []
        if not headers:
            include = Path("/usr/include")
            headers = sorted(include.rglob("*.h")) if include.is_dir() else []
        for f in headers:
            yield f"include/{f.relative_to(include)}", f.read_text(encoding="utf-8", errors="replace")
        test = root / "test"
        for f in sorted(test.glob("*.c")) if test.is_dir() else []:
            yield f"test/{f.name}", f.read_text(encoding="utf-8", errors="replace")
    elif fam == "prose":
        for mod in names[1::2]:
            docs = [d for f in mods[mod] for d in _docstrings(f)]
            if docs:
                yield f"docstrings/{mod}.txt", "\n\n".join(docs) + "\n"
        topics = root / "pydoc_data" / "topics.py"
        if topics.is_file():
            yield "pydoc_topics.txt", "\n\n".join(_string_constants(topics)) + "\n"
        for f in sorted(p for p in root.rglob("*") if p.suffix in (".txt", ".rst") and p.is_file()
                        and "site-packages" not in p.parts and not _is_numeric_file(p)):
            yield f"text/{f.relative_to(root)}", f.read_text(encoding="utf-8", errors="replace")
    elif fam == "numeric":
        files = [p for p in sorted((root / "test").rglob("*")) if p.is_file() and _is_numeric_file(p)] \
            if (root / "test").is_dir() else []
        for f in files:
            yield f"vectors/{f.relative_to(root / 'test')}", f.read_text(encoding="utf-8", errors="replace")
        if not files:
            yield from _generated_tables()


def _is_numeric_file(p: Path) -> bool:
    return p.suffix == ".decTest" or p.name.endswith("_testcases.txt") or p.name == "floating_points.txt"


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    except SyntaxError:
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 40:
                out.append(doc)
    return out


def _string_constants(path: Path) -> list[str]:
    """The long string constants of a module (pydoc_data/topics.py is one dict of help texts)."""
    tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and len(n.value) > 200]


def _generated_tables() -> Iterator[tuple[str, str]]:
    """Elementary-function tables (12 significant digits), for a Python without its test suite."""
    for fn in ("sin", "cos", "exp", "log1p", "sqrt", "atan"):
        f = getattr(math, fn)
        rows = [f"{fn}({x:.6g}) = {f(x):.12g}" for x in (i / 97.0 for i in range(1, 6001))]
        yield f"tables/{fn}.txt", "\n".join(rows) + "\n"
