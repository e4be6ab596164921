"""Offline contributions: H inner steps from a base checkpoint, handed in later as delta + signed receipt.

A contribution is exactly one live round's pseudo-gradient: it restores a `LocalPeer` from
the base checkpoint θ_r and trains it with the same `InnerTrainer` on the batches the seed
schedule gives (genesis seed, base round r, the contributor's peer id). The files:

  NAME.safetensors            Δ = θ_r − θ_local by parameter name (float32)
  NAME.receipt.json           what was done, signed with the contributor's identity key
  NAME.snap-SSSSSS.safetensors  optional: parameters + inner optimizer state before step S,
                              every `verify.snapshot_interval` steps, for `verify --spot-check`

The receipt is written last, so a contribution without one was interrupted.

The inner optimizer's start state: a live peer carries its AdamW state from round to round.
A contribution continues the base checkpoint's inner state only when that checkpoint is
the contributor's own (its meta.json names the same peer id); otherwise it starts a fresh
AdamW with the learning-rate warm-up from step 0. Someone else's moments describe someone
else's data, and a verifier could not tell which state was used unless it is committed to:
the receipt records the choice, the start state's sha256 and its step count, and verify
refuses to replay from a different start.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from swarmfold.averaging.identity import Identity
from swarmfold.averaging.merge import MergeOptions, MergeResult, merge_contributions
from swarmfold.averaging.receipt import (
    RECEIPT_FORMAT,
    contribution_paths,
    load_contribution,
    sign_record,
)
from swarmfold.errors import UserError
from swarmfold.fsutil import write_json_atomic
from swarmfold.peer.checkpoint import (
    Checkpoint,
    CheckpointError,
    file_sha256,
    list_checkpoints,
    round_dir_name,
    save_checkpoint,
)
from swarmfold.peer.data import Shard
from swarmfold.peer.local import LocalPeer, environment
from swarmfold.peer.model import build_config, flat_params, set_flat_params, tensor_sha256
from swarmfold.peer.seeds import batch_order
from swarmfold.peer.tokenizer import load_tokenizer
from swarmfold.peer.trainer import set_threads
from swarmfold.spec import Spec, spec_from_dict

logger = logging.getLogger(__name__)

INNER_SOURCES = ("auto", "fresh", "checkpoint")


class ContributeError(UserError):
    """A contribution cannot be made as asked; the message says why and what to do."""


# ---- hashing and files -------------------------------------------------------------------

def state_sha256(tensors: dict[str, torch.Tensor], step: int) -> str:
    """sha256 of an optimizer state: names, dtypes, shapes, bytes (sorted by name) and step count."""
    h = hashlib.sha256()
    header = [[n, str(tensors[n].dtype), list(tensors[n].shape)] for n in sorted(tensors)]
    h.update(json.dumps({"step": int(step), "tensors": header}, separators=(",", ":")).encode())
    for n in sorted(tensors):
        h.update(tensors[n].detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> str:
    """Write safetensors via temp file + fsync + rename; return the file's sha256."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    digest = file_sha256(tmp)
    os.replace(tmp, path)
    return digest


def snapshot_name(delta_path: Path, step: int) -> Path:
    stem = delta_path.name[: -len(".safetensors")]
    return delta_path.with_name(f"{stem}.snap-{step:06d}.safetensors")


# ---- checkpoints without loading their tensors ----------------------------------------------

def checkpoint_meta(target: str | Path) -> tuple[Path, dict[str, Any]]:
    """(folder, meta) of a checkpoint folder or a workdir's newest sound one, hash-checked by streaming.

    Unlike `resolve_checkpoint`, no tensor is loaded: merge streams them afterwards.
    """
    p = Path(target)
    candidates = [p] if (p / "meta.json").is_file() else list_checkpoints(p) if p.is_dir() else []
    if not candidates:
        raise CheckpointError(f"{p}: no such checkpoint folder or workdir with checkpoints")
    problems = []
    for folder in candidates:
        try:
            meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
            for name, digest in meta["files"].items():
                if file_sha256(folder / name) != digest:
                    raise CheckpointError(f"{folder / name}: sha256 does not match meta.json; truncated or corrupted")
            return folder, meta
        except (OSError, KeyError, TypeError, ValueError) as e:
            problems.append(str(e))
            logger.warning("skipping checkpoint %s: %s", folder, e)
    raise CheckpointError(f"{p}: no sound checkpoint ({'; '.join(problems)})")


