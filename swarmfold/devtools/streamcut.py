"""Reproduce "result streams cut off mid-message" with two real libp2p daemons.

Two hivemind `P2P` instances (each runs its own p2pd, the daemon swarmfold uses) talk over
a stream; optionally every byte between them crosses `devtools/linkemu.py`. The answering
side reads a small request and sends one large framed answer (seeded random bytes), then
ends the stream in one of two ways:

- `close`: closes its end at once (what every handler did before wire.finish);
- `finish`: `wire.finish(reader, writer, timeout)`: waits until the caller has closed its end.

The caller may also keep sending (`upload` bytes after its request, which the answerer never
reads), as a member whose part a reducer stopped reading does: it streams its chunks while it
reads the result. It reads the answer with `wire.recv`, stops sending, closes, and the trial
records whether the bytes arrived whole (sha256 against the sent ones) or how the stream ended. docs/swarm.md
("Streams cut off mid-message") explains the daemon's side; scripts/stream_cut.py runs a
measurement and writes JSON; tests/test_wire_streams.py asserts the `finish` case.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import Any

from hivemind.p2p import P2P, PeerID

from swarmfold.averaging import wire
from swarmfold.averaging.hivemind_adapter import connect
from swarmfold.devtools.linkemu import LinkEmulator, LinkSpec

MODES = ("close", "finish")
PROTO = "/swarmfold-streamcut/{mode}"
REQUEST_BYTES = 1 << 10


def payload(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


@dataclass
class Trial:
    mode: str
    seed: int
    size: int
    outcome: str  # "whole", "cut" (ended mid-message), "lost" (no answer at all), "corrupt"
    received: int  # bytes of the answer's frame the caller read before the end
    error: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Pair:
    """An answering daemon and a calling daemon, connected (through the emulator, if one is given)."""

    def __init__(self, answerer: P2P, caller: P2P, finish_timeout: float):
        self.answerer, self.caller = answerer, caller
        self.finish_timeout = finish_timeout
        self.answered: dict[str, int] = {m: 0 for m in MODES}

    async def serve(self) -> None:
        for mode in MODES:
            await self.answerer.add_binary_stream_handler(PROTO.format(mode=mode), self._handler(mode))

    def _handler(self, mode: str) -> Any:
        async def handle(_info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                msg, _ = await wire.recv(reader, REQUEST_BYTES)
                seed, size = wire.field(msg, "seed", int), wire.field(msg, "size", int)
                await wire.send(writer, {"data": payload(seed, size)})
                self.answered[mode] += 1
            finally:
                if mode == "finish":
                    await wire.finish(reader, writer, self.finish_timeout)
                else:
                    wire.close(writer)
        return handle

    async def trial(self, mode: str, seed: int, size: int, timeout: float, upload: int = 0) -> Trial:
        received = 0

        def progress(done: int, _total: int) -> None:
            nonlocal received
            received = done

        t0 = time.monotonic()
        _, reader, writer = await self.caller.call_binary_stream_handler(self.answerer.peer_id,
                                                                          PROTO.format(mode=mode))
        outcome, error = "whole", ""
        sending: asyncio.Future[None] | None = None
        try:
            await wire.send(writer, {"seed": seed, "size": size})
            if upload:
                sending = asyncio.ensure_future(_send_upload(writer, upload))
            reply, _ = await asyncio.wait_for(wire.recv(reader, size + REQUEST_BYTES, progress), timeout)
            data = reply.get("data")
            if not isinstance(data, bytes) or hashlib.sha256(data).digest() != hashlib.sha256(payload(seed, size)).digest():
                outcome, error = "corrupt", "the bytes differ from the ones sent"
        except (wire.WireError, ConnectionError, OSError, TimeoutError) as e:
            outcome = "cut" if received else "lost"
            error = f"{type(e).__name__}: {e}"
        finally:
            if sending is not None:
                sending.cancel()
                await asyncio.gather(sending, return_exceptions=True)
            wire.close(writer)
        return Trial(mode, seed, size, outcome, received, error, round(time.monotonic() - t0, 3))


async def _send_upload(writer: asyncio.StreamWriter, n: int) -> None:
    piece = bytes(1 << 16)
    while n > 0:
        writer.write(piece[:n])
        n -= len(piece)
        await writer.drain()


@asynccontextmanager
async def pair(link: str | None, *, finish_timeout: float = 30.0) -> AsyncIterator[tuple[Pair, LinkEmulator | None]]:
    """Two daemons; with `link` (a LinkSpec string, "" for loopback speed), every connection between
    them crosses a link emulator: each listens on its real port and announces only the emulator's."""
    emu = None
    if link is not None:
        emu = LinkEmulator(LinkSpec.parse(link))
        nodes = [emu.add_node("answerer"), emu.add_node("caller")]
        emu.start()
        kw = [{"host_maddrs": [n.host_maddr], "announce_maddrs": [n.announce_maddr]} for n in nodes]
    else:
        kw = [{"host_maddrs": ["/ip4/127.0.0.1/tcp/0"]}] * 2
    p2ps: list[P2P] = []
    try:
        for k in kw:
            p2ps.append(await P2P.create(**k))
        answerer, caller = p2ps
        maddrs = [str(m) for m in await answerer.get_visible_maddrs()]
        if emu is not None:  # dial the emulator's address for the answerer, never its real one
            maddrs = [f"{emu.nodes[0].announce_maddr}/p2p/{answerer.peer_id}"]
        await connect(caller, PeerID.from_base58(str(answerer.peer_id)), maddrs)
        p = Pair(answerer, caller, finish_timeout)
        await p.serve()
        yield p, emu
    finally:
        for p2p in p2ps:
            await p2p.shutdown()
        if emu is not None:
            emu.close()
