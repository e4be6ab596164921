"""The span-partial averaging tree for N > G: an ALTERNATIVE design, not the live one.

The live tree is the delegate tree: climb.py runs it in the swarm, and
`inprocess.reduce_tree` is its in-process reference (what `simulate` uses); its per-peer
cost model is averaging/treecost.py. Each group commits its own aggregate first, and its
delegate carries it up one level, recursively.

This module is the other design: every level-1 group's float64 span partials are combined
at span leaders before anything commits. It sends fewer bytes (no float32 F downloads, at
most about 2G peers and 3.25 Δ a peer at G = 8) but needs every group's partial before any
group can commit, so one slow or failed group holds up the round for all. It is pure and
in-process, kept for comparison: `scripts/bench_tree.py` measures it (the "tree" arm)
beside the live delegate tree ("live") and today's independent groups ("today").

Shape. The sorted ready set of round r is cut by `base.partition_groups` into
K1 = ceil(N/G) level-1 groups of near-equal size (sizes differ by at most one), in sorted
order: group 0 holds the smallest ids. Level l+1 cuts the K_l nodes of level l, in order,
the same way (`base.balanced_cuts`), until one node is left: the root. So depth is
ceil(log_G N) levels; for N <= G^2 it is the two-level tree (groups, then groups of groups),
and for N <= G it is today's single group. For G >= 3 every node above level 1 has at least
2 children; with G = 2 a node may have one, and passes its child's partial through. Each level-1 group has the id `base.group_id_for(swarm, r, 0, members)`; the
tree has one round id, a hash of (swarm, r, G, the level-1 group ids in order).

Canonical order of the sum (what every implementation must compute, bit for bit):
1. Level 1, group g, sorted members p: S_g = 0 (float64), then S_g.add_(x_p, alpha=w_p) per
   member in sorted-id order, where x_p is the float64 of what p's codec put on the wire
   (one fused multiply-add per element on builds with FMA, as `aggregate.weighted_sum`);
   W_g = 0.0 + w_p + ... as Python (float64) floats in the same order.
2. Level l > 1, node v with children c_0 < c_1 < ... (in tree order):
   S_v = ((S_c0 + S_c1) + S_c2) + ... and W_v = ((W_c0 + W_c1) + W_c2) + ..., in float64.
   A partial sum travels between levels as raw float64 (8 bytes an element) and its weight
   as a float64, so no precision is lost between levels and nothing is rounded twice.
3. Root: mean = float32(S_root / W_root), cast once; with compression it is encoded once,
   and every peer applies the decoded form of those same bytes.
Every step is elementwise, so the bits do not depend on how the vector is cut into spans.
For one group (N <= G) step 2 does nothing, and the result is `aggregate.weighted_mean`
exactly: the same operations in the same order (tests/test_tree.py checks with torch.equal).
For more than one group the result is NOT the flat sorted sum over all N peers: the tree's
parenthesisation is the definition. Only the weighted mean decomposes this way; trimmed
mean and median need every contribution of a coordinate in one place, so the tree refuses
them.

Placement (who sends what, for the cost model). All level-1 groups cut the vector into the
same spans, `codec.spans(numel, m)` with m the smallest group's size, so that span j means
the same elements everywhere; member j of each group reduces span j (in a group of m+1 the
last member reduces none). For span j, the representative of a level-1 group is its
reducer; the leader of a node above level 1 is the span-j reducer of the first level-1
group under the node's second child, and is its representative. These leaders are distinct
peers, so a peer leads at most one node per round. Up: every member sends span j (encoded)
to its group's reducer j; each node's children's representatives send their float64
partial (plus its weight) to the node's leader. The root's leader divides, encodes, and the
aggregate goes back down the same edges; each level-1 reducer sends it to its members.
A peer's fan-out is at most (group size - 1) + 2 + (G - 1), whatever N.

Failure containment: a level-1 group whose attempt fails (a member died or was rejected)
is taken out of round r's tree. Its members roll back (keep θ_r and carry their Δ, as a
failed group does today); the levels above 1 are rebuilt over the surviving level-1 groups
in their order (`Tree.without`), which keeps every surviving group's level-1 sum, and the
survivors commit one model. See docs/swarm.md, "More than one group: the tree".
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from swarmfold.averaging import codec
from swarmfold.averaging.aggregate import Contribution, weighted_sum
from swarmfold.averaging.base import (
    AverageRequest,
    AverageResult,
    balanced_cuts,
    group_id_for,
    partition_groups,
)
from swarmfold.averaging.inprocess import reduce_in_process

WEIGHT_BYTES = 8  # a partial's weight travels as one float64


@dataclass(frozen=True)
class Tree:
    """The shape of one round's tree: level-1 groups of peers, then levels of groups of nodes."""

    swarm_id: str
    round: int
    group_size: int
    groups: tuple[tuple[str, ...], ...]  # level-1 groups, each sorted, in sorted order
    upper: tuple[tuple[tuple[int, ...], ...], ...]  # upper[i]: level i+2's nodes, as child indices into level i+1
    group_ids: tuple[str, ...] = field(init=False)
    round_id: str = field(init=False)

    def __post_init__(self) -> None:
        gids = tuple(group_id_for(self.swarm_id, self.round, 0, list(g)) for g in self.groups)
        blob = json.dumps(["swarmfold-tree-v1", self.swarm_id, self.round, self.group_size, list(gids)],
                          separators=(",", ":")).encode()
        object.__setattr__(self, "group_ids", gids)
        object.__setattr__(self, "round_id", hashlib.sha256(blob).hexdigest()[:32])

    @property
    def members(self) -> list[str]:
        return sorted(p for g in self.groups for p in g)

    @property
    def depth(self) -> int:
        return 1 + len(self.upper)

    def group_of(self, peer_id: str) -> int:
        for i, g in enumerate(self.groups):
            if peer_id in g:
                return i
        raise KeyError(peer_id)

    def spans(self, numel: int) -> list[tuple[int, int]]:
        """The spans every level-1 group uses (one per member of the smallest group)."""
        return codec.spans(numel, min(len(g) for g in self.groups))

    def without(self, group_indices: Collection[int]) -> Tree:
        """Round r's tree once the given level-1 groups failed: the rest, upper levels rebuilt."""
        kept = [g for i, g in enumerate(self.groups) if i not in set(group_indices)]
        if not kept:
            raise ValueError("tree: every group failed; nothing to commit")
        return tree_of_groups(kept, self.group_size, swarm_id=self.swarm_id, round_idx=self.round)


