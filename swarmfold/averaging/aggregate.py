"""Aggregation rules: pure, elementwise functions over contributions.

The live all-reduce (one span per reducer), `swarmfold simulate` (the whole vector) and
`swarmfold merge` (one tensor at a time) all call these functions. Because every rule is
elementwise and sums in canonical order (sorted by contributor id) in float64, the bits
of the result do not depend on how the vector is cut into spans or on arrival order.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

RULES = ("mean", "trimmed_mean", "median")


@dataclass(frozen=True)
class Contribution:
    """One contributor's tensor (a span of its pseudo-gradient) and its weight (tokens)."""

    tensor: torch.Tensor
    weight: float


def canonical_order(contributions: Mapping[str, Contribution]) -> list[str]:
    return sorted(contributions)


def weighted_sum(contributions: Mapping[str, Contribution]) -> tuple[torch.Tensor, float]:
    """(sum_p w_p * x_p, sum_p w_p) in float64, both accumulated in sorted-id order.

    The sum starts from zeros and adds each contribution with `Tensor.add_(x, alpha=w)` (one
    fused multiply-add per element on builds with FMA); the weight is a Python float sum.
    `weighted_mean` divides the two; the tree (tree.py) combines them across groups first.
    """
    if not contributions:
        raise ValueError("weighted_sum: no contributions to aggregate")
    order = canonical_order(contributions)
    total = 0.0
    for pid in order:
        total += float(contributions[pid].weight)
    first = contributions[order[0]].tensor
    acc = torch.zeros(first.shape, dtype=torch.float64)
    for pid in order:
        c = contributions[pid]
        acc.add_(c.tensor.to(torch.float64), alpha=float(c.weight))
    return acc, total


def weighted_mean(contributions: Mapping[str, Contribution]) -> torch.Tensor:
    """sum_p w_p * x_p / sum_p w_p, accumulated in float64 in sorted-id order, returned as float32."""
    if not contributions:
        raise ValueError("weighted_mean: no contributions to aggregate")
    total = 0.0
    for pid in canonical_order(contributions):
        total += float(contributions[pid].weight)
    if not total > 0:
        raise ValueError(f"weighted_mean: total weight must be positive, got {total}")
    acc, _ = weighted_sum(contributions)
    acc.div_(total)
    return acc.to(torch.float32)


def trimmed_mean(contributions: Mapping[str, Contribution], trim_fraction: float) -> torch.Tensor:
    """Coordinate-wise mean after dropping the k smallest and k largest values (unweighted).

    k = floor(trim_fraction * n). With n contributions stacked in sorted-id order the
    sort is over values, so the result does not depend on arrival order.
    """
    order = canonical_order(contributions)
    n = len(order)
    k = int(trim_fraction * n)
    stacked = torch.stack([contributions[p].tensor.to(torch.float64) for p in order])
    values, _ = torch.sort(stacked, dim=0, stable=True)
    kept = values[k : n - k] if n - 2 * k > 0 else values
    acc = torch.zeros(kept.shape[1:], dtype=torch.float64)
    for row in kept:
        acc.add_(row)
    return acc.div_(kept.shape[0]).to(torch.float32)


