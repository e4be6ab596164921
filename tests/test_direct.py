"""Direct streams (averaging/direct.py): the record layer, the offer and its one-time ticket, the fall
back to libp2p, and a live all-reduce between real peers that carries its chunks on them, bit for bit
what the libp2p path gives."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import fast_spec
from swarm_helpers import connected_swarms

from swarmfold.averaging import direct, wire
from swarmfold.averaging.direct import (
    MAGIC,
    MAX_RECORD,
    MAX_TICKETS_PER_PEER,
    DirectInfo,
    DirectStreamError,
    DirectStreams,
    SealedReader,
    SealedWriter,
    parse_addr,
)
from swarmfold.averaging.protocol import DIRECT

KEY = b"k" * 32
BIG = bytes(range(256)) * (3 * MAX_RECORD // 256 + 7)  # three full records and a short one


# ---- the record layer ----------------------------------------------------------------------------------

async def _sealed_pair(key_w: bytes = KEY, key_r: bytes = KEY
                       ) -> tuple[SealedWriter, SealedReader, asyncio.StreamReader, asyncio.StreamWriter]:
    """A sealed writer on one end of a real socket pair, a sealed reader on the other, and the raw ends."""
    a, b = socket.socketpair()
    ra, wa = await asyncio.open_connection(sock=a, limit=8 << 20)
    rb, wb = await asyncio.open_connection(sock=b, limit=8 << 20)
    return SealedWriter(wa, key_w), SealedReader(rb, key_r), ra, wb


async def _raw(messages: Callable[[SealedWriter], Awaitable[None]]) -> bytes:
    """The bytes that `messages` puts on the wire, sealed."""
    w, _, _, _ = await _sealed_pair()
    captured = bytearray()

    class Tap:
        transport = None

        def write(self, data: bytes | memoryview) -> None:
            captured.extend(data)

    w._w = Tap()  # type: ignore[assignment]
    await messages(w)
    return bytes(captured)


async def _read_raw(raw: bytes, key: bytes = KEY) -> tuple[dict[str, Any], int]:
    reader = asyncio.StreamReader(limit=8 << 20)
    reader.feed_data(raw)
    reader.feed_eof()
    return await wire.recv(SealedReader(reader, key), 1 << 24)  # type: ignore[arg-type]


async def _send_big(w: SealedWriter) -> None:
    w.write(wire.pack({"kind": "chunk", "k": 0, "data": BIG}))


def test_messages_cross_sealed_streams_whole_and_encrypted() -> None:
    async def run() -> None:
        w, r, _, raw_w = await _sealed_pair()
        await wire.send(w, {"kind": "header", "n": 1})
        await wire.send_chunk(w, 0, memoryview(BIG))
        w.close()
        assert (await wire.recv(r, 1 << 24))[0] == {"kind": "header", "n": 1}
        frame, n = await wire.recv(r, 1 << 24)
        assert frame["data"] == BIG and n == wire.chunk_frame_size(0, len(BIG))
        assert await r.read(10) == b"", "a clean end of the stream reads as EOF"
        assert BIG[:4096] not in await _raw(_send_big), "the payload does not travel in the clear"
        with pytest.raises(asyncio.IncompleteReadError):
            await r.readexactly(1)
        raw_w.close()
    asyncio.run(run())


@pytest.mark.parametrize("change", ["flip a payload byte", "flip a tag byte", "drop a record", "repeat a record",
                                    "swap two records", "cut inside a record", "other direction's key"])
def test_a_record_changed_in_transit_ends_the_stream(change: str) -> None:
    raw = asyncio.run(_raw(_send_big))
    size = 4 + MAX_RECORD + direct.TAG_BYTES  # length, sealed payload, tag
    records = [raw[i:i + size] for i in range(0, len(raw), size)]
    assert len(records) == 4
    key = KEY
    if change == "flip a payload byte":
        raw = raw[:5000] + bytes([raw[5000] ^ 1]) + raw[5001:]
    elif change == "flip a tag byte":
        raw = raw[:size - 3] + bytes([raw[size - 3] ^ 1]) + raw[size - 2:]
    elif change == "drop a record":
        raw = b"".join(records[:1] + records[2:])
    elif change == "repeat a record":
        raw = b"".join(records[:2] + records[1:])
    elif change == "swap two records":
        raw = b"".join([records[1], records[0], *records[2:]])
    elif change == "cut inside a record":
        raw = raw[:size + 100]
    else:
        key = b"K" * 32
    with pytest.raises(DirectStreamError):
        asyncio.run(_read_raw(raw, key))
    assert asyncio.run(_read_raw(asyncio.run(_raw(_send_big))))[0]["data"] == BIG, "unchanged, it reads back"


def test_a_record_longer_than_the_limit_is_refused_before_it_is_read() -> None:
    head = (MAX_RECORD + direct.TAG_BYTES + 1).to_bytes(4, "big") + b"\0" * 64
    with pytest.raises(DirectStreamError, match="record of"):
        asyncio.run(_read_raw(head))


@pytest.mark.parametrize("text", ["1.2.3.4", "host:80", "1.2.3.4:0", "1.2.3.4:70000", "example.org:80", ""])
def test_bad_direct_addresses_are_refused_by_name(text: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT|IP address"):
        parse_addr(text)
    assert parse_addr("[::1]:9") == ("::1", 9) and parse_addr("10.0.0.1:31340") == ("10.0.0.1", 31340)


# ---- the offer, the ticket and the fall back: two DirectStreams on 127.0.0.1, offers answered in-process --

class _Pair:
    """A server and a client DirectStreams on real sockets; the client's libp2p request for the offer is
    answered by the server's handler in-process (the requester named as `asker`)."""

    def __init__(self, *, announce: list[str] | None = None, listen: bool = True):
        self.server = DirectStreams("server-id", self._no_request, listen=("127.0.0.1", 0) if listen else None,
                                    announce=announce or [], timeout=5.0)
        self.client = DirectStreams("client-id", self._ask, listen=None, announce=[], timeout=5.0)
        self.asker = "client-id"
        self.offers = 0
        self.served: list[tuple[str, bytes]] = []

    async def _no_request(self, *a: Any, **k: Any) -> Any:
        raise AssertionError("the server asks for nothing")

    async def _ask(self, peer: str, proto: str, msg: dict[str, Any], *, timeout: float
                   ) -> tuple[dict[str, Any], int, int]:
        assert peer == "server-id" and proto == DIRECT
        self.offers += 1
        req = asyncio.StreamReader()
        req.feed_data(wire.pack(msg))
        req.feed_eof()
        out = _Collect()
        await self.server.on_offer(DirectInfo(self.asker), req, out)  # type: ignore[arg-type]
        reply = asyncio.StreamReader()
        reply.feed_data(bytes(out.buf))
        reply.feed_eof()
        answer, n = await wire.recv(reply, 1 << 20)
        return answer, 0, n

    async def offer(self, proto: str = "proto/bulk") -> dict[str, Any]:
        """What the server answers a DirectRequest for `proto` from `asker`."""
        raw, _, _ = await self._ask("server-id", DIRECT, {"kind": "direct_request", "proto": proto}, timeout=5)
        return raw

    async def echo(self, info: Any, reader: Any, writer: Any) -> None:
        msg, _ = await wire.recv(reader, 1 << 24)
        self.served.append((info.peer_id, msg["data"]))
        await wire.send(writer, {"kind": "echo", "data": msg["data"]})
        await wire.finish(reader, writer, 5.0)

    async def start(self) -> None:
        await self.server.start({"proto/bulk": self.echo}, hosts=["127.0.0.1"])

    async def exchange(self, data: bytes) -> bytes | None:
        pair = await self.client.open("server-id", "proto/bulk")
        if pair is None:
            return None
        reader, writer = pair
        await wire.send(writer, {"kind": "x", "data": data})
        reply, _ = await wire.recv(reader, 1 << 24)
        writer.close()
        return reply["data"]


