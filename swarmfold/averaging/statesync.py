"""State sync: serve θ_r and the outer state to joining peers, and download them, checked against
the hashes the source published in its record.

The answer streams in chunk frames, as the all-reduce does: a `StateHeader` (round, hashes, numel,
the outer tensors' names, the chunk size), then θ_r and each outer tensor as float32 bytes in chunks
of `STATE_CHUNK_BYTES`. The server sends views of the tensors it was given (no copy of the model);
the joiner writes each chunk into tensors it allocated once from the header, hashing θ as it goes.
So neither side holds a second full copy of the state, nor the whole answer in one buffer: at the
base preset (113.5M parameters) a one-message answer cost about 3 transient full copies (the packed
message, the received frame, the unpacked bytes) on each side.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from swarmfold.averaging import wire
from swarmfold.averaging.messages import StateHeader, StateRefusal, StateRequest
from swarmfold.averaging.outer import outer_state_sha256
from swarmfold.averaging.protocol import (
    CHUNK_FRAME_SLACK,
    STATE,
    AveragingError,
    Rejected,
    StateSyncError,
)
from swarmfold.averaging.records import PeerRecord
from swarmfold.averaging.timeouts import RoundTimeouts
from swarmfold.averaging.transport import SMALL_MESSAGE, Net
from swarmfold.spec import Spec

logger = logging.getLogger(__name__)

STATE_CHUNK_BYTES = 4 << 20  # bytes of tensor data per chunk frame a server sends (1M float32)
MAX_STATE_CHUNK_BYTES = 64 << 20  # the largest chunk a joiner accepts: what it buffers at once
MAX_OUTER_TENSORS = 16  # outer-optimizer tensors a joiner accepts (momentum: 1)
MAX_NAME = 64  # characters of an outer tensor's name


@dataclass
class ServedState:
    """What `serve` was given, held by reference (no copy of the model): θ_r and the outer state."""

    round: int
    theta: torch.Tensor
    outer: dict[str, torch.Tensor]
    model_sha256: str
    outer_sha256: str


def _raw(t: torch.Tensor) -> memoryview:
    """The float32 bytes of a contiguous CPU tensor, as a writable view (no copy)."""
    return t.numpy().data.cast("B")


def state_chunks(numel: int, tensors: int, chunk_bytes: int) -> list[tuple[int, int, int]]:
    """The chunk frames of a state of `tensors` float32 tensors of `numel` elements each (θ first, then
    the outer tensors in name order): (tensor index, first byte, end byte), in the order they are sent."""
    size = numel * 4
    return [(t, lo, min(lo + chunk_bytes, size)) for t in range(tensors) for lo in range(0, size, chunk_bytes)]


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

    # ---- serving --------------------------------------------------------------------------------
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
        if theta.dtype != torch.float32 or any(v.dtype != torch.float32 or v.numel() != theta.numel()
                                               for v in outer.values()):
            raise ValueError("state sync serves float32 θ_r and outer tensors of θ_r's size")
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
                wire.widen(reader, writer)
                await asyncio.wait_for(self._stream(writer, served), self.tt.state_sync)
        except (wire.WireError, ConnectionError, TimeoutError) as e:
            logger.info("state request from %s failed: %s", info.peer_id, e)
        finally:  # not close(): that could reset the stream under the answer's last chunks (wire.finish)
            await wire.finish(reader, writer, self.tt.state_sync)

    async def _stream(self, writer: asyncio.StreamWriter, served: ServedState) -> None:
        """The header, then θ_r and the outer tensors in chunk frames sent from views of them."""
        names = tuple(sorted(served.outer))
        views = [_raw(served.theta), *(_raw(served.outer[n]) for n in names)]
        numel = served.theta.numel()
        await wire.send(writer, StateHeader(round=served.round, model_sha256=served.model_sha256,
                                            outer_sha256=served.outer_sha256, numel=numel, outer_names=names,
                                            chunk_bytes=STATE_CHUNK_BYTES).to_wire())
        for k, (t, lo, hi) in enumerate(state_chunks(numel, len(views), STATE_CHUNK_BYTES)):
            await wire.send_chunk(writer, k, views[t][lo:hi])

    # ---- downloading ----------------------------------------------------------------------------
    async def download(self, sources: list[PeerRecord], numel: int,
                       on_progress: Callable[[int, int], None] | None = None) -> SyncedState:
        """θ_r and outer state from the first source that serves what its record published.

        `on_progress(bytes received, answer bytes)` is called as the answer arrives (progress display);
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
        try:
            return await asyncio.wait_for(self._receive(src, numel, on_progress), self.tt.state_sync)
        except TimeoutError as e:
            raise StateSyncError(f"{src.peer_id} did not serve its state within {self.tt.state_sync:.0f}s "
                                 "(network.state_sync_timeout)") from e
        except (ConnectionError, OSError) as e:
            raise StateSyncError(f"the state download from {src.peer_id} failed: {e}") from e

    async def _receive(self, src: PeerRecord, numel: int,
                       on_progress: Callable[[int, int], None] | None) -> SyncedState:
        reader, writer = await self.net.open(src.peer_id, STATE, src.maddrs)
        try:
            wire.widen(reader, writer)
            await wire.send(writer, StateRequest(spec_hash=self.spec.spec_hash).to_wire())
            raw, got = await wire.recv(reader, SMALL_MESSAGE)
            head = _check_header(raw, src, numel)
            tensors = [torch.empty(numel, dtype=torch.float32) for _ in range(1 + len(head.outer_names))]
            views = [_raw(t) for t in tensors]
            chunks = state_chunks(numel, len(tensors), head.chunk_bytes)
            total = got + sum(wire.chunk_frame_size(k, hi - lo) for k, (_, lo, hi) in enumerate(chunks))
            if on_progress is not None:
                on_progress(got, total)
            model_hash = hashlib.sha256()
            for k, (t, lo, hi) in enumerate(chunks):
                msg, n = await wire.recv(reader, hi - lo + CHUNK_FRAME_SLACK)
                data = _chunk_data(msg, k, hi - lo)
                views[t][lo:hi] = data
                if t == 0:
                    model_hash.update(data)
                got += n
                if on_progress is not None:
                    on_progress(got, total)
        finally:
            wire.close(writer)
        if model_hash.hexdigest() != src.model_sha256:
            raise StateSyncError("served weights do not match the model hash the peer published")
        outer = dict(zip(head.outer_names, tensors[1:], strict=True))
        if outer_state_sha256(outer) != src.outer_sha256:
            raise StateSyncError("served outer state does not match the published hash")
        return SyncedState(round=head.round, theta=tensors[0], outer=outer, source=src.peer_id,
                           model_sha256=src.model_sha256)