def param_names(spec: Spec, vocab_size: int, eos_id: int) -> list[str]:
    """The model's parameter order (that of the flat vector), from a weightless meta-device model."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(build_config(spec, vocab_size, eos_id), dtype=torch.float32)
    return [n for n, _ in model.named_parameters()]


# ---- starting and running the steps (shared with verify) -----------------------------------

def round_batches(peer: LocalPeer, round_idx: int, steps: int) -> list[torch.Tensor]:
    """The windows `peer` trains on in round `round_idx`: `LocalPeer.batches_for_round` for any H.

    batch_order draws whole permutations and cuts the first steps × batch rows, so a
    contribution of fewer steps than the spec's H trains on a prefix of the live round's batches.
    """
    order = batch_order(peer.spec.seed, round_idx, peer.peer_id, num_windows=len(peer.shard.train_windows),
                        steps=steps, batch_size=peer.spec.inner.batch_size)
    return [peer.shard.train_batch(row) for row in order]


def inner_source_for(ckpt: Checkpoint, peer_id: str, requested: str) -> str:
    if requested not in INNER_SOURCES:
        raise ContributeError(f"--inner-state {requested!r} is unknown; use one of {', '.join(INNER_SOURCES)}")
    if requested == "fresh":
        return "fresh"
    own = ckpt.meta.get("peer_id") == peer_id and bool(ckpt.inner)
    if requested == "checkpoint" and not ckpt.inner:
        raise ContributeError(f"{ckpt.path}: holds no inner optimizer state; use --inner-state fresh")
    return "checkpoint" if requested == "checkpoint" or own else "fresh"


def start_peer(spec: Spec, ckpt: Checkpoint, shard: Shard, *, peer_id: str, threads: int,
               inner_source: str, device: torch.device | str = "cpu") -> LocalPeer:
    """A LocalPeer at θ_r of `ckpt`, with the inner state `inner_source` names ('checkpoint' or 'fresh')."""
    peer = LocalPeer(spec, [], peer_id=peer_id, threads=threads, tokenizer=shard.tokenizer, shard=shard,
                     device=device)
    peer.restore(ckpt)
    # A carried local delta (after a rolled-back round) is not part of a contribution: start at θ_r.
    set_flat_params(peer.model, peer.theta)
    peer.carried_tokens, peer.residual = 0, None
    if inner_source == "fresh":
        peer.trainer.load_state_tensors({}, 0)
    return peer


def inner_state_record(peer: LocalPeer, source: str) -> dict[str, Any]:
    step = peer.trainer.step_count
    return {"source": source, "step": step, "sha256": state_sha256(peer.trainer.state_tensors(), step)}


def snapshot_tensors(peer: LocalPeer) -> dict[str, torch.Tensor]:
    tensors = {f"param/{n}": p.detach().to("cpu", copy=True) for n, p in peer.model.named_parameters()}
    tensors.update({f"inner/{k}": v for k, v in peer.trainer.state_tensors().items()})
    return tensors


def load_snapshot(peer: LocalPeer, tensors: dict[str, torch.Tensor], inner_step: int) -> None:
    """Put `peer` in the state a snapshot recorded (parameters and inner optimizer)."""
    with torch.no_grad():
        for n, p in peer.model.named_parameters():
            t = tensors.get(f"param/{n}")
            if t is None or t.shape != p.shape or t.dtype != p.dtype:
                raise ValueError(f"snapshot lacks parameter {n} or has the wrong shape")
            p.copy_(t)
    inner = {k[len("inner/"):]: v for k, v in tensors.items() if k.startswith("inner/")}
    peer.trainer.load_state_tensors(inner, inner_step)


def run_steps(peer: LocalPeer, batches: Sequence[torch.Tensor], *, first_step: int = 0,
              before_step: Callable[[int], None] | None = None) -> tuple[list[float], int]:
    """InnerTrainer steps over `batches` (step indices from `first_step`); (losses, tokens).

    The same per-step code as `InnerTrainer.run` (the lr at the swarm's step round × H + i);
    `before_step(i)` may snapshot the state.
    """
    losses, tokens = [], 0
    for i, windows in enumerate(batches, start=first_step):
        if before_step is not None:
            before_step(i)
        losses.append(peer.trainer.step(windows, peer.round_start_step + i))
        tokens += windows.shape[0] * (windows.shape[1] - 1)
    return losses, tokens


def named_delta(peer: LocalPeer) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Δ = θ_r − θ_local as one flat vector (the live round's formula) and by parameter name."""
    flat = peer.theta - flat_params(peer.model)
    named, offset = {}, 0
    for n, p in peer.model.named_parameters():
        named[n] = flat[offset : offset + p.numel()].view(p.shape).clone()
        offset += p.numel()
    return flat, named


class threads_set:
    """Context manager: run with `threads` intra-op threads, then restore the previous count."""

    def __init__(self, threads: int):
        self.threads, self.before = threads, torch.get_num_threads()

    def __enter__(self) -> None:
        set_threads(self.threads)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.before)


