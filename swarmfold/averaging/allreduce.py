"""The butterfly all-reduce: each member sends span j of its Δ to reducer j and gets span j's aggregate back.

The flat Δ is cut into BLOCK-aligned spans, one per reducing member (codec.spans). A
sender streams its part in chunks after a header (messages.PartHeader); the reducer checks
the header and every chunk (protocol.check_header, check_chunk), aggregates chunk k in
sorted-id order in float64 as soon as every included member has sent it, encodes it once
and streams those same bytes to every member, the trailer (messages.SpanResult: whom it
included, with what weight, whom it rejected) last. A member decodes each span's chunks
into its place in the aggregate as they arrive (`SpanCollector`), hashing the bytes: the
span digests are what the commit votes on.

With verification (spec verify.fraction > 0; averaging/verification.py), a reducer first
replays a random fraction of the members whose parts it holds and rejects those whose
span fails (`verify_failed`); the directory then denies them.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import math
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from swarmfold.averaging import codec, wire
from swarmfold.averaging.aggregate import Contribution, aggregate
from swarmfold.averaging.base import AverageRequest
from swarmfold.averaging.directory import Directory
from swarmfold.averaging.matchmaking import Group, Membership
from swarmfold.averaging.messages import PartHeader, ReduceError, SpanResult
from swarmfold.averaging.protocol import (
    CHUNK_ELEMENTS,
    CHUNK_FRAME_SLACK,
    REDUCE,
    AveragingError,
    Expectation,
    Phase,
    Rejected,
    Rejection,
    check_chunk,
    check_header,
    chunk_bounds,
    encode_span,
)
from swarmfold.averaging.timeouts import RoundTimeouts
from swarmfold.averaging.transport import SMALL_MESSAGE, Net
from swarmfold.averaging.verification import (
    SpanVerdict,
    SwarmVerifier,
    choose_to_verify,
    claimed_environment,
    judge_span,
    same_class,
)
from swarmfold.spec import Spec

logger = logging.getLogger(__name__)

MAX_REDUCERS = 8  # reducers kept (this round's attempts and a few late ones); older ones are dropped
MakePart = Callable[[Group, AverageRequest, int, "bytes | memoryview", int], dict[str, Any]]


@dataclass
class Reducer:
    """This peer's reduction of one span for one group, chunk by chunk.

    Each member's part fills a span-sized float32 buffer chunk by chunk (`received` counts
    the chunks in). Chunk k is aggregated as soon as every included member has sent it,
    and its encoded aggregate is appended to `results`, which every member's stream sends
    back at once; the `trailer` (who was included, rejected, and whether the result is
    complete) ends each stream. Everything runs on the network loop; `wake` tells the
    waiters that something changed.
    """

    exp: Expectation
    offset: int = 0  # where this span starts in the flat Δ
    level: int = 1  # the tree level (above 1 the parts are groups' aggregates: not replayed)
    parts: dict[str, Contribution] = field(default_factory=dict)
    claims: dict[str, dict[str, Any] | None] = field(default_factory=dict)  # environment class each part claims
    steps: dict[str, int] = field(default_factory=dict)  # inner steps each part declares (checked by its header)
    rejected: dict[str, str] = field(default_factory=dict)
    received: dict[str, int] = field(default_factory=dict)  # chunks received from each member
    included: list[str] | None = None  # fixed when the first chunk is aggregated
    results: list[bytes] = field(default_factory=list)  # the encoded aggregate, chunk by chunk
    trailer: dict[str, Any] | None = None  # the last message of every member's stream
    bytes_sent: int = 0  # results sent back to members
    bytes_received: int = 0  # parts received from members
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def chunks(self) -> list[tuple[int, int]]:
        return chunk_bounds(self.exp.numel)

    def wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def until(self, ready: Callable[[], bool], deadline: float) -> bool:
        """Wait until `ready()` (re-checked after every change) or the loop's clock passes `deadline`."""
        return await wait_until(self, ready, deadline)

    def reject(self, sender: str, label: str) -> None:
        self.parts.pop(sender, None)
        self.rejected[sender] = label
        self.wake()

    def accounted(self) -> bool:
        return set(self.parts) | set(self.rejected) >= self.exp.members

    def has_chunk(self, k: int) -> bool:
        return all(self.received.get(p, 0) > k for p in self.parts)

    def news(self, seen: int) -> bool:
        """Is there more to send to a member that has `seen` result chunks?"""
        return len(self.results) > seen or self.trailer is not None

    def complete_parts(self) -> bool:
        n = len(self.chunks)
        return all(self.received.get(p, 0) >= n for p in self.parts)


