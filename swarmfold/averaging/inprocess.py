"""An in-process group: the reference reduction that the live swarm must equal bit for bit.

It runs the same steps as the butterfly all-reduce, on whole vectors instead of spans:
decode what a sender would put on the wire, aggregate in canonical order in float64,
encode the aggregate once and hand every member the decoded form of those bytes.
`reduce_tree` joins more groups than one (N > G) the way the live tree does (climb.py).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from swarmfold.averaging import codec
from swarmfold.averaging.aggregate import Contribution, aggregate
from swarmfold.averaging.base import (
    AverageRequest,
    AverageResult,
    butterfly_bytes,
    delegates_of,
    group_id_for,
    partition_groups,
    tree_level,
)


def reduce_in_process(requests: dict[str, AverageRequest], *, swarm_id: str, compression: str, rule: str,
                      trim_fraction: float, level: int = 1) -> dict[str, AverageResult]:
    members = sorted(requests)
    if len(members) == 1:
        (pid,) = members
        return {pid: AverageResult(status="alone", aggregate=requests[pid].delta, members=members,
                                   included=members, steps={pid: int(requests[pid].steps)},
                                   reason="group of one")}
    contributions = {pid: Contribution(codec.roundtrip(compression, r.delta), r.weight)
                     for pid, r in requests.items()}
    agg = codec.roundtrip(compression, aggregate(contributions, rule, trim_fraction=trim_fraction))
    round_idx = requests[members[0]].round
    gid = group_id_for(swarm_id, round_idx, 0, members, level=level)
    numel = agg.numel()
    n = len(members)
    out = {}
    for i, pid in enumerate(members):
        sent = butterfly_bytes(numel, n, i, compression)
        out[pid] = AverageResult(status="committed", aggregate=agg, group_id=gid, members=members,
                                 included=members, weights={p: float(requests[p].weight) for p in members},
                                 steps={p: int(requests[p].steps) for p in members},
                                 confirmed=[p for p in members if p != pid],
                                 bytes_sent=sent, bytes_received=sent,
                                 compressed=compression != "none")
    return out


def reduce_tree(requests: dict[str, AverageRequest], *, swarm_id: str, compression: str, rule: str,
                trim_fraction: float, group_size: int) -> dict[str, AverageResult]:
    """Every ready peer of a round, every one in its first attempt: the groups of `partition_groups`,
    and for N > G the tree above them (climb.py), whole vectors at once. Each group's delegate (its
    first member) carries the group's aggregate up, weighted by the sum of its included weights in
    sorted order, with the sum of their steps; a group of one carries its own Δ; each level is
    `reduce_in_process` under that level's group ids, until one group is left. Every peer gets the
    top aggregate, with one `base.tree_level` record per level above its group (commit digests are
    the live swarm's only, and are left empty here)."""
    return _climb(requests, swarm_id=swarm_id, compression=compression, rule=rule, trim_fraction=trim_fraction,
                  group_size=group_size, level=1)


def _climb(requests: dict[str, AverageRequest], *, level: int, group_size: int, swarm_id: str, compression: str,
           rule: str, trim_fraction: float) -> dict[str, AverageResult]:
    opts: dict[str, Any] = dict(swarm_id=swarm_id, compression=compression, rule=rule, trim_fraction=trim_fraction)
    groups = partition_groups(sorted(requests), group_size)
    out: dict[str, AverageResult] = {}
    for g in groups:
        out.update(reduce_in_process({p: requests[p] for p in g}, level=level, **opts))
    delegates = delegates_of(sorted(requests), group_size)
    if not delegates:  # one group, or G = 1 (every peer alone)
        return out
    up: dict[str, AverageRequest] = {}
    for d in delegates:
        r, req = out[d], requests[d]
        weight = 0.0
        for p in sorted(r.included):  # the order climb._sums adds them in
            weight += float(r.weights[p]) if r.status == "committed" else float(req.weight)
        assert r.aggregate is not None
        up[d] = AverageRequest(round=req.round, delta=r.aggregate, weight=weight, model_sha256=req.model_sha256,
                               steps=sum(r.steps.values()), level=level + 1)
    above = _climb(up, level=level + 1, group_size=group_size, **opts)
    for d, g in zip(delegates, groups, strict=True):
        top = above[d]  # its `tree` holds the levels above its own group at level + 1
        real = top.status == "committed" and len(top.members) > 1  # not a group of one carried further up
        levels = ([tree_level(level + 1, top.group_id, top.included, top.weights, top.steps)] if real else []) \
            + top.tree
        for p in g:
            r = out[p]
            if r.status == "alone":  # a group of one: it committed at the level above
                r = replace(r, status="committed", group_id=levels[0]["group_id"], members=[p],
                            weights={p: float(requests[p].weight)}, compressed=compression != "none")
            out[p] = replace(r, aggregate=top.aggregate, tree=levels, reason=f"tree of {len(levels) + 1} levels",
                             bytes_sent=r.bytes_sent + (top.bytes_sent if p == d else 0),
                             bytes_received=r.bytes_received + (top.bytes_received if p == d else 0))
    return out