def tree_of_groups(groups: Sequence[Sequence[str]], group_size: int, *, swarm_id: str, round_idx: int) -> Tree:
    """The tree over given level-1 groups (sorted within and between), levels cut by balanced_cuts."""
    if not groups or any(not g for g in groups):
        raise ValueError("tree: need at least one non-empty group")
    if group_size < 2 and len(groups) > 1:
        raise ValueError("tree: group_size must be >= 2 to join more than one group")
    ordered = sorted(tuple(sorted(g)) for g in groups)
    seen = [p for g in ordered for p in g]
    if len(set(seen)) != len(seen):
        raise ValueError("tree: a peer is in more than one group")
    upper: list[tuple[tuple[int, ...], ...]] = []
    count = len(ordered)
    while count > 1:
        nodes = tuple(tuple(range(lo, hi)) for lo, hi in balanced_cuts(count, group_size))
        upper.append(nodes)
        count = len(nodes)
    return Tree(swarm_id=swarm_id, round=round_idx, group_size=group_size, groups=tuple(ordered), upper=tuple(upper))


def build_tree(peer_ids: Sequence[str], group_size: int, *, swarm_id: str, round_idx: int) -> Tree:
    """Round r's tree over its ready set: partition_groups for level 1, then groups of groups."""
    if not peer_ids:
        raise ValueError("tree: no ready peers")
    return tree_of_groups(partition_groups(list(peer_ids), group_size), group_size,
                          swarm_id=swarm_id, round_idx=round_idx)


