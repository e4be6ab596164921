"""Direct streams: the all-reduce's bulk bytes over a plain TCP connection beside the libp2p daemon.

Through libp2p every byte crosses hivemind's daemon twice per peer (a unix socket to p2pd,
then libp2p's multiplexing and encryption over TCP). For the all-reduce's tensor chunks
that costs as much CPU as swarmfold's own work (docs/results.md, section 7). A direct
stream carries them over one TCP connection between the two peer processes instead, and
libp2p keeps what it is good at: discovery, NAT traversal and authentication.

How a member opens a direct stream to a reducer:

1. It asks the reducer, over libp2p (authenticated: each side knows the other's peer id),
   for an offer (`DirectRequest` -> `DirectOffer`): the reducer's direct addresses, a
   one-time ticket and a fresh 32-byte session key. The reducer remembers (ticket -> the
   asking peer's id, the protocol, the key) for `TICKET_TTL` seconds.
2. It dials one of the addresses and sends MAGIC + ticket. The reducer pops the ticket
   (each is good for one connection), answers with a sealed ACK, and serves the protocol's
   handler as if the stream had come through libp2p from that peer.
3. From then on every byte in both directions travels in records: a 4-byte length and the
   payload sealed with AES-256-GCM, under a key per direction derived from the session
   key, with the record's sequence number as the nonce (the construction of TLS 1.3's
   record layer). A record that was changed, dropped, replayed, reordered or reflected in
   transit fails its tag and ends the stream.

So a direct stream is as private and as authenticated as the libp2p stream it replaces:
the key came over libp2p, to the peer libp2p authenticated. AES-GCM runs at several GB/s
on a CPU with AES instructions, far below the cost of a pass through the daemon.
Anything that fails before the ACK (no offer, an old peer, an unreachable
address, a firewall) falls back to the libp2p stream, and the peer is not tried directly
again for `RETRY_AFTER` seconds; nothing on this path can fail a round that libp2p
would have carried.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import logging
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from swarmfold.averaging import wire
from swarmfold.averaging.messages import DirectOffer, DirectRequest
from swarmfold.averaging.protocol import DIRECT, AveragingError, Rejected

logger = logging.getLogger(__name__)

MAGIC = b"SFD1"  # the first bytes of a direct connection: the format's version
TICKET_BYTES = 16
KEY_BYTES = 32
TAG_BYTES = 16  # AES-GCM's tag
NONCE_BYTES = 12
MAX_RECORD = 1 << 20  # a write is cut into records of at most this many bytes
TICKET_TTL = 60.0  # seconds an offer's ticket stays good (the member dials it at once)
MAX_TICKETS = 1024  # offers outstanding at once, over all peers (the oldest is dropped)
MAX_TICKETS_PER_PEER = 32  # a peer asking for more loses its oldest (a flood costs only itself)
MAX_ADDRS = 4  # addresses an offer may carry
MAX_PENDING = 64  # connections that have not shown a ticket yet (more are closed at once: no fd exhaustion)
RETRY_AFTER = 600.0  # seconds before a peer whose direct path failed is tried directly again
DIAL_TIMEOUT = 3.0  # seconds to connect to an offered address (a firewall that drops packets never answers)
ASK_AGAIN_AFTER = 30.0  # ... or that did not answer the offer request (gone, restarting, or too old to know it)
ACK = b"ok"
BUFFER = 4 << 20  # stream reader limit and socket buffers (wire.widen): a chunk moves without stalls; asyncio
# already turns Nagle off on TCP sockets
StreamPair = tuple[Any, Any]  # (reader, writer): SealedReader/SealedWriter, or asyncio's
Handler = Callable[[Any, Any, Any], Awaitable[None]]


class DirectStreamError(ConnectionError):
    """A direct stream broke its format or failed its integrity check: it ends like a reset connection."""


# ---- the record layer -------------------------------------------------------------------------------

def _directional_keys(key: bytes) -> tuple[bytes, bytes]:
    """(caller -> server key, server -> caller key): a record cannot be reflected back to its sender."""
    return (hmac.new(key, b"swarmfold direct c2s", hashlib.sha256).digest(),
            hmac.new(key, b"swarmfold direct s2c", hashlib.sha256).digest())


def _nonce(seq: int) -> bytes:
    """A record's AES-GCM nonce: its sequence number in its direction (each direction has its own key)."""
    return seq.to_bytes(NONCE_BYTES, "big")