# ---- contribute ------------------------------------------------------------------------------

@dataclass
class ContributionResult:
    delta_path: Path
    receipt_path: Path
    snapshot_paths: list[Path]
    receipt: dict[str, Any]  # the signed record

    @property
    def body(self) -> dict[str, Any]:
        return dict(self.receipt["body"])


def out_paths(out: str | Path) -> tuple[Path, Path]:
    delta, receipt = contribution_paths(out)
    if not delta.name[: -len(".safetensors")]:
        raise ContributeError(f"--out {out}: give a file name, e.g. --out my-contribution.safetensors")
    return delta, receipt


def contribute(*, ckpt: Checkpoint, data: Sequence[str | Path], identity: Identity, out: str | Path,
               threads: int, spec: Spec | None = None, steps: int | None = None,
               snapshot_interval: int | None = None, inner_state: str = "auto",
               shard: Shard | None = None, device: torch.device | str = "cpu") -> ContributionResult:
    """Train `steps` (default H) inner steps from `ckpt` on `data` and write delta + signed receipt."""
    base_spec = spec_from_dict(ckpt.meta["spec"], str(ckpt.path))
    if spec is not None and spec.spec_hash != base_spec.spec_hash:
        raise ContributeError(f"--spec has hash {spec.spec_hash[:12]}…, but the base checkpoint {ckpt.path} "
                              f"was written under {base_spec.spec_hash[:12]}…; use the swarm's spec or leave "
                              "--spec out to use the base's")
    spec = base_spec
    steps = spec.round.inner_steps if steps is None else steps
    interval = spec.verify.snapshot_interval if snapshot_interval is None else snapshot_interval
    if steps < 1:
        raise ContributeError(f"--rounds-of-steps must be at least 1, got {steps}")
    if interval < 0:
        raise ContributeError(f"--snapshot-every must be >= 0 (0 = no snapshots), got {interval}")
    delta_path, receipt_path = out_paths(out)
    for p in (delta_path, receipt_path):
        if p.exists():
            raise ContributeError(f"{p}: exists; choose another --out or remove the old contribution")
    delta_path.parent.mkdir(parents=True, exist_ok=True)
    shard = shard or Shard(data, load_tokenizer(spec.tokenizer), seq_len=spec.data.seq_len,
                           val_fraction=spec.data.val_fraction)
    written: list[Path] = []
    try:
        with threads_set(threads):
            result = _train_and_write(ckpt, spec, shard, identity, delta_path, receipt_path, steps=steps,
                                      interval=interval, inner_state=inner_state, threads=threads,
                                      written=written, device=device)
    except BaseException:
        for p in written:  # nothing half-written: no receipt means no contribution
            p.unlink(missing_ok=True)
        raise
    return result


