"""Writing files so that a crash leaves the old version or the new one, never half of either."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def fsync_dir(path: str | Path) -> None:
    """Make a rename or a new file inside `path` durable (the directory entry itself)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | Path, data: bytes | str, *, mode: int | None = None) -> None:
    """Write `data` to a hidden temporary beside `path`, fsync it, rename it over `path`, fsync the folder.

    `mode` sets the permission bits at creation (0o600 for secrets), so the file is never
    readable by others, not even for a moment. A failure leaves `path` as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666 if mode is None else mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: str | Path, obj: Any, *, indent: int | None = 1, sort_keys: bool = False) -> None:
    """`write_atomic` of `obj` as JSON (UTF-8, a final newline)."""
    write_atomic(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")
