"""Aggregation rules: pure, elementwise functions over contributions.

The live all-reduce (one span per reducer), `swarmfold simulate` (the whole vector) and
`swarmfold merge` (one tensor at a time) all call these functions. Because every rule is
elementwise and sums in canonical order (sorted by contributor id) in float64, the bits
of the result do not depend on how the vector is cut into spans or on arrival order.
"""

from __future__ import annotations

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


def weighted_mean(contributions: Mapping[str, Contribution]) -> torch.Tensor:
    """sum_p w_p * x_p / sum_p w_p, accumulated in float64 in sorted-id order, returned as float32."""
    if not contributions:
        raise ValueError("weighted_mean: no contributions to aggregate")
    order = canonical_order(contributions)
    total = 0.0
    for pid in order:
        total += float(contributions[pid].weight)
    if not total > 0:
        raise ValueError(f"weighted_mean: total weight must be positive, got {total}")
    first = contributions[order[0]].tensor
    acc = torch.zeros(first.shape, dtype=torch.float64)
    for pid in order:
        c = contributions[pid]
        acc.add_(c.tensor.to(torch.float64), alpha=float(c.weight))
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