async def wait_until(owner: Any, ready: Callable[[], bool], deadline: float) -> bool:
    """Wait until `ready()` (re-checked each time `owner._changed` fires) or the loop's clock passes `deadline`."""
    loop = asyncio.get_running_loop()
    while not ready():
        remaining = deadline - loop.time()
        if remaining <= 0:
            return False
        try:
            await asyncio.wait_for(owner._changed.wait(), None if math.isinf(remaining) else remaining)
        except TimeoutError:
            return ready()
    return True


class SpanCollector:
    """A span's aggregate as it arrives: each chunk is decoded into its place in `out`, checked to be
    finite, and its encoded bytes hashed (the span's digest), while later chunks are still coming."""

    def __init__(self, compression: str, out: torch.Tensor):
        self.compression = compression
        self.out = out
        self.bounds = chunk_bounds(out.numel())
        self.count = 0
        self._hash = hashlib.sha256()

    @property
    def complete(self) -> bool:
        return self.count == len(self.bounds)

    def add(self, data: bytes) -> None:
        if self.complete:
            raise wire.WireError(f"more than the span's {len(self.bounds)} chunks")
        lo, hi = self.bounds[self.count]
        dst = self.out[lo:hi]
        try:
            codec.decode_into(self.compression, data, dst)
        except ValueError as e:
            raise wire.WireError(f"chunk {self.count}: {e}") from e
        if not bool(np.isfinite(dst.numpy()).all()):
            raise wire.WireError(f"chunk {self.count} of the aggregate holds NaN or Inf")
        self._hash.update(data)
        self.count += 1

    def digest(self) -> str:
        return self._hash.hexdigest()


@dataclass(frozen=True)
class SpanOutcome:
    """What a member got for one span: the reducer's trailer, checked, and the digest of the chunks."""

    included: list[str]
    weights: dict[str, float]
    steps: dict[str, int]
    complete: bool
    rejected: dict[str, str]
    digest: str


def take_result(raw: dict[str, Any], collector: SpanCollector, group: Group, span: int) -> SpanOutcome:
    """Check a span's trailer against the group and the chunks collected; WireError if unusable."""
    try:
        if raw.get("kind") == ReduceError.KIND:
            raise wire.WireError(f"the reducer refused: {ReduceError.from_wire(raw).reason}")
        r = SpanResult.from_wire(raw)
    except Rejected as e:
        raise wire.WireError(f"bad trailer: {e}") from e
    if r.group_id != group.group_id or r.span != span:
        raise wire.WireError(f"a trailer for group {r.group_id[:8]} span {r.span}, expected span {span}")
    if not set(r.included) <= set(group.members) or set(r.weights) != set(r.included) \
            or set(r.steps) != set(r.included):
        raise wire.WireError("the result names contributors outside the group")
    if r.complete and not collector.complete:
        raise wire.WireError(f"the aggregate has {collector.count} of {len(collector.bounds)} chunks")
    return SpanOutcome(included=sorted(r.included), weights=dict(r.weights), steps=dict(r.steps),
                       complete=r.complete,
                       rejected=dict(r.rejected), digest=collector.digest() if r.complete else "")