class _Collect:
    def __init__(self) -> None:
        self.buf = bytearray()

    def write(self, data: bytes) -> None:
        self.buf += data

    async def drain(self) -> None:
        return None

    def close(self) -> None:
        return None


async def _dial(addr: str, hello: bytes, *, accepted: bool = False) -> bytes:
    """Connect to a direct server and send `hello`: what it answers before it closes, or (`accepted`) its
    acknowledgement record (it then waits for the handler's request)."""
    host, port = parse_addr(addr)
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(hello)
    await writer.drain()
    try:
        if accepted:
            return await asyncio.wait_for(reader.readexactly(4 + len(direct.ACK) + direct.TAG_BYTES), 5.0)
        return await asyncio.wait_for(reader.read(), 5.0)
    finally:
        writer.close()


def _with_pair(body: Callable[[_Pair], Awaitable[None]], **kw: Any) -> None:
    """Start a _Pair(**kw), run `body` on it, and close its server however the body ends."""
    async def run() -> None:
        p = _Pair(**kw)
        await p.start()
        try:
            await body(p)
        finally:
            await p.server.close()
    asyncio.run(run())


def test_a_direct_stream_serves_the_handler_as_the_peer_that_asked_for_it() -> None:
    async def body(p: _Pair) -> None:
        assert await p.exchange(BIG) == BIG
        assert p.served == [("client-id", BIG)], "the handler knows the caller by its libp2p-authenticated id"
        assert p.client.opened == 1 and p.client.fell_back == 0
        assert p.server.addrs == [f"127.0.0.1:{p.server._server.sockets[0].getsockname()[1]}"]  # type: ignore
    _with_pair(body)


