"""The directory: what peers publish in the DHT, signed and expiring (averaging/records.py).

- this peer's record (round, model and outer hashes, addresses, metrics), refreshed by a
  heartbeat, and everyone else's, read back and checked;
- matchmaking declarations, per (round, attempt) and in the waiting room of min_group_size;
- deny records: a peer whose contribution failed replay is refused by this peer at once
  and, once `verify.deny_quorum` issuers deny it, by everyone.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

from hivemind.utils import get_dht_time

from swarmfold.averaging.identity import Identity
from swarmfold.averaging.protocol import AveragingError
from swarmfold.averaging.receipt import build_deny_record
from swarmfold.averaging.records import (
    Declaration,
    PeerRecord,
    deny_key,
    encode_record,
    entries,
    matchmaking_key,
    owned_subkey,
    peers_key,
    waiting_key,
)
from swarmfold.averaging.transport import Transport
from swarmfold.averaging.verification import SpanVerdict, denied_from_values
from swarmfold.spec import Spec

logger = logging.getLogger(__name__)


class Directory:
    def __init__(self, transport: Transport, spec: Spec, identity: Identity):
        self.t = transport
        self.spec = spec
        self.identity = identity
        self.peer_id = transport.peer_id
        self.swarm_id = spec.swarm_id
        self._record: PeerRecord | None = None
        self.denied: set[str] = set()  # peers refused this round: deny records at quorum, or our own
        self._own_denies: dict[str, float] = {}  # peer -> when our own deny record for it expires

    # ---- this peer's record and the heartbeat ------------------------------------------------
    async def publish(self, record: PeerRecord) -> None:
        self._record = record
        await self._store_record()

    async def _store_record(self) -> None:
        if self._record is None or self.t.dht is None:
            return
        self._record.time = time.time()
        await self.t.dht_call(self.t.dht.store(
            peers_key(self.swarm_id), self._record.to_value(), get_dht_time() + self.spec.averaging.record_ttl,
            subkey=owned_subkey(self.t.validator, self.peer_id), return_future=True))

    async def heartbeat(self) -> None:
        """Refresh our record every third of its lifetime, forever (cancelled at shutdown)."""
        while True:
            await asyncio.sleep(self.spec.averaging.record_ttl / 3)
            try:
                await self._store_record()
            except AveragingError as e:  # the DHT did not answer: retried at the next beat
                logger.info("record refresh failed: %s", e)
            except Exception:  # not a DHT hiccup: a bug worth seeing; the next beat still runs
                logger.warning("record refresh failed unexpectedly", exc_info=True)

    async def records(self) -> dict[str, PeerRecord]:
        """Every live, correctly signed peer record of this swarm, by peer id."""
        assert self.t.dht is not None
        result = await self.t.dht_call(self.t.dht.get(peers_key(self.swarm_id), latest=True, return_future=True))
        now = get_dht_time()
        out = {}
        for subkey, value, exp in entries(result):
            rec = PeerRecord.parse(subkey, value, exp)
            if rec is not None and exp > now and rec.spec_hash == self.spec.spec_hash:
                out[rec.peer_id] = rec
        return out

    async def expected_peers(self, round_idx: int, excluded: set[str],
                             distrusted: frozenset[str] | set[str] = frozenset()) -> tuple[set[str], set[str]]:
        """From one read of the records: the peers whose records say they are at this round (or
        finishing the one before), and those already past it, but for `distrusted` ones (peers whose
        contribution this round we rejected for cause: where such a peer says it is tells nothing
        about the swarm). A DHT that does not answer gives two empty sets: gather until the timeout."""
        try:
            recs = await self.records()
        except AveragingError as e:
            logger.info("could not read peer records: %s", e)
            return set(), set()
        expected = {pid for pid, r in recs.items() if r.round in (round_idx - 1, round_idx)
                    and pid != self.peer_id and pid not in excluded and r.state != "paused"}
        ahead = {pid for pid, r in recs.items() if r.round > round_idx and pid != self.peer_id
                 and pid not in distrusted}
        return expected, ahead

    async def moved_past(self, round_idx: int) -> set[str]:
        """Peers whose records say they are already past `round_idx` (their declarations are stale)."""
        try:
            return {pid for pid, r in (await self.records()).items() if r.round > round_idx}
        except AveragingError:
            return set()

    # ---- matchmaking declarations ------------------------------------------------------------------
    def _key(self, round_idx: int, attempt: int, waiting: bool, level: int) -> str:
        if waiting:
            return waiting_key(self.swarm_id, round_idx)
        return matchmaking_key(self.swarm_id, round_idx, attempt, level)

    async def declare(self, decl: Declaration, round_idx: int, attempt: int, waiting: bool, ttl: float,
                      level: int = 1) -> None:
        assert self.t.dht is not None
        await self.t.dht_call(self.t.dht.store(
            self._key(round_idx, attempt, waiting, level), decl.to_value(), get_dht_time() + ttl,
            subkey=owned_subkey(self.t.validator, self.peer_id), return_future=True))

    async def declared(self, round_idx: int, attempt: int, waiting: bool, level: int = 1) -> dict[str, Declaration]:
        assert self.t.dht is not None
        result = await self.t.dht_call(self.t.dht.get(self._key(round_idx, attempt, waiting, level), latest=True,
                                                      return_future=True))
        out = {}
        for subkey, value, _ in entries(result):
            d = Declaration.parse(subkey, value)
            if d is not None:
                out[d.peer_id] = d
        return out

    # ---- deny records -----------------------------------------------------------------------------
    def deny(self, member: str, round_idx: int, verdict: SpanVerdict, evidence: dict[str, Any]) -> None:
        """Refuse `member` ourselves from now on and publish a signed deny record (in the background)."""
        ttl = self.spec.verify.deny_ttl
        self._own_denies[member] = time.time() + ttl
        self.denied.add(member)
        distance = verdict.distance if verdict.distance is None or math.isfinite(verdict.distance) else "inf"
        record = build_deny_record(
            self.identity, swarm_id=self.swarm_id, denied=member, round_idx=round_idx, reason=verdict.reason,
            evidence={"mode": verdict.mode, "distance": distance, "tolerance": self.spec.verify.tolerance,
                      **evidence}, ttl=ttl)

        async def store() -> None:
            assert self.t.dht is not None
            try:
                await self.t.dht_call(self.t.dht.store(
                    deny_key(self.swarm_id), encode_record(record), get_dht_time() + ttl,
                    subkey=owned_subkey(self.t.validator, member), return_future=True))
                logger.warning("[%s] published a deny record against %s for %.0f s", self.peer_id[-8:],
                               member[-8:], ttl)
            except AveragingError as e:  # we still refuse it ourselves; others may catch it themselves
                logger.warning("[%s] could not publish the deny record against %s: %s", self.peer_id[-8:],
                               member[-8:], e)

        asyncio.ensure_future(store())

    async def refresh_denied(self, round_idx: int) -> set[str]:
        """Peers to leave out this round: denied by verify.deny_quorum issuers in the DHT, or by us."""
        now = time.time()
        self._own_denies = {p: t for p, t in self._own_denies.items() if t > now}
        by_dht: dict[str, list[str]] = {}
        try:
            assert self.t.dht is not None
            result = await self.t.dht_call(self.t.dht.get(deny_key(self.swarm_id), latest=True, return_future=True))
            v = self.spec.verify
            by_dht = denied_from_values([value for _, value, _ in entries(result)], swarm_id=self.swarm_id,
                                        max_ttl=v.deny_ttl, quorum=v.deny_quorum, now=now)
        except AveragingError as e:  # a DHT hiccup: keep last round's view
            logger.info("could not read deny records: %s", e)
            by_dht = {p: [] for p in self.denied}
        self.denied = set(by_dht) | set(self._own_denies)
        if self.peer_id in self.denied:
            logger.warning("[%s] round %d: this peer is denied by %s: others will not average with it",
                           self.peer_id[-8:], round_idx, ", ".join(i[-8:] for i in by_dht.get(self.peer_id, [])))
        others = sorted(self.denied - {self.peer_id})
        if others:
            logger.info("[%s] round %d: leaving out denied peer(s) %s", self.peer_id[-8:], round_idx,
                        ", ".join(p[-8:] for p in others))
        return set(others)