# ---- the canonical reduction ------------------------------------------------------------


@dataclass(frozen=True)
class Partial:
    """A node's float64 weighted sum of its contributions (not the mean) and its total weight."""

    sum: torch.Tensor
    weight: float


def group_partial(contributions: Mapping[str, Contribution]) -> Partial:
    """Level 1: sorted members, float64 (aggregate.weighted_sum)."""
    acc, total = weighted_sum(contributions)
    return Partial(acc, total)


def combine(partials: Sequence[Partial]) -> Partial:
    """Level > 1: ((S_0 + S_1) + S_2) + ... in float64, children in tree order; one child passes through."""
    if not partials:
        raise ValueError("combine: no partials")
    acc = partials[0].sum.clone()
    weight = partials[0].weight
    for p in partials[1:]:
        acc.add_(p.sum)
        weight += p.weight
    return Partial(acc, weight)


def finish(root: Partial) -> torch.Tensor:
    """The root: divide by the total weight in float64, cast to float32 once."""
    if not root.weight > 0:
        raise ValueError(f"tree: total weight must be positive, got {root.weight}")
    return (root.sum / root.weight).to(torch.float32)


def tree_mean(tree: Tree, contributions: Mapping[str, Contribution], lo: int = 0, hi: int | None = None) -> torch.Tensor:
    """The tree's weighted mean of elements [lo, hi) in the canonical order (before the final codec)."""
    if set(contributions) != set(tree.members):
        raise ValueError("tree_mean: contributions must be exactly the tree's members")
    level = [group_partial({p: Contribution(contributions[p].tensor[lo:hi], contributions[p].weight) for p in g})
             for g in tree.groups]
    for nodes in tree.upper:
        level = [combine([level[i] for i in node]) for node in nodes]
    return finish(level[0])


# ---- placement, messages and cost ------------------------------------------------------


@dataclass(frozen=True)
class Message:
    """One stream message of the round: a span (or the partial of a span) from one peer to another."""

    sender: str
    receiver: str
    level: int  # 1: inside a level-1 group; l > 1: between a node's children and its leader
    direction: str  # "up" (contribution or partial) or "down" (the encoded aggregate)
    span: int
    nbytes: int  # payload bytes (headers not counted, as base.butterfly_bytes)


def _first_group(tree: Tree, level_index: int, node: int) -> int:
    """The first level-1 group under a node (level_index 0 is level 1)."""
    while level_index > 0:
        node = tree.upper[level_index - 1][node][0]
        level_index -= 1
    return node


def representative(tree: Tree, level_index: int, node: int, span: int) -> str:
    """Who holds a node's partial of `span`: a group's reducer, or the leader of a node above level 1."""
    if level_index == 0:
        return tree.groups[node][span]
    children = tree.upper[level_index - 1][node]
    if len(children) == 1:  # a pass-through node (only with G = 2): its child's holder keeps the partial
        return representative(tree, level_index - 1, children[0], span)
    return tree.groups[_first_group(tree, level_index - 1, children[1])][span]


def upper_links(tree: Tree, span: int) -> list[list[tuple[str, list[str]]]]:
    """For each level above 1 (bottom-up), each node's (leader, holders of its children's partials)
    of `span`: the edges partials travel up and the aggregate travels down."""
    return [[(representative(tree, li + 1, vi, span), [representative(tree, li, c, span) for c in node])
             for vi, node in enumerate(nodes)] for li, nodes in enumerate(tree.upper)]


def plan(tree: Tree, numel: int, compression: str) -> list[Message]:
    """Every message of one round of the tree, with its payload size (no tensors needed)."""
    out: list[Message] = []
    for j, (lo, hi) in enumerate(tree.spans(numel)):
        if hi == lo:
            continue
        n = hi - lo
        enc = codec.encoded_size(compression, n)
        partial = 8 * n + WEIGHT_BYTES
        for g in tree.groups:
            r = g[j]
            out += [Message(p, r, 1, "up", j, enc) for p in g if p != r]
        links = upper_links(tree, j)
        for li, level in enumerate(links):
            out += [Message(holder, leader, li + 2, "up", j, partial)
                    for leader, holders in level for holder in holders if holder != leader]
        for li in range(len(links) - 1, -1, -1):
            out += [Message(leader, holder, li + 2, "down", j, enc)
                    for leader, holders in links[li] for holder in holders if holder != leader]
        for g in tree.groups:
            r = g[j]
            out += [Message(r, p, 1, "down", j, enc) for p in g if p != r]
    return out


