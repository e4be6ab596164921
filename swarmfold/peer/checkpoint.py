"""Crash-safe checkpoints: safetensors for tensors, JSON for metadata, atomic, hash-checked.

Layout: W/checkpoints/round-NNNNNN/ holds the state at the *start* of round NNNNNN:
  model.safetensors            θ_r, the round's shared weights, by parameter name
  inner_optimizer.safetensors  this peer's AdamW moments and step counts (and Muon's momentum buffers)
  outer_optimizer.safetensors  the outer optimizer's state (momentum; empty for plain averaging)
  local.safetensors            only when this peer carries a local delta (after a rollback) or
                               a compression residual: its local weights and residual
  meta.json                    round, step, RNG state, data cursor, hashes, versions, environment

A checkpoint is written into a hidden temp folder, every file fsynced, then renamed into
place, so a crash leaves either the whole checkpoint or none. meta.json lists the sha256
of every tensor file, and loading checks them: a damaged newest checkpoint is reported
and the one before it is used. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from swarmfold.errors import UserError
from swarmfold.fsutil import fsync_dir
from swarmfold.hashing import file_sha256

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
TENSOR_FILES = ("model.safetensors", "inner_optimizer.safetensors", "outer_optimizer.safetensors",
                "local.safetensors")


class CheckpointError(UserError):
    """A checkpoint is missing, damaged or belongs to another spec; the message says which and why."""


@dataclass
class Checkpoint:
    path: Path
    meta: dict[str, Any]
    model: dict[str, torch.Tensor]
    inner: dict[str, torch.Tensor]
    outer: dict[str, torch.Tensor]
    local: dict[str, torch.Tensor]

    @property
    def round(self) -> int:
        return int(self.meta["round"])



def round_dir_name(round_idx: int) -> str:
    return f"round-{round_idx:06d}"


def checkpoints_dir(workdir: Path) -> Path:
    return Path(workdir) / "checkpoints"


def list_checkpoints(workdir: Path) -> list[Path]:
    """Checkpoint folders, newest round first (temp folders are ignored)."""
    root = checkpoints_dir(workdir)
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("round-") and p.name[6:].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name[6:]), reverse=True)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "swarmfold"})
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_checkpoint(workdir: Path, *, round_idx: int, model: dict[str, torch.Tensor],
                    inner: dict[str, torch.Tensor], outer: dict[str, torch.Tensor],
                    local: dict[str, torch.Tensor] | None, meta: dict[str, Any], keep: int = 3) -> Path:
    """Write round `round_idx` atomically, then prune to the newest `keep` checkpoints."""
    root = checkpoints_dir(workdir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / round_dir_name(round_idx)
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    files: dict[str, str] = {}
    for name, tensors in (("model.safetensors", model), ("inner_optimizer.safetensors", inner),
                          ("outer_optimizer.safetensors", outer), ("local.safetensors", local)):
        if tensors is None:
            continue
        _save_tensors(tensors, tmp / name)
        files[name] = file_sha256(tmp / name)
    full_meta = dict(meta, format_version=FORMAT_VERSION, round=round_idx, files=files)
    with open(tmp / "meta.json", "w", encoding="utf-8") as f:
        json.dump(full_meta, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(tmp)
    if final.exists():  # the same round written again (e.g. a replay): replace it whole
        old = root / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(root)
    prune(workdir, keep)
    return final


def prune(workdir: Path, keep: int) -> None:
    for old in list_checkpoints(workdir)[max(1, keep):]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in checkpoints_dir(workdir).glob(".round-*"):
        shutil.rmtree(stale, ignore_errors=True)


def load_checkpoint_dir(path: Path) -> Checkpoint:
    """Load one checkpoint folder, checking every file against meta.json; CheckpointError if not sound."""
    path = Path(path)
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{path}: no meta.json; not a swarmfold checkpoint (or an interrupted write)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_path}: damaged ({e})") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict) or "round" not in meta:
        raise CheckpointError(f"{meta_path}: missing 'files' or 'round'; not a swarmfold checkpoint")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {meta.get('format_version')} is not {FORMAT_VERSION}; "
                              "use the swarmfold version that wrote it")
    loaded: dict[str, dict[str, torch.Tensor]] = {}
    for name, digest in meta["files"].items():
        if name not in TENSOR_FILES:
            raise CheckpointError(f"{path}: meta.json lists unexpected file {name!r}")
        fp = path / name
        if not fp.is_file():
            raise CheckpointError(f"{fp}: missing")
        actual = file_sha256(fp)
        if actual != digest:
            raise CheckpointError(f"{fp}: sha256 {actual[:12]}… does not match meta.json ({str(digest)[:12]}…); "
                                  "the file is truncated or corrupted")
        try:
            loaded[name] = load_file(str(fp))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{fp}: cannot be read as safetensors ({e})") from e
    if "model.safetensors" not in loaded:
        raise CheckpointError(f"{path}: no model.safetensors listed in meta.json")
    return Checkpoint(path=path, meta=meta, model=loaded["model.safetensors"],
                      inner=loaded.get("inner_optimizer.safetensors", {}),
                      outer=loaded.get("outer_optimizer.safetensors", {}),
                      local=loaded.get("local.safetensors", {}))


def load_latest(workdir: Path) -> Checkpoint | None:
    """The newest sound checkpoint in `workdir`, skipping damaged ones with a warning; None if none."""
    for path in list_checkpoints(workdir):
        try:
            return load_checkpoint_dir(path)
        except CheckpointError as e:
            logger.warning("skipping damaged checkpoint: %s; falling back to the previous one", e)
    return None


def resolve_checkpoint(target: str | Path) -> Checkpoint:
    """A workdir (its newest sound checkpoint) or a checkpoint folder, for eval/export/generate."""
    p = Path(target)
    if (p / "meta.json").is_file():
        return load_checkpoint_dir(p)
    if p.is_dir():
        ckpt = load_latest(p)
        if ckpt is None:
            raise CheckpointError(f"{p}: no sound checkpoint found under {p}/checkpoints; train first")
        return ckpt
    raise CheckpointError(f"{p}: no such workdir or checkpoint folder")
