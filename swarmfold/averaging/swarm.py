"""The swarm: a small facade that runs one round through the phase modules.

One `Swarm` per peer implements the `Averager` protocol (averaging/base.py) for LocalPeer.
`average()` is called from the training thread; everything network-side runs on the
transport's loop. A round, as DESIGN.md sets it out:

  1. matchmaking (matchmaking.py): declare under (swarm id, round, attempt) with the base
     model hash; the smallest peer id of a group proposes the member list, the leader
     sends the final list; the group id is a hash of swarm, round, attempt and members.
  2. all-reduce (allreduce.py): the flat Δ is cut into BLOCK-aligned spans, one per
     reducing member; each reducer checks every part, aggregates in sorted-id order in
     float64, encodes the aggregate once and streams those bytes back to every sender.
  3. commit (commit.py): each member judges the spans it assembled and sends a digest vote;
     it commits only if no one reported a failure and every vote carries its own digest.
  4. failure: a failed attempt is redone among the survivors (attempt + 1) without the
     peers that were missing or rejected; after `max_attempts` the round is rolled back:
     θ_r is kept and Δ carries into the next round.
  5. verification (spec verify.fraction > 0): reducers replay a random fraction of the
     members' rounds; a failed member is rejected and denied (directory.py).
  6. the tree (climb.py), when more peers are ready than one group holds: each group's
     delegate runs steps 1-4 again one level up with its group's aggregate, and the other
     members fetch the top level's result from it.

The other pieces: transport.py (DHT node, P2P, calls, hello), directory.py (signed DHT
records, heartbeat, deny records), statesync.py (serving and downloading θ_r), timeouts.py
(every bound of a round), messages.py (every message kind, validated on arrival).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import hivemind
import torch
from hivemind.dht.crypto import RSASignatureValidator

from swarmfold.averaging.allreduce import AllReduce
from swarmfold.averaging.base import AverageRequest, AverageResult, delegate_of
from swarmfold.averaging.climb import Climb
from swarmfold.averaging.commit import Commit, judge
from swarmfold.averaging.directory import Directory
from swarmfold.averaging.identity import Identity
from swarmfold.averaging.matchmaking import AttemptFailed, Group, Matchmaker, NoGroup
from swarmfold.averaging.protocol import (
    DTYPE_OF_CODEC,
    PROPOSE,
    REDUCE,
    STATE,
    TREE,
    VOTE,
    AveragingError,
    Phase,
    Rejection,
)
from swarmfold.averaging.records import PeerRecord
from swarmfold.averaging.statesync import StateSync
from swarmfold.averaging.timeouts import RoundTimeouts
from swarmfold.averaging.transport import Handler, JoinError, Transport
from swarmfold.averaging.verification import SwarmVerifier
from swarmfold.spec import Spec

__all__ = ["Group", "JoinError", "Swarm"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class _Tally:
    """What a round's attempts have accumulated so far."""

    excluded: set[str] = field(default_factory=set)
    denied: set[str] = field(default_factory=set)  # peers with a deny record against them (a verifying swarm)
    expected: set[str] | None = None
    timings: dict[str, float] = field(default_factory=lambda: {"matchmaking": 0.0, "allreduce": 0.0, "commit": 0.0})
    rejected: dict[str, str] = field(default_factory=dict)
    sent: int = 0
    received: int = 0
    # the tree (N > G): the next level's delegates as the round's first group learnt them, and that
    # group's members; a retry among the survivors gathers too few peers to see the other groups
    delegates: list[str] = field(default_factory=list)
    delegates_from: frozenset[str] = frozenset()

    def for_cause(self) -> set[str]:
        """Peers left out for a rejected contribution or a deny record (not merely for being slow or
        unreachable): they stay out of the waiting room too, and where they say they are tells nothing
        about where the swarm is."""
        return self.denied | {p for p, why in self.rejected.items() if not why.startswith(Rejection.TIMEOUT.value)}

    def failed(self, e: AttemptFailed, group: Group | None, me: str) -> None:
        self.excluded |= e.exclude
        self.rejected.update(e.rejected)
        self.sent += e.bytes_sent
        self.received += e.bytes_received
        members = set(group.members) if group is not None else (e.expected or set())
        self.expected = members - self.excluded - {me}
        if group is not None and group.delegates and not self.delegates:
            self.delegates, self.delegates_from = list(group.delegates), frozenset(group.members)

    def keep_tree(self, out: AverageResult, me: str) -> AverageResult:
        """A retry's outcome still belongs in the round's tree: the delegates the first attempt learnt,
        with this group's delegate now (its old one may be the peer that failed)."""
        if out.delegates or not self.delegates or out.status not in ("committed", "alone"):
            return out
        mine = delegate_of(out.included, set(out.clients)) if out.status == "committed" else me
        out.delegates = sorted((set(self.delegates) - self.delegates_from) | {mine})
        return out

    def common(self, attempts: int) -> dict[str, Any]:
        return dict(attempts=attempts, timings=self.timings, rejected=self.rejected, bytes_sent=self.sent,
                    bytes_received=self.received)


