"""The contract between a peer's round and whatever averages it: alone, in-process, or the swarm."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

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
    # the tree (N > G): 1 = a group of peers; above, a group of the groups' delegates, whose `delta` is
    # their group's aggregate, `weight` its included weights' sum and `steps` its declared steps' sum
    level: int = 1


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
    # the tree (N > G): one entry per level above this peer's group, lowest first (tree_level());
    # `aggregate` is then the top level's, and the fields above describe this peer's own group
    tree: list[dict[str, Any]] = field(default_factory=list)
    delegates: list[str] = field(default_factory=list)  # the next level's expected members (empty: no tree)
    clients: list[str] = field(default_factory=list)  # members in client mode (they cannot be delegates)
    digest: str = ""  # what the group's commit votes agreed on (commit.digest)
    # False when the tree's top that this peer applied does not hold its group's aggregate (its delegate
    # died before carrying it up, and another delegate gave the round's top): its tokens did not count
    reached_top: bool = True


class Averager(Protocol):
    def average(self, request: AverageRequest) -> AverageResult: ...


class SoloAverager:
    """No swarm: every round the peer applies its own pseudo-gradient (what `swarmfold train` uses)."""

    def average(self, request: AverageRequest) -> AverageResult:
        return AverageResult(status="alone", aggregate=request.delta, reason="training alone")


def group_id_for(swarm_id: str, round_idx: int, attempt: int, members: list[str], *, waiting: bool = False,
                 level: int = 1) -> str:
    """The id every member of a group derives from the same facts: swarm, round, attempt (or the waiting
    room of min_group_size, which peers reach from any attempt), the tree level above 1 (a group of
    delegates) and the sorted member list."""
    where: int | str = "wait" if waiting else attempt
    facts: list[Any] = [swarm_id, round_idx, where, sorted(members)]
    if level > 1:
        facts.insert(3, f"L{level}")
    blob = json.dumps(facts, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def delegates_of(peer_ids: list[str], group_size: int, clients: frozenset[str] | set[str] = frozenset()
                 ) -> list[str]:
    """The tree's next level (N > G): the delegate of each group `partition_groups` cuts the ready peers
    into is its first member that can reduce (not in client mode; the first member if none can). One
    group, or none: no next level ([])."""
    groups = partition_groups(peer_ids, group_size)
    if len(groups) <= 1 or group_size < 2:  # G = 1 averages nothing: every peer is alone, no level above
        return []
    return [next((p for p in g if p not in clients), g[0]) for g in groups]


def delegate_of(included: list[str], clients: frozenset[str] | set[str] = frozenset()) -> str:
    """Who carries a committed group's aggregate to the next level: its first included reducer."""
    ids = sorted(included)
    return next((p for p in ids if p not in clients), ids[0])


def tree_level(level: int, group_id: str, included: list[str], weights: dict[str, float],
               steps: dict[str, int], digest: str = "") -> dict[str, Any]:
    """One level of the tree above a peer's group, as results, records and round logs carry it: the
    delegates' group, whom it included (delegates) with what weight (their groups' total) and steps."""
    return {"level": level, "group_id": group_id, "included": sorted(included),
            "weights": {p: float(weights[p]) for p in sorted(weights)},
            "steps": {p: int(steps[p]) for p in sorted(steps)}, "digest": digest}


def tree_depth(n: int, group_size: int) -> int:
    """Levels of the tree above level 1 for `n` next-level members (0 for n <= 1)."""
    levels = 0
    while n > 1 and group_size >= 2:
        n = math.ceil(n / group_size) if n > group_size else 1
        levels += 1
    return levels


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
