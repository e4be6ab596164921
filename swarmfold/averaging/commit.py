"""The commit: members agree on the aggregate before anyone applies it.

Each member judges the spans it assembled (`judge`: every span arrived, whole, from
reducers that included the same contributors with the same weights), then sends a digest
vote (messages.Vote) to the others. It commits only if no one reported a failure and
every vote it got carries its own digest; a member that died mid-commit is not waited for.
Votes are accepted only from members of a group this peer is in, into bounded tables.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from swarmfold.averaging import wire
from swarmfold.averaging.allreduce import SpanOutcome, wait_until
from swarmfold.averaging.matchmaking import Group, Membership
from swarmfold.averaging.messages import Answer, Vote
from swarmfold.averaging.protocol import VOTE, AveragingError, Phase, Rejected
from swarmfold.averaging.timeouts import RoundTimeouts
from swarmfold.averaging.transport import SMALL_MESSAGE, Net

logger = logging.getLogger(__name__)

MAX_VOTE_GROUPS = 8  # groups whose votes are kept (this round's attempts); a group's votes are bounded by its members


def digest(group_id: str, included: list[str], weights: dict[str, Any], steps: dict[str, int],
           span_digests: list[str]) -> str:
    """What every member votes on: the group, who was included with what weight and how many inner
    steps, and the sha256 of each span's aggregate exactly as its reducer encoded it (the same bytes
    went to every member)."""
    blob = json.dumps([group_id, included, sorted(weights.items()), sorted(steps.items()), span_digests],
                      separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class Judgement:
    """A member's view of its all-reduce: whom the aggregate includes, and the failure if any."""

    included: list[str]
    weights: dict[str, float]
    steps: dict[str, int]  # the inner steps each included member declared (its part header)
    rejected: dict[str, str]
    missing: set[str]  # reducers that sent no usable aggregate
    failure: str  # "" when the aggregate is whole and consistent
    digest: str  # "" on failure


def judge(group: Group, me: str, results: list[SpanOutcome | None]) -> Judgement:
    """Check the spans' outcomes against each other (a pure function: tests feed it outcomes)."""
    reducers = group.reducers
    missing = {reducers[j] for j, res in enumerate(results) if res is None}
    got = [res for res in results if res is not None]
    rejected: dict[str, str] = {}
    for res in got:
        rejected.update(res.rejected)
    cut = [j for j, res in enumerate(results) if res is not None and not res.complete]
    included_sets = {tuple(res.included) for res in got}
    weight_sets = {json.dumps([res.weights, res.steps], sort_keys=True) for res in got}
    failure = ""
    if missing:
        failure = f"no aggregate from reducer(s) {', '.join(sorted(m[-8:] for m in missing))}"
    elif cut:
        failure = (f"span(s) {', '.join(map(str, cut))} cut off mid-stream (a contributor was rejected "
                   "after its first chunks were averaged)")
    elif len(included_sets) != 1 or len(weight_sets) != 1:
        failure = "reducers included different contributors"
    first = results[0]
    included = list(first.included) if first is not None else []
    weights = dict(first.weights) if first is not None else {}
    steps = dict(first.steps) if first is not None else {}
    if not failure and me not in included:
        failure = "our own contribution was rejected"
    d = "" if failure else digest(group.group_id, included, weights, steps, [res.digest for res in got])
    return Judgement(included=included, weights=weights, steps=steps, rejected=rejected, missing=missing, failure=failure,
                     digest=d)


class Commit:
    def __init__(self, net: Net, membership: Membership, timeouts: RoundTimeouts, *,
                 on_enter: Callable[[Phase, int, int], None]):
        self.net = net
        self.membership = membership
        self.tt = timeouts
        self.peer_id = net.peer_id
        self.on_enter = on_enter
        self.votes: OrderedDict[str, dict[str, Vote]] = OrderedDict()
        self._changed = asyncio.Event()

    def forget(self, group_id: str) -> None:
        self.votes.pop(group_id, None)

    def _record(self, sender: str, vote: Vote) -> bool:
        """Keep `vote` if `sender` is a member of its group (one we are in); False if refused."""
        if sender == self.peer_id or not self.membership.is_member(sender, vote.group_id):
            return False
        self.votes.setdefault(vote.group_id, {})[sender] = vote
        self.votes.move_to_end(vote.group_id)
        while len(self.votes) > MAX_VOTE_GROUPS:
            self.votes.popitem(last=False)
        self._changed.set()
        self._changed = asyncio.Event()
        return True

    async def commit(self, group: Group, round_idx: int, j: Judgement, stats: dict[str, int]
                     ) -> tuple[bool, list[str]]:
        """Exchange digest votes: (commit?, the members whose votes confirmed our digest). Commit iff we hold
        the aggregate, no member reported a failure, and every vote received carries our digest (a member
        that died mid-commit is not waited for)."""
        ok = not j.failure
        vote = Vote(group_id=group.group_id, ok=ok, digest=j.digest, reason=j.failure).to_wire()
        others = [m for m in group.members if m != self.peer_id]
        first = True

        async def cast(peer: str) -> None:
            nonlocal first
            try:
                _, s, r = await self.net.request(peer, VOTE, vote, timeout=self.tt.commit)
                stats["sent"] += s
                stats["received"] += r
            except AveragingError as e:
                logger.info("vote to %s failed: %s", peer[-8:], e)
            if first:
                first = False
                self.on_enter(Phase.COMMIT, round_idx, group.level)

        casting = asyncio.gather(*(cast(p) for p in others))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.tt.commit
        await wait_until(self, lambda: set(self.votes.get(group.group_id, {})) >= set(others), deadline)
        await casting
        got = {p: v for p, v in self.votes.get(group.group_id, {}).items() if p in others}
        agree = ok and all(v.ok and v.digest == j.digest for v in got.values())
        if not agree:
            bad = {p[-8:]: v.reason or "different digest" for p, v in got.items() if not (v.ok and v.digest == j.digest)}
            logger.warning("[%s] round %d: not committing (%s)", self.peer_id[-8:], round_idx,
                           j.failure or f"votes: {bad}")
        return agree, sorted(p for p, v in got.items() if v.ok and v.digest == j.digest)

    async def on_vote(self, info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sender = str(info.peer_id)
        try:
            raw, _ = await wire.recv(reader, SMALL_MESSAGE)
            try:
                accepted = self._record(sender, Vote.from_wire(raw))
                answer = Answer(ok=accepted, reason="" if accepted else "not a member of that group")
            except Rejected as r:
                answer = Answer(ok=False, reason=r.label)
            await wire.send(writer, answer.to_wire())
        except (wire.WireError, ConnectionError) as e:
            logger.info("bad vote from %s: %s", sender[-8:], e)
        finally:
            await wire.finish(reader, writer, self.tt.commit)