class SealedWriter:
    """An asyncio StreamWriter whose writes travel as AES-256-GCM records (what wire.py needs of one)."""

    def __init__(self, writer: asyncio.StreamWriter, key: bytes):
        self._w = writer
        self._aead = AESGCM(key)
        self._seq = 0
        self.transport = writer.transport

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        for pos in range(0, len(view), MAX_RECORD):
            sealed = self._aead.encrypt(_nonce(self._seq), view[pos:pos + MAX_RECORD], None)
            self._w.write(len(sealed).to_bytes(4, "big"))
            self._w.write(sealed)
            self._seq += 1

    async def drain(self) -> None:
        await self._w.drain()

    def close(self) -> None:
        self._w.close()

    def is_closing(self) -> bool:
        return self._w.is_closing()

    async def wait_closed(self) -> None:
        await self._w.wait_closed()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._w.get_extra_info(name, default)


class SealedReader:
    """An asyncio StreamReader over AES-256-GCM records: `readexactly` and `read` as asyncio's, raising
    DirectStreamError when a record fails its tag (changed, dropped, replayed, reordered, reflected) or
    the stream ends inside one."""

    def __init__(self, reader: asyncio.StreamReader, key: bytes):
        self._r = reader
        self._aead = AESGCM(key)
        self._seq = 0
        self._records: deque[bytes] = deque()  # opened records not yet read, the first from `_pos` on
        self._pos = 0
        self._size = 0  # bytes not yet read
        self._eof = False

    async def _fill(self) -> bool:
        """Read and open one record; False at a clean end of the stream."""
        if self._eof:
            return False
        try:
            head = await self._r.readexactly(4)
        except asyncio.IncompleteReadError as e:
            if e.partial:
                raise DirectStreamError("direct stream cut inside a record header") from e
            self._eof = True
            return False
        n = int.from_bytes(head, "big")
        if not TAG_BYTES < n <= MAX_RECORD + TAG_BYTES:
            raise DirectStreamError(f"direct stream record of {n} bytes (at most {MAX_RECORD + TAG_BYTES})")
        try:
            sealed = await self._r.readexactly(n)
        except asyncio.IncompleteReadError as e:
            raise DirectStreamError("direct stream cut inside a record") from e
        try:
            body = self._aead.decrypt(_nonce(self._seq), sealed, None)
        except InvalidTag as e:
            raise DirectStreamError(f"direct stream record {self._seq} failed its integrity check") from e
        self._seq += 1
        self._records.append(body)
        self._size += len(body)
        return True

    def _take(self, n: int) -> bytes:
        """The next `n` buffered bytes (n <= self._size): the record itself when it is exactly that."""
        first = self._records[0]
        if self._pos == 0 and len(first) == n:
            self._records.popleft()
            self._size -= n
            return first
        parts, need = [], n
        while need:
            first = self._records[0]
            take = min(len(first) - self._pos, need)
            parts.append(memoryview(first)[self._pos:self._pos + take])
            need -= take
            self._pos += take
            if self._pos == len(first):
                self._records.popleft()
                self._pos = 0
        self._size -= n
        return b"".join(parts)

    async def readexactly(self, n: int) -> bytes:
        while self._size < n:
            if not await self._fill():
                raise asyncio.IncompleteReadError(self._take(self._size) if self._size else b"", n)
        return self._take(n) if n else b""

    async def read(self, n: int = -1) -> bytes:
        if not self._size:
            await self._fill()
        want = self._size if n < 0 else min(n, self._size)
        return self._take(want) if want else b""


# ---- addresses -----------------------------------------------------------------------------------------

def parse_addr(text: str) -> tuple[str, int]:
    """'HOST:PORT' (an IPv4 or bracketed IPv6 literal) as (host, port); ValueError says what is wrong."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not HOST:PORT (for example 203.0.113.5:31340)")
    try:
        ipaddress.ip_address(host)
    except ValueError as e:
        raise ValueError(f"{text!r}: the host must be an IP address, not a name") from e
    return host, int(port)


def format_addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listen_host(host_maddrs: list[str]) -> str | None:
    """The IP the peer's libp2p listens on (the first /ip4/ or /ip6/ of its host multiaddrs)."""
    for maddr in host_maddrs:
        parts = maddr.split("/")
        if len(parts) > 2 and parts[1] in ("ip4", "ip6"):
            return parts[2]
    return None


@dataclass(frozen=True)
class DirectInfo:
    """What a handler gets to know of a direct stream's caller: the peer id libp2p authenticated."""

    peer_id: str


@dataclass
class _Ticket:
    peer: str
    proto: str
    key: bytes
    expires: float


# ---- both sides ------------------------------------------------------------------------------------------

