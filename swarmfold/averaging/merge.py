"""Combine contributions that share a base into θ_{r+1}, one tensor at a time.

This is the offline twin of a live round's aggregation and commit: the same aggregation
functions (`aggregate.weighted_mean` and friends, float64 in canonical order) and the
same `OuterOptimizer` produce the new weights. Contributions are keyed by (peer id,
delta sha256) and sorted, so the bits do not depend on the order the files are given in.

Memory: only one named tensor of the base and of each contribution is in memory at a
time; the output model is built up tensor by tensor. Peak memory is about one model plus
one tensor per contribution, not N models (`scripts/bench_merge.py` measures it). Files
are read with plain positioned reads (`TensorFile`), not `safe_open`: safe_open maps the
file, and every page a merge touches stays in the process's resident set until the file
is closed, so the resident size grew by every input file's size (measured: 4 contributions
of the small preset added about 200 MiB of mapped pages on top of the output model).

The outer step is elementwise, so stepping tensor by tensor (with the matching slice of
the momentum buffer) gives exactly the bits of one step on the whole flat vector.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from swarmfold.averaging.aggregate import MERGE_RULES, Contribution, merge_rule
from swarmfold.averaging.outer import OuterOptimizer
from swarmfold.averaging.receipt import SignedContribution
from swarmfold.errors import UserError
from swarmfold.spec import Spec

logger = logging.getLogger(__name__)

WEIGHTINGS = ("tokens", "equal")


class MergeError(UserError):
    """Contributions cannot be merged as given; the message names the file and the fix."""


MAX_HEADER_BYTES = 64 * 2**20


class TensorFile:
    """Reads float32 tensors from a safetensors file one at a time, with positioned reads.

    Only the header is parsed up front (JSON: name -> dtype, shape, byte offsets); each
    `get` reads just that tensor's bytes into memory the returned tensor owns.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            self._entries = self._read_header()
        except BaseException:
            os.close(self._fd)
            raise

    def _read_header(self) -> dict[str, tuple[tuple[int, ...], int, int]]:
        size = os.fstat(self._fd).st_size
        raw = os.pread(self._fd, 8, 0)
        n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
        if not 0 < n <= min(MAX_HEADER_BYTES, size - 8):
            raise MergeError(f"{self.path}: not a safetensors file (bad header length)")
        try:
            header = json.loads(os.pread(self._fd, n, 8))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MergeError(f"{self.path}: safetensors header is not JSON ({e})") from e
        if not isinstance(header, dict):
            raise MergeError(f"{self.path}: safetensors header is not a JSON object")
        data_start, entries = 8 + n, {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
            except (KeyError, TypeError, ValueError) as e:
                raise MergeError(f"{self.path}: header entry {name!r} is malformed ({e})") from e
            numel = 1
            for d in shape:
                numel *= d
            if dtype != "F32" or end - begin != 4 * numel or begin < 0 or data_start + end > size:
                raise MergeError(f"{self.path}: tensor {name!r} is {dtype} {shape} at bytes {begin}-{end}; "
                                 "expected float32 inside the file")
            entries[name] = (shape, data_start + begin, numel)
        return entries

    def keys(self) -> list[str]:
        return list(self._entries)

    def get(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The tensor `name`, or elements [start, stop) of it flattened."""
        shape, offset, numel = self._entries[name]
        stop = numel if stop is None else stop
        if not 0 <= start <= stop <= numel:
            raise MergeError(f"{self.path}: slice {start}:{stop} is outside tensor {name!r} ({numel} elements)")
        buf = bytearray(4 * (stop - start))
        view, done = memoryview(buf), 0
        while done < len(buf):
            got = os.preadv(self._fd, [view[done:]], offset + 4 * start + done)
            if got <= 0:
                raise MergeError(f"{self.path}: file ended inside tensor {name!r}; it is truncated")
            done += got
        flat = torch.frombuffer(buf, dtype=torch.float32) if buf else torch.empty(0, dtype=torch.float32)
        return flat if (start, stop) != (0, numel) else flat.view(shape)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


@dataclass(frozen=True, kw_only=True)
class MergeOptions:
    method: str = "mean"
    weights: str = "tokens"
    density: float = 0.2  # ties: fraction of each delta's entries kept
    drop_rate: float = 0.5  # dare: fraction of entries dropped
    scale: float = 1.0  # task-arithmetic and ties: multiplier of the merged delta

    def check(self) -> None:
        if self.method not in MERGE_RULES:
            raise MergeError(f"--method {self.method!r} is unknown; use one of {', '.join(MERGE_RULES)}")
        if self.weights not in WEIGHTINGS:
            raise MergeError(f"--weights {self.weights!r} is unknown; use 'tokens' or 'equal'")
        if not 0 < self.density <= 1:
            raise MergeError(f"--density must be in (0, 1], got {self.density}")
        if not 0 <= self.drop_rate < 1:
            raise MergeError(f"--drop-rate must be in [0, 1), got {self.drop_rate}")
        if not self.scale > 0:
            raise MergeError(f"--scale must be positive, got {self.scale}")


@dataclass
class MergeResult:
    model: dict[str, torch.Tensor]  # θ_{r+1} by parameter name
    outer_state: dict[str, torch.Tensor]
    model_sha256: str  # sha256 of the flat float32 θ_{r+1} in parameter order
    aggregate_sha256: str  # sha256 of the flat aggregate pseudo-gradient
    round: int  # r + 1
    contributions: list[dict[str, Any]] = field(default_factory=list)  # in canonical order


def expected_tokens(spec: Spec, steps: int) -> tuple[int, float]:
    """(tokens, weight) a contribution of `steps` inner steps must claim under `spec`."""
    tokens = steps * spec.tokens_per_step
    return tokens, float(min(tokens, spec.token_cap))


def check_against_base(c: SignedContribution, *, spec: Spec, base_round: int, base_model_sha256: str) -> None:
    """Refuse a contribution made from another base or spec, or whose token claim is inconsistent."""
    where = str(c.delta_path)
    if c.spec_hash != spec.spec_hash:
        raise MergeError(f"{where}: made under spec {c.spec_hash[:12]}…, the base is spec {spec.spec_hash[:12]}…; "
                         "merge only contributions of the base's swarm")
    if c.base_round != base_round or c.base_model_sha256 != base_model_sha256:
        raise MergeError(f"{where}: made from base round {c.base_round} (model {c.base_model_sha256[:12]}…), but "
                         f"--base is round {base_round} (model {base_model_sha256[:12]}…); merge only "
                         "contributions that share the base, or pass the checkpoint they were made from")
    steps = int(c.body["steps"])
    tokens, weight = expected_tokens(spec, steps)
    if steps < 1 or int(c.body["tokens"]) != tokens or float(c.body["weight"]) != weight or \
            len(c.body["losses"]) != steps:
        raise MergeError(f"{where}: receipt claims {c.body['tokens']} tokens, weight {c.body['weight']} and "
                         f"{len(c.body['losses'])} losses for {steps} steps; this spec gives {tokens} tokens, "
                         f"weight {weight}; the receipt is inconsistent")


def _canonical(contributions: Sequence[SignedContribution]) -> list[SignedContribution]:
    by_key: dict[str, SignedContribution] = {}
    for c in contributions:
        if c.key in by_key:
            raise MergeError(f"{c.delta_path}: the same contribution as {by_key[c.key].delta_path} "
                             "(same peer and delta); give each contribution once")
        by_key[c.key] = c
    return [by_key[k] for k in sorted(by_key)]


def merge_contributions(*, base_model_path: Path, base_outer_path: Path | None, base_meta: dict[str, Any],
                        names: Sequence[str], contributions: Sequence[SignedContribution],
                        spec: Spec, options: MergeOptions) -> MergeResult:
    """Stream the merge of checked contributions over the base's tensors.

    `names` is the model's parameter order (what the flat vector and model_sha256 use);
    `base_meta` is the base checkpoint's meta.json, whose files the caller has hash-checked.
    """
    options.check()
    if not contributions:
        raise MergeError("no contributions given; pass one or more contribution files after --base")
    base_round, base_sha = int(base_meta["round"]), str(base_meta["model_sha256"])
    for c in contributions:
        check_against_base(c, spec=spec, base_round=base_round, base_model_sha256=base_sha)
    ordered = _canonical(contributions)
    weights = {c.key: (c.weight if options.weights == "tokens" else 1.0) for c in ordered}
    model_hash, agg_hash, base_hash = hashlib.sha256(), hashlib.sha256(), hashlib.sha256()
    out: dict[str, torch.Tensor] = {}
    momentum_parts: list[torch.Tensor] = []
    o = spec.outer
    with ExitStack() as stack:
        base = stack.enter_context(TensorFile(base_model_path))
        outer_file: TensorFile | None = None
        if o.momentum > 0:
            if base_outer_path is None:
                raise MergeError("the base checkpoint has no outer optimizer state, but the spec's outer "
                                 "optimizer has momentum; use a checkpoint written by swarmfold")
            outer_file = stack.enter_context(TensorFile(base_outer_path))
        deltas = {c.key: stack.enter_context(TensorFile(c.delta_path)) for c in ordered}
        _check_names(names, set(base.keys()), "the base's model.safetensors")
        for c in ordered:
            _check_names(names, set(deltas[c.key].keys()), str(c.delta_path))
        offset = 0
        for name in names:
            theta = base.get(name)
            if theta.dtype != torch.float32:
                raise MergeError(f"base tensor {name} is {theta.dtype}, expected float32")
            base_hash.update(theta.contiguous().numpy().tobytes())
            group = {}
            for c in ordered:
                d = deltas[c.key].get(name)
                if d.shape != theta.shape or d.dtype != torch.float32 or not bool(torch.isfinite(d).all()):
                    raise MergeError(f"{c.delta_path}: tensor {name} is {tuple(d.shape)}/{d.dtype} or not finite; "
                                     f"the base has {tuple(theta.shape)}/float32")
                group[c.key] = Contribution(d.reshape(-1), weights[c.key])
            agg = merge_rule(group, options.method, label=name, density=options.density,
                             drop_rate=options.drop_rate, scale=options.scale)
            del group
            agg_hash.update(agg.numpy().tobytes())
            opt = OuterOptimizer(kind=o.kind, lr=o.lr, momentum=o.momentum, numel=theta.numel())
            if outer_file is not None:
                opt.load_state_dict({"momentum": outer_file.get("momentum", offset, offset + theta.numel())})
            new = opt.step(theta.reshape(-1), agg)
            model_hash.update(new.numpy().tobytes())
            out[name] = new.view(theta.shape)
            if opt.buf is not None:
                momentum_parts.append(opt.buf)
            offset += theta.numel()
    if base_hash.hexdigest() != base_sha:
        raise MergeError(f"the base's tensors hash to {base_hash.hexdigest()[:12]}… in this model's parameter "
                         f"order, but its meta.json says {base_sha[:12]}…; the base checkpoint is not sound")
    outer_state = {"momentum": torch.cat(momentum_parts)} if momentum_parts else {}
    logger.info("merged %d contributions onto round %d with %s (%s weights)", len(ordered), base_round,
                options.method, options.weights)
    return MergeResult(
        model=out, outer_state=outer_state, model_sha256=model_hash.hexdigest(),
        aggregate_sha256=agg_hash.hexdigest(), round=base_round + 1,
        contributions=[{"peer_id": c.peer_id, "delta_sha256": c.delta_sha256, "receipt_sha256": c.receipt_sha256,
                        "weight": weights[c.key], "tokens": int(c.body["tokens"]), "file": c.delta_path.name}
                       for c in ordered])


def _check_names(names: Sequence[str], have: set[str], where: str) -> None:
    missing = [n for n in names if n not in have]
    extra = sorted(have - set(names))
    if missing or extra:
        raise MergeError(f"{where}: tensors do not match the base model (missing {missing[:3]}, extra {extra[:3]}); "
                         "it was made for another model")