def _check_header(raw: dict[str, Any], src: PeerRecord, numel: int) -> StateHeader:
    """The answer's header, checked before any tensor is allocated; StateSyncError naming what is wrong."""
    try:
        if raw.get("kind") == StateRefusal.KIND:
            raise StateSyncError(f"refused: {StateRefusal.from_wire(raw).reason}")
        head = StateHeader.from_wire(raw)
    except Rejected as e:
        raise StateSyncError(f"a malformed state answer: {e}") from e
    if head.numel != numel:
        raise StateSyncError(f"served weights have {head.numel} elements, expected {numel}")
    if head.model_sha256 != src.model_sha256:
        raise StateSyncError("served weights do not match the model hash the peer published")
    if head.outer_sha256 != src.outer_sha256:
        raise StateSyncError("served outer state does not match the published hash")
    if not 0 < head.chunk_bytes <= MAX_STATE_CHUNK_BYTES or head.chunk_bytes % 4:
        raise StateSyncError(f"served chunks of {head.chunk_bytes} bytes; a chunk must be a multiple of 4 "
                             f"bytes up to {MAX_STATE_CHUNK_BYTES}")
    names = head.outer_names
    if (len(names) > MAX_OUTER_TENSORS or len(set(names)) != len(names) or list(names) != sorted(names)
            or any(not 0 < len(n) <= MAX_NAME for n in names)):
        raise StateSyncError(f"served outer state names {list(names)[:MAX_OUTER_TENSORS + 1]!r} are malformed: "
                             f"at most {MAX_OUTER_TENSORS} distinct sorted names of 1 to {MAX_NAME} characters")
    return head


def _chunk_data(msg: dict[str, Any], index: int, size: int) -> bytes:
    """The data of state chunk frame `index`, which must carry exactly `size` bytes."""
    if msg.get("kind") != "chunk" or type(msg.get("k")) is not int or msg["k"] != index:
        raise StateSyncError(f"expected state chunk {index}, got {msg.get('kind')!r} {msg.get('k')!r}")
    data = msg.get("data")
    if not isinstance(data, bytes) or len(data) != size:
        got = len(data) if isinstance(data, bytes) else type(data).__name__
        raise StateSyncError(f"state chunk {index} carries {got} bytes, expected {size}")
    return data
