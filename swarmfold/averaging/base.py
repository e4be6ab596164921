"""The contract between a peer's round and whatever averages it: alone, in-process, or the swarm."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from swarmfold.averaging import codec

Status = Literal["committed", "alone", "rolled_back"]


@dataclass
class AverageRequest:
    round: int
    delta: torch.Tensor  # flat float32 pseudo-gradient θ_r − θ_local (plus any compression residual)
    weight: float  # tokens trained, already capped by the spec
    model_sha256: str  # hash of θ_r, so members can tell they start from the same weights
    steps: int  # inner steps trained for this Δ this round (declared in the part header, recorded)


@dataclass
class AverageResult:
    """What the round did. `aggregate` is the pseudo-gradient to apply (None when rolled back)."""

    status: Status
    aggregate: torch.Tensor | None
    group_id: str = ""
    members: list[str] = field(default_factory=list)  # the agreed group, sorted
    included: list[str] = field(default_factory=list)  # whose contributions are in the aggregate
    weights: dict[str, float] = field(default_factory=dict)  # the weight each included contribution had
    steps: dict[str, int] = field(default_factory=dict)  # the inner steps each included member declared
    confirmed: list[str] = field(default_factory=list)  # other members whose digest votes matched ours
    rejected: dict[str, str] = field(default_factory=dict)  # peer id -> named error
    attempts: int = 1
    reason: str = ""
    timings: dict[str, float] = field(default_factory=dict)  # matchmaking, allreduce, commit (seconds)
    bytes_sent: int = 0
    bytes_received: int = 0
    compressed: bool = False  # the aggregate went through the codec (error feedback applies)


class Averager(Protocol):
    def average(self, request: AverageRequest) -> AverageResult: ...


class SoloAverager:
    """No swarm: every round the peer applies its own pseudo-gradient (what `swarmfold train` uses)."""

    def average(self, request: AverageRequest) -> AverageResult:
        return AverageResult(status="alone", aggregate=request.delta, reason="training alone")


def group_id_for(swarm_id: str, round_idx: int, attempt: int, members: list[str], *, waiting: bool = False) -> str:
    """The id every member of a group derives from the same facts: swarm, round, attempt (or the waiting
    room of min_group_size, which peers reach from any attempt) and the sorted member list."""
    where: int | str = "wait" if waiting else attempt
    blob = json.dumps([swarm_id, round_idx, where, sorted(members)], separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def balanced_cuts(n: int, group_size: int) -> list[tuple[int, int]]:
    """Cut [0, n) into ceil(n/G) contiguous near-equal ranges (sizes differ by at most one)."""
    if n <= 0:
        return []
    k = math.ceil(n / group_size)
    return [(i * n // k, (i + 1) * n // k) for i in range(k)]


def partition_groups(peer_ids: list[str], group_size: int) -> list[list[str]]:
    """Deterministic grouping of ready peers: sort, then cut into ceil(n/G) near-equal groups."""
    ids = sorted(set(peer_ids))
    return [ids[lo:hi] for lo, hi in balanced_cuts(len(ids), group_size)]


def butterfly_bytes(numel: int, n: int, index: int, compression: str) -> int:
    """Bytes member `index` of an n-member butterfly all-reduce sends (payloads, excluding headers).

    It sends span j to every other reducer j, then its reduced span to every other member.
    """
    if n <= 1:
        return 0
    spans = codec.spans(numel, n)
    out = sum(codec.encoded_size(compression, hi - lo) for j, (lo, hi) in enumerate(spans) if j != index)
    lo, hi = spans[index]
    out += (n - 1) * codec.encoded_size(compression, hi - lo)
    return out


def allreduce_fp32_bytes_per_step(numel: int, n: int) -> int:
    """What one per-step fp32 gradient all-reduce (reduce-scatter + all-gather) sends per worker."""
    return 0 if n <= 1 else int(2 * (n - 1) / n * numel * 4)