def _train_and_write(ckpt: Checkpoint, spec: Spec, shard: Shard, identity: Identity, delta_path: Path,
                     receipt_path: Path, *, steps: int, interval: int, inner_state: str, threads: int,
                     written: list[Path], device: torch.device | str = "cpu") -> ContributionResult:
    peer_id = identity.peer_id
    source = inner_source_for(ckpt, peer_id, inner_state)
    peer = start_peer(spec, ckpt, shard, peer_id=peer_id, threads=threads, inner_source=source, device=device)
    start = inner_state_record(peer, source)
    snapshots: list[dict[str, Any]] = []

    def before_step(i: int) -> None:
        if interval and i > 0 and i % interval == 0:
            path = snapshot_name(delta_path, i)
            written.append(path)
            step = peer.trainer.step_count
            digest = atomic_save_tensors(snapshot_tensors(peer), path, {
                "format": "swarmfold-snapshot", "step": str(i), "inner_step": str(step)})
            snapshots.append({"step": i, "inner_step": step, "file": path.name, "sha256": digest})

    t0 = time.perf_counter()
    losses, tokens = run_steps(peer, round_batches(peer, ckpt.round, steps), before_step=before_step)
    seconds = time.perf_counter() - t0
    flat, named = named_delta(peer)
    written.append(delta_path)
    delta_file_sha = atomic_save_tensors(named, delta_path, {
        "format": "swarmfold-contribution", "peer_id": peer_id, "base_model_sha256": peer.theta_sha256})
    body: dict[str, Any] = {
        "kind": "contribution",
        "spec_hash": spec.spec_hash,
        "base": {"round": ckpt.round, "model_sha256": peer.theta_sha256},
        "peer_id": peer_id,
        "seed_inputs": {"genesis_seed": spec.seed, "round": ckpt.round, "peer_id": peer_id, "steps": steps,
                        "batch_size": spec.inner.batch_size, "num_windows": len(shard.train_windows)},
        "data": {"manifest_hash": shard.manifest_hash, "files": shard.manifest_json()},
        "steps": steps,
        "tokens": tokens,
        "weight": float(min(tokens, spec.token_cap)),
        "losses": losses,
        "inner_start": start,
        "environment": environment(threads, peer.device),
        "delta": {"file": delta_path.name, "file_sha256": delta_file_sha, "sha256": tensor_sha256(flat),
                  "norm": float(flat.norm())},
        "snapshots": {"interval": interval, "files": snapshots},
        "seconds": round(seconds, 3),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    record = sign_record(RECEIPT_FORMAT, body, identity)
    written.append(receipt_path)
    write_json_atomic(receipt_path, record, sort_keys=True)
    logger.info("[%s] contribution from round %d: %d steps, mean loss %.4f, |Δ| %.4g -> %s", peer_id[-8:],
                ckpt.round, steps, sum(losses) / len(losses), body["delta"]["norm"], delta_path)
    return ContributionResult(delta_path=delta_path, receipt_path=receipt_path,
                              snapshot_paths=[delta_path.with_name(s["file"]) for s in snapshots], receipt=record)


# ---- merge into a checkpoint ------------------------------------------------------------------

def merge_to_checkpoint(*, base: str | Path, contributions: Sequence[str | Path], out: str | Path,
                        options: MergeOptions, keep: int = 3) -> tuple[Path, MergeResult]:
    """`swarmfold merge`: check every contribution, stream the merge, write OUT/checkpoints/round-(r+1)."""
    base_dir, meta = checkpoint_meta(base)
    spec = spec_from_dict(meta["spec"], str(base_dir))
    signed = [load_contribution(c) for c in contributions]
    target = Path(out) / "checkpoints" / round_dir_name(int(meta["round"]) + 1)
    if target.exists():
        raise CheckpointError(f"{target}: exists; choose another --out or remove it")
    names = param_names(spec, int(meta["vocab_size"]), int(meta["eos_id"]))
    outer_path = base_dir / "outer_optimizer.safetensors" if "outer_optimizer.safetensors" in meta["files"] else None
    result = merge_contributions(base_model_path=base_dir / "model.safetensors", base_outer_path=outer_path,
                                 base_meta=meta, names=names, contributions=signed, spec=spec, options=options)
    tokens = sum(int(c["tokens"]) for c in result.contributions)
    new_meta = {
        "step": 0,  # a merged model has no inner optimizer state: whoever continues starts AdamW afresh
        "peer_id": "merge",
        "spec_hash": spec.spec_hash,
        "spec": spec.to_dict(),
        "manifest_hash": "",
        "manifest": [],
        "model_sha256": result.model_sha256,
        "tokens_total": int(meta.get("tokens_total", 0)) + tokens,
        "carried_tokens": 0,
        "data_cursor": {"round": result.round, "step_in_round": 0, "seed_inputs": None},
        "vocab_size": int(meta["vocab_size"]),
        "eos_id": int(meta["eos_id"]),
        "environment": environment(torch.get_num_threads()),
        "merge": {"method": options.method, "weights": options.weights, "density": options.density,
                  "drop_rate": options.drop_rate, "scale": options.scale,
                  "base": {"round": int(meta["round"]), "model_sha256": meta["model_sha256"], "path": str(base_dir)},
                  "aggregate_sha256": result.aggregate_sha256, "contributions": result.contributions},
        "written_at": time.time(),
    }
    path = save_checkpoint(Path(out), round_idx=result.round, model=result.model, inner={},
                           outer=result.outer_state, local=None, meta=new_meta, keep=keep)
    return path, result