class AllReduce:
    def __init__(self, net: Net, directory: Directory, membership: Membership, spec: Spec, timeouts: RoundTimeouts,
                 *, make_part: MakePart, on_enter: Callable[[Phase, int, int], None],
                 loop: asyncio.AbstractEventLoop, verifier: SwarmVerifier | None = None):
        self.net = net
        self.dir = directory
        self.membership = membership
        self.spec = spec
        self.avg = spec.averaging
        self.tt = timeouts
        self.peer_id = net.peer_id
        self.make_part = make_part
        self.on_enter = on_enter
        self.verifier = verifier
        self.loop = loop
        self.reducers: OrderedDict[str, Reducer] = OrderedDict()
        self._changed = asyncio.Event()  # a reducer was registered
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="swarmfold-reduce")
        self._replay_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="swarmfold-replay")

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._replay_executor.shutdown(wait=False, cancel_futures=True)

    def forget(self, group_id: str) -> None:
        """Drop the reducer of a finished group (streams still open hold their own reference)."""
        self.reducers.pop(group_id, None)

    def _register(self, group_id: str, red: Reducer) -> None:
        self.reducers[group_id] = red
        while len(self.reducers) > MAX_REDUCERS:
            self.reducers.popitem(last=False)
        self._changed.set()
        self._changed = asyncio.Event()

    # ---- a member's side ---------------------------------------------------------------------------
    async def run(self, req: AverageRequest, group: Group, out: torch.Tensor, stats: dict[str, int]
                  ) -> tuple[list[SpanOutcome | None], Reducer | None]:
        """Send every span to its reducer and collect the aggregate into `out`: (each span's outcome or
        None when it failed, our reducer)."""
        reducers = group.reducers
        spans = codec.spans(req.delta.numel(), len(reducers))
        my_span = reducers.index(self.peer_id) if self.peer_id in reducers else None
        red = self._open_reducer(req, group, spans[my_span], my_span) if my_span is not None else None
        reduce_task = asyncio.ensure_future(self._reduce(red, req.round)) if red is not None else None
        encoded = await self._encode(req, spans, my_span)
        sent_first = asyncio.Event()

        def after_send() -> None:
            if not sent_first.is_set():
                sent_first.set()
                self.on_enter(Phase.SEND, req.round, req.level)

        async def send_to(j: int, reducer: str) -> SpanOutcome | None:
            lo, hi = spans[j]
            if reducer == self.peer_id:
                assert red is not None
                return await self._collect_own(red, group, j, out[lo:hi])
            msg = self.make_part(group, req, j, encoded[j], hi - lo)
            try:
                return await asyncio.wait_for(self._exchange_span(reducer, msg, group, j, out[lo:hi], stats,
                                                                  after_send), self.tt.span_exchange)
            except TimeoutError:
                logger.info("[%s] span %d from %s: no result within %.0fs", self.peer_id[-8:], j, reducer[-8:],
                            self.tt.span_exchange)
            except AveragingError as e:
                logger.info("[%s] span %d from %s: %s", self.peer_id[-8:], j, reducer[-8:], e)
            return None

        results = await asyncio.gather(*(send_to(j, r) for j, r in enumerate(reducers)))
        if reduce_task is not None:
            await reduce_task
        return list(results), red

    def _open_reducer(self, req: AverageRequest, group: Group, span: tuple[int, int], index: int) -> Reducer:
        lo, hi = span
        comp = self.avg.compression
        # above level 1 a part is a group's aggregate: its weight and steps are sums over at most
        # G^(level-1) peers (a group of one passes its own Δ up: the fewest steps stay one peer's)
        fan = self.avg.group_size ** (req.level - 1)
        red = Reducer(offset=lo, level=req.level, exp=Expectation(
            spec_hash=self.spec.spec_hash, round=req.round, group_id=group.group_id,
            base_sha256=req.model_sha256, members=frozenset(group.members), compression=comp, numel=hi - lo,
            span_index=index, weight_cap=float(self.spec.token_cap) * fan, min_steps=self.spec.round_min_steps,
            max_steps=self.spec.round.inner_steps * fan, max_payload_bytes=self.avg.max_message_bytes))
        red.parts[self.peer_id] = Contribution(codec.roundtrip(comp, req.delta[lo:hi].contiguous()),
                                               float(req.weight))
        red.steps[self.peer_id] = int(req.steps)
        red.received[self.peer_id] = len(red.chunks)
        self._register(group.group_id, red)
        return red

    async def _encode(self, req: AverageRequest, spans: list[tuple[int, int]], my_span: int | None
                      ) -> list[bytes | memoryview]:
        comp = self.avg.compression
        if comp == "none":  # the float32 span is its own payload: send it from Δ's memory, no copy
            return [req.delta[lo:hi].numpy().data.cast("B") for lo, hi in spans]
        return await self.loop.run_in_executor(
            self._executor, lambda: [encode_span(comp, req.delta[lo:hi]) if j != my_span else b""
                                     for j, (lo, hi) in enumerate(spans)])

    async def _exchange_span(self, reducer: str, msg: dict[str, Any], group: Group, span: int, out: torch.Tensor,
                             stats: dict[str, int], after_send: Callable[[], None]) -> SpanOutcome:
        """Stream our part of `span` to its reducer while its aggregate streams back into `out`."""
        payload = msg.pop("payload")
        header = {**msg, "payload_bytes": len(payload), "chunk": CHUNK_ELEMENTS}
        reader, writer = await self.net.open_bulk(reducer, REDUCE)
        wire.widen(reader, writer)
        try:
            stats["sent"] += await wire.send(writer, header)
            writing = asyncio.ensure_future(self._write_chunks(writer, payload, out.numel(), stats, after_send))
            try:
                return await self._read_result(reader, group, span, out, stats)
            finally:
                if not writing.done():  # the reducer stopped reading us (we were rejected): stop sending
                    writing.cancel()
                await asyncio.gather(writing, return_exceptions=True)
        except (wire.WireError, ConnectionError, OSError) as e:
            raise AveragingError(f"{REDUCE} with {reducer} failed: {e}") from e
        finally:
            wire.close(writer)

    async def _write_chunks(self, writer: asyncio.StreamWriter, payload: bytes | memoryview, numel: int,
                            stats: dict[str, int], after_send: Callable[[], None]) -> None:
        view, pos = memoryview(payload), 0
        sizes = [codec.encoded_size(self.avg.compression, hi - lo) for lo, hi in chunk_bounds(numel)]
        if sum(sizes) != len(payload):  # not what the header promised (tests' hostile peer): send it anyway
            sizes = sizes + [len(payload) - sum(sizes)] if len(payload) > sum(sizes) else [len(payload)]
        for k, size in enumerate(sizes):
            stats["sent"] += await wire.send_chunk(writer, k, view[pos:pos + size])
            pos += size
            after_send()

    async def _read_result(self, reader: asyncio.StreamReader, group: Group, span: int, out: torch.Tensor,
                           stats: dict[str, int]) -> SpanOutcome:
        collector = SpanCollector(self.avg.compression, out)
        limit = codec.encoded_size(self.avg.compression, CHUNK_ELEMENTS) + CHUNK_FRAME_SLACK
        while True:
            frame, n = await wire.recv(reader, limit)
            stats["received"] += n
            kind = frame.get("kind")
            if kind == "chunk" and frame.get("k") == collector.count:
                collector.add(wire.field(frame, "data", bytes))
            elif kind in (SpanResult.KIND, ReduceError.KIND):
                return take_result(frame, collector, group, span)
            else:
                raise wire.WireError(f"unexpected {str(kind)[:40]!r} frame from the reducer")

    async def _collect_own(self, red: Reducer, group: Group, span: int, out: torch.Tensor) -> SpanOutcome | None:
        """Our own span's aggregate, decoded into `out` chunk by chunk as our reducer computes it."""
        collector = SpanCollector(self.avg.compression, out)
        try:
            while True:
                await red.until(functools.partial(red.news, collector.count), math.inf)
                while collector.count < len(red.results):
                    collector.add(red.results[collector.count])
                if red.trailer is not None and collector.count == len(red.results):
                    return take_result(red.trailer, collector, group, span)
        except wire.WireError as e:  # e.g. our own aggregate overflowed float32
            logger.warning("[%s] bad aggregate for our span %d: %s", self.peer_id[-8:], span, e)
            return None

    # ---- the reducer's side ------------------------------------------------------------------------
    async def _reduce(self, red: Reducer, round_idx: int) -> None:
        """Aggregate our span chunk by chunk (bounded); always ends with `red.trailer` set."""
        try:
            await self._reduce_inner(red, round_idx)
        except Exception as e:  # a bug or our own failure: the members must still hear the end of the stream
            logger.exception("[%s] round %d: reducing span %d failed", self.peer_id[-8:], round_idx,
                             red.exp.span_index)
            if red.trailer is None:
                red.trailer = ReduceError(reason=f"reducer failed: {e}").to_wire()
                red.wake()

    def _time_out(self, red: Reducer, round_idx: int, missing: set[str], what: str) -> None:
        for peer in sorted(missing):
            red.reject(peer, f"{Rejection.TIMEOUT.value}: {what} within {self.tt.allreduce}s")
            logger.warning("[%s] round %d: no %s from %s in time", self.peer_id[-8:], round_idx, what, peer[-8:])

    async def _reduce_inner(self, red: Reducer, round_idx: int) -> None:
        deadline = self.loop.time() + self.tt.allreduce
        if not await red.until(red.accounted, deadline):
            self._time_out(red, round_idx, set(red.exp.members - set(red.parts) - set(red.rejected)), "contribution")
        self.on_enter(Phase.REDUCE, round_idx, red.level)
        if self.verifier is not None and self.verifier.fraction > 0 and red.level == 1:
            # the replay judges whole spans, exactly as they would enter the average: wait for them first
            if not await red.until(red.complete_parts, deadline):
                self._time_out(red, round_idx, {p for p in red.parts if red.received.get(p, 0) < len(red.chunks)},
                               "complete contribution")
            await self._verify_parts(red)
        complete = await self._aggregate_chunks(red, round_idx, deadline)
        included = red.included if red.included is not None else sorted(red.parts)
        red.trailer = SpanResult(group_id=red.exp.group_id, span=red.exp.span_index, included=tuple(included),
                                 complete=complete, rejected=dict(red.rejected),
                                 weights={p: red.parts[p].weight if p in red.parts else 0.0
                                          for p in included},
                                 steps={p: red.steps.get(p, 0) for p in included}).to_wire()
        red.wake()

    async def _aggregate_chunks(self, red: Reducer, round_idx: int, deadline: float) -> bool:
        """Aggregate chunk by chunk as parts arrive; False if a contributor was rejected after its first
        chunks were averaged (the span is then cut off: its aggregate is unusable)."""
        comp, rule, trim = self.avg.compression, self.avg.aggregation, self.avg.trim_fraction
        for k, (lo, hi) in enumerate(red.chunks):
            if not await red.until(functools.partial(red.has_chunk, k), deadline):
                self._time_out(red, round_idx, {p for p in red.parts if red.received.get(p, 0) <= k}, f"chunk {k}")
            if red.included is None:
                red.included = sorted(red.parts)
            elif sorted(red.parts) != red.included:
                return False
            parts = {p: Contribution(c.tensor[lo:hi], c.weight) for p, c in red.parts.items()}

            def compute(parts: dict[str, Contribution] = parts) -> bytes:
                return codec.encode(comp, aggregate(parts, rule, trim_fraction=trim))

            red.results.append(await self.loop.run_in_executor(self._executor, compute))
            red.wake()
        return True

    async def _reducer_for(self, sender: str, group_id: str) -> Reducer | None:
        """Our reducer for `group_id`, waiting for it only if `sender` is a member of a group we are
        in (or of the proposal we accepted, whose final list may still be on its way to us)."""
        deadline = self.loop.time() + self.tt.reducer_ready
        while group_id not in self.reducers:
            if not (self.membership.is_member(sender, group_id) or self.membership.may_become_member(sender)):
                return None
            if not await wait_until(self, lambda: group_id in self.reducers, deadline):
                return None
        return self.reducers[group_id]

    async def on_reduce(self, info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sender = str(info.peer_id)
        streaming: asyncio.Future | None = None
        try:
            red, received = await self._accept(sender, reader, writer)
            if red is None:
                return
            streaming = asyncio.ensure_future(self._stream_result(red, writer))
            if sender in red.parts:
                await asyncio.wait_for(self._receive_chunks(red, sender, reader), self.tt.span_exchange)
            await asyncio.wait_for(asyncio.shield(streaming), self.tt.span_exchange)
        except (wire.WireError, ConnectionError, TimeoutError) as e:
            logger.info("reduce exchange with %s failed: %s", sender[-8:], e)
        finally:
            if streaming is not None and not streaming.done():
                streaming.cancel()
            await wire.finish(reader, writer, self.tt.span_exchange)

    async def _accept(self, sender: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                      ) -> tuple[Reducer | None, int]:
        """Read and judge a part's header: (the reducer it joins, bytes read), or (None, 0) if refused."""
        async def refuse(reason: str) -> tuple[None, int]:
            await wire.send(writer, ReduceError(reason=reason).to_wire())
            return None, 0
        try:
            raw, received = await wire.recv(reader, SMALL_MESSAGE)
        except wire.MessageTooLarge as e:
            self._reject_everywhere(sender, Rejected(Rejection.OVERSIZED, str(e)))
            return await refuse(f"oversized: {e}")
        group_id = raw.get("group_id")
        if not isinstance(group_id, str):
            self._reject_everywhere(sender, Rejected(Rejection.MALFORMED, "no group id"))
            return await refuse("malformed: no group id")
        red = await self._reducer_for(sender, group_id)
        if red is None:
            return await refuse("unknown group")
        if sender not in red.exp.members:  # a member of another group we are in: nothing to record here
            logger.warning("[%s] round %d: refused a part from %s: %s", self.peer_id[-8:], red.exp.round,
                           sender[-8:], Rejection.NOT_A_MEMBER.value)
            return await refuse(f"{Rejection.NOT_A_MEMBER.value}: not in group {group_id[:8]}")
        if sender in red.parts or sender in red.rejected:
            return await refuse("duplicate contribution")
        red.bytes_received += received
        wire.widen(reader, writer)
        try:
            if sender in self.dir.denied:
                raise Rejected(Rejection.DENIED, "a deny record names it (its contribution failed replay)")
            header = PartHeader.from_wire(raw)
            weight = check_header(header, sender, red.exp)
            red.parts[sender] = Contribution(torch.empty(red.exp.numel, dtype=torch.float32), weight)
            red.received[sender] = 0
            red.claims[sender] = claimed_environment(header.environment)
            red.steps[sender] = header.steps
            red.wake()
        except Rejected as r:
            self._reject(red, sender, r)
        return red, received

    async def _receive_chunks(self, red: Reducer, sender: str, reader: asyncio.StreamReader) -> None:
        """Read `sender`'s chunks into its part; a bad or missing chunk rejects it (by name)."""
        comp = red.exp.compression
        limit = codec.encoded_size(comp, CHUNK_ELEMENTS) + CHUNK_FRAME_SLACK
        part = red.parts[sender]
        for k, (lo, hi) in enumerate(red.chunks):
            try:
                frame, n = await wire.recv(reader, limit)
            except wire.MessageTooLarge as e:
                self._reject(red, sender, Rejected(Rejection.OVERSIZED, f"chunk {k}: {e}"))
                return
            except (wire.WireError, ConnectionError) as e:
                if sender in red.parts:
                    self._reject(red, sender, Rejected(Rejection.TIMEOUT, f"its stream ended after {k} of "
                                                       f"{len(red.chunks)} chunks ({e})"))
                return
            red.bytes_received += n
            if red.parts.get(sender) is not part:  # rejected meanwhile (e.g. timed out): stop reading
                return
            try:
                check_chunk(frame, k, comp, part.tensor[lo:hi])
            except Rejected as r:
                self._reject(red, sender, r)
                return
            red.received[sender] = k + 1
            red.wake()

    async def _stream_result(self, red: Reducer, writer: asyncio.StreamWriter) -> None:
        """Send the aggregate's chunks to one member as they are computed, then the trailer."""
        sent = 0
        while True:
            await red.until(functools.partial(red.news, sent), math.inf)
            while sent < len(red.results):
                red.bytes_sent += await wire.send_chunk(writer, sent, red.results[sent])
                sent += 1
            if red.trailer is not None and sent == len(red.results):
                red.bytes_sent += await wire.send(writer, red.trailer)
                return

    def _reject(self, red: Reducer, sender: str, r: Rejected) -> None:
        red.reject(sender, r.label)
        logger.warning("[%s] round %d: rejected the contribution of %s: %s", self.peer_id[-8:],
                       red.exp.round, sender[-8:], r.label)

    def _reject_everywhere(self, sender: str, r: Rejected) -> None:
        for red in self.reducers.values():
            if sender in red.exp.members and sender not in red.parts and sender not in red.rejected \
                    and red.included is None:
                self._reject(red, sender, r)

    # ---- verification by replay --------------------------------------------------------------------
    async def _verify_parts(self, red: Reducer) -> None:
        """Replay a random fraction of the members whose parts we hold; reject those whose span fails."""
        v = self.verifier
        if v is None or v.fraction <= 0:
            return
        for member in choose_to_verify(sorted(red.parts), self_id=self.peer_id, fraction=v.fraction, rng=v.rng):
            verdict = await self._judge(red, member, v)
            if verdict is None:
                continue
            if verdict.passed:
                logger.info("[%s] round %d: replayed %s: %s (%s)", self.peer_id[-8:], red.exp.round, member[-8:],
                            verdict.reason, verdict.mode)
                continue
            del red.parts[member]
            red.rejected[member] = f"{Rejection.VERIFY_FAILED.value}: {verdict.reason}"
            logger.warning("[%s] round %d: rejected the contribution of %s: %s", self.peer_id[-8:], red.exp.round,
                           member[-8:], red.rejected[member])
            self.dir.deny(member, red.exp.round, verdict, {"group_id": red.exp.group_id, "span": red.exp.span_index,
                                                           "base_sha256": red.exp.base_sha256})

    async def _judge(self, red: Reducer, member: str, v: SwarmVerifier) -> SpanVerdict | None:
        """Replay `member`'s round and compare its span; None if we could not replay it ourselves."""
        part = red.parts[member]
        steps = red.steps[member]
        if part.weight != v.weight_for(steps):
            return SpanVerdict(False, "weight", f"claims weight {part.weight:g}; {steps} inner steps of this spec "
                               f"give {v.weight_for(steps):g}")
        try:
            replay = await self.loop.run_in_executor(self._replay_executor, v.replay, member, red.exp.round,
                                                     red.exp.base_sha256, steps)
            span = replay[red.offset : red.offset + red.exp.numel]
            if span.numel() != red.exp.numel:
                raise ValueError(f"replay has {replay.numel()} elements, too few for this span")
        except Exception as e:  # our own failure to replay says nothing about the member
            logger.warning("[%s] round %d: could not replay %s (%s); its contribution is not judged",
                           self.peer_id[-8:], red.exp.round, member[-8:], e, exc_info=True)
            return None
        return await self.loop.run_in_executor(self._executor, functools.partial(
            judge_span, part.tensor, span, compression=red.exp.compression,
            bitwise=same_class(red.claims.get(member), v.environment), tolerance=v.tolerance))