def test_a_ticket_is_good_for_one_connection_and_strangers_get_nothing() -> None:
    async def body(p: _Pair) -> None:
        raw = await p.offer()
        ticket, addr = raw["ticket"], raw["addrs"][0]
        assert await _dial(addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") == b"", "not a direct stream: closed, no answer"
        assert await _dial(addr, MAGIC + b"\0" * 16) == b"", "an unknown ticket: closed, no answer"
        first = await _dial(addr, MAGIC + ticket, accepted=True)
        assert first.startswith((len(direct.ACK) + direct.TAG_BYTES).to_bytes(4, "big")), \
            "the ticket's first use is acknowledged"
        assert await _dial(addr, MAGIC + ticket) == b"", "its second use is refused"
        raw = await p.offer()
        for t in p.server._tickets.values():
            t.expires = time.monotonic() - 1
        assert await _dial(raw["addrs"][0], MAGIC + raw["ticket"]) == b"", "an expired ticket is refused"
        assert await p.exchange(b"still serving") == b"still serving"
    _with_pair(body)


def test_a_peer_asking_for_offers_without_end_holds_a_bounded_number_of_tickets() -> None:
    async def body(p: _Pair) -> None:
        p.asker = "honest"
        await p.offer()
        p.asker = "flooder"
        for _ in range(10 * MAX_TICKETS_PER_PEER):
            await p.offer()
        owners = [t.peer for t in p.server._tickets.values()]
        assert owners.count("flooder") == MAX_TICKETS_PER_PEER and owners.count("honest") == 1
        assert (await p.offer("other"))["addrs"] == [], "a protocol that does not travel directly gets no offer"
    _with_pair(body)


def test_an_unreachable_offer_falls_back_to_libp2p_and_is_not_retried_at_once() -> None:
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"

    async def body(p: _Pair) -> None:
        assert await p.exchange(b"x") is None
        assert p.client.fell_back == 1 and p.offers == 1
        assert await p.exchange(b"x") is None
        assert p.offers == 1, "a peer whose direct path failed is not asked again for RETRY_AFTER"
    _with_pair(body, announce=[closed])


def test_a_peer_that_libp2p_cannot_reach_is_asked_again_soon(monkeypatch: pytest.MonkeyPatch) -> None:
    """No offer because libp2p itself failed (the peer is restarting, or too old to know offers): that is
    not a failed direct path, and the next exchange asks again once ASK_AGAIN_AFTER has passed."""
    from types import SimpleNamespace

    from swarmfold.averaging.protocol import AveragingError

    clock = [1000.0]
    monkeypatch.setattr(direct, "time", SimpleNamespace(monotonic=lambda: clock[0]))

    async def unreachable(*a: Any, **k: Any) -> Any:
        raise AveragingError("cannot reach server-id")

    async def body(p: _Pair) -> None:
        p.client._request = unreachable
        assert await p.exchange(b"x") is None and p.client.fell_back == 0
        p.client._request = p._ask
        assert await p.exchange(b"x") is None and p.offers == 0, "not asked again at once"
        clock[0] += direct.ASK_AGAIN_AFTER + 1
        assert await p.exchange(b"again") == b"again", "asked again after ASK_AGAIN_AFTER, well before RETRY_AFTER"
    _with_pair(body)


def test_a_data_port_that_is_taken_leaves_the_peer_running_through_libp2p(caplog: pytest.LogCaptureFixture
                                                                            ) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        async def run() -> None:
            streams = DirectStreams("p", _Pair()._no_request, listen=("127.0.0.1", port), announce=[], timeout=5.0)
            await streams.start({"proto/bulk": _Pair().echo}, hosts=["127.0.0.1"])
            assert streams.addrs == [] and streams._server is None, "it offers nothing, and runs on"
            await streams.close()
        asyncio.run(run())
    assert f"cannot listen for direct streams on 127.0.0.1:{port}" in caplog.text and "--data-port" in caplog.text


def test_a_peer_that_accepts_no_direct_streams_offers_none() -> None:
    async def body(p: _Pair) -> None:
        assert await p.exchange(b"x") is None and p.client.fell_back == 0 and p.server.addrs == []
    _with_pair(body, listen=False)


# ---- a live all-reduce between real peers ----------------------------------------------------------------

def _average_both(swarms: list[Any], round_idx: int) -> list[str]:
    """Both peers average one random Δ each (the same inputs for every call); the sha256 of each result."""
    from swarmfold.averaging.base import AverageRequest

    numel = 3 * MAX_RECORD // 4 + 12345  # several chunks and records per span
    results: list[Any] = [None] * len(swarms)

    def go(i: int) -> None:
        delta = torch.randn(numel, generator=torch.Generator().manual_seed(100 + i))
        results[i] = swarms[i].average(AverageRequest(round=round_idx, delta=delta, weight=1000.0 + i,
                                                      model_sha256="b" * 64, steps=5))
    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(swarms))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(r is not None and r.status == "committed" for r in results), [r and r.reason for r in results]
    return [hashlib.sha256(r.aggregate.numpy().tobytes()).hexdigest() for r in results]