@dataclass
class PeerCost:
    fan_out: int = 0  # distinct peers it sends to in the round
    fan_in: int = 0  # distinct peers it receives from
    messages_sent: int = 0
    messages_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    by_level: dict[int, dict[str, int]] = field(default_factory=dict)  # level -> messages/bytes sent/received


def peer_costs(tree: Tree, messages: Sequence[Message]) -> dict[str, PeerCost]:
    return tally_costs(tree.members, messages, lambda m: m.level)


def tally_costs(peers: Sequence[str], messages: Sequence[Any], level_of: Callable[[Any], int]
                ) -> dict[str, PeerCost]:
    """Per peer: fan-out / fan-in (distinct peers it sends to / receives from), messages and bytes, in
    total and by `level_of(message)`; each message has `sender`, `receiver` and `nbytes`."""
    costs = {p: PeerCost() for p in sorted(peers)}
    outs: dict[str, set[str]] = {p: set() for p in costs}
    ins: dict[str, set[str]] = {p: set() for p in costs}
    for m in messages:
        s, r = costs[m.sender], costs[m.receiver]
        outs[m.sender].add(m.receiver)
        ins[m.receiver].add(m.sender)
        s.messages_sent += 1
        s.bytes_sent += m.nbytes
        r.messages_received += 1
        r.bytes_received += m.nbytes
        key = level_of(m)
        for c, k in ((s, "sent"), (r, "received")):
            lv = c.by_level.setdefault(key, {"messages_sent": 0, "bytes_sent": 0,
                                             "messages_received": 0, "bytes_received": 0})
            lv[f"messages_{k}"] += 1
            lv[f"bytes_{k}"] += m.nbytes
    for p, c in costs.items():
        c.fan_out, c.fan_in = len(outs[p]), len(ins[p])
    return costs


def cost_model(n: int, group_size: int, numel: int, compression: str) -> dict[str, PeerCost]:
    """Per-peer fan-out, messages and bytes of one round for N ready peers (ids are placeholders)."""
    tree = build_tree([f"p{i:06d}" for i in range(n)], group_size, swarm_id="cost", round_idx=0)
    return peer_costs(tree, plan(tree, numel, compression))


@dataclass
class TreeRun:
    aggregate: dict[str, torch.Tensor]  # what each peer assembled, span by span (float32)
    messages: list[Message]


