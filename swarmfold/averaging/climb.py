"""The tree for more ready peers than one group holds (N > G): one model per round at any N.

Level 1 is the round as it always was: the ready peers are cut into groups of at most G
(base.partition_groups), and each group reduces and commits its own aggregate A_g,
atomically. When the leader's gather held more than one group's worth of peers, its final
list names the next level's expected members: the delegate of every group (its first
member that can reduce; base.delegates_of). After its group's commit, each delegate runs
the same round again, one level up (matchmaking, all-reduce and commit under keys and
group ids of that level), among the delegates: its part is A_g, with the weight and steps
of everything its group included (their sums). This recurses while a level's final list
names delegates again (N > G^2), so that a peer's fan-out stays bounded by G at every
level. A group of one at some level carries its own part up unchanged (as
`inprocess.reduce_in_process` hands a group of one its own Δ).

The other members ask their delegate (TREE) for what the levels above made of their
group: the top level's aggregate F, with one record per level (base.tree_level), or
"fallback" when a level above failed, and they then apply the highest aggregate that
committed (A_g at worst: never a mix within a group, as every member gets the same answer
from the same delegate). A member whose delegate cannot be reached (it died, before or
during the level above or after it) asks the round's other delegates, in sorted order, for
the top their groups reached: the level above, missing the dead delegate, retried without
it (its atomic commit leaves no mix), so the group's members end on the swarm's one model
even though their own aggregate did not reach it, unless the delegate had carried it up
before it died. Only when no delegate answers does a member apply A_g.

The canonical order of the sum is the tree's: sorted members within a group (float64,
aggregate.aggregate), the decoded group aggregate, then sorted delegates within their
group, level by level. `inprocess.reduce_tree` computes the same, whole vectors at once,
and `simulate` uses it, so the swarm still equals `simulate` bit for bit at N > G.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from swarmfold.averaging import wire
from swarmfold.averaging.base import (
    AverageRequest,
    AverageResult,
    delegate_of,
    tree_depth,
    tree_level,
)
from swarmfold.averaging.matchmaking import Membership
from swarmfold.averaging.messages import MAX_TREE_LEVELS, TreeLevel, TreeRequest, TreeResult
from swarmfold.averaging.protocol import (
    CHUNK_ELEMENTS,
    CHUNK_FRAME_SLACK,
    TREE,
    AveragingError,
    Rejected,
)
from swarmfold.averaging.timeouts import RoundTimeouts
from swarmfold.averaging.transport import SMALL_MESSAGE, Net

logger = logging.getLogger(__name__)

MAX_SERVED = 8  # groups whose top-level aggregate a delegate keeps serving (a few rounds' worth)
# requests at once from members of other groups (whose delegate is gone) that a delegate serves: a
# round's dead delegate leaves at most G - 1 of them, so this bounds a flood, not the honest case
MAX_FOREIGN = 16
RunLevel = Callable[[AverageRequest, set[str]], Awaitable[AverageResult]]


@dataclass
class Top:
    """What the levels above a group made of it: the highest aggregate that committed, and one record
    per level that did (empty: the levels above failed, the group keeps its own aggregate)."""

    aggregate: torch.Tensor
    levels: list[dict] = field(default_factory=list)
    bytes_sent: int = 0
    bytes_received: int = 0
    foreign: bool = False  # another group's delegate gave it, and it does not hold our group's aggregate


def _sums(req: AverageRequest, res: AverageResult) -> tuple[float, int]:
    """The weight and steps a group carries up: the sums over whom it included, in sorted order."""
    if res.status != "committed":
        return float(req.weight), int(req.steps)
    weight = 0.0
    for p in sorted(res.included):
        weight += float(res.weights[p])
    return weight, sum(int(res.steps[p]) for p in res.included)


class Climb:
    """This peer's part in the levels above its group: carry its group up, or fetch the result."""

    def __init__(self, net: Net, membership: Membership, timeouts: RoundTimeouts, group_size: int):
        self.net = net
        self.membership = membership
        self.tt = timeouts
        self.group_size = group_size
        self.peer_id = net.peer_id
        self.served: OrderedDict[str, asyncio.Future[Top | None]] = OrderedDict()
        # (round, θ_r's hash) -> the same answer as our level-1 group's, for members of other groups
        self.round_tops: OrderedDict[tuple[int, str], asyncio.Future[Top | None]] = OrderedDict()
        self._foreign = asyncio.Semaphore(MAX_FOREIGN)
        self._changed = asyncio.Event()

    # ---- after a level's outcome ------------------------------------------------------------------
    async def finish(self, req: AverageRequest, res: AverageResult, run_level: RunLevel) -> AverageResult:
        """`res` is this peer's outcome at level 1; with a tree above, the round's outcome."""
        if not res.delegates or res.status not in ("committed", "alone"):
            return res
        top = await self.resolve(req, res, run_level)
        if top is not None and top.levels and all(not lv["group_id"] for lv in top.levels) and not top.foreign:
            top = Top(top.aggregate, [], top.bytes_sent, top.bytes_received)  # we were alone above: our own
        if top is None or not top.levels:
            why = "the levels above failed" if res.status == "committed" else "no level above formed"
            logger.warning("[%s] round %d: %s; keeping group %s's own aggregate", self.peer_id[-8:], req.round,
                           why, res.group_id[:8] or "of one")
            return replace(res, reason=f"tree: {why}; applied this group's aggregate",
                           bytes_sent=res.bytes_sent + (top.bytes_sent if top else 0),
                           bytes_received=res.bytes_received + (top.bytes_received if top else 0))
        out = replace(res, aggregate=top.aggregate, tree=top.levels, bytes_sent=res.bytes_sent + top.bytes_sent,
                      bytes_received=res.bytes_received + top.bytes_received,
                      reason=f"tree of {len(top.levels) + 1} levels", reached_top=not top.foreign)
        if res.status == "alone":  # a group of one whose Δ went up: it committed at the level above
            first = top.levels[0]
            out = replace(out, status="committed", group_id=first["group_id"], members=[self.peer_id],
                          included=[self.peer_id], weights={self.peer_id: float(req.weight)},
                          steps={self.peer_id: int(req.steps)}, compressed=res.compressed or bool(top.levels))
        logger.info("[%s] round %d: the tree's top aggregate applied (%d level(s) above group %s)",
                    self.peer_id[-8:], req.round, len(top.levels), res.group_id[:8] or "of one")
        return out

    async def resolve(self, req: AverageRequest, res: AverageResult, run_level: RunLevel) -> Top | None:
        """The top of the tree above `res` (this peer's outcome at level `req.level`), or None."""
        me = self.peer_id
        delegate = delegate_of(res.included, set(res.clients)) if res.status == "committed" else me
        if delegate != me:
            return await self._from_delegates(req, res, delegate)
        key = (req.round, req.model_sha256) if req.level == 1 else None
        fut = self._serve(res.group_id, key) if res.status == "committed" else None
        top: Top | None = None
        try:
            top = await self._carry(req, res, run_level)
        finally:
            if fut is not None and not fut.done():
                fut.set_result(top)
        return top

    async def _from_delegates(self, req: AverageRequest, res: AverageResult, delegate: str) -> Top | None:
        """A member's answer: from its group's delegate; if that one gives none (gone), from the round's
        other delegates in sorted order, the first that has a top."""
        bound = self.tt.tree_wait(tree_depth(len(res.delegates), self.group_size))
        ask = TreeRequest(group_id=res.group_id, round=req.round, base=req.model_sha256)
        top = await self._ask(delegate, ask, req.delta.numel(), bound)
        if top is not None:
            return top
        for other in sorted(set(res.delegates) - {delegate, self.peer_id}):
            logger.info("[%s] round %d: asking delegate %s for the round's top instead", self.peer_id[-8:],
                        req.round, other[-8:])
            top = await self._ask(other, ask, req.delta.numel(), bound)
            if top is not None and top.levels:
                # our delegate may have carried our group up before it died: then the top holds it
                top.foreign = delegate not in top.levels[0]["included"]
                return top
        return None

    async def _carry(self, req: AverageRequest, res: AverageResult, run_level: RunLevel) -> Top | None:
        """We are our group's delegate: run the level above with the group's aggregate."""
        weight, steps = _sums(req, res)
        assert res.aggregate is not None
        up = AverageRequest(round=req.round, delta=res.aggregate, weight=weight, model_sha256=req.model_sha256,
                            steps=steps, level=req.level + 1)
        r = await run_level(up, set(res.delegates) - {self.peer_id})
        sent, received = r.bytes_sent, r.bytes_received
        if r.status == "committed":
            here = tree_level(up.level, r.group_id, r.included, r.weights, r.steps, r.digest)
            assert r.aggregate is not None
            top = Top(r.aggregate, [here])
            if r.delegates:
                higher = await self.resolve(up, r, run_level)
                if higher is not None and higher.levels:
                    top = Top(higher.aggregate, [here, *higher.levels], higher.bytes_sent, higher.bytes_received)
        elif r.status == "alone" and r.delegates:  # a group of one at this level: our part goes up as it is
            higher = await self.resolve(up, r, run_level)
            if higher is None or not higher.levels:
                return Top(res.aggregate, [], sent, received) if res.aggregate is not None else None
            top = higher
        elif r.status == "alone":  # no other delegate came (dead or cut off): the top is our part alone,
            # which members of other groups whose delegate is gone apply too (one model for the survivors)
            top = Top(res.aggregate, [tree_level(up.level, "", [self.peer_id], {self.peer_id: weight},
                                                 {self.peer_id: steps})])
        else:
            logger.warning("[%s] round %d: tree level %d: %s", self.peer_id[-8:], req.round, up.level,
                           r.reason or r.status)
            return Top(res.aggregate, [], sent, received)
        top.bytes_sent += sent
        top.bytes_received += received
        return top

    # ---- a member asks its delegate --------------------------------------------------------------
    async def _ask(self, delegate: str, ask: TreeRequest, numel: int, bound: float) -> Top | None:
        """The delegate's answer (a Top without levels: "fallback"), or None when it gave none."""
        try:
            return await asyncio.wait_for(self._fetch(delegate, ask, numel), bound)
        except TimeoutError:
            logger.warning("[%s] no answer from delegate %s within %.0fs", self.peer_id[-8:], delegate[-8:], bound)
        except (AveragingError, wire.WireError, ConnectionError, OSError, Rejected) as e:
            logger.warning("[%s] fetching the tree's result from delegate %s failed: %s", self.peer_id[-8:],
                           delegate[-8:], e)
        return None

    async def _fetch(self, delegate: str, ask: TreeRequest, numel: int) -> Top | None:
        group_id = ask.group_id
        reader, writer = await self.net.open(delegate, TREE)
        wire.widen(reader, writer)
        try:
            sent = await wire.send(writer, ask.to_wire())
            raw, received = await wire.recv(reader, SMALL_MESSAGE)
            head = TreeResult.from_wire(raw)
            if head.group_id != group_id:
                raise wire.WireError(f"an answer for group {head.group_id[:8]}, asked for {group_id[:8]}")
            if head.status == "fallback":
                return Top(torch.empty(0), [], sent, received)
            if head.numel != numel or not head.levels:
                raise wire.WireError(f"an aggregate of {head.numel} elements with {len(head.levels)} levels, "
                                     f"expected {numel} elements")
            out = torch.empty(numel, dtype=torch.float32)
            view = out.numpy()
            h = hashlib.sha256()
            limit = 4 * CHUNK_ELEMENTS + CHUNK_FRAME_SLACK
            for k, lo in enumerate(range(0, numel, CHUNK_ELEMENTS)):
                hi = min(numel, lo + CHUNK_ELEMENTS)
                frame, n = await wire.recv(reader, limit)
                received += n
                data = wire.field(frame, "data", bytes)
                if frame.get("kind") != "chunk" or frame.get("k") != k or len(data) != 4 * (hi - lo):
                    raise wire.WireError(f"expected chunk {k} of {4 * (hi - lo)} bytes")
                view[lo:hi] = np.frombuffer(data, dtype=np.float32)
                h.update(data)
            if h.hexdigest() != head.sha256:
                raise wire.WireError("the aggregate's bytes do not match the sha256 its header announced")
            if not bool(np.isfinite(view).all()):
                raise wire.WireError("the aggregate holds NaN or Inf")
            return Top(out, [lv.as_record() for lv in head.levels], sent, received)
        finally:
            wire.close(writer)

    # ---- a delegate serves its group -------------------------------------------------------------
    def _serve(self, group_id: str, key: tuple[int, str] | None) -> asyncio.Future[Top | None]:
        fut: asyncio.Future[Top | None] = asyncio.get_running_loop().create_future()
        self.served[group_id] = fut
        if key is not None:
            self.round_tops[key] = fut
        while len(self.served) > MAX_SERVED:
            _, old = self.served.popitem(last=False)
            if not old.done():
                old.set_result(None)
        while len(self.round_tops) > MAX_SERVED:
            self.round_tops.popitem(last=False)
        self._changed.set()
        self._changed = asyncio.Event()
        return fut

    async def _served(self, table: OrderedDict[Any, asyncio.Future[Top | None]], key: Any
                      ) -> asyncio.Future[Top | None] | None:
        """The answer under `key` (a group id in `served`, or a round in `round_tops`), waiting a commit
        window for it (members commit a little apart)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.tt.commit + self.tt.leader_grace
        while key not in table:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                pass
        return table[key]

    async def on_tree(self, info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sender = str(info.peer_id)
        try:
            raw, _ = await wire.recv(reader, SMALL_MESSAGE)
            try:
                req = TreeRequest.from_wire(raw)
            except Rejected as r:
                logger.info("bad tree request from %s: %s", sender[-8:], r.label)
                return
            # the delegate resolves it within its own bounds, whatever happens above: this is a safety net
            bound = self.tt.tree_wait(MAX_TREE_LEVELS)
            if self.membership.is_member(sender, req.group_id):
                fut = await self._served(self.served, req.group_id)
                top = await asyncio.wait_for(asyncio.shield(fut), bound) if fut is not None else None
            elif self._foreign.locked():
                logger.info("[%s] declined a tree request from %s: %d already served", self.peer_id[-8:],
                            sender[-8:], MAX_FOREIGN)
                top = None
            else:  # a member of another group of the round, whose own delegate is gone
                async with self._foreign:
                    fut = await self._served(self.round_tops, (req.round, req.base))
                    top = await asyncio.wait_for(asyncio.shield(fut), bound) if fut is not None else None
            await self._send(writer, req.group_id, top)
        except (wire.WireError, ConnectionError, TimeoutError) as e:
            logger.info("tree exchange with %s failed: %s", sender[-8:], e)
        finally:
            await wire.finish(reader, writer, self.tt.commit)

    async def _send(self, writer: asyncio.StreamWriter, group_id: str, top: Top | None) -> None:
        if top is None or not top.levels:
            await wire.send(writer, TreeResult(group_id=group_id, status="fallback", numel=0, sha256="").to_wire())
            return
        data = top.aggregate.numpy().data.cast("B")
        levels = tuple(TreeLevel(level=int(lv["level"]), group_id=lv["group_id"], included=tuple(lv["included"]),
                                 weights=dict(lv["weights"]), steps=dict(lv["steps"]), digest=lv["digest"])
                       for lv in top.levels)
        await wire.send(writer, TreeResult(group_id=group_id, status="committed", numel=top.aggregate.numel(),
                                           sha256=hashlib.sha256(data).hexdigest(), levels=levels).to_wire())
        step = 4 * CHUNK_ELEMENTS
        for k, pos in enumerate(range(0, len(data), step)):
            await wire.send_chunk(writer, k, data[pos:pos + step])