class Swarm:
    """A peer's membership in the swarm: implements the `Averager` protocol for LocalPeer."""

    def __init__(self, spec: Spec, identity: Identity, *, initial_peers: list[str] | None = None,
                 host_maddrs: list[str] | None = None, announce_maddrs: list[str] | None = None,
                 client_mode: bool = False, use_relay: bool = True, use_auto_relay: bool = False,
                 on_phase: Callable[[str, str], None] | None = None, stop_event: threading.Event | None = None,
                 verifier: SwarmVerifier | None = None, announce_data: list[str] | None = None):
        self.spec = spec
        self.identity = identity
        self.peer_id = identity.peer_id
        self.swarm_id = spec.swarm_id
        self.avg = spec.averaging
        self.client_mode = client_mode
        self.on_phase = on_phase or (lambda phase, detail: None)
        self._stopping = stop_event or threading.Event()  # set: stop waiting for a group
        self.timeouts = RoundTimeouts.from_spec(spec)
        self.transport = Transport(spec, identity, self.timeouts, initial_peers=initial_peers,
                                   host_maddrs=host_maddrs, announce_maddrs=announce_maddrs, client_mode=client_mode,
                                   use_relay=use_relay, use_auto_relay=use_auto_relay, announce_data=announce_data)
        self.directory = Directory(self.transport, spec, identity)
        self.matchmaker = Matchmaker(self.transport, self.directory, spec, self.timeouts, client_mode=client_mode,
                                     maddrs=lambda: self.transport.maddrs, stopping=self._stopping,
                                     on_phase=self.on_phase, on_enter=self.phase_entered)
        self.allreduce = AllReduce(self.transport, self.directory, self.matchmaker.membership, spec, self.timeouts,
                                   make_part=self._make_part, on_enter=self.phase_entered,
                                   loop=self.transport.loop, verifier=verifier)
        self.committer = Commit(self.transport, self.matchmaker.membership, self.timeouts,
                                on_enter=self.phase_entered)
        self.statesync = StateSync(self.transport, spec, self.timeouts)
        self.climb = Climb(self.transport, self.matchmaker.membership, self.timeouts, self.avg.group_size)
        self._heartbeat: Any = None  # the record refresh, a task on the network loop

    # ---- what other parts of the peer use ---------------------------------------------------------
    @property
    def verifier(self) -> SwarmVerifier | None:
        """Replays members' rounds when the spec verifies (verify.fraction > 0)."""
        return self.allreduce.verifier

    @verifier.setter
    def verifier(self, v: SwarmVerifier | None) -> None:
        self.allreduce.verifier = v

    @property
    def maddrs(self) -> list[str]:
        return self.transport.maddrs

    @property
    def dht(self) -> hivemind.DHT | None:
        return self.transport.dht

    @property
    def validator(self) -> RSASignatureValidator:
        return self.transport.validator

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Join the DHT (JoinError on unreachable initial peers) and serve the round's protocols."""
        handlers: dict[str, Handler] = {PROPOSE: self.matchmaker.on_propose, REDUCE: self.allreduce.on_reduce,
                                        VOTE: self.committer.on_vote, STATE: self.statesync.on_state,
                                        TREE: self.climb.on_tree}
        self.transport.start(handlers, direct=(REDUCE,))
        self._heartbeat = asyncio.run_coroutine_threadsafe(self.directory.heartbeat(), self.transport.loop)
        logger.info("[%s] joined swarm %s; others can join with: %s", self.peer_id[-8:], self.swarm_id,
                    " ".join(self.maddrs))

    def shutdown(self) -> None:
        self._stopping.set()
        self.transport.shutdown()
        self.allreduce.shutdown()

    def run_coroutine(self, coro: Awaitable[T], timeout: float | None = None) -> T:
        """Run `coro` on the swarm's network loop and wait for its result (from another thread)."""
        return self.transport.call(coro, timeout)

    def add_handler(self, proto: str, handler: Handler) -> None:
        """Serve `proto` on this peer's P2P with `handler(info, reader, writer)` (after start())."""
        self.transport.add_handler(proto, handler)

    async def open_stream(self, peer: str, proto: str, maddrs: list[str] | None = None
                          ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A stream to `peer`'s `proto` handler (dialing `maddrs` if there is no route yet); on the loop."""
        return await self.transport.open(peer, proto, maddrs)

    def check_spec(self, peers: list[str]) -> None:
        """Ask each initial peer for its spec hash; SpecMismatch if one differs."""
        self.transport.call(self.transport.check_spec(peers))

    def publish(self, record: PeerRecord) -> None:
        self.transport.call(self.directory.publish(record), timeout=self.timeouts.dht_call)

    def records(self) -> dict[str, PeerRecord]:
        """Every live, correctly signed peer record of this swarm, by peer id."""
        return self.transport.call(self.directory.records(), timeout=self.timeouts.dht_call)

    def serve_state(self, round_idx: int, theta: torch.Tensor, outer: dict[str, torch.Tensor]) -> tuple[str, str]:
        """Make θ_r and the outer state available to joining peers; returns (model, outer) hashes."""
        return self.statesync.serve(round_idx, theta, outer)

    def download_state(self, sources: list[PeerRecord], *, numel: int,
                       on_progress: Callable[[int, int], None] | None = None
                       ) -> tuple[int, torch.Tensor, dict[str, torch.Tensor], str]:
        """θ_r and outer state from the first source that serves what the records published;
        `on_progress(bytes, total)` follows the download (called on the network loop)."""
        s = self.transport.call(self.statesync.download(sources, numel, on_progress),
                                timeout=self.timeouts.state_sync_total)
        return s.round, s.theta, s.outer, s.source

    # ---- extension points (tests/peers/ subclass these) --------------------------------------------
    def phase_entered(self, phase: Phase, round_idx: int, level: int = 1) -> None:
        """Called as this peer's round enters `phase` at tree `level` (on the network loop); does nothing here."""

    def _make_part(self, group: Group, req: AverageRequest, span_index: int, payload: bytes | memoryview,
                   numel: int) -> dict[str, Any]:
        """Our contribution to span `span_index`: the header fields and the payload (the span encoded chunk
        by chunk, protocol.encode_span), which is streamed in chunk frames after the header."""
        return {"kind": "part", "group_id": group.group_id, "spec_hash": self.spec.spec_hash,
                "round": req.round, "base_sha256": req.model_sha256, "span": span_index, "numel": numel,
                "dtype": DTYPE_OF_CODEC[self.avg.compression], "weight": float(req.weight),
                "steps": int(req.steps), "payload": payload,
                **({"environment": self.verifier.environment} if self.verifier is not None else {})}

    # ---- the round ---------------------------------------------------------------------------------
    def average(self, request: AverageRequest) -> AverageResult:
        """Blocking: run one round's averaging for `request` (called by LocalPeer.run_round)."""
        return self.transport.call(self._average(request))

    async def _average(self, req: AverageRequest) -> AverageResult:
        return await self.climb.finish(req, await self._level(req, None), self._level)

    async def _level(self, req: AverageRequest, expected: set[str] | None) -> AverageResult:
        """One level's round: attempts of matchmaking, all-reduce and commit (level 1: this peer's group;
        above: its group's delegates, whom `expected` names)."""
        tally = _Tally(expected=expected)
        if self.spec.verify.fraction > 0 and req.level == 1:
            tally.denied = await self.directory.refresh_denied(req.round)
            tally.excluded |= tally.denied
        where = f"round {req.round}" + (f", tree level {req.level}" if req.level > 1 else "")
        attempt = 0
        for attempt in range(self.avg.max_attempts):
            group: Group | None = None
            try:
                t0 = time.perf_counter()
                self.on_phase("matchmaking", f"{where}, attempt {attempt}")
                try:
                    outcome = await self.matchmaker.matchmake(req, attempt, tally.excluded, tally.expected,
                                                              tally.for_cause())
                finally:
                    tally.timings["matchmaking"] += time.perf_counter() - t0
                if isinstance(outcome, NoGroup):
                    return tally.keep_tree(self._no_group(req, outcome, tally.common(attempt + 1)), self.peer_id)
                group = outcome
                return tally.keep_tree(await self._attempt(req, group, attempt, tally), self.peer_id)
            except AveragingError as e:
                failed = e if isinstance(e, AttemptFailed) else AttemptFailed(str(e), set())  # e.g. the DHT
                if self._stopping.is_set():
                    break
                logger.warning("[%s] %s attempt %d failed (%s); %s", self.peer_id[-8:], where, attempt,
                               failed, "retrying without " + ", ".join(sorted(p[-8:] for p in failed.exclude))
                               if failed.exclude else "retrying")
                tally.failed(failed, group, self.peer_id)
        return AverageResult(status="rolled_back", aggregate=None,
                             reason=f"averaging failed {attempt + 1} time(s); θ_r kept, Δ carried",
                             **tally.common(attempt + 1))

    async def _attempt(self, req: AverageRequest, group: Group, attempt: int, tally: _Tally) -> AverageResult:
        budget = self.timeouts.attempt_budget
        try:
            out = await asyncio.wait_for(self._allreduce_and_commit(req, group, tally.timings), budget)
        except TimeoutError as e:  # a safety net: every step inside is bounded on its own
            raise AttemptFailed(f"all-reduce and commit took longer than {budget:.0f}s", set()) from e
        out.attempts = attempt + 1
        out.rejected.update(tally.rejected)
        out.bytes_sent += tally.sent
        out.bytes_received += tally.received
        return out

    def _no_group(self, req: AverageRequest, outcome: NoGroup, common: dict[str, Any]) -> AverageResult:
        if outcome.moved_on:
            return AverageResult(status="rolled_back", aggregate=None, reason="the swarm moved on to a later round",
                                 **common)
        if self._stopping.is_set() and (self.avg.min_group_size > 1 or req.level > 1):
            return AverageResult(status="rolled_back", aggregate=None, reason="stopped while waiting for a group",
                                 **common)
        if self.avg.min_group_size <= 1 or req.level > 1:  # above level 1, a group of one carries its part up
            return AverageResult(status="alone", aggregate=req.delta, delegates=list(outcome.delegates),
                                 reason="no group formed before the matchmaking timeout", **common)
        return AverageResult(status="rolled_back", aggregate=None, reason="no group of min_group_size formed",
                             **common)

    async def _allreduce_and_commit(self, req: AverageRequest, group: Group,
                                    timings: dict[str, float]) -> AverageResult:
        t0 = time.perf_counter()
        self.on_phase("averaging", f"round {req.round}: all-reduce in group {group.group_id[:8]} of "
                      f"{len(group.members)}" + (f" (tree level {req.level})" if req.level > 1 else ""))
        if not group.reducers:
            raise AttemptFailed("no member of the group can reduce (all in client mode)", set())
        out = torch.empty(req.delta.numel(), dtype=torch.float32)  # the aggregate, filled span by span
        stats = {"sent": 0, "received": 0}
        results, red = await self.allreduce.run(req, group, out, stats)
        timings["allreduce"] += time.perf_counter() - t0
        t1 = time.perf_counter()
        j = judge(group, self.peer_id, results)
        committed, confirmed = await self.committer.commit(group, req.round, j, stats)
        if red is not None:  # our reducer's traffic (complete: every voter had our result first)
            stats["sent"] += red.bytes_sent
            stats["received"] += red.bytes_received
        timings["commit"] += time.perf_counter() - t1
        self.allreduce.forget(group.group_id)
        self.committer.forget(group.group_id)
        if j.failure or not committed:
            raise AttemptFailed(j.failure or "the group did not agree on the aggregate",
                                (j.missing | set(j.rejected)) - {self.peer_id}, rejected=j.rejected,
                                bytes_sent=stats["sent"], bytes_received=stats["received"])
        logger.info("[%s] round %d: committed with %d of %d members (group %s, digest %s)", self.peer_id[-8:],
                    req.round, len(j.included), len(group.members), group.group_id[:8], j.digest[:12])
        return AverageResult(status="committed", aggregate=out, group_id=group.group_id, members=group.members,
                             included=j.included, weights=j.weights, steps=j.steps, confirmed=confirmed,
                             rejected=j.rejected, timings=timings, digest=j.digest,
                             delegates=list(group.delegates), clients=sorted(group.clients),
                             bytes_sent=stats["sent"], bytes_received=stats["received"],
                             compressed=self.avg.compression != "none")
