"""The swarm: DHT membership, matchmaking, butterfly all-reduce, commit, state sync.

One `Swarm` per peer. It starts a hivemind DHT (which runs hivemind's bundled libp2p
daemon in a child process, with this peer's identity key) and takes a replica of its
P2P handle in an asyncio loop on a background thread. The round code calls
`average()` from the training thread; everything network-side happens on the loop.

A round, as DESIGN.md sets it out:
  1. matchmaking: declare under (swarm id, round, attempt) with the base model hash;
     gather until the group is full, every peer known to be at this round has declared,
     or the timeout; the smallest peer id of a group proposes the member list, the
     others accept one proposal only, and the leader sends the final list (group id =
     hash of swarm, round, attempt, members).
  2. all-reduce: the flat Δ is cut into BLOCK-aligned spans, one per reducing member.
     Each sender sends span j to reducer j; the reducer checks every part, aggregates
     in sorted-id order in float64, encodes the aggregate once and returns those bytes,
     with the list of whom it included, to every sender.
  3. commit: each member assembles the spans, checks that every span included the
     same contributors, and sends a digest vote to the others. It commits only if no
     one reported a failure and every vote it got carries its own digest.
  4. failure: a failed attempt is redone among the survivors (attempt + 1) without
     the peers that were missing or rejected; after `max_attempts` the round is
     rolled back: θ_r is kept and Δ carries into the next round.
  5. verification (spec verify.fraction > 0; averaging/verification.py): before
     aggregating, a reducer replays a random fraction of the members whose parts it holds
     and compares its span; a failed member is rejected (`verify_failed`), so the round is
     redone without it, and denied in the DHT; denied peers are left out of matchmaking
     and their parts refused (`denied`).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import hivemind
import numpy as np
import torch
from hivemind.p2p import P2P, PeerID
from hivemind.utils import get_dht_time
from hivemind.utils.multiaddr import Multiaddr

from swarmfold.averaging import codec, wire
from swarmfold.averaging.aggregate import Contribution, aggregate
from swarmfold.averaging.base import AverageRequest, AverageResult, partition_groups
from swarmfold.averaging.identity import Identity
from swarmfold.averaging.inprocess import group_id_for
from swarmfold.averaging.outer import outer_state_sha256
from swarmfold.averaging.protocol import (
    CHUNK_ELEMENTS,
    CHUNK_FRAME_SLACK,
    DTYPE_OF_CODEC,
    HELLO,
    PROPOSE,
    REDUCE,
    STATE,
    VOTE,
    AveragingError,
    Expectation,
    Phase,
    Rejected,
    Rejection,
    SpecMismatch,
    StateSyncError,
    check_chunk,
    check_header,
    chunk_bounds,
    encode_span,
)
from swarmfold.averaging.receipt import build_deny_record
from swarmfold.averaging.records import (
    Declaration,
    PeerRecord,
    deny_key,
    encode_record,
    entries,
    make_validator,
    matchmaking_key,
    owned_subkey,
    peers_key,
)
from swarmfold.averaging.verification import (
    SpanVerdict,
    SwarmVerifier,
    choose_to_verify,
    claimed_environment,
    denied_from_values,
    judge_span,
    same_class,
)
from swarmfold.spec import Spec

logger = logging.getLogger(__name__)

T = TypeVar("T")
POLL_INTERVAL = 0.2
SMALL_MESSAGE = 1 << 20  # proposals, votes, hello: never need more
WAIT_ATTEMPT = 1_000_000  # the matchmaking key of peers waiting for a group of min_group_size


@dataclass
class Group:
    round: int
    attempt: int
    group_id: str
    members: list[str]  # sorted
    clients: frozenset[str]  # members in client mode (they send but do not reduce)
    leader: str

    @property
    def reducers(self) -> list[str]:
        return [m for m in self.members if m not in self.clients]


@dataclass
class _Attempt:
    """Matchmaking state of this peer for one (round, attempt), shared with the propose handler."""

    round: int
    attempt: int
    base: str
    excluded: set[str]
    locked_to: str | None = None  # the leader whose proposal we accepted (or ourselves)
    proposal_event: asyncio.Event = field(default_factory=asyncio.Event)
    final: asyncio.Future | None = None


@dataclass
class _Reducer:
    """This peer's reduction of one span for one group, chunk by chunk.

    Each member's part fills a span-sized float32 buffer chunk by chunk (`received` counts
    the chunks in). Chunk k is aggregated as soon as every included member has sent it,
    and its encoded aggregate is appended to `results`, which every member's stream sends
    back at once; the `trailer` (who was included, rejected, and whether the result is
    complete) ends each stream. Everything runs on the swarm's loop; `wake` tells the
    waiters that something changed.
    """

    exp: Expectation
    offset: int = 0  # where this span starts in the flat Δ
    parts: dict[str, Contribution] = field(default_factory=dict)
    claims: dict[str, dict[str, Any] | None] = field(default_factory=dict)  # environment class each part claims
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
        loop = asyncio.get_running_loop()
        while not ready():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._changed.wait(), None if math.isinf(remaining) else remaining)
            except TimeoutError:
                return ready()
        return True

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


class _SpanCollector:
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


@dataclass
class ServedState:
    round: int
    theta: bytes
    outer: dict[str, bytes]
    model_sha256: str
    outer_sha256: str


class Swarm:
    """A peer's membership in the swarm: implements the `Averager` protocol for LocalPeer."""

    def __init__(self, spec: Spec, identity: Identity, *, initial_peers: list[str] | None = None,
                 host_maddrs: list[str] | None = None, announce_maddrs: list[str] | None = None,
                 client_mode: bool = False, use_relay: bool = True, use_auto_relay: bool = False,
                 on_phase: Callable[[str, str], None] | None = None, stop_event: threading.Event | None = None,
                 verifier: SwarmVerifier | None = None):
        self.spec = spec
        self.identity = identity
        self.peer_id = identity.peer_id
        self.initial_peers = list(initial_peers or [])
        self.host_maddrs = list(host_maddrs or ["/ip4/127.0.0.1/tcp/0"])
        self.announce_maddrs = list(announce_maddrs or [])
        self.client_mode = client_mode
        self.use_relay, self.use_auto_relay = use_relay, use_auto_relay
        self.on_phase = on_phase or (lambda phase, detail: None)
        self.avg = spec.averaging
        self.swarm_id = spec.swarm_id
        self.validator = make_validator(identity)
        self.dht: hivemind.DHT | None = None
        self.p2p: P2P | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="swarmfold-net", daemon=True)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="swarmfold-reduce")
        self._attempt: _Attempt | None = None
        self._reducers: dict[str, _Reducer] = {}
        self._reducer_ready: dict[str, asyncio.Future] = {}
        self._votes: dict[str, dict[str, dict[str, Any]]] = {}
        self._vote_events: dict[str, asyncio.Event] = {}
        self._served: ServedState | None = None
        self._record: PeerRecord | None = None
        self._heartbeat: asyncio.Task | None = None
        self._stopping = stop_event or threading.Event()  # set: stop waiting for a group
        self.verifier = verifier  # replays members' rounds when the spec verifies (verify.fraction > 0)
        self._replay_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="swarmfold-replay")
        self._denied: set[str] = set()  # peers refused this round: deny records at quorum, or our own
        self._own_denies: dict[str, float] = {}  # peer -> when our own deny record for it expires
        self.maddrs: list[str] = []

    # ---- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        """Join the DHT (raises on unreachable initial peers) and register the protocol handlers."""
        try:
            self.dht = hivemind.DHT(
                start=True, initial_peers=self.initial_peers or None, host_maddrs=self.host_maddrs,
                announce_maddrs=self.announce_maddrs or None, identity_path=str(self.identity.path),
                client_mode=self.client_mode, use_relay=self.use_relay, use_auto_relay=self.use_auto_relay,
                record_validators=[self.validator], check_if_identity_free=False,
            )
        except Exception as e:  # hivemind raises P2PDaemonError, ValueError, TimeoutError...
            hint = ("check the --initial-peers / bootstrap_peers addresses and that those peers are running"
                    if self.initial_peers else "check --host-maddrs")
            raise JoinError(f"could not join the swarm: {e}; {hint}") from e
        self.maddrs = [str(a) for a in self.dht.get_visible_maddrs()]
        self._thread.start()
        self._call(self._setup())
        logger.info("[%s] joined swarm %s; others can join with: %s", self.peer_id[-8:], self.swarm_id,
                    " ".join(self.maddrs))

    async def _setup(self) -> None:
        assert self.dht is not None  # start() set it
        self.p2p = await self.dht.replicate_p2p()
        for name, handler in ((HELLO, self._on_hello), (PROPOSE, self._on_propose), (REDUCE, self._on_reduce),
                              (VOTE, self._on_vote), (STATE, self._on_state)):
            await self.p2p.add_binary_stream_handler(name, handler)
        self._heartbeat = asyncio.ensure_future(self._heartbeat_loop())

    def shutdown(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            try:
                self._call(self._teardown(), timeout=10)
            except Exception as e:  # best effort: the process is leaving anyway
                logger.debug("teardown: %s", e)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            if not self._thread.is_alive():
                self._loop.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._replay_executor.shutdown(wait=False, cancel_futures=True)
        if self.dht is not None:
            self.dht.shutdown()
            self.dht = None

    async def _teardown(self) -> None:
        """Cancel our tasks and close the P2P replica (the DHT process owns the daemon itself)."""
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks(self._loop) if t is not current]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.p2p is not None:
            await self.p2p.shutdown()
            self.p2p = None

    def _call(self, coro: Awaitable[T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)  # type: ignore[arg-type]

    # ---- for other protocols on this peer's P2P (e.g. averaging/datashare.py) -------------
    def add_handler(self, proto: str, handler: Callable[[Any, asyncio.StreamReader, asyncio.StreamWriter],
                                                         Awaitable[None]]) -> None:
        """Serve `proto` on this peer's P2P with `handler(info, reader, writer)` (after start())."""
        assert self.p2p is not None, "start() the swarm first"
        p2p = self.p2p
        self._call(p2p.add_binary_stream_handler(proto, handler), timeout=30)

    def run_coroutine(self, coro: Awaitable[T], timeout: float | None = None) -> T:
        """Run `coro` on the swarm's network loop and wait for its result (from another thread)."""
        return self._call(coro, timeout)

    async def open_stream(self, peer: str, proto: str, maddrs: list[str] | None = None
                          ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A stream to `peer`'s `proto` handler (dialing `maddrs` if there is no route yet); on the loop."""
        return await self._open(peer, proto, maddrs)

    def _fault(self, phase: Phase, round_idx: int) -> None:
        """Test-only crash injection. SWARMFOLD_TEST_FAULT=PHASE@R SIGKILLs this peer's whole process
        group (the DHT and its libp2p daemon included) the first time it reaches PHASE at a round >= R."""
        fault = os.environ.get("SWARMFOLD_TEST_FAULT", "")
        name, _, at = fault.partition("@")
        if name == phase.value and at.isdigit() and round_idx >= int(at):
            logger.warning("[%s] fault injection: SIGKILL in phase %s of round %d", self.peer_id[-8:],
                           phase.value, round_idx)
            logging.shutdown()
            os.killpg(os.getpgid(0), signal.SIGKILL)

    async def _dht_call(self, future: Any) -> Any:
        """Await a DHT operation, bounded: a stuck DHT must not stall the round."""
        try:
            return await asyncio.wait_for(future, self.spec.network.dht_timeout)
        except TimeoutError as e:
            raise AveragingError(f"the DHT did not answer within {self.spec.network.dht_timeout}s "
                                 "(network.dht_timeout)") from e

    # ---- calling peers -----------------------------------------------------------------
    async def _open(self, peer: str, proto: str, maddrs: list[str] | None = None
                    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        assert self.p2p is not None
        pid = PeerID.from_base58(peer)
        try:
            _, reader, writer = await self.p2p.call_binary_stream_handler(pid, proto)
            return reader, writer
        except Exception as first:  # no route yet: connect with the addresses it declared, then retry
            if not maddrs:
                raise AveragingError(f"cannot reach {peer}: {first}") from first
            logger.debug("no stream to %s (%s); connecting to %s", peer[-8:], first, maddrs)
            try:
                # the daemon takes transport addresses; the /p2p/<id> part travels as `pid`
                await self.p2p._client.connect(pid, [Multiaddr(a.split("/p2p/")[0]) for a in maddrs])
                _, reader, writer = await self.p2p.call_binary_stream_handler(pid, proto)
                return reader, writer
            except Exception as e:
                raise AveragingError(f"cannot reach {peer}: {first}; then dialing {maddrs}: {e}") from e

    async def _request(self, peer: str, proto: str, msg: dict[str, Any], *, timeout: float,
                       max_reply: int = SMALL_MESSAGE, maddrs: list[str] | None = None,
                       after_send: Callable[[], None] | None = None) -> tuple[dict[str, Any], int, int]:
        """One request/response exchange: (reply, bytes sent, bytes received)."""
        async def exchange() -> tuple[dict[str, Any], int, int]:
            reader, writer = await self._open(peer, proto, maddrs)
            try:
                sent = await wire.send(writer, msg)
                if after_send is not None:
                    after_send()
                reply, received = await wire.recv(reader, max_reply)
                return reply, sent, received
            finally:
                wire.close(writer)
        try:
            return await asyncio.wait_for(exchange(), timeout)
        except TimeoutError as e:
            raise AveragingError(f"{peer} did not answer {proto} within {timeout:.1f}s") from e
        except (wire.WireError, ConnectionError, OSError) as e:
            raise AveragingError(f"{proto} to {peer} failed: {e}") from e

    # ---- hello: refuse peers of another spec -------------------------------------------
    async def _on_hello(self, info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            msg, _ = await wire.recv(reader, SMALL_MESSAGE)
            theirs = str(msg.get("spec_hash", ""))
            ok = theirs == self.spec.spec_hash
            if not ok:
                logger.warning("[%s] refused peer %s: its spec hash %s… differs from this swarm's %s… (%s); "
                               "it must run this swarm's spec file", self.peer_id[-8:], info.peer_id,
                               theirs[:12], self.spec.spec_hash[:12], self.spec.name)
            await wire.send(writer, {"ok": ok, "spec_hash": self.spec.spec_hash, "name": self.spec.name})
        except wire.WireError as e:
            logger.debug("bad hello from %s: %s", info.peer_id, e)
        finally:
            wire.close(writer)

    def check_spec(self, peers: list[str]) -> None:
        """Ask each initial peer for its spec hash; SpecMismatch if one differs."""
        self._call(self._check_spec(peers))

    async def _check_spec(self, peers: list[str]) -> None:
        for addr in peers:
            peer = addr.rsplit("/p2p/", 1)[-1]
            try:
                reply, _, _ = await self._request(peer, HELLO, {"spec_hash": self.spec.spec_hash,
                                                                "name": self.spec.name},
                                                  timeout=self.avg.join_timeout, maddrs=[addr])
            except AveragingError as e:
                logger.warning("[%s] could not check the spec of %s: %s", self.peer_id[-8:], peer, e)
                continue
            if not reply.get("ok"):
                raise SpecMismatch(
                    f"refused by {peer}: that swarm ('{reply.get('name')}') runs spec "
                    f"{str(reply.get('spec_hash'))[:12]}…, but your spec hashes to {self.spec.spec_hash[:12]}…. "
                    "Every peer of a swarm must use the same spec file: get the swarm's spec and pass it with --spec")

    # ---- records -------------------------------------------------------------------------
    def publish(self, record: PeerRecord) -> None:
        self._record = record
        self._call(self._store_record(), timeout=30)

    async def _store_record(self) -> None:
        if self._record is None or self.dht is None:
            return
        self._record.time = time.time()
        await self._dht_call(self.dht.store(peers_key(self.swarm_id), self._record.to_value(),
                                            get_dht_time() + self.avg.record_ttl,
                                            subkey=owned_subkey(self.validator, self.peer_id), return_future=True))

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.avg.record_ttl / 3)
            try:
                await self._store_record()
            except Exception as e:  # a failed refresh is retried at the next beat
                logger.debug("record refresh failed: %s", e)

    def records(self) -> dict[str, PeerRecord]:
        """Every live, correctly signed peer record of this swarm, by peer id."""
        return self._call(self._records(), timeout=30)

    async def _records(self) -> dict[str, PeerRecord]:
        assert self.dht is not None
        result = await self._dht_call(self.dht.get(peers_key(self.swarm_id), latest=True, return_future=True))
        now = get_dht_time()
        out = {}
        for subkey, value, exp in entries(result):
            rec = PeerRecord.parse(subkey, value, exp)
            if rec is not None and exp > now and rec.spec_hash == self.spec.spec_hash:
                out[rec.peer_id] = rec
        return out

    # ---- state sync ------------------------------------------------------------------------
    def serve_state(self, round_idx: int, theta: torch.Tensor, outer: dict[str, torch.Tensor]) -> tuple[str, str]:
        """Make θ_r and the outer state available to joining peers; returns (model, outer) hashes."""
        theta_bytes = theta.contiguous().numpy().tobytes()
        served = ServedState(round=round_idx, theta=theta_bytes,
                             outer={k: v.contiguous().numpy().tobytes() for k, v in outer.items()},
                             model_sha256=hashlib.sha256(theta_bytes).hexdigest(),
                             outer_sha256=outer_state_sha256(outer))
        self._served = served
        return served.model_sha256, served.outer_sha256

    async def _on_state(self, info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            msg, _ = await wire.recv(reader, SMALL_MESSAGE)
            served = self._served
            if msg.get("spec_hash") != self.spec.spec_hash:
                await wire.send(writer, {"ok": False, "reason": "spec hash mismatch"})
            elif served is None:
                await wire.send(writer, {"ok": False, "reason": "no state to serve yet"})
            else:
                await wire.send(writer, {"ok": True, "round": served.round, "model_sha256": served.model_sha256,
                                         "outer_sha256": served.outer_sha256, "theta": served.theta,
                                         "outer": served.outer})
        except (wire.WireError, ConnectionError) as e:
            logger.debug("state request from %s failed: %s", info.peer_id, e)
        finally:
            wire.close(writer)

    def download_state(self, sources: list[PeerRecord], *, numel: int
                       ) -> tuple[int, torch.Tensor, dict[str, torch.Tensor], str]:
        """θ_r and outer state from the first source that serves what the records published."""
        return self._call(self._download_state(sources, numel), timeout=self.avg.state_sync_timeout * 2)

    async def _download_state(self, sources: list[PeerRecord], numel: int
                              ) -> tuple[int, torch.Tensor, dict[str, torch.Tensor], str]:
        errors = []
        limit = numel * 4 * 3 + SMALL_MESSAGE
        for src in sources:
            try:
                reply, _, _ = await self._request(src.peer_id, STATE, {"spec_hash": self.spec.spec_hash},
                                                  timeout=self.avg.state_sync_timeout, max_reply=limit,
                                                  maddrs=src.maddrs)
                if not reply.get("ok"):
                    raise StateSyncError(str(reply.get("reason")))
                theta_bytes = wire.field(reply, "theta", bytes)
                if len(theta_bytes) != numel * 4:
                    raise StateSyncError(f"served weights have {len(theta_bytes) // 4} elements, expected {numel}")
                if hashlib.sha256(theta_bytes).hexdigest() != src.model_sha256:
                    raise StateSyncError("served weights do not match the model hash the peer published")
                theta = torch.frombuffer(bytearray(theta_bytes), dtype=torch.float32)
                outer_raw = wire.field(reply, "outer", dict)
                outer = {}
                for name, raw in outer_raw.items():
                    if not isinstance(name, str) or not isinstance(raw, bytes) or len(raw) != numel * 4:
                        raise StateSyncError(f"served outer state {name!r} is malformed")
                    outer[name] = torch.frombuffer(bytearray(raw), dtype=torch.float32)
                if outer_state_sha256(outer) != src.outer_sha256:
                    raise StateSyncError("served outer state does not match the published hash")
                return int(wire.field(reply, "round", int)), theta, outer, src.peer_id
            except (AveragingError, StateSyncError, wire.WireError) as e:
                errors.append(f"{src.peer_id[-8:]}: {e}")
        raise StateSyncError("no peer served the published state: " + "; ".join(errors))

    # ---- the round ---------------------------------------------------------------------------
    def average(self, request: AverageRequest) -> AverageResult:
        """Blocking: run one round's averaging for `request` (called by LocalPeer.run_round)."""
        return self._call(self._average(request))

    async def _average(self, req: AverageRequest) -> AverageResult:
        excluded: set[str] = set()
        expected: set[str] | None = None
        timings = {"matchmaking": 0.0, "allreduce": 0.0, "commit": 0.0}
        rejected_all: dict[str, str] = {}
        sent = received = 0
        if self.spec.verify.fraction > 0:
            excluded |= await self._refresh_denied(req.round)
        for attempt in range(self.avg.max_attempts):
            t0 = time.perf_counter()
            self.on_phase("matchmaking", f"round {req.round}, attempt {attempt}")
            group: Group | None = None
            try:
                for_cause = {p for p, why in rejected_all.items() if not why.startswith(Rejection.TIMEOUT.value)}
                group = await self._matchmake(req, attempt, excluded, expected, for_cause)
                timings["matchmaking"] += time.perf_counter() - t0
                if group is None:
                    return self._no_group(req, attempt, timings, rejected_all, sent, received)
                budget = 3 * self.avg.allreduce_timeout + 2 * self.avg.commit_timeout + 2 * self.avg.join_timeout
                try:
                    out = await asyncio.wait_for(self._allreduce_and_commit(req, group, timings), budget)
                except TimeoutError as e:  # a safety net: every step inside is bounded on its own
                    raise _AttemptFailed(f"all-reduce and commit took longer than {budget:.0f}s", set()) from e
                out.attempts = attempt + 1
                out.rejected.update(rejected_all)
                out.bytes_sent += sent
                out.bytes_received += received
                return out
            except AveragingError as e:
                if not isinstance(e, _AttemptFailed):  # e.g. the DHT did not answer: retry, exclude no one
                    e = _AttemptFailed(str(e), set())
                if group is None:
                    timings["matchmaking"] += time.perf_counter() - t0
                if self._stopping.is_set():
                    break
                logger.warning("[%s] round %d attempt %d failed (%s); %s", self.peer_id[-8:], req.round, attempt,
                               e, "retrying without " + ", ".join(sorted(p[-8:] for p in e.exclude))
                               if e.exclude else "retrying")
                excluded |= e.exclude
                rejected_all.update(e.rejected)
                sent += e.bytes_sent
                received += e.bytes_received
                members = set(group.members) if group is not None else (e.expected or set())
                expected = members - excluded - {self.peer_id}
        return AverageResult(status="rolled_back", aggregate=None, attempts=attempt + 1,
                             reason=f"averaging failed {attempt + 1} time(s); θ_r kept, Δ carried",
                             timings=timings, rejected=rejected_all, bytes_sent=sent, bytes_received=received)

    _moved_on = False

    def _no_group(self, req: AverageRequest, attempt: int, timings: dict[str, float], rejected: dict[str, str],
                  sent: int, received: int) -> AverageResult:
        common = dict(attempts=attempt + 1, timings=timings, rejected=rejected, bytes_sent=sent,
                      bytes_received=received)
        if self._moved_on:
            return AverageResult(status="rolled_back", aggregate=None,
                                 reason="the swarm moved on to a later round", **common)  # type: ignore[arg-type]
        if self._stopping.is_set() and self.avg.min_group_size > 1:
            return AverageResult(status="rolled_back", aggregate=None,
                                 reason="stopped while waiting for a group", **common)  # type: ignore[arg-type]
        if self.avg.min_group_size <= 1:
            return AverageResult(status="alone", aggregate=req.delta,
                                 reason="no group formed before the matchmaking timeout", **common)  # type: ignore[arg-type]
        return AverageResult(status="rolled_back", aggregate=None,
                             reason="no group of min_group_size formed", **common)  # type: ignore[arg-type]

    # ---- matchmaking ---------------------------------------------------------------------------
    async def _declared(self, round_idx: int, attempt: int) -> dict[str, Declaration]:
        assert self.dht is not None
        result = await self._dht_call(self.dht.get(matchmaking_key(self.swarm_id, round_idx, attempt), latest=True,
                                                   return_future=True))
        out = {}
        for subkey, value, _ in entries(result):
            d = Declaration.parse(subkey, value)
            if d is not None:
                out[d.peer_id] = d
        return out

    async def _declare(self, a: _Attempt, ttl: float) -> None:
        assert self.dht is not None
        decl = Declaration(peer_id=self.peer_id, model_sha256=a.base, client_mode=self.client_mode,
                           maddrs=self.maddrs)
        await self._dht_call(self.dht.store(matchmaking_key(self.swarm_id, a.round, a.attempt), decl.to_value(),
                                            get_dht_time() + ttl, subkey=owned_subkey(self.validator, self.peer_id),
                                            return_future=True))

    async def _expected_peers(self, round_idx: int, excluded: set[str]) -> tuple[set[str], int]:
        """Peers whose records say they are at this round (or finishing the one before); and how
        many are already past it."""
        try:
            recs = await self._records()
        except Exception as e:  # DHT hiccup: gather until the timeout instead
            logger.debug("could not read peer records: %s", e)
            return set(), 0
        expected = {pid for pid, r in recs.items() if r.round in (round_idx - 1, round_idx)
                    and pid != self.peer_id and pid not in excluded and r.state != "paused"}
        ahead = sum(1 for pid, r in recs.items() if r.round > round_idx and pid != self.peer_id)
        return expected, ahead

    async def _matchmake(self, req: AverageRequest, attempt: int, excluded: set[str],
                         expected: set[str] | None, for_cause: set[str] | None = None) -> Group | None:
        """Form this attempt's group. `excluded` peers are left out; once waiting for a group of
        min_group_size, only those excluded `for_cause` (a rejected contribution) stay out: a peer
        that was merely slow or unreachable gets another chance."""
        self._moved_on = False
        a = _Attempt(round=req.round, attempt=attempt, base=req.model_sha256, excluded=set(excluded))
        a.final = self._loop.create_future()
        self._attempt = a
        window = self.avg.matchmaking_timeout if attempt == 0 else 2 * self.avg.join_timeout
        await self._declare(a, window + self.avg.join_timeout * 2)
        self._fault(Phase.MATCHMAKING, req.round)
        if expected is None:
            expected, _ = await self._expected_peers(req.round, excluded)
        deadline = time.monotonic() + window
        while True:
            try:
                members = await self._gather(a, expected, deadline)
                group = None
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
                if group is not None and len(group.members) >= self.avg.min_group_size:
                    return group
                if group is not None:  # too small to average: release the members
                    await self._cancel(group)
                what = f"{len(members)} ready"
            except _JoinWaiters as w:
                what = f"{w.count} already waiting"
            if self.avg.min_group_size <= 1 or self._stopping.is_set():
                return None
            # min_group_size > 1: keep waiting at this round unless the swarm has moved past it
            self.on_phase("matchmaking", f"round {req.round}: waiting for a group of at least "
                          f"{self.avg.min_group_size} ({what})")
            logger.info("[%s] round %d: %s, waiting for a group of at least %d", self.peer_id[-8:], req.round,
                        what, self.avg.min_group_size)
            _, ahead = await self._expected_peers(req.round, excluded)
            if ahead >= max(1, self.avg.min_group_size - 1):
                self._moved_on = True
                return None
            # every waiting peer of this round meets under one key, whatever attempt it came from
            a.attempt = WAIT_ATTEMPT
            a.excluded = set(for_cause or ())
            a.locked_to = None
            a.proposal_event.clear()
            a.final = self._loop.create_future()
            await self._declare(a, self.avg.matchmaking_timeout + self.avg.join_timeout * 2)
            deadline = time.monotonic() + self.avg.matchmaking_timeout
            expected = set()

    async def _moved_past(self, round_idx: int) -> set[str]:
        """Peers whose records say they are already past `round_idx` (their declarations are stale)."""
        try:
            return {pid for pid, r in (await self._records()).items() if r.round > round_idx}
        except AveragingError:
            return set()

    async def _waiting(self, a: _Attempt) -> set[str]:
        """Other peers already waiting for a group of min_group_size at this round (same base)."""
        return {pid for pid, d in (await self._declared(a.round, WAIT_ATTEMPT)).items()
                if d.model_sha256 == a.base and pid != self.peer_id and pid not in a.excluded}

    async def _gather(self, a: _Attempt, expected: set[str], deadline: float) -> dict[str, Declaration]:
        """Poll declarations until the group can be full, everyone expected is in, or the deadline.

        With min_group_size > 1: peers that already wait for a group of that size meet under the
        WAIT key, so a peer that sees any there joins them at once (_JoinWaiters) instead of
        forming a group of its attempt with peers that have left it; and the waiting peers stop
        gathering as soon as they are min_group_size."""
        polls = 0
        gone: set[str] = set()
        waiting_room = self.avg.min_group_size > 1
        while True:
            declared = await self._declared(a.round, a.attempt)
            if polls % 5 == 0:
                gone = await self._moved_past(a.round)
            polls += 1
            if waiting_room and a.attempt != WAIT_ATTEMPT and a.locked_to is None:
                waiting = await self._waiting(a)
                if waiting - gone:
                    raise _JoinWaiters(len(waiting - gone))
            members = {pid: d for pid, d in declared.items()
                       if d.model_sha256 == a.base and pid not in a.excluded and pid not in gone}
            members.setdefault(self.peer_id, Declaration(self.peer_id, a.base, self.client_mode, self.maddrs))
            others = set(members) - {self.peer_id}
            enough = waiting_room and a.attempt == WAIT_ATTEMPT and len(members) >= self.avg.min_group_size
            # too few here and enough already past this round: stop gathering, so that the round is
            # rolled back and the catch-up moves us to where they are (instead of chasing them)
            left_behind = (waiting_room and len(members) < self.avg.min_group_size
                           and len(gone) >= self.avg.min_group_size - 1)
            if (len(members) >= self.avg.group_size or (expected and expected <= others) or enough or left_behind
                    or time.monotonic() >= deadline or a.locked_to is not None or self._stopping.is_set()):
                return members
            try:
                await asyncio.wait_for(a.proposal_event.wait(), POLL_INTERVAL)
            except TimeoutError:
                pass

    async def _lead(self, a: _Attempt, proposed: list[str], declared: dict[str, Declaration]) -> Group | None:
        if a.locked_to is not None:
            return None
        a.locked_to = self.peer_id
        clients = sorted(p for p in proposed if declared[p].client_mode)
        msg = {"kind": "propose", "round": a.round, "attempt": a.attempt, "base": a.base,
               "members": proposed, "clients": clients, "spec_hash": self.spec.spec_hash}

        async def ask(peer: str) -> str | None:
            try:
                reply, _, _ = await self._request(peer, PROPOSE, msg, timeout=self.avg.join_timeout,
                                                  maddrs=declared[peer].maddrs)
                if reply.get("ok"):
                    return peer
                logger.info("[%s] round %d: %s declined our proposal: %s", self.peer_id[-8:], a.round, peer[-8:],
                            reply.get("reason"))
            except AveragingError as e:
                logger.info("[%s] round %d: proposal to %s failed: %s", self.peer_id[-8:], a.round, peer[-8:], e)
            return None

        answers = await asyncio.gather(*(ask(p) for p in proposed if p != self.peer_id))
        members = sorted([self.peer_id] + [p for p in answers if p is not None])
        group = Group(round=a.round, attempt=a.attempt, members=members, leader=self.peer_id,
                      clients=frozenset(p for p in clients if p in members),
                      group_id=group_id_for(self.swarm_id, a.round, a.attempt, members))
        final = {"kind": "final", "round": a.round, "attempt": a.attempt, "members": members,
                 "clients": sorted(group.clients), "group_id": group.group_id}
        cancel = {"kind": "cancel", "reason": "dropped", "round": a.round, "attempt": a.attempt,
                  "group_id": group.group_id}
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
            await self._request(peer, PROPOSE, final, timeout=self.avg.join_timeout, maddrs=maddrs)
        except AveragingError as e:
            logger.debug("final to %s failed: %s", peer[-8:], e)

    async def _cancel(self, group: Group) -> None:
        if group.leader != self.peer_id:
            return
        msg = {"kind": "cancel", "reason": "too_small", "round": group.round, "attempt": group.attempt,
               "group_id": group.group_id}
        await asyncio.gather(*(self._send_final(p, msg, []) for p in group.members if p != self.peer_id))

    async def _await_leader(self, a: _Attempt, mine: list[str], deadline: float) -> Group | None:
        """Wait for our group's leader (or any valid leader) to propose, then for its final list.

        The leader may still be gathering until about our own deadline (it began when we did),
        so we wait that long plus the join timeout before giving up on it."""
        give_up = time.monotonic() + max(0.0, deadline - time.monotonic()) + self.avg.join_timeout * 2
        while not a.proposal_event.is_set() and time.monotonic() < give_up:
            try:
                await asyncio.wait_for(a.proposal_event.wait(), min(1.0, max(0.01, give_up - time.monotonic())))
            except TimeoutError:
                if mine[0] in await self._moved_past(a.round):  # the leader is gone to a later round
                    break
                if (self.avg.min_group_size > 1 and a.attempt != WAIT_ATTEMPT and not a.proposal_event.is_set()
                        and mine[0] in await self._waiting(a)):  # the leader now waits for a bigger group
                    a.locked_to = self.peer_id  # accept no proposal of this attempt any more
                    raise _JoinWaiters(1) from None
        if a.locked_to is None:
            a.locked_to = self.peer_id  # stop accepting: we give up on this attempt
            raise _AttemptFailed(f"leader {mine[0][-8:]} did not propose in time", {mine[0]},
                                 expected=set(mine) - {mine[0], self.peer_id})
        return await self._follow(a)

    async def _follow(self, a: _Attempt) -> Group | None:
        assert a.final is not None
        try:
            final = await asyncio.wait_for(asyncio.shield(a.final), self.avg.join_timeout * 2)
        except TimeoutError as e:
            raise _AttemptFailed(f"no final member list from leader {str(a.locked_to)[-8:]}",
                                 {str(a.locked_to)}) from e
        if final.get("kind") == "cancel":
            if final.get("reason") == "too_small":
                return None  # keep waiting at this attempt for more peers
            raise _AttemptFailed(f"leader {str(a.locked_to)[-8:]} formed its group without us", set())
        members = sorted(final["members"])
        return Group(round=a.round, attempt=a.attempt, group_id=final["group_id"], members=members,
                     clients=frozenset(final["clients"]), leader=str(a.locked_to))

    async def _on_propose(self, info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sender = str(info.peer_id)
        try:
            msg, _ = await wire.recv(reader, SMALL_MESSAGE)
            ok, reason = self._consider(sender, msg)
            await wire.send(writer, {"ok": ok, "reason": reason})
        except (wire.WireError, ConnectionError) as e:
            logger.debug("bad proposal from %s: %s", sender, e)
        finally:
            wire.close(writer)

    def _consider(self, sender: str, msg: dict[str, Any]) -> tuple[bool, str]:
        a = self._attempt
        kind = msg.get("kind")
        if a is None or msg.get("round") != a.round or msg.get("attempt") != a.attempt:
            return False, "not at this round/attempt"
        members = msg.get("members")
        if kind in ("final", "cancel"):
            if a.locked_to != sender or a.final is None or a.final.done():
                return False, "no pending proposal from you"
            if kind == "final":
                if (not isinstance(members, list) or self.peer_id not in members
                        or msg.get("group_id") != group_id_for(self.swarm_id, a.round, a.attempt, sorted(members))
                        or not isinstance(msg.get("clients"), list)):
                    a.final.set_result({"kind": "cancel"})
                    return False, "malformed final list"
            a.final.set_result(msg)
            return True, ""
        if kind != "propose":
            return False, f"unknown kind {kind!r}"
        if a.locked_to is not None:
            return False, "already in a group"
        if (not isinstance(members, list) or not all(isinstance(m, str) for m in members)
                or self.peer_id not in members or sender != min(members) or sender not in members):
            return False, "malformed proposal"
        if len(members) > self.avg.group_size:
            return False, "group too large"
        if msg.get("base") != a.base:
            return False, "different base model"
        if a.excluded & set(members):
            return False, "proposal includes peers excluded this round"
        a.locked_to = sender
        a.proposal_event.set()
        return True, ""

    # ---- all-reduce -------------------------------------------------------------------------
    def _make_part(self, group: Group, req: AverageRequest, span_index: int, payload: bytes | memoryview,
                   numel: int) -> dict[str, Any]:
        """Our contribution to span `span_index`: the header fields and the payload (the span encoded chunk
        by chunk, protocol.encode_span), which is streamed in chunk frames after the header (tests subclass this)."""
        return {"kind": "part", "group_id": group.group_id, "spec_hash": self.spec.spec_hash,
                "round": req.round, "base_sha256": req.model_sha256, "span": span_index, "numel": numel,
                "dtype": DTYPE_OF_CODEC[self.avg.compression], "weight": float(req.weight), "payload": payload,
                **({"environment": self.verifier.environment} if self.verifier is not None else {})}

    async def _allreduce_and_commit(self, req: AverageRequest, group: Group,
                                    timings: dict[str, float]) -> AverageResult:
        t0 = time.perf_counter()
        self.on_phase("averaging", f"round {req.round}: all-reduce in group {group.group_id[:8]} of "
                      f"{len(group.members)}")
        reducers = group.reducers
        if not reducers:
            raise _AttemptFailed("no member of the group can reduce (all in client mode)", set())
        comp = self.avg.compression
        numel = req.delta.numel()
        spans = codec.spans(numel, len(reducers))
        members = frozenset(group.members)
        my_span = reducers.index(self.peer_id) if self.peer_id in reducers else None
        red: _Reducer | None = None
        if my_span is not None:
            lo, hi = spans[my_span]
            red = _Reducer(offset=lo, exp=Expectation(
                spec_hash=self.spec.spec_hash, round=req.round, group_id=group.group_id,
                base_sha256=req.model_sha256, members=members, compression=comp, numel=hi - lo,
                span_index=my_span, weight_cap=float(self.spec.token_cap),
                max_payload_bytes=self.avg.max_message_bytes))
            red.parts[self.peer_id] = Contribution(codec.roundtrip(comp, req.delta[lo:hi].contiguous()),
                                                   float(req.weight))
            red.received[self.peer_id] = len(red.chunks)
            self._reducers[group.group_id] = red
            self._reducer_ready.setdefault(group.group_id, self._loop.create_future())
            if not self._reducer_ready[group.group_id].done():
                self._reducer_ready[group.group_id].set_result(red)
            reduce_task = asyncio.ensure_future(self._reduce(red, req.round))
        stats = {"sent": 0, "received": 0}
        if comp == "none":  # the float32 span is its own payload: send it from Δ's memory, no copy
            encoded: list[bytes | memoryview] = [req.delta[lo:hi].numpy().data.cast("B") for lo, hi in spans]
        else:
            encoded = await self._loop.run_in_executor(
                self._executor, lambda: [encode_span(comp, req.delta[lo:hi]) if j != my_span else b""
                                         for j, (lo, hi) in enumerate(spans)])
        out = torch.empty(numel, dtype=torch.float32)  # the aggregate, filled span by span, chunk by chunk

        sent_first = asyncio.Event()

        def after_send() -> None:
            if not sent_first.is_set():
                sent_first.set()
                self._fault(Phase.SEND, req.round)

        async def send_to(j: int, reducer: str) -> dict[str, Any] | None:
            lo, hi = spans[j]
            if reducer == self.peer_id:
                assert red is not None
                return await self._collect_own(red, group, j, out[lo:hi])
            msg = self._make_part(group, req, j, encoded[j], hi - lo)
            try:
                return await asyncio.wait_for(self._exchange_span(reducer, msg, group, j, out[lo:hi], stats,
                                                                  after_send), self.avg.allreduce_timeout * 2)
            except TimeoutError:
                logger.info("[%s] span %d from %s: no result within %.0fs", self.peer_id[-8:], j, reducer[-8:],
                            self.avg.allreduce_timeout * 2)
            except AveragingError as e:
                logger.info("[%s] span %d from %s: %s", self.peer_id[-8:], j, reducer[-8:], e)
            return None

        results = await asyncio.gather(*(send_to(j, r) for j, r in enumerate(reducers)))
        if my_span is not None:
            await reduce_task
        timings["allreduce"] += time.perf_counter() - t0
        t1 = time.perf_counter()
        missing = {reducers[j] for j, res in enumerate(results) if res is None}
        rejected: dict[str, str] = {}
        for res in results:
            if res is not None:
                rejected.update(res["rejected"])
        cut = [j for j, res in enumerate(results) if res is not None and not res["complete"]]
        included_sets = {tuple(res["included"]) for res in results if res is not None}
        weight_sets = {json.dumps(res["weights"], sort_keys=True) for res in results if res is not None}
        failure = ""
        if missing:
            failure = f"no aggregate from reducer(s) {', '.join(sorted(m[-8:] for m in missing))}"
        elif cut:
            failure = (f"span(s) {', '.join(map(str, cut))} cut off mid-stream (a contributor was rejected "
                       "after its first chunks were averaged)")
        elif len(included_sets) != 1 or len(weight_sets) != 1:
            failure = "reducers included different contributors"
        digest = ""
        first = results[0] or {}
        included = list(first.get("included", []))
        if not failure:
            if self.peer_id not in included:
                failure = "our own contribution was rejected"
            digest = _digest(group.group_id, included, first["weights"], [res["digest"] for res in results if res])
        exclude = set(missing) | set(rejected)
        committed = await self._commit(group, req.round, digest, failure, stats)
        if red is not None:  # our reducer's traffic (complete: every voter had our result first)
            stats["sent"] += red.bytes_sent
            stats["received"] += red.bytes_received
        timings["commit"] += time.perf_counter() - t1
        self._forget(group.group_id)
        if failure or not committed:
            raise _AttemptFailed(failure or "the group did not agree on the aggregate", exclude - {self.peer_id},
                                 rejected=rejected, bytes_sent=stats["sent"], bytes_received=stats["received"])
        logger.info("[%s] round %d: committed with %d of %d members (group %s, digest %s)", self.peer_id[-8:],
                    req.round, len(included), len(group.members), group.group_id[:8], digest[:12])
        return AverageResult(status="committed", aggregate=out, group_id=group.group_id,
                             members=group.members, included=included, rejected=rejected,
                             timings=timings, bytes_sent=stats["sent"], bytes_received=stats["received"],
                             compressed=comp != "none")

    async def _exchange_span(self, reducer: str, msg: dict[str, Any], group: Group, span: int, out: torch.Tensor,
                             stats: dict[str, int], after_send: Callable[[], None]) -> dict[str, Any] | None:
        """Stream our part of `span` to its reducer while its aggregate streams back into `out`."""
        payload = msg.pop("payload")
        header = {**msg, "payload_bytes": len(payload), "chunk": CHUNK_ELEMENTS}
        comp = self.avg.compression
        chunks = chunk_bounds(out.numel())
        reader, writer = await self._open(reducer, REDUCE)
        wire.widen(reader, writer)

        async def write_chunks() -> None:
            view, pos = memoryview(payload), 0
            sizes = [codec.encoded_size(comp, hi - lo) for lo, hi in chunks]
            if sum(sizes) != len(payload):  # not what the header promised (tests' hostile peer): send it anyway
                sizes = sizes + [len(payload) - sum(sizes)] if len(payload) > sum(sizes) else [len(payload)]
            for k, size in enumerate(sizes):
                stats["sent"] += await wire.send_chunk(writer, k, view[pos:pos + size])
                pos += size
                after_send()

        try:
            stats["sent"] += await wire.send(writer, header)
            writing = asyncio.ensure_future(write_chunks())
            try:
                collector = _SpanCollector(comp, out)
                limit = codec.encoded_size(comp, CHUNK_ELEMENTS) + CHUNK_FRAME_SLACK
                while True:
                    frame, n = await wire.recv(reader, limit)
                    stats["received"] += n
                    kind = frame.get("kind")
                    if kind == "chunk" and frame.get("k") == collector.count:
                        collector.add(wire.field(frame, "data", bytes))
                    elif kind == "result":
                        return self._take_result(frame, collector, group, span)
                    else:
                        raise wire.WireError(f"unexpected {kind!r} from the reducer: {str(frame.get('reason', ''))[:200]}")
            finally:
                if not writing.done():  # the reducer stopped reading us (we were rejected): stop sending
                    writing.cancel()
                await asyncio.gather(writing, return_exceptions=True)
        except (wire.WireError, ConnectionError, OSError) as e:
            raise AveragingError(f"{REDUCE} with {reducer} failed: {e}") from e
        finally:
            wire.close(writer)

    async def _collect_own(self, red: _Reducer, group: Group, span: int, out: torch.Tensor) -> dict[str, Any] | None:
        """Our own span's aggregate, decoded into `out` chunk by chunk as our reducer computes it."""
        collector = _SpanCollector(self.avg.compression, out)
        try:
            while True:
                await red.until(functools.partial(red.news, collector.count), math.inf)
                while collector.count < len(red.results):
                    collector.add(red.results[collector.count])
                if red.trailer is not None and collector.count == len(red.results):
                    return self._take_result(red.trailer, collector, group, span)
        except wire.WireError as e:  # our own aggregate overflowed float32
            logger.warning("[%s] bad aggregate for our span %d: %s", self.peer_id[-8:], span, e)
            return None

    def _take_result(self, trailer: dict[str, Any], collector: _SpanCollector, group: Group,
                     span: int) -> dict[str, Any] | None:
        """Check a span's trailer against the chunks collected; None if the result is unusable."""
        try:
            if trailer.get("kind") != "result" or trailer.get("group_id") != group.group_id or \
                    trailer.get("span") != span:
                raise wire.WireError(f"unexpected reply {trailer.get('kind')!r} / {trailer.get('reason', '')}")
            included = wire.field(trailer, "included", list)
            weights = wire.field(trailer, "weights", dict)
            rejected = wire.field(trailer, "rejected", dict)
            complete = wire.field(trailer, "complete", bool)
            if not set(included) <= set(group.members) or set(weights) != set(included):
                raise wire.WireError("the result names contributors outside the group")
            if complete and not collector.complete:
                raise wire.WireError(f"the aggregate has {collector.count} of {len(collector.bounds)} chunks")
            return {"included": sorted(str(p) for p in included), "weights": weights, "complete": complete,
                    "rejected": {str(k): str(v) for k, v in rejected.items()},
                    "digest": collector.digest() if complete else ""}
        except wire.WireError as e:
            logger.warning("[%s] bad aggregate for span %d: %s", self.peer_id[-8:], span, e)
            return None

    async def _reduce(self, red: _Reducer, round_idx: int) -> None:
        """Aggregate our span chunk by chunk (bounded); always ends with `red.trailer` set."""
        try:
            await self._reduce_inner(red, round_idx)
        except Exception as e:
            logger.exception("[%s] round %d: reducing span %d failed", self.peer_id[-8:], round_idx,
                             red.exp.span_index)
            if red.trailer is None:
                red.trailer = {"kind": "error", "reason": f"reducer failed: {e}"}
                red.wake()

    def _time_out(self, red: _Reducer, round_idx: int, missing: set[str], what: str) -> None:
        for peer in sorted(missing):
            red.reject(peer, f"{Rejection.TIMEOUT.value}: {what} within {self.avg.allreduce_timeout}s")
            logger.warning("[%s] round %d: no %s from %s in time", self.peer_id[-8:], round_idx, what, peer[-8:])

    async def _reduce_inner(self, red: _Reducer, round_idx: int) -> None:
        deadline = self._loop.time() + self.avg.allreduce_timeout
        if not await red.until(red.accounted, deadline):
            self._time_out(red, round_idx, set(red.exp.members - set(red.parts) - set(red.rejected)), "contribution")
        self._fault(Phase.REDUCE, round_idx)
        chunks = red.chunks
        if self.verifier is not None and self.verifier.fraction > 0:
            # the replay judges whole spans, exactly as they would enter the average: wait for them first
            if not await red.until(red.complete_parts, deadline):
                self._time_out(red, round_idx, {p for p in red.parts if red.received.get(p, 0) < len(chunks)},
                               "complete contribution")
            await self._verify_parts(red)
        comp, rule, trim = self.avg.compression, self.avg.aggregation, self.avg.trim_fraction
        complete = True
        for k, (lo, hi) in enumerate(chunks):
            if not await red.until(functools.partial(red.has_chunk, k), deadline):
                self._time_out(red, round_idx, {p for p in red.parts if red.received.get(p, 0) <= k},
                               f"chunk {k}")
            if red.included is None:
                red.included = sorted(red.parts)
            elif sorted(red.parts) != red.included:  # someone was rejected after chunks were averaged with it
                complete = False
                break
            parts = {p: Contribution(c.tensor[lo:hi], c.weight) for p, c in red.parts.items()}

            def compute(parts: dict[str, Contribution] = parts) -> bytes:
                return codec.encode(comp, aggregate(parts, rule, trim_fraction=trim))

            red.results.append(await self._loop.run_in_executor(self._executor, compute))
            red.wake()
        included = red.included if red.included is not None else sorted(red.parts)
        red.trailer = {"kind": "result", "group_id": red.exp.group_id, "span": red.exp.span_index,
                       "included": included, "complete": complete, "rejected": dict(red.rejected),
                       "weights": {p: red.parts[p].weight if p in red.parts else 0.0 for p in included}}
        red.wake()

    async def _on_reduce(self, info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sender = str(info.peer_id)
        streaming: asyncio.Future | None = None
        try:
            try:
                msg, received = await wire.recv(reader, SMALL_MESSAGE)
            except wire.MessageTooLarge as e:
                self._reject_everywhere(sender, Rejected(Rejection.OVERSIZED, str(e)))
                await wire.send(writer, {"kind": "error", "reason": f"oversized: {e}"})
                return
            group_id = msg.get("group_id")
            if not isinstance(group_id, str):
                self._reject_everywhere(sender, Rejected(Rejection.MALFORMED, "no group id"))
                await wire.send(writer, {"kind": "error", "reason": "malformed: no group id"})
                return
            ready = self._reducer_ready.setdefault(group_id, self._loop.create_future())
            try:
                red = await asyncio.wait_for(asyncio.shield(ready), self.avg.join_timeout * 2)
            except TimeoutError:
                await wire.send(writer, {"kind": "error", "reason": "unknown group"})
                return
            if sender in red.parts or sender in red.rejected:
                await wire.send(writer, {"kind": "error", "reason": "duplicate contribution"})
                return
            red.bytes_received += received
            wire.widen(reader, writer)
            try:
                if sender in self._denied:
                    raise Rejected(Rejection.DENIED, "a deny record names it (its contribution failed replay)")
                weight = check_header(msg, sender, red.exp)
                red.parts[sender] = Contribution(torch.empty(red.exp.numel, dtype=torch.float32), weight)
                red.received[sender] = 0
                red.claims[sender] = claimed_environment(msg.get("environment"))
                red.wake()
            except Rejected as r:
                self._reject(red, sender, r)
            streaming = asyncio.ensure_future(self._stream_result(red, writer))
            if sender in red.parts:
                await asyncio.wait_for(self._receive_chunks(red, sender, reader), self.avg.allreduce_timeout * 2)
            await asyncio.wait_for(asyncio.shield(streaming), self.avg.allreduce_timeout * 2)
        except (wire.WireError, ConnectionError, TimeoutError) as e:
            logger.debug("reduce exchange with %s failed: %s", sender[-8:], e)
        finally:
            if streaming is not None and not streaming.done():
                streaming.cancel()
            wire.close(writer)

    async def _receive_chunks(self, red: _Reducer, sender: str, reader: asyncio.StreamReader) -> None:
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

    async def _stream_result(self, red: _Reducer, writer: asyncio.StreamWriter) -> None:
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

    def _reject(self, red: _Reducer, sender: str, r: Rejected) -> None:
        red.reject(sender, r.label)
        logger.warning("[%s] round %d: rejected the contribution of %s: %s", self.peer_id[-8:],
                       red.exp.round, sender[-8:], r.label)

    def _reject_everywhere(self, sender: str, r: Rejected) -> None:
        for red in self._reducers.values():
            if sender in red.exp.members and sender not in red.parts and sender not in red.rejected \
                    and red.included is None:
                self._reject(red, sender, r)

    # ---- verification by replay ------------------------------------------------------------------
    async def _verify_parts(self, red: _Reducer) -> None:
        """Replay a random fraction of the members whose parts we hold; reject those whose span fails."""
        v = self.verifier
        if v is None or v.fraction <= 0:
            return
        for member in choose_to_verify(sorted(red.parts), self_id=self.peer_id, fraction=v.fraction, rng=v.rng):
            part = red.parts[member]
            if part.weight != v.expected_weight:
                verdict = SpanVerdict(False, "weight", f"claims weight {part.weight:g}; one round of this spec "
                                      f"gives {v.expected_weight:g}")
            else:
                try:
                    replay = await self._loop.run_in_executor(self._replay_executor, v.replay, member,
                                                              red.exp.round, red.exp.base_sha256)
                    span = replay[red.offset : red.offset + red.exp.numel]
                    if span.numel() != red.exp.numel:
                        raise ValueError(f"replay has {replay.numel()} elements, too few for this span")
                except Exception as e:  # our own failure to replay says nothing about the member
                    logger.warning("[%s] round %d: could not replay %s (%s); its contribution is not judged",
                                   self.peer_id[-8:], red.exp.round, member[-8:], e)
                    continue
                verdict = await self._loop.run_in_executor(self._executor, functools.partial(
                    judge_span, part.tensor, span, compression=red.exp.compression,
                    bitwise=same_class(red.claims.get(member), v.environment), tolerance=v.tolerance))
            if verdict.passed:
                logger.info("[%s] round %d: replayed %s: %s (%s)", self.peer_id[-8:], red.exp.round, member[-8:],
                            verdict.reason, verdict.mode)
                continue
            del red.parts[member]
            red.rejected[member] = f"{Rejection.VERIFY_FAILED.value}: {verdict.reason}"
            logger.warning("[%s] round %d: rejected the contribution of %s: %s", self.peer_id[-8:], red.exp.round,
                           member[-8:], red.rejected[member])
            self._deny(member, red, verdict)

    def _deny(self, member: str, red: _Reducer, verdict: SpanVerdict) -> None:
        """Refuse `member` ourselves from now on and publish a signed deny record (in the background)."""
        ttl = self.spec.verify.deny_ttl
        self._own_denies[member] = time.time() + ttl
        self._denied.add(member)
        distance = verdict.distance if verdict.distance is None or math.isfinite(verdict.distance) else "inf"
        record = build_deny_record(
            self.identity, swarm_id=self.swarm_id, denied=member, round_idx=red.exp.round, reason=verdict.reason,
            evidence={"mode": verdict.mode, "distance": distance, "tolerance": self.spec.verify.tolerance,
                      "group_id": red.exp.group_id, "span": red.exp.span_index, "base_sha256": red.exp.base_sha256},
            ttl=ttl)

        async def store() -> None:
            assert self.dht is not None
            try:
                await self._dht_call(self.dht.store(
                    deny_key(self.swarm_id), encode_record(record), get_dht_time() + ttl,
                    subkey=owned_subkey(self.validator, member), return_future=True))
                logger.warning("[%s] published a deny record against %s for %.0f s", self.peer_id[-8:],
                               member[-8:], ttl)
            except Exception as e:  # we still refuse it ourselves; others may catch it themselves
                logger.warning("[%s] could not publish the deny record against %s: %s", self.peer_id[-8:],
                               member[-8:], e)

        asyncio.ensure_future(store())

    async def _refresh_denied(self, round_idx: int) -> set[str]:
        """Peers to leave out this round: denied by verify.deny_quorum issuers in the DHT, or by us."""
        now = time.time()
        self._own_denies = {p: t for p, t in self._own_denies.items() if t > now}
        by_dht: dict[str, list[str]] = {}
        try:
            assert self.dht is not None
            result = await self._dht_call(self.dht.get(deny_key(self.swarm_id), latest=True, return_future=True))
            v = self.spec.verify
            by_dht = denied_from_values([value for _, value, _ in entries(result)], swarm_id=self.swarm_id,
                                        max_ttl=v.deny_ttl, quorum=v.deny_quorum, now=now)
        except AveragingError as e:  # a DHT hiccup: keep last round's view
            logger.debug("could not read deny records: %s", e)
            by_dht = {p: [] for p in self._denied}
        self._denied = set(by_dht) | set(self._own_denies)
        if self.peer_id in self._denied:
            logger.warning("[%s] round %d: this peer is denied by %s: others will not average with it",
                           self.peer_id[-8:], round_idx, ", ".join(i[-8:] for i in by_dht.get(self.peer_id, [])))
        others = sorted(self._denied - {self.peer_id})
        if others:
            logger.info("[%s] round %d: leaving out denied peer(s) %s", self.peer_id[-8:], round_idx,
                        ", ".join(p[-8:] for p in others))
        return set(others)

    # ---- commit -------------------------------------------------------------------------------
    async def _commit(self, group: Group, round_idx: int, digest: str, failure: str, stats: dict[str, int]) -> bool:
        """Exchange digest votes. Commit iff we hold the aggregate, no member reported a failure,
        and every vote received carries our digest (a member that died mid-commit is not waited for)."""
        ok = not failure
        vote = {"kind": "vote", "group_id": group.group_id, "ok": ok, "digest": digest, "reason": failure}
        event = self._vote_events.setdefault(group.group_id, asyncio.Event())
        others = [m for m in group.members if m != self.peer_id]
        first = True

        async def cast(peer: str) -> None:
            nonlocal first
            try:
                _, s, r = await self._request(peer, VOTE, vote, timeout=self.avg.commit_timeout)
                stats["sent"] += s
                stats["received"] += r
            except AveragingError as e:
                logger.debug("vote to %s failed: %s", peer[-8:], e)
            if first:
                first = False
                self._fault(Phase.COMMIT, round_idx)

        casting = asyncio.gather(*(cast(p) for p in others))
        deadline = time.monotonic() + self.avg.commit_timeout
        votes = self._votes.setdefault(group.group_id, {})
        while len(set(votes) & set(others)) < len(others) and time.monotonic() < deadline:
            event.clear()
            try:
                await asyncio.wait_for(event.wait(), max(0.01, deadline - time.monotonic()))
            except TimeoutError:
                break
        await casting
        got = {p: v for p, v in votes.items() if p in others}
        agree = ok and all(v.get("ok") and v.get("digest") == digest for v in got.values())
        if not agree:
            bad = {p[-8:]: v.get("reason") or "different digest" for p, v in got.items()
                   if not (v.get("ok") and v.get("digest") == digest)}
            logger.warning("[%s] round %d: not committing (%s)", self.peer_id[-8:], round_idx,
                           failure or f"votes: {bad}")
        return agree

    async def _on_vote(self, info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sender = str(info.peer_id)
        try:
            msg, _ = await wire.recv(reader, SMALL_MESSAGE)
            gid = msg.get("group_id")
            if isinstance(gid, str) and len(self._votes) < 1024:
                self._votes.setdefault(gid, {})[sender] = {"ok": bool(msg.get("ok")),
                                                           "digest": str(msg.get("digest", "")),
                                                           "reason": str(msg.get("reason", ""))[:500]}
                self._vote_events.setdefault(gid, asyncio.Event()).set()
            await wire.send(writer, {"ok": True})
        except (wire.WireError, ConnectionError) as e:
            logger.debug("bad vote from %s: %s", sender[-8:], e)
        finally:
            wire.close(writer)

    def _forget(self, group_id: str) -> None:
        """Drop state of finished groups (keep the latest few for late stragglers)."""
        for d in (self._reducers, self._reducer_ready, self._votes, self._vote_events):
            while len(d) > 8:
                d.pop(next(iter(d)))


class _JoinWaiters(Exception):
    """Control flow in matchmaking: peers of this round already wait for a group; join them."""

    def __init__(self, count: int):
        super().__init__(f"{count} peer(s) already waiting")
        self.count = count


class JoinError(Exception):
    """The DHT could not start or reach any initial peer."""


class _AttemptFailed(AveragingError):
    def __init__(self, reason: str, exclude: set[str], *, rejected: dict[str, str] | None = None,
                 bytes_sent: int = 0, bytes_received: int = 0, expected: set[str] | None = None):
        super().__init__(reason)
        self.expected = expected
        self.exclude = exclude
        self.rejected = rejected or {}
        self.bytes_sent = bytes_sent
        self.bytes_received = bytes_received


def _digest(group_id: str, included: list[str], weights: dict[str, Any], span_digests: list[str]) -> str:
    """What every member votes on: the group, who was included with what weight, and the sha256 of
    each span's aggregate exactly as its reducer encoded it (the same bytes went to every member)."""
    blob = json.dumps([group_id, included, sorted(weights.items()), span_digests], separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()