@pytest.mark.slow
def test_a_live_all_reduce_rides_direct_streams_with_the_bits_of_libp2p(tmp_path: Path) -> None:
    net = {"min_group_size": 2, "group_size": 2, "matchmaking_timeout": 10.0, "join_timeout": 5.0}
    digests = {}
    for direct_on in (True, False):
        spec = fast_spec(averaging=net, network={"direct_streams": direct_on})
        with connected_swarms(spec, tmp_path, ["a", "b"]) as swarms:  # the same peers both times
            digests[direct_on] = _average_both(swarms, 0)
            opened = [s.transport.direct.opened for s in swarms]
            fell_back = [s.transport.direct.fell_back for s in swarms]
        assert len(set(digests[direct_on])) == 1, "every member holds the same aggregate"
        assert fell_back == [0, 0]
        assert opened == ([1, 1] if direct_on else [0, 0]), "each sends its span to the other reducer directly"
    assert digests[True] == digests[False], "the direct path carries the same bits as libp2p"


def test_offers_name_the_listen_ip_or_what_is_announced_never_a_bypass_of_announced_addresses(tmp_path: Path
                                                                                             ) -> None:
    """A peer behind an announced address (a port forward, an emulated WAN) offers only --announce-data:
    offering its real listen address would let streams bypass the path its libp2p addresses go through."""
    from swarmfold.averaging.identity import load_or_create_identity
    from swarmfold.averaging.timeouts import RoundTimeouts
    from swarmfold.averaging.transport import Transport

    spec = fast_spec()
    ident = load_or_create_identity(tmp_path / "id.key")

    def hosts(**kw: Any) -> list[str]:
        t = Transport(spec, ident, RoundTimeouts.from_spec(spec), **kw)
        t.maddrs = ["/ip4/127.0.0.1/tcp/5/p2p/x", "/ip4/10.1.2.3/tcp/5/p2p/x"]
        t.loop.close()  # never started
        return t._direct_hosts()
    assert hosts(host_maddrs=["/ip4/127.0.0.1/tcp/0"]) == ["127.0.0.1"]
    assert hosts(host_maddrs=["/ip4/0.0.0.0/tcp/0"]) == ["10.1.2.3", "127.0.0.1"], "reachable ones first"
    assert hosts(host_maddrs=["/ip4/127.0.0.1/tcp/0"], announce_maddrs=["/ip4/127.0.0.1/tcp/9"]) == []
    no_direct = Transport(spec.replace(network={"direct_streams": False}), ident, RoundTimeouts.from_spec(spec))
    no_direct.loop.close()
    assert no_direct.direct._listen is None