class DirectStreams:
    """This peer's direct streams: the server that accepts them and the client side that opens them.

    `request(peer, proto, msg, timeout=...)` is the transport's libp2p request (for the offer);
    `protos` maps each protocol that may travel directly to its handler."""

    def __init__(self, peer_id: str, request: Callable[..., Awaitable[tuple[dict[str, Any], int, int]]], *,
                 listen: tuple[str, int] | None, announce: list[str], timeout: float):
        self.peer_id = peer_id
        self._request = request
        self._listen = listen
        self._announce = list(announce)
        self.timeout = timeout
        self.protos: dict[str, Handler] = {}
        self.addrs: list[str] = []  # what our offers carry (empty: we accept no direct streams)
        self._server: asyncio.Server | None = None
        self._tickets: OrderedDict[bytes, _Ticket] = OrderedDict()
        self._failed: dict[str, float] = {}  # peer -> when its direct path may be tried again
        self._pending = 0
        self.opened = 0  # direct streams this peer opened, and fell back from (for tests and benches)
        self.fell_back = 0

    async def start(self, protos: dict[str, Handler], hosts: list[str]) -> None:
        """Listen (if a listen address was given) and serve `protos` on direct streams. Offers carry the
        announced addresses, else `hosts` with the port we listen on (none: we offer nothing)."""
        self.protos = dict(protos)
        if self._listen is None:
            return
        host, port = self._listen
        try:
            self._server = await asyncio.start_server(self._on_connection, host, port, limit=BUFFER,
                                                      reuse_address=True)
        except OSError as e:  # the port is taken, or not ours to bind: run on, through libp2p only
            logger.warning("[%s] cannot listen for direct streams on %s (%s); this peer's all-reduce bytes "
                           "come through libp2p (slower). Free that port, or pass another --data-port (0: any "
                           "free port)", self.peer_id[-8:], format_addr(host, port), e)
            return
        real_port = self._server.sockets[0].getsockname()[1]
        self.addrs = (self._announce or [format_addr(h, real_port) for h in hosts])[:MAX_ADDRS]
        logger.info("[%s] direct streams on %s, announced as %s", self.peer_id[-8:], format_addr(host, real_port),
                    ", ".join(self.addrs) or "nothing (set --announce-data HOST:PORT)")

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):  # connections still open end with the loop
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None

    # ---- the server side --------------------------------------------------------------------------
    async def on_offer(self, info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The libp2p handler of DIRECT: answer a DirectRequest with an offer (no addresses: go through libp2p)."""
        peer = str(info.peer_id)
        try:
            msg, _ = await wire.recv(reader, 4096)
            req = DirectRequest.from_wire(msg)
            if req.proto not in self.protos or not self.addrs:
                await wire.send(writer, DirectOffer(addrs=(), ticket=b"", key=b"").to_wire())
                return
            ticket, key = secrets.token_bytes(TICKET_BYTES), secrets.token_bytes(KEY_BYTES)
            self._remember(ticket, _Ticket(peer, req.proto, key, time.monotonic() + TICKET_TTL))
            await wire.send(writer, DirectOffer(addrs=tuple(self.addrs), ticket=ticket, key=key).to_wire())
        except (wire.WireError, Rejected, ConnectionError) as e:
            logger.info("bad direct-stream request from %s: %s", peer[-8:], e)
        finally:
            await wire.finish(reader, writer, self.timeout)

    def _remember(self, ticket: bytes, t: _Ticket) -> None:
        now = time.monotonic()
        for old in [k for k, v in self._tickets.items() if v.expires < now]:
            del self._tickets[old]
        mine = [k for k, v in self._tickets.items() if v.peer == t.peer]
        for old in mine[:max(0, len(mine) - MAX_TICKETS_PER_PEER + 1)]:
            del self._tickets[old]
        while len(self._tickets) >= MAX_TICKETS:
            self._tickets.popitem(last=False)
        self._tickets[ticket] = t

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:  # shutdown with a stream open: end it quietly (transport._quiet_on_cancel)
            wire.close(writer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._pending >= MAX_PENDING:
            writer.close()
            return
        self._pending += 1
        try:
            hello = await asyncio.wait_for(reader.readexactly(len(MAGIC) + TICKET_BYTES), self.timeout)
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError, OSError):
            writer.close()
            return
        finally:
            self._pending -= 1
        t = self._tickets.pop(hello[len(MAGIC):], None) if hello.startswith(MAGIC) else None
        if t is None or t.expires < time.monotonic():
            peer = writer.get_extra_info("peername")
            logger.info("[%s] refused a direct connection from %s: %s", self.peer_id[-8:], peer,
                        "not a swarmfold direct stream" if not hello.startswith(MAGIC) else "unknown or expired ticket")
            writer.close()
            return
        wire.widen(reader, writer, BUFFER)
        c2s, s2c = _directional_keys(t.key)
        sealed_writer = SealedWriter(writer, s2c)
        sealed_writer.write(ACK)
        try:
            await sealed_writer.drain()
            await self.protos[t.proto](DirectInfo(t.peer), SealedReader(reader, c2s), sealed_writer)
        except (ConnectionError, OSError) as e:  # handlers log their own failures; this is the ACK's
            logger.info("direct stream from %s ended: %s", t.peer[-8:], e)

    # ---- the client side --------------------------------------------------------------------------
    async def open(self, peer: str, proto: str) -> StreamPair | None:
        """A direct stream to `peer`'s `proto`, or None when there is none to have (then use libp2p)."""
        if self._failed.get(peer, 0.0) > time.monotonic():
            return None
        try:
            raw, _, _ = await self._request(peer, DIRECT, DirectRequest(proto=proto).to_wire(), timeout=self.timeout)
            offer = DirectOffer.from_wire(raw)
        except (AveragingError, Rejected, wire.WireError, TimeoutError, ConnectionError, OSError) as e:
            # libp2p did not carry the offer: the libp2p stream will tell what is wrong; a restarted peer or
            # an old one that has no offers is asked again soon, not after RETRY_AFTER
            self._fail(peer, ASK_AGAIN_AFTER)
            logger.debug("no direct-stream offer from %s: %s", peer[-8:], e)
            return None
        if not offer.addrs:  # it offers no direct streams: not an error
            self._fail(peer, RETRY_AFTER)
            return None
        try:
            pair = await asyncio.wait_for(self._dial(peer, offer), self.timeout)
        except (AveragingError, TimeoutError, ConnectionError, OSError) as e:
            self._fail(peer, RETRY_AFTER)
            self.fell_back += 1
            logger.info("[%s] no direct stream to %s (%s); using libp2p, and not trying directly for %.0fs",
                        self.peer_id[-8:], peer[-8:], e, RETRY_AFTER)
            return None
        self.opened += 1
        return pair

    def _source_for(self, host: str) -> tuple[str, int] | None:
        """Dial from our own listen IP when both ends are loopback addresses (peers in a lab, each on its own
        127.x address: swarmfold.devtools.linkemu tells who dialled by the source IP); elsewhere the kernel
        picks the source, as for any outgoing connection."""
        if self._listen is None:
            return None
        mine = ipaddress.ip_address(self._listen[0])
        return (str(mine), 0) if mine.is_loopback and ipaddress.ip_address(host).is_loopback else None

    def _fail(self, peer: str, seconds: float) -> None:
        now = time.monotonic()
        self._failed = {p: t for p, t in self._failed.items() if t > now}
        self._failed[peer] = now + seconds

    async def _dial(self, peer: str, offer: DirectOffer) -> StreamPair:
        """Connect to the first address of `offer` that answers and show its ticket; AveragingError if none."""
        if len(offer.ticket) != TICKET_BYTES or len(offer.key) != KEY_BYTES:
            raise AveragingError(f"malformed direct-stream offer from {peer[-8:]}")
        errors = []
        for text in offer.addrs[:MAX_ADDRS]:
            try:
                host, port = parse_addr(text)
                reader, writer = await asyncio.wait_for(asyncio.open_connection(
                    host, port, limit=BUFFER, local_addr=self._source_for(host)), DIAL_TIMEOUT)
            except (ValueError, ConnectionError, OSError, TimeoutError) as e:
                errors.append(f"{text}: {e}")
                continue
            try:
                wire.widen(reader, writer, BUFFER)
                writer.write(MAGIC + offer.ticket)
                c2s, s2c = _directional_keys(offer.key)
                sealed_reader = SealedReader(reader, s2c)
                if await sealed_reader.readexactly(len(ACK)) != ACK:
                    raise DirectStreamError("no acknowledgement")
                return sealed_reader, SealedWriter(writer, c2s)
            except (asyncio.IncompleteReadError, ConnectionError, OSError) as e:
                writer.close()
                errors.append(f"{text}: {e or type(e).__name__}")
            except BaseException:  # cancelled (open()'s bound, shutdown): do not leave the socket open
                writer.close()
                raise
        raise AveragingError("; ".join(errors) or "no usable address in its offer")
