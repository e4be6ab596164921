"""State sync: serve θ_r and the outer state to joining peers, and download them, checked against
the hashes the source published in its record."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from swarmfold.averaging import wire
from swarmfold.averaging.messages import StateRefusal, StateReply, StateRequest
from swarmfold.averaging.outer import outer_state_sha256
from swarmfold.averaging.protocol import STATE, AveragingError, Rejected, StateSyncError
from swarmfold.averaging.records import PeerRecord
from swarmfold.averaging.timeouts import RoundTimeouts
from swarmfold.averaging.transport import SMALL_MESSAGE, Net
from swarmfold.spec import Spec

logger = logging.getLogger(__name__)


@dataclass
class ServedState:
    """What `serve` was given, held by reference (no copy of the model): θ_r and the outer state."""

    round: int
    theta: torch.Tensor
    outer: dict[str, torch.Tensor]
    model_sha256: str
    outer_sha256: str


def _raw(t: torch.Tensor) -> memoryview:
    """The float32 bytes of a contiguous CPU tensor, as a view (msgpack packs it as `bin`)."""
    return t.numpy().data.cast("B")


@dataclass(frozen=True)
class SyncedState:
    """A state downloaded from `source`, checked against the hashes it published."""

    round: int
    theta: torch.Tensor
    outer: dict[str, torch.Tensor]
    source: str
    model_sha256: str


class StateSync:
    def __init__(self, net: Net, spec: Spec, timeouts: RoundTimeouts):
        self.net = net
        self.spec = spec
        self.tt = timeouts
        self._served: ServedState | None = None

    def serve(self, round_idx: int, theta: torch.Tensor, outer: dict[str, torch.Tensor]) -> tuple[str, str]:
        """Make θ_r and the outer state available to joining peers; returns (model, outer) hashes.

        The tensors are held, not copied: at 125M parameters a copy is 500 MB kept for the whole
        round on every peer. So the caller must not change them in place afterwards. LocalPeer
        never does: each round's θ_r is a new tensor (the outer step returns one) and its outer
        state_dict() is a copy. Were one changed, a joiner would notice: it checks what it
        downloads against the hashes computed here, and tries another peer."""
        theta = theta.detach().contiguous()
        outer = {k: v.detach().contiguous() for k, v in outer.items()}
        if theta.device.type != "cpu" or any(v.device.type != "cpu" for v in outer.values()):
            raise ValueError("state sync serves CPU tensors: θ_r and the outer state live on the CPU")
        served = ServedState(round=round_idx, theta=theta, outer=outer,
                             model_sha256=hashlib.sha256(_raw(theta)).hexdigest(),
                             outer_sha256=outer_state_sha256(outer))
        self._served = served
        return served.model_sha256, served.outer_sha256

    async def on_state(self, info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            raw, _ = await wire.recv(reader, SMALL_MESSAGE)
            served = self._served
            try:
                req = StateRequest.from_wire(raw)
            except Rejected as r:
                await wire.send(writer, StateRefusal(reason=r.label).to_wire())
                return
            if req.spec_hash != self.spec.spec_hash:
                await wire.send(writer, StateRefusal(reason="spec hash mismatch").to_wire())
            elif served is None:
                await wire.send(writer, StateRefusal(reason="no state to serve yet").to_wire())
            else:
                await wire.send(writer, StateReply(round=served.round, model_sha256=served.model_sha256,
                                                   outer_sha256=served.outer_sha256,
                                                   theta=_raw(served.theta),  # type: ignore[arg-type]
                                                   outer={k: _raw(v) for k, v in served.outer.items()}  # type: ignore[misc]
                                                   ).to_wire())
        except (wire.WireError, ConnectionError) as e:
            logger.info("state request from %s failed: %s", info.peer_id, e)
        finally:
            wire.close(writer)

    async def download(self, sources: list[PeerRecord], numel: int,
                       on_progress: Callable[[int, int], None] | None = None) -> SyncedState:
        """θ_r and outer state from the first source that serves what its record published.

        `on_progress(bytes received, reply bytes)` is called as the reply arrives (progress display);
        each source tried starts again from zero."""
        errors = []
        for src in sources:
            try:
                return await self._download_from(src, numel, on_progress)
            except (AveragingError, StateSyncError, wire.WireError) as e:
                errors.append(f"{src.peer_id[-8:]}: {e}")
        raise StateSyncError("no peer served the published state: " + "; ".join(errors))

    async def _download_from(self, src: PeerRecord, numel: int,
                             on_progress: Callable[[int, int], None] | None = None) -> SyncedState:
        limit = numel * 4 * 3 + SMALL_MESSAGE
        raw, _, _ = await self.net.request(src.peer_id, STATE, StateRequest(spec_hash=self.spec.spec_hash).to_wire(),
                                           timeout=self.tt.state_sync, max_reply=limit, maddrs=src.maddrs,
                                           on_progress=on_progress)
        try:
            if raw.get("kind") == StateRefusal.KIND:
                raise StateSyncError(StateRefusal.from_wire(raw).reason)
            reply = StateReply.from_wire(raw)
        except Rejected as e:
            raise StateSyncError(f"a malformed state reply: {e}") from e
        if len(reply.theta) != numel * 4:
            raise StateSyncError(f"served weights have {len(reply.theta) // 4} elements, expected {numel}")
        if hashlib.sha256(reply.theta).hexdigest() != src.model_sha256:
            raise StateSyncError("served weights do not match the model hash the peer published")
        theta = torch.frombuffer(bytearray(reply.theta), dtype=torch.float32)
        outer = {}
        for name, raw_state in reply.outer.items():
            if len(raw_state) != numel * 4:
                raise StateSyncError(f"served outer state {name!r} is malformed")
            outer[name] = torch.frombuffer(bytearray(raw_state), dtype=torch.float32)
        if outer_state_sha256(outer) != src.outer_sha256:
            raise StateSyncError("served outer state does not match the published hash")
        return SyncedState(round=reply.round, theta=theta, outer=outer, source=src.peer_id,
                           model_sha256=src.model_sha256)
