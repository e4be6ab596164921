"""Matchmaking: form this round's group, one member list and one group id that every member agrees on
before any tensor moves.

Each ready peer declares under (swarm, round, attempt) with its base model hash, and
gathers declarations until its group can be full, every peer known to be at this round
has declared, or the window closes. The smallest peer id of a group proposes the member
list; the others accept one proposal only; the leader sends the final list (the group id
is a hash of swarm, round, attempt and members: base.group_id_for). With
min_group_size > 1, peers that found too few others meet in the waiting room of their
round (records.waiting_key) until enough are there, or enough others have moved past it.

`Membership` remembers the groups this peer is in (bounded): the all-reduce and the commit
accept parts, readiness and votes only from their members.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from swarmfold.averaging import wire
from swarmfold.averaging.base import AverageRequest, delegates_of, group_id_for, partition_groups
from swarmfold.averaging.directory import Directory
from swarmfold.averaging.messages import Answer, Cancel, Final, Propose, parse_matchmaking
from swarmfold.averaging.protocol import PROPOSE, AveragingError, Phase, Rejected
from swarmfold.averaging.records import Declaration
from swarmfold.averaging.timeouts import RoundTimeouts
from swarmfold.averaging.transport import SMALL_MESSAGE, Net
from swarmfold.spec import Spec

logger = logging.getLogger(__name__)

MAX_KNOWN_GROUPS = 16  # groups remembered for late parts and votes (a few rounds' worth of attempts)
MAX_DELEGATES = 4096  # a final list naming more next-level members is malformed (G = 8: 32k peers)


@dataclass
class Group:
    round: int
    attempt: int
    group_id: str
    members: list[str]  # sorted
    clients: frozenset[str]  # members in client mode (they send but do not reduce)
    leader: str
    waiting: bool = False  # formed in the waiting room of min_group_size
    level: int = 1  # the tree (N > G): 1 = peers; above, groups' delegates
    delegates: tuple[str, ...] = ()  # the next level's expected members, from the leader's gather (empty: top)

    @property
    def reducers(self) -> list[str]:
        return [m for m in self.members if m not in self.clients]


@dataclass(frozen=True)
class NoGroup:
    """Matchmaking ended without a group: the window closed (`moved_on` False), or enough peers are
    past this round and no fewer than are still at it (`moved_on` True: the catch-up will follow them).
    `delegates`: the next tree level's members, when this peer's gather held more than one group's
    worth of peers (it is then a group of one that carries its own Δ up)."""

    moved_on: bool = False
    delegates: tuple[str, ...] = ()


class AttemptFailed(AveragingError):
    """One attempt failed; the next one leaves out `exclude` (and expects `expected`, when known)."""

    def __init__(self, reason: str, exclude: set[str], *, rejected: dict[str, str] | None = None,
                 bytes_sent: int = 0, bytes_received: int = 0, expected: set[str] | None = None):
        super().__init__(reason)
        self.expected = expected
        self.exclude = exclude
        self.rejected = rejected or {}
        self.bytes_sent = bytes_sent
        self.bytes_received = bytes_received


class _JoinWaiters(Exception):
    """Control flow in matchmaking: peers of this round already wait for a group; join them."""

    def __init__(self, count: int):
        super().__init__(f"{count} peer(s) already waiting")
        self.count = count


@dataclass
class _Attempt:
    """This peer's matchmaking state for one (round, attempt) or the round's waiting room."""

    round: int
    attempt: int
    base: str
    excluded: set[str]
    waiting: bool = False
    level: int = 1
    # peers whose contribution this round we rejected for cause: that such a peer is past this round
    # (it gave up and moved on) says nothing about where the swarm is
    distrusted: frozenset[str] = frozenset()
    locked_to: str | None = None  # the leader whose proposal we accepted (or ourselves)
    proposed: frozenset[str] = frozenset()  # the members of that proposal
    proposal_event: asyncio.Event = field(default_factory=asyncio.Event)
    final: asyncio.Future | None = None  # the leader's Final or Cancel
    gathered: frozenset[str] = frozenset()  # the peers of our last gather (the tree's delegates come from it)
    left_behind: bool = False  # our last gather ended because the swarm is past this round
    clients: frozenset[str] = frozenset()  # those of them in client mode

    def here(self, m: Propose | Final | Cancel) -> bool:
        """Is `m` about where we are (the waiting room is one per round, whatever the attempt)?"""
        return (m.round == self.round and m.level == self.level and m.waiting == self.waiting
                and (self.waiting or m.attempt == self.attempt))


class Membership:
    """The groups this peer is in or about to be in: who may send it parts, readiness and votes."""

    def __init__(self) -> None:
        self._groups: OrderedDict[str, frozenset[str]] = OrderedDict()
        self._pending: frozenset[str] = frozenset()  # members of the proposal we accepted, final list to come

    def register(self, group: Group) -> None:
        self._groups[group.group_id] = frozenset(group.members)
        self._groups.move_to_end(group.group_id)
        while len(self._groups) > MAX_KNOWN_GROUPS:
            self._groups.popitem(last=False)

    def set_pending(self, members: frozenset[str]) -> None:
        self._pending = members

    def members_of(self, group_id: str) -> frozenset[str] | None:
        return self._groups.get(group_id)

    def is_member(self, sender: str, group_id: str) -> bool:
        members = self._groups.get(group_id)
        return members is not None and sender in members

    def may_become_member(self, sender: str) -> bool:
        """`sender` is in the proposal we accepted: its group's final list may still be on its way to us."""
        return sender in self._pending