def median(contributions: Mapping[str, Contribution]) -> torch.Tensor:
    """Coordinate-wise median (mean of the two middle values for even n)."""
    order = canonical_order(contributions)
    n = len(order)
    stacked = torch.stack([contributions[p].tensor.to(torch.float64) for p in order])
    values, _ = torch.sort(stacked, dim=0, stable=True)
    if n % 2:
        return values[n // 2].to(torch.float32)
    return ((values[n // 2 - 1] + values[n // 2]) / 2).to(torch.float32)


def aggregate(contributions: Mapping[str, Contribution], rule: str = "mean", *, trim_fraction: float = 0.2) -> torch.Tensor:
    if rule == "mean":
        return weighted_mean(contributions)
    if rule == "trimmed_mean":
        return trimmed_mean(contributions, trim_fraction)
    if rule == "median":
        return median(contributions)
    raise ValueError(f"unknown aggregation rule {rule!r}; use one of {', '.join(RULES)}")


# ---- offline merge rules (swarmfold merge) ---------------------------------------------
# These combine whole contributions one tensor at a time. TIES and DARE are not
# elementwise (TIES trims by magnitude within the tensor, DARE draws a mask per tensor),
# so they are used by `merge` only, where the unit is always one named parameter.

MERGE_RULES = ("mean", "task-arithmetic", "ties", "dare")


def _normalized_weights(contributions: Mapping[str, Contribution], order: list[str]) -> list[float]:
    """Weights scaled to average 1, so equal weights give plain sums."""
    weights = [float(contributions[p].weight) for p in order]
    total = 0.0
    for w in weights:
        total += w
    if not total > 0 or any(w < 0 for w in weights):
        raise ValueError(f"merge: weights must be non-negative with a positive total, got {weights}")
    return [w * len(weights) / total for w in weights]


def task_arithmetic(contributions: Mapping[str, Contribution], *, scale: float = 1.0) -> torch.Tensor:
    """scale · Σ_p ŵ_p x_p (ŵ averages 1): the sum of task vectors (Ilharco et al., 2023).

    With n equal-weight contributions, scale = 1/n is the plain mean.
    """
    if not contributions:
        raise ValueError("task_arithmetic: no contributions to aggregate")
    order = canonical_order(contributions)
    weights = _normalized_weights(contributions, order)
    acc = torch.zeros(contributions[order[0]].tensor.shape, dtype=torch.float64)
    for pid, w in zip(order, weights, strict=True):
        acc.add_(contributions[pid].tensor.to(torch.float64), alpha=w)
    return acc.mul_(float(scale)).to(torch.float32)


def _trim_to_density(x: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the entries whose magnitude is among the top `density` fraction (ties at the cut kept)."""
    flat = x.reshape(-1)
    k = max(1, math.ceil(density * flat.numel()))
    if k >= flat.numel():
        return x
    threshold = torch.kthvalue(flat.abs(), flat.numel() - k + 1).values
    return torch.where(x.abs() >= threshold, x, torch.zeros_like(x))


def ties(contributions: Mapping[str, Contribution], *, density: float = 0.2, scale: float = 1.0) -> torch.Tensor:
    """TIES-merging (Yadav et al., 2023): trim each to its top-`density` magnitudes, elect a sign
    per coordinate from the weighted sum, and average only the entries that agree with it."""
    if not contributions:
        raise ValueError("ties: no contributions to aggregate")
    if not 0 < density <= 1:
        raise ValueError(f"ties: density must be in (0, 1], got {density}")
    order = canonical_order(contributions)
    weights = _normalized_weights(contributions, order)
    trimmed = [_trim_to_density(contributions[p].tensor.to(torch.float64), density) for p in order]
    mass = torch.zeros(trimmed[0].shape, dtype=torch.float64)
    for t, w in zip(trimmed, weights, strict=True):
        mass.add_(t, alpha=w)
    sign = torch.sign(mass)
    num = torch.zeros_like(mass)
    den = torch.zeros_like(mass)
    for t, w in zip(trimmed, weights, strict=True):
        agree = ((torch.sign(t) == sign) & (t != 0)).to(torch.float64)
        num.add_(t * agree, alpha=w)
        den.add_(agree, alpha=w)
    merged = torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))
    return merged.mul_(float(scale)).to(torch.float32)


def _label_seed(*parts: str) -> int:
    blob = json.dumps(["swarmfold-dare-v1", *parts], separators=(",", ":")).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") & (2**63 - 1)


def dare(contributions: Mapping[str, Contribution], *, drop_rate: float = 0.5, label: str = "") -> torch.Tensor:
    """DARE (Yu et al., 2024): drop each entry with probability `drop_rate`, rescale the rest by
    1/(1 − drop_rate), then take the weighted mean.

    The mask of contribution p is drawn from a generator seeded by sha256 of (p, label), where
    the label is the tensor's name: the same inputs always give the same bits.
    """
    if not 0 <= drop_rate < 1:
        raise ValueError(f"dare: drop_rate must be in [0, 1), got {drop_rate}")
    rescaled = {}
    for pid, c in contributions.items():
        g = torch.Generator(device="cpu")
        g.manual_seed(_label_seed(pid, label))
        keep = torch.rand(c.tensor.shape, generator=g, dtype=torch.float64) >= drop_rate
        x = c.tensor.to(torch.float64)
        rescaled[pid] = Contribution(torch.where(keep, x / (1.0 - drop_rate), torch.zeros_like(x)), c.weight)
    return weighted_mean(rescaled)


def merge_rule(contributions: Mapping[str, Contribution], method: str, *, label: str = "",
               density: float = 0.2, drop_rate: float = 0.5, scale: float = 1.0) -> torch.Tensor:
    """One of MERGE_RULES applied to one named tensor's contributions."""
    if method == "mean":
        return weighted_mean(contributions)
    if method == "task-arithmetic":
        return task_arithmetic(contributions, scale=scale)
    if method == "ties":
        return ties(contributions, density=density, scale=scale)
    if method == "dare":
        return dare(contributions, drop_rate=drop_rate, label=label)
    raise ValueError(f"unknown merge method {method!r}; use one of {', '.join(MERGE_RULES)}")
