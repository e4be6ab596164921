"""Cost model of the live delegate tree (climb.py, `inprocess.reduce_tree`): who talks to whom, how much.

Pure: no tensors, no network. It lays out one round of the tree the live swarm runs for
N > G ready peers and counts, per peer, the messages it sends and receives and their
payload bytes (headers not counted, as `base.butterfly_bytes`).

Shape. Level 1 is `base.partition_groups` of the sorted ready peers. Level l + 1 is
`partition_groups` of level l's delegates (`base.delegates_of`: each group's first member;
client mode is not modelled), until a level has one group: the top. A group of one at some
level sends nothing there; its member carries its part up unchanged.

Messages, per group of m > 1 members at every level (the butterfly all-reduce, allreduce.py):
the vector is cut by `codec.spans(numel, m)`; member i sends span j (encoded) to reducer j
for every j != i, and reducer j sends its span's encoded aggregate back to every other
member: 2 (m - 1) messages a member, `base.butterfly_bytes` bytes (a message is counted even
when its span is empty, as the live peer opens every exchange). Then the downloads (TREE):
the top group's members hold F; every delegate sends F as raw float32 (4 bytes an element)
to each other member of each group it carried up below the top, once each. A member's small
TREE request carries no payload and is not counted as a message.

`by_level` keys are the tree levels (1 = the groups of peers) for the butterflies, and
`DOWNLOADS` (0) for the F downloads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from swarmfold.averaging import codec
from swarmfold.averaging.base import delegates_of, partition_groups
from swarmfold.averaging.tree import PeerCost, tally_costs

DOWNLOADS = 0  # the by_level key of the F downloads
F_BYTES_PER_ELEMENT = 4  # F travels as raw float32 (climb.py)


@dataclass(frozen=True)
class Send:
    """One message of the round: a span, a span's aggregate, or F."""

    sender: str
    receiver: str
    level: int  # the tree level of the group it belongs to (1 = the groups of peers)
    kind: str  # "part" (span j to reducer j), "aggregate" (reducer j's result back) or "download" (F)
    nbytes: int  # payload bytes


def delegate_levels(peer_ids: Sequence[str], group_size: int) -> list[list[list[str]]]:
    """The groups of every level, bottom-up: level 1 is partition_groups of the sorted peers, each next
    level partition_groups of the previous level's delegates, until one group is left (the top)."""
    nodes = sorted(set(peer_ids))
    if not nodes:
        raise ValueError("delegate tree: no peers")
    if group_size < 2 and len(nodes) > 1:
        raise ValueError("delegate tree: group_size must be >= 2 to join more than one group")
    levels = []
    while True:
        groups = partition_groups(nodes, group_size)
        levels.append(groups)
        if len(groups) <= 1:
            return levels
        nodes = delegates_of(nodes, group_size)


def tree_records(levels: list[list[list[str]]]) -> dict[str, list[tuple[int, list[str]]]]:
    """For each peer, the groups above its own that it reached through its delegates, as
    (level, members) for each level whose group has more than one member: what
    `reduce_tree`'s `AverageResult.tree` records (level and included)."""
    out: dict[str, list[tuple[int, list[str]]]] = {}
    for g in levels[0]:
        for p in g:
            chain = []
            carrier = g[0]
            for li in range(1, len(levels)):
                group = next(h for h in levels[li] if carrier in h)
                if len(group) > 1:
                    chain.append((li + 1, list(group)))
                carrier = group[0]
            out[p] = chain
    return out


def delegate_plan(levels: list[list[list[str]]], numel: int, compression: str) -> list[Send]:
    """Every message of one round of the delegate tree, with its payload size."""
    out: list[Send] = []
    for li, groups in enumerate(levels):
        level = li + 1
        for g in groups:
            m = len(g)
            if m <= 1:
                continue
            sizes = [codec.encoded_size(compression, hi - lo) for lo, hi in codec.spans(numel, m)]
            for i, p in enumerate(g):
                out += [Send(p, g[j], level, "part", sizes[j]) for j in range(m) if j != i]
            for j, r in enumerate(g):
                out += [Send(r, p, level, "aggregate", sizes[j]) for p in g if p != r]
    f_bytes = F_BYTES_PER_ELEMENT * numel
    for li in range(len(levels) - 1):  # below the top: each group's delegate hands F down to its members
        for g in levels[li]:
            out += [Send(g[0], p, li + 1, "download", f_bytes) for p in g[1:]]
    return out


def costs_of(peers: Sequence[str], sends: Sequence[Send]) -> dict[str, PeerCost]:
    """Per peer: fan-out / fan-in, messages and bytes, by level (butterflies at their level, downloads
    under DOWNLOADS)."""
    return tally_costs(peers, sends, lambda m: DOWNLOADS if m.kind == "download" else m.level)


def delegate_costs_of(peer_ids: Sequence[str], group_size: int, numel: int, compression: str
                      ) -> dict[str, PeerCost]:
    """Per-peer cost of one round of the live delegate tree over the given ready peers."""
    levels = delegate_levels(peer_ids, group_size)
    return costs_of([p for g in levels[0] for p in g], delegate_plan(levels, numel, compression))


def delegate_costs(n: int, group_size: int, numel: int, compression: str) -> dict[str, PeerCost]:
    """Per-peer cost of one round of the live delegate tree for N ready peers (ids are placeholders)."""
    return delegate_costs_of([f"p{i:06d}" for i in range(n)], group_size, numel, compression)