class Matchmaker:
    def __init__(self, net: Net, directory: Directory, spec: Spec, timeouts: RoundTimeouts, *,
                 client_mode: bool, maddrs: Callable[[], list[str]], stopping: threading.Event,
                 on_phase: Callable[[str, str], None], on_enter: Callable[[Phase, int, int], None]):
        self.net = net
        self.dir = directory
        self.spec = spec
        self.avg = spec.averaging
        self.tt = timeouts
        self.peer_id = net.peer_id
        self.swarm_id = spec.swarm_id
        self.client_mode = client_mode
        self.maddrs = maddrs
        self.stopping = stopping
        self.on_phase = on_phase
        self.on_enter = on_enter
        self.membership = Membership()
        self._attempt: _Attempt | None = None

    # ---- one attempt ----------------------------------------------------------------------------
    async def matchmake(self, req: AverageRequest, attempt: int, excluded: set[str], expected: set[str] | None,
                        for_cause: set[str] | None = None) -> Group | NoGroup:
        """Form this attempt's group. `excluded` peers are left out; once waiting for a group of
        min_group_size, only those excluded `for_cause` (a rejected contribution) stay out: a peer
        that was merely slow or unreachable gets another chance.

        With min_group_size > 1 a peer waits at its round until a group forms or the swarm has moved
        past it: at least min_group_size − 1 peers are at later rounds, and no fewer than are here (this
        peer and those whose records are at this round). Counting those here matters: a peer that gave
        up this round alone (a rejected attacker, a peer that ran out of attempts) is one record ahead,
        and must not make a round that enough peers are still at look abandoned."""
        distrusted = frozenset(for_cause or ())
        a = await self._begin(_Attempt(round=req.round, attempt=attempt, base=req.model_sha256,
                                       excluded=set(excluded), distrusted=distrusted, level=req.level),
                              self.tt.declaration_ttl(attempt))
        self.on_enter(Phase.MATCHMAKING, req.round, req.level)
        if expected is None:
            expected, _ = await self.dir.expected_peers(req.round, excluded)
        deadline = time.monotonic() + self.tt.gather_window(attempt, survivors=bool(expected))
        while True:
            group, what = await self._try_form(a, expected, deadline)
            if group is not None:
                return group
            if self.avg.min_group_size <= 1 or self.stopping.is_set() or a.level > 1:
                # a group of one: with more than one group's worth of peers about, it is its own delegate
                mine = delegates_of(sorted(a.gathered | {self.peer_id}), self.avg.group_size, a.clients)
                self._leave(a)
                return NoGroup(delegates=tuple(mine) if self.peer_id in mine else ())
            # min_group_size > 1: keep waiting at this round unless the swarm has moved past it
            self.on_phase("matchmaking", f"round {req.round}: waiting for a group of at least "
                          f"{self.avg.min_group_size} ({what})")
            logger.info("[%s] round %d: %s, waiting for a group of at least %d", self.peer_id[-8:], req.round,
                        what, self.avg.min_group_size)
            here, ahead = await self.dir.expected_peers(req.round, excluded, distrusted)
            if len(ahead) >= max(1, self.avg.min_group_size - 1) and len(ahead) >= 1 + len(here):
                self._leave(a)
                return NoGroup(moved_on=True)
            # every waiting peer of this round meets in its waiting room, whatever attempt it came from
            a = await self._begin(_Attempt(round=req.round, attempt=attempt, base=req.model_sha256,
                                           excluded=set(distrusted), distrusted=distrusted, waiting=True),
                                  self.tt.waiting_room_ttl)
            deadline = time.monotonic() + self.tt.matchmaking
            expected = set()

    def _leave(self, a: _Attempt) -> None:
        """We leave this attempt without a group: accept no proposal for it any more. A leader that came
        late would otherwise count us into a group we are no longer in, and fail its attempt on us."""
        if a.locked_to is None:
            a.locked_to = self.peer_id

    async def _begin(self, a: _Attempt, ttl: float) -> _Attempt:
        a.final = asyncio.get_running_loop().create_future()
        self._attempt = a
        self.membership.set_pending(frozenset())
        decl = Declaration(peer_id=self.peer_id, model_sha256=a.base, client_mode=self.client_mode,
                           maddrs=self.maddrs())
        await self.dir.declare(decl, a.round, a.attempt, a.waiting, ttl, a.level)
        return a

    async def _try_form(self, a: _Attempt, expected: set[str], deadline: float) -> tuple[Group | None, str]:
        """Gather, then lead, follow or wait for a leader; (a group of min_group_size, or None and why)."""
        try:
            members = await self._gather(a, expected, deadline)
            group = None
            if a.left_behind:
                return None, "the swarm is past this round"
            if a.locked_to is not None and a.locked_to != self.peer_id:
                group = await self._follow(a)
            else:
                groups = [g for g in partition_groups(sorted(members), self.avg.group_size) if self.peer_id in g]
                mine = groups[0] if groups else [self.peer_id]
                if len(mine) > 1:
                    if mine[0] == self.peer_id:
                        group = await self._lead(a, mine, members)
                    else:
                        group = await self._await_leader(a, mine, deadline)
            if group is not None and len(group.members) >= (self.avg.min_group_size if a.level == 1 else 2):
                return group, ""
            if group is not None:  # too small to average: release the members
                await self._cancel(group)
            return None, f"{len(members)} ready"
        except _JoinWaiters as w:
            return None, f"{w.count} already waiting"

    async def _waiting(self, a: _Attempt) -> set[str]:
        """Other peers already waiting for a group of min_group_size at this round (same base)."""
        return {pid for pid, d in (await self.dir.declared(a.round, a.attempt, True)).items()
                if d.model_sha256 == a.base and pid != self.peer_id and pid not in a.excluded}

    async def _gather(self, a: _Attempt, expected: set[str], deadline: float) -> dict[str, Declaration]:
        """Poll declarations until the group can be full, everyone expected is in, or the deadline.

        With min_group_size > 1: a peer that sees others in its round's waiting room joins them at
        once (_JoinWaiters) instead of forming a group with peers that have left its attempt; and the
        waiting peers stop gathering as soon as they are min_group_size.

        In a round's first attempt, `expected` grows with the peers whose records appear at this
        round while we gather (a peer that started after us): the window then ends when they have
        declared too, not at its deadline (which still bounds it)."""
        polls = 0
        gone: set[str] = set()
        present: set[str] = set()  # peers whose records say they are at this round
        waiting_room = self.avg.min_group_size > 1 and a.level == 1
        expected = set(expected)
        while True:
            declared = await self.dir.declared(a.round, a.attempt, a.waiting, a.level)
            if polls % 5 == 0 and a.level == 1:  # above level 1, the delegates expected are known
                present, gone = await self.dir.expected_peers(a.round, a.excluded, a.distrusted)  # one DHT read
                if a.attempt == 0 and not a.waiting:
                    expected |= present
            polls += 1
            if waiting_room and not a.waiting and a.locked_to is None:
                waiting = await self._waiting(a)
                if waiting - gone:
                    raise _JoinWaiters(len(waiting - gone))
            members = {pid: d for pid, d in declared.items()
                       if d.model_sha256 == a.base and pid not in a.excluded and pid not in gone}
            members.setdefault(self.peer_id, Declaration(self.peer_id, a.base, self.client_mode, self.maddrs()))
            a.gathered = frozenset(members)
            a.clients = frozenset(p for p, d in members.items() if d.client_mode)
            # a peer that declared here on another base model (it rolled its last round back, or holds a
            # split's other model) cannot be in our group this attempt: it is not waited for
            elsewhere = {pid for pid, d in declared.items() if d.model_sha256 != a.base}
            if self._gathered(a, members, expected, gone, deadline, present, gone | elsewhere):
                return members
            try:
                await asyncio.wait_for(a.proposal_event.wait(), self.tt.poll)
            except TimeoutError:
                pass

    def _gathered(self, a: _Attempt, members: dict[str, Declaration], expected: set[str], gone: set[str],
                  deadline: float, present: set[str], not_coming: set[str]) -> bool:
        others = set(members) - {self.peer_id}
        waiting_room = self.avg.min_group_size > 1 and a.level == 1
        enough = waiting_room and a.waiting and len(members) >= self.avg.min_group_size
        # enough already past this round, and no fewer than are at it (we included): stop gathering,
        # whether or not a group could form here, so that the round is rolled back and the catch-up
        # moves us to where they are. Late peers that paired up at a round the swarm has left would
        # commit a model of their own, which the swarm's next round throws away (an adoption).
        left_behind = (waiting_room and len(gone) >= max(1, self.avg.min_group_size - 1)
                       and len(gone) >= len(set(members) | expected | present))
        a.left_behind = left_behind and a.locked_to is None
        # a full group ends the gather only if no peer we expect is still missing: with more ready peers
        # than one group holds, every one of them must be in the same cut (the tree joins the groups).
        # An expected peer that will not come (its record is past this round: it committed, or gave the
        # round up; or it declared here on another base) is not waited for, by attempt 0's window or a retry's.
        awaited = expected - not_coming
        full = len(members) >= self.avg.group_size and not awaited - others
        return (full or bool(expected and awaited <= others) or enough
                or left_behind or time.monotonic() >= deadline or a.locked_to is not None
                or self.stopping.is_set())

    # ---- leading --------------------------------------------------------------------------------
    async def _lead(self, a: _Attempt, proposed: list[str], declared: dict[str, Declaration]) -> Group | None:
        if a.locked_to is not None:
            return None
        a.locked_to, a.proposed = self.peer_id, frozenset(proposed)
        self.membership.set_pending(a.proposed)
        clients = sorted(p for p in proposed if declared[p].client_mode)
        msg = Propose(round=a.round, attempt=a.attempt, waiting=a.waiting, base=a.base, members=tuple(proposed),
                      clients=tuple(clients), spec_hash=self.spec.spec_hash, level=a.level).to_wire()

        async def ask(peer: str) -> str | None:
            try:
                reply, _, _ = await self.net.request(peer, PROPOSE, msg, timeout=self.tt.join,
                                                     maddrs=declared[peer].maddrs)
                answer = Answer.from_wire(reply)
                if answer.ok:
                    return peer
                logger.info("[%s] round %d: %s declined our proposal: %s", self.peer_id[-8:], a.round, peer[-8:],
                            answer.reason)
            except (AveragingError, Rejected) as e:
                logger.info("[%s] round %d: proposal to %s failed: %s", self.peer_id[-8:], a.round, peer[-8:], e)
            return None

        answers = await asyncio.gather(*(ask(p) for p in proposed if p != self.peer_id))
        members = sorted([self.peer_id] + [p for p in answers if p is not None])
        # the tree (N > G): the groups every peer we gathered falls into, by the rule every leader uses
        delegates = tuple(delegates_of(sorted(declared), self.avg.group_size,
                                       frozenset(p for p, d in declared.items() if d.client_mode)))
        group = Group(round=a.round, attempt=a.attempt, members=members, leader=self.peer_id, waiting=a.waiting,
                      clients=frozenset(p for p in clients if p in members), level=a.level, delegates=delegates,
                      group_id=group_id_for(self.swarm_id, a.round, a.attempt, members, waiting=a.waiting,
                                            level=a.level))
        self.membership.register(group)  # before the final list goes out: members may send parts at once
        final = Final(round=a.round, attempt=a.attempt, waiting=a.waiting, members=tuple(members),
                      clients=tuple(sorted(group.clients)), group_id=group.group_id, level=a.level,
                      delegates=delegates).to_wire()
        cancel = Cancel(round=a.round, attempt=a.attempt, waiting=a.waiting, group_id=group.group_id,
                        reason="dropped", level=a.level).to_wire()
        # the final list to members; a cancel to those that answered too late, so they stop waiting
        await asyncio.gather(*(self._send_final(p, final if p in members else cancel, declared[p].maddrs)
                               for p in proposed if p != self.peer_id))
        if len(members) < 2:
            return None
        logger.info("[%s] round %d: leading group %s of %d", self.peer_id[-8:], a.round, group.group_id[:8],
                    len(members))
        return group

    async def _send_final(self, peer: str, final: dict[str, Any], maddrs: list[str]) -> None:
        try:
            await self.net.request(peer, PROPOSE, final, timeout=self.tt.join, maddrs=maddrs)
        except AveragingError as e:
            logger.info("final to %s failed: %s", peer[-8:], e)

    async def _cancel(self, group: Group) -> None:
        if group.leader != self.peer_id:
            return
        msg = Cancel(round=group.round, attempt=group.attempt, waiting=group.waiting, group_id=group.group_id,
                     reason="too_small", level=group.level).to_wire()
        await asyncio.gather(*(self._send_final(p, msg, []) for p in group.members if p != self.peer_id))

    # ---- following ------------------------------------------------------------------------------
    async def _await_leader(self, a: _Attempt, mine: list[str], deadline: float) -> Group | None:
        """Wait for our group's leader (or any valid leader) to propose, then for its final list.

        The leader may still be gathering until about our own deadline (it began when we did),
        so we wait that long plus the leader's grace before giving up on it."""
        give_up = time.monotonic() + max(0.0, deadline - time.monotonic()) + self.tt.leader_grace
        while not a.proposal_event.is_set() and time.monotonic() < give_up:
            try:
                await asyncio.wait_for(a.proposal_event.wait(), min(1.0, max(0.01, give_up - time.monotonic())))
            except TimeoutError:
                if mine[0] in await self.dir.moved_past(a.round):  # the leader is gone to a later round
                    break
                if (self.avg.min_group_size > 1 and not a.waiting and not a.proposal_event.is_set()
                        and mine[0] in await self._waiting(a)):  # the leader now waits for a bigger group
                    a.locked_to = self.peer_id  # accept no proposal of this attempt any more
                    raise _JoinWaiters(1) from None
        if a.locked_to is None:
            a.locked_to = self.peer_id  # stop accepting: we give up on this attempt
            raise AttemptFailed(f"leader {mine[0][-8:]} did not propose in time", {mine[0]},
                                expected=set(mine) - {mine[0], self.peer_id})
        return await self._follow(a)

    async def _follow(self, a: _Attempt) -> Group | None:
        assert a.final is not None
        try:
            final = await asyncio.wait_for(asyncio.shield(a.final), self.tt.leader_grace)
        except TimeoutError as e:
            raise AttemptFailed(f"no final member list from leader {str(a.locked_to)[-8:]}",
                                {str(a.locked_to)}) from e
        if isinstance(final, Cancel):
            if final.reason == "too_small":
                return None  # keep waiting at this attempt for more peers
            raise AttemptFailed(f"leader {str(a.locked_to)[-8:]} formed its group without us", set())
        return Group(round=a.round, attempt=a.attempt, group_id=final.group_id, members=sorted(final.members),
                     clients=frozenset(final.clients), leader=str(a.locked_to), waiting=a.waiting, level=a.level,
                     delegates=tuple(final.delegates))

    async def on_propose(self, info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sender = str(info.peer_id)
        try:
            raw, _ = await wire.recv(reader, SMALL_MESSAGE)
            try:
                ok, reason = self.consider(sender, parse_matchmaking(raw))
            except Rejected as r:
                ok, reason = False, r.label
            await wire.send(writer, Answer(ok=ok, reason=reason).to_wire())
        except (wire.WireError, ConnectionError) as e:
            logger.info("bad proposal from %s: %s", sender[-8:], e)
        finally:
            await wire.finish(reader, writer, self.tt.join)

    def consider(self, sender: str, m: Propose | Final | Cancel) -> tuple[bool, str]:
        """Accept or decline a leader's message (synchronously, so that a final list accepted here is
        known before the leader hears back and starts the all-reduce)."""
        a = self._attempt
        if a is None or not a.here(m):
            return False, "not at this round/attempt"
        if isinstance(m, (Final, Cancel)):
            if a.locked_to != sender or a.final is None or a.final.done():
                return False, "no pending proposal from you"
            if isinstance(m, Final):
                members = sorted(m.members)
                if (self.peer_id not in members or not set(members) <= a.proposed
                        or len(m.delegates) > MAX_DELEGATES or len(set(m.delegates)) != len(m.delegates)
                        or m.group_id != group_id_for(self.swarm_id, a.round, a.attempt, members, waiting=a.waiting,
                                                      level=a.level)):
                    a.final.set_result(Cancel(round=m.round, attempt=m.attempt, waiting=m.waiting,
                                              group_id=m.group_id, reason="dropped", level=m.level))
                    return False, "malformed final list"
                self.membership.register(Group(round=a.round, attempt=a.attempt, group_id=m.group_id,
                                               members=members, clients=frozenset(m.clients), leader=sender,
                                               level=a.level))
            a.final.set_result(m)
            return True, ""
        if a.locked_to is not None:
            return False, "already in a group"
        if self.peer_id not in m.members or sender != min(m.members):
            return False, "malformed proposal"
        if len(m.members) > self.avg.group_size:
            return False, "group too large"
        if m.base != a.base:
            return False, "different base model"
        if a.excluded & set(m.members):
            return False, "proposal includes peers excluded this round"
        a.locked_to, a.proposed = sender, frozenset(m.members)
        self.membership.set_pending(a.proposed)
        a.proposal_event.set()
        return True, ""
