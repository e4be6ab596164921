"""State sync on its own: the chunked answer between a real server and a real joiner over a socket pair
(real asyncio streams, no P2P daemon), checked bit for bit, by its progress, by its memory, and against
servers that lie or break off. The two-DHT test in test_swarm.py runs the same code over libp2p."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import torch
from conftest import fast_spec

from swarmfold.averaging import statesync, wire
from swarmfold.averaging.messages import StateHeader, StateRefusal
from swarmfold.averaging.outer import outer_state_sha256
from swarmfold.averaging.protocol import StateSyncError
from swarmfold.averaging.records import PeerRecord
from swarmfold.averaging.statesync import StateSync, state_chunks
from swarmfold.averaging.timeouts import RoundTimeouts
from swarmfold.averaging.transport import SMALL_MESSAGE

SPEC = fast_spec(network={"state_sync_timeout": 2.0})
Handler = Callable[[Any, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class _Info:
    peer_id = "joiner"


class PairNet:
    """A `Net` whose streams are socket pairs to in-process handlers, one per source peer id."""

    peer_id = "joiner"

    def __init__(self, handlers: dict[str, Handler]):
        self.handlers = handlers
        self.served: list[asyncio.Task] = []

    async def open(self, peer: str, proto: str, maddrs: list[str] | None = None
                   ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        mine, theirs = socket.socketpair()
        reader, writer = await asyncio.open_connection(sock=theirs)
        self.served.append(asyncio.ensure_future(self.handlers[peer](_Info(), reader, writer)))
        return await asyncio.open_connection(sock=mine)

    async def request(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("state sync opens its own stream")


def _record(peer: str, round_idx: int, model_sha: str, outer_sha: str) -> PeerRecord:
    return PeerRecord(peer_id=peer, round=round_idx, model_sha256=model_sha, outer_sha256=outer_sha,
                      spec_hash=SPEC.spec_hash, client_mode=False, maddrs=[], state="training")


def _server() -> StateSync:
    return StateSync(PairNet({}), SPEC, RoundTimeouts.from_spec(SPEC))


def _download(handlers: dict[str, Handler], records: list[PeerRecord], numel: int,
              on_progress: Callable[[int, int], None] | None = None) -> statesync.SyncedState:
    async def go() -> statesync.SyncedState:
        net = PairNet(handlers)
        joiner = StateSync(net, SPEC, RoundTimeouts.from_spec(SPEC))
        try:
            return await joiner.download(records, numel, on_progress)
        finally:
            for t in net.served:
                t.cancel()
            await asyncio.gather(*net.served, return_exceptions=True)
    return asyncio.run(go())


def _state(numel: int, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(numel, generator=g), {"momentum": torch.randn(numel, generator=g)}


def test_chunks_cover_every_tensor_once_in_order() -> None:
    assert state_chunks(10, 2, 16) == [(0, 0, 16), (0, 16, 32), (0, 32, 40), (1, 0, 16), (1, 16, 32), (1, 32, 40)]
    assert state_chunks(4, 1, 16) == [(0, 0, 16)]
    for numel, tensors, size in [(1, 1, 4), (1000, 3, 400), (1001, 2, 4096)]:
        chunks = state_chunks(numel, tensors, size)
        for t in range(tensors):
            spans = [(lo, hi) for u, lo, hi in chunks if u == t]
            assert spans[0][0] == 0 and spans[-1][1] == numel * 4
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))


def test_a_state_streams_in_chunks_bit_for_bit_with_exact_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(statesync, "STATE_CHUNK_BYTES", 4096)
    numel = 5000  # 20,000 bytes a tensor: 4 whole chunks and a short one each
    theta, outer = _state(numel)
    server = _server()
    model_sha, outer_sha = server.serve(3, theta, outer)
    seen: list[tuple[int, int]] = []
    got = _download({"a": server.on_state}, [_record("a", 3, model_sha, outer_sha)], numel,
                    lambda d, t: seen.append((d, t)))
    assert got.round == 3 and got.source == "a" and got.model_sha256 == model_sha
    assert torch.equal(got.theta, theta) and list(got.outer) == ["momentum"]
    assert torch.equal(got.outer["momentum"], outer["momentum"])
    assert hashlib.sha256(got.theta.numpy().tobytes()).hexdigest() == model_sha
    n_chunks = len(state_chunks(numel, 2, 4096))
    done = [d for d, _ in seen]
    total = seen[-1][1]
    assert len(seen) == 1 + n_chunks and done == sorted(done) and done[-1] == total
    assert {t for _, t in seen} == {total}
    header = len(wire.pack(StateHeader(round=3, model_sha256=model_sha, outer_sha256=outer_sha, numel=numel,
                                       outer_names=("momentum",), chunk_bytes=4096).to_wire()))
    assert done[0] == header
    assert total == header + sum(wire.chunk_frame_size(k, hi - lo)
                                 for k, (_, lo, hi) in enumerate(state_chunks(numel, 2, 4096)))


def test_neither_side_buffers_more_than_a_few_chunks_of_a_large_state() -> None:
    """128 MiB of weights move with a Python-side peak of a few 4 MiB chunks, whatever the state's size
    (the tensors themselves are torch's, which tracemalloc does not see); one whole-answer message
    cost over 2 x 128 MiB here. The chunks in flight: the joiner's stream buffer (up to 2 chunks), the
    frame it reads and that frame's unpacked data (1 each), the server's write buffer (up to 2)."""
    numel = 32 << 20
    theta = torch.arange(numel, dtype=torch.float32)
    server = _server()
    model_sha, outer_sha = server.serve(1, theta, {})
    tracemalloc.start()
    try:
        got = _download({"a": server.on_state}, [_record("a", 1, model_sha, outer_sha)], numel)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert torch.equal(got.theta, theta)
    assert peak < 8 * statesync.STATE_CHUNK_BYTES, f"peak {peak / 2**20:.1f} MiB"


def test_a_state_changed_after_serve_is_refused_and_the_next_source_serves() -> None:
    numel = 3000
    theta, outer = _state(numel)
    liar, honest = _server(), _server()
    model_sha, outer_sha = liar.serve(2, theta.clone(), outer)
    honest.serve(2, theta, outer)
    assert liar._served is not None
    liar._served.theta.add_(1.0)  # served by reference: an in-place change shows in what it sends
    records = [_record("liar", 2, model_sha, outer_sha), _record("honest", 2, model_sha, outer_sha)]
    got = _download({"liar": liar.on_state, "honest": honest.on_state}, records, numel)
    assert got.source == "honest" and torch.equal(got.theta, theta)
    with pytest.raises(StateSyncError, match="liar: served weights do not match the model hash"):
        _download({"liar": liar.on_state}, records[:1], numel)


# ---- hostile or broken servers: each is refused by name, and nothing is adopted --------------------------
NUMEL, CHUNK = 3000, 4096
THETA, OUTER = _state(NUMEL, seed=1)
MODEL_SHA = hashlib.sha256(THETA.numpy().tobytes()).hexdigest()
OUTER_SHA = outer_state_sha256(OUTER)


def _header(**over: Any) -> dict[str, Any]:
    h = StateHeader(round=4, model_sha256=MODEL_SHA, outer_sha256=OUTER_SHA, numel=NUMEL,
                    outer_names=("momentum",), chunk_bytes=CHUNK).to_wire()
    h.update(over)
    return h


def _frames(theta: torch.Tensor = THETA, outer: torch.Tensor = OUTER["momentum"]) -> list[tuple[int, bytes]]:
    data = [theta.numpy().tobytes(), outer.numpy().tobytes()]
    return [(k, data[t][lo:hi]) for k, (t, lo, hi) in enumerate(state_chunks(NUMEL, 2, CHUNK))]


def _flipped(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t[NUMEL // 2] = -t[NUMEL // 2] + 1.0
    return t


HOSTILE: dict[str, tuple[dict[str, Any] | None, list[tuple[int, bytes]] | None, str]] = {
    # case: (header sent, chunk frames sent (None: the stream stays open, silent), error expected)
    "refusal": (StateRefusal(reason="no state to serve yet").to_wire(), [], "refused: no state to serve yet"),
    "wrong numel": (_header(numel=NUMEL + 1), _frames(), f"served weights have {NUMEL + 1} elements, expected "
                                                         f"{NUMEL}"),
    "chunk of 0 bytes": (_header(chunk_bytes=0), _frames(), "served chunks of 0 bytes"),
    "huge chunks": (_header(chunk_bytes=1 << 30), _frames(), "served chunks of 1073741824 bytes"),
    "unaligned chunks": (_header(chunk_bytes=4095), _frames(), "multiple of 4"),
    "many outer tensors": (_header(outer_names=[f"m{i:02d}" for i in range(17)]), _frames(), "names"),
    "duplicate names": (_header(outer_names=["m", "m"]), _frames(), "names"),
    "unknown field": (_header(extra=1), _frames(), "malformed state answer: .*unknown field"),
    "another model hash": (_header(model_sha256="0" * 64), _frames(), "do not match the model hash"),
    "chunks out of order": (_header(), _frames()[1:], "expected state chunk 0, got 'chunk' 1"),
    "short chunk": (_header(), [(0, _frames()[0][1][:-4]), *_frames()[1:]], "state chunk 0 carries 4092 bytes, "
                                                                            "expected 4096"),
    "flipped weights": (_header(), _frames(theta=_flipped(THETA)), "served weights do not match the model hash"),
    "flipped momentum": (_header(), _frames(outer=_flipped(OUTER["momentum"])), "outer state does not match"),
    "cut off": (_header(), _frames()[:2], "closed the stream"),
    "silent": (_header(), None, "did not serve its state within 2s"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_or_broken_server_is_refused_by_name(case: str) -> None:
    header, frames, expected = HOSTILE[case]

    async def hostile(info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await wire.recv(reader, SMALL_MESSAGE)
        await wire.send(writer, header)
        if frames is None:
            await asyncio.Event().wait()  # never answers more; the joiner's bound ends it
        for k, data in frames or []:
            await wire.send_chunk(writer, k, data)
        writer.close()

    with pytest.raises(StateSyncError, match=f"no peer served the published state: .*{expected}"):
        _download({"h": hostile}, [_record("h", 4, MODEL_SHA, OUTER_SHA)], NUMEL)


def test_serve_refuses_a_state_it_could_not_stream() -> None:
    server = _server()
    with pytest.raises(ValueError, match="outer tensors of θ_r's size"):
        server.serve(1, torch.zeros(8), {"momentum": torch.zeros(4)})
    with pytest.raises(ValueError, match="float32"):
        server.serve(1, torch.zeros(8, dtype=torch.float64), {})