def run_tree(tree: Tree, deltas: Mapping[str, tuple[torch.Tensor, float]], compression: str) -> TreeRun:
    """Execute one round of the tree span by span, as the peers would: encode, send, reduce, combine
    float64 partials at their leaders, encode the root's mean once, send it down. Every payload is
    real bytes, and every peer assembles its own copy of the aggregate from what it received."""
    if set(deltas) != set(tree.members):
        raise ValueError("run_tree: deltas must be exactly the tree's members")
    numel = next(iter(deltas.values()))[0].numel()
    assembled = {p: torch.zeros(numel, dtype=torch.float32) for p in deltas}
    messages: list[Message] = []
    for j, (lo, hi) in enumerate(tree.spans(numel)):
        if hi == lo:
            continue
        held: dict[str, Partial] = {}
        for g in tree.groups:
            r = g[j]
            contributions = {}
            for p in g:
                payload = codec.encode(compression, deltas[p][0][lo:hi].contiguous())
                if p != r:
                    messages.append(Message(p, r, 1, "up", j, len(payload)))
                contributions[p] = Contribution(codec.decode(compression, payload, hi - lo), deltas[p][1])
            held[r] = group_partial(contributions)
        links = upper_links(tree, j)
        for li, level in enumerate(links):
            for leader, holders in level:
                parts = []
                for holder in holders:
                    part = held.pop(holder)
                    if holder != leader:  # raw float64 partial + float64 weight on the wire
                        payload = part.sum.numpy().tobytes() + np.float64(part.weight).tobytes()
                        messages.append(Message(holder, leader, li + 2, "up", j, len(payload)))
                        part = Partial(torch.from_numpy(np.frombuffer(payload[:-WEIGHT_BYTES], dtype=np.float64).copy()),
                                       float(np.frombuffer(payload[-WEIGHT_BYTES:], dtype=np.float64)[0]))
                    parts.append(part)
                held[leader] = combine(parts)
        (root_holder, root), = held.items()
        payload = codec.encode(compression, finish(root))
        have = {root_holder: payload}
        for li in range(len(links) - 1, -1, -1):
            for leader, holders in links[li]:
                for holder in holders:
                    if holder != leader:
                        messages.append(Message(leader, holder, li + 2, "down", j, len(have[leader])))
                        have[holder] = have[leader]
        for g in tree.groups:
            r = g[j]
            for p in g:
                if p != r:
                    messages.append(Message(r, p, 1, "down", j, len(have[r])))
                assembled[p][lo:hi] = codec.decode(compression, have[r], hi - lo)
    return TreeRun(aggregate=assembled, messages=messages)


# ---- the in-process round of this design (simulate uses inprocess.reduce_tree instead) ---


def reduce_tree_in_process(requests: dict[str, AverageRequest], *, swarm_id: str, compression: str,
                           group_size: int, dead: Collection[str] = ()) -> dict[str, AverageResult]:
    """One round of the span-partial tree over every ready peer, whole vectors at once (the
    reference a span-by-span run of this design must equal). N <= G is today's single group (`reduce_in_process`), bit
    for bit. Peers in `dead` died during the round: their level-1 groups are taken out of the
    tree, the other members of those groups roll back, and the rest commit one model. Dead
    peers get no result."""
    if not requests:
        raise ValueError("reduce_tree_in_process: no requests")
    round_idx = requests[min(requests)].round
    full = build_tree(sorted(requests), group_size, swarm_id=swarm_id, round_idx=round_idx)
    failed = sorted({full.group_of(p) for p in dead if p in requests})
    if len(full.groups) == 1 and not failed:
        return reduce_in_process(requests, swarm_id=swarm_id, compression=compression, rule="mean", trim_fraction=0.0)
    out: dict[str, AverageResult] = {}
    for gi in failed:
        for p in full.groups[gi]:
            if p not in dead:
                out[p] = AverageResult(status="rolled_back", aggregate=None, group_id=full.group_ids[gi],
                                       members=list(full.groups[gi]), attempts=1,
                                       reason=f"level-1 group failed ({', '.join(sorted(set(dead) & set(full.groups[gi])))}"
                                              f" died); excluded from round {round_idx}'s tree")
    if len(failed) == len(full.groups):
        return out
    tree = full.without(failed)
    members = tree.members
    contributions = {p: Contribution(codec.roundtrip(compression, requests[p].delta), requests[p].weight)
                     for p in members}
    agg = codec.roundtrip(compression, tree_mean(tree, contributions))
    costs = peer_costs(tree, plan(tree, agg.numel(), compression))
    weights = {p: float(requests[p].weight) for p in members}
    for p in members:
        group = tree.groups[tree.group_of(p)]
        out[p] = AverageResult(status="committed", aggregate=agg, group_id=tree.round_id, members=members,
                               included=members, weights=weights, steps={q: int(requests[q].steps) for q in members},
                               confirmed=[q for q in group if q != p],
                               attempts=1, reason=f"tree of {len(tree.groups)} groups, depth {tree.depth}",
                               bytes_sent=costs[p].bytes_sent, bytes_received=costs[p].bytes_received,
                               compressed=compression != "none")
    return out
