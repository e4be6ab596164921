"""A WAN in the lab: a user-space link emulator for peers on 127.0.0.1.

Run it beside real peers (each peer listens on its *real* port and announces the emulator's
port for it, so that every connection a peer accepts crosses the emulated network):

    python -m swarmfold.devtools.linkemu --link rtt=50ms,rate=100mbit --peers 2 --ports ports.json
    # ports.json: [{"name": "peer-0", "host_maddr": "/ip4/127.0.0.1/tcp/R0",
    #               "announce_maddr": "/ip4/127.0.0.1/tcp/A0"}, ...]
    swarmfold run ... --host-maddrs /ip4/127.0.0.1/tcp/R0 --announce-maddrs /ip4/127.0.0.1/tcp/A0

`tc netem` is missing from this kernel; this is an asyncio TCP proxy instead. The model, per
`--link` (one spec for the whole emulated network, one access link per peer):

- **Latency.** Every byte arrives `rtt/2` after it left (one way), so a request/response
  costs one `rtt`. A new connection first waits one `rtt` (the TCP handshake) before any
  byte moves, so its first byte lands 1.5 `rtt` after the dial, as on a real path.
- **Rate.** Each peer has an uplink and a downlink, each a token bucket of `up`/`down`
  bits per second (`rate` sets both) with a burst of `burst` bytes. A byte from A to B
  leaves through A's uplink and then enters through B's downlink, in FIFO order, so all
  of a peer's connections share its link, as on a home connection. Which peer dialled is
  known from the connection's source port: libp2p dials from its listen port
  (SO_REUSEPORT), and the emulator knows every peer's real port. A peer on a loopback
  address of its own (`--data`: 127.0.1.N) is also known by its source IP, which is how
  its direct streams (swarmfold/averaging/direct.py; they dial from the peer's listen IP
  on loopback, from any port) are charged to its link. A connection from an unknown
  port gets a link of its own and is counted in `unattributed_connections`.
- **Loss.** A TCP stream cannot lose bytes, so loss is modelled as the receiver sees it.
  The stream is cut into segments of `mss` bytes; each is lost with probability `loss`
  and then arrives only after a retransmission timeout RTO = max(`rto_min`, 2*rtt), and
  because TCP delivers in order, every byte behind it waits too (head-of-line blocking).
  What is *not* modelled: the sender's congestion window halving on each loss. Real
  Reno/CUBIC over 1% loss at 100 ms RTT reaches only about MSS/RTT * 1.22/sqrt(p) ~ 1.4
  Mbit/s per connection (Mathis et al.); here throughput stays at the rate limit except
  for the RTO stalls. So loss here is pessimistic on latency (a real fast retransmit takes
  about one RTT; only a tail loss waits a full RTO) and optimistic on throughput.
- **Buffers.** At most `window` bytes per connection and direction are in the emulated
  network at once (read from the sender, not yet written to the receiver); beyond that the
  proxy stops reading and the sender's socket fills, as a TCP congestion window and the
  bottleneck's queue do. The default is twice the bandwidth-delay product (the BDP in
  flight and a router buffer of one BDP, the classic sizing), at least 256 KiB: 1.25 MB at
  50 ms and 100 Mbit/s, 256 KiB on a 20 Mbit/s link without latency; 4 MiB on an
  unlimited link. It never limits a connection's throughput below the link's rate. It
  used to be 4 MiB everywhere: at 20 Mbit/s that let each connection book 1.7 s of its
  peer's uplink ahead, in FIFO order, which no real TCP does (its window stays near the
  BDP plus the queue), and starved whichever connections came later. Many parallel
  connections (direct streams, one per span) suffered most: 0.65x the libp2p path's
  speed with 4 MiB, 1.02x with 256 KiB (docs/results.md, section 7).

Loss draws come from one seeded `random.Random` per connection direction (seed, connection
number, direction), so a run is repeatable up to the order in which connections arrive.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import functools
import json
import logging
import math
import os
import random
import re
import signal
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

READ_CHUNK = 64 * 1024
MIN_WINDOW = 256 * 1024  # the default in-flight limit of a link with a rate: at least this
UNLIMITED_WINDOW = 4 * 1024 * 1024

_UNITS_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
_UNITS_BPS = {"bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bps": 8.0, "kbps": 8e3, "mbps": 8e6}


def _seconds(key: str, text: str) -> float:
    m = re.fullmatch(r"([0-9.]+)\s*(us|ms|s)?", text.strip().lower())
    if not m:
        raise ValueError(f"--link {key}={text!r}: expected a duration such as 50ms, 0.2s or 200us")
    return float(m.group(1)) * _UNITS_S[m.group(2) or "s"]


def _bits_per_second(key: str, text: str) -> float:
    m = re.fullmatch(r"([0-9.]+)\s*(bit|kbit|mbit|gbit|bps|kbps|mbps)?", text.strip().lower())
    if not m:
        raise ValueError(f"--link {key}={text!r}: expected a rate such as 100mbit, 20mbit or 500kbit "
                         "(bit, kbit, mbit, gbit; bps, kbps, mbps are bytes per second)")
    return float(m.group(1)) * _UNITS_BPS[m.group(2) or "bit"]


def _fraction(key: str, text: str) -> float:
    t = text.strip()
    value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"--link {key}={text!r}: a loss probability in [0, 1), e.g. 1% or 0.01")
    return value


@dataclass(frozen=True)
class LinkSpec:
    """One emulated network: its round-trip time, each peer's access link rates, loss."""

    rtt: float = 0.0  # seconds, round trip between any two peers
    up: float | None = None  # bits/s of each peer's uplink; None: unlimited
    down: float | None = None  # bits/s of each peer's downlink; None: unlimited
    loss: float = 0.0  # probability that a segment is lost (then delivered after one RTO)
    mss: int = 1448  # bytes per segment (Ethernet MTU minus IP/TCP headers and timestamps)
    rto_min: float = 0.2  # seconds, Linux's minimum retransmission timeout
    burst: int = 32 * 1024  # bytes a token bucket holds when idle
    window: int = 0  # bytes in flight per connection and direction; 0: `in_flight_limit`'s default
    seed: int = 0

    @property
    def in_flight_limit(self) -> int:
        """`window`, or by default twice the bandwidth-delay product (a bottleneck buffer of one BDP beside
        the BDP in flight: the classic router sizing), at least MIN_WINDOW; 4 MiB on an unlimited link."""
        if self.window:
            return self.window
        rates = [r for r in (self.up, self.down) if r is not None]
        if not rates:
            return UNLIMITED_WINDOW
        return max(MIN_WINDOW, int(2 * min(rates) / 8 * self.rtt))

    @property
    def rto(self) -> float:
        return max(self.rto_min, 2.0 * self.rtt)

    @classmethod
    def parse(cls, text: str) -> LinkSpec:
        """`rtt=50ms,rate=100mbit,loss=1%` (keys: rtt, delay (one way), rate (= up and down),
        up, down, loss, mss, rto_min, burst, window, seed); an empty string is loopback."""
        kw: dict[str, Any] = {}
        for item in filter(None, (s.strip() for s in text.split(","))):
            key, sep, value = item.partition("=")
            key = key.strip().lower()
            if not sep:
                raise ValueError(f"--link {item!r}: expected key=value, e.g. rtt=50ms,rate=100mbit")
            if key == "rtt":
                kw["rtt"] = _seconds(key, value)
            elif key == "delay":
                kw["rtt"] = 2 * _seconds(key, value)
            elif key == "rate":
                kw["up"] = kw["down"] = _bits_per_second(key, value)
            elif key in ("up", "down"):
                kw[key] = _bits_per_second(key, value)
            elif key == "loss":
                kw["loss"] = _fraction(key, value)
            elif key == "rto_min":
                kw["rto_min"] = _seconds(key, value)
            elif key in ("mss", "burst", "window", "seed"):
                kw[key] = int(value)
            else:
                raise ValueError(f"--link: unknown key {key!r}; use rtt, delay, rate, up, down, loss, mss, "
                                 "rto_min, burst, window or seed")
        spec = cls(**kw)
        for name in ("up", "down"):
            rate = getattr(spec, name)
            if rate is not None and rate <= 0:
                raise ValueError(f"--link {name}: the rate must be positive")
        if spec.mss < 1 or spec.burst < 1 or (spec.window and spec.window < READ_CHUNK):
            raise ValueError(f"--link: mss and burst must be >= 1 and window >= {READ_CHUNK}")
        return spec

    def describe(self) -> str:
        def rate(r: float | None) -> str:
            return "unlimited" if r is None else f"{r / 1e6:g} Mbit/s"
        return (f"rtt {self.rtt * 1e3:g} ms, up {rate(self.up)}, down {rate(self.down)}, "
                f"loss {self.loss * 100:g}% (RTO {self.rto * 1e3:g} ms)")


class TokenBucket:
    """A FIFO link of `rate` bits/s that holds up to `burst` bytes of credit while idle.

    `reserve(n, t)` books n bytes that are ready at time t and returns when their last byte
    has left; bookings are served in the order they are made."""

    def __init__(self, rate_bps: float | None, burst: int):
        self.rate = None if rate_bps is None else rate_bps / 8.0  # bytes per second
        self.burst = float(burst)
        self.tokens = float(burst)
        self.t_last = 0.0

    def reserve(self, n: int, t: float) -> float:
        if self.rate is None:
            return t
        start = max(t, self.t_last)
        self.tokens = min(self.burst, self.tokens + (start - self.t_last) * self.rate)
        if self.tokens >= n:
            self.tokens -= n
            done = start
        else:
            done = start + (n - self.tokens) / self.rate
            self.tokens = 0.0
        self.t_last = done
        return done


@dataclass
class NodeStats:
    bytes_up: int = 0
    bytes_down: int = 0
    connections_in: int = 0
    connections_out: int = 0
    segments_lost_up: int = 0


class Node:
    """One peer's access link: its real address, the port it announces, its two buckets; with `data_port`,
    also the real and announced ports of its direct streams (swarmfold/averaging/direct.py)."""

    def __init__(self, name: str, real_port: int, announce_port: int, spec: LinkSpec, *, ip: str = "127.0.0.1",
                 data_port: int = 0, data_announce_port: int = 0):
        self.name = name
        self.ip = ip
        self.real_port = real_port
        self.announce_port = announce_port
        self.data_port = data_port
        self.data_announce_port = data_announce_port
        self.up = TokenBucket(spec.up, spec.burst)
        self.down = TokenBucket(spec.down, spec.burst)
        self.stats = NodeStats()

    @property
    def host_maddr(self) -> str:
        return f"/ip4/{self.ip}/tcp/{self.real_port}"

    @property
    def announce_data(self) -> str:
        """What the peer passes as --announce-data (empty: the node has no direct-stream ports)."""
        return f"127.0.0.1:{self.data_announce_port}" if self.data_announce_port else ""

    @property
    def announce_maddr(self) -> str:
        return f"/ip4/127.0.0.1/tcp/{self.announce_port}"


@dataclass
class EmulatorStats:
    connections: int = 0
    unattributed_connections: int = 0
    failed_upstream_connects: int = 0
    nodes: dict[str, NodeStats] = field(default_factory=dict)


def free_port(ip: str = "127.0.0.1") -> int:
    """A TCP port on `ip` that was free a moment ago (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((ip, 0))
        return int(s.getsockname()[1])


class _Direction:
    """Bytes of one connection in one direction: read, scheduled, delivered in order."""

    def __init__(self, emu: LinkEmulator, src: Node, dst: Node, rng: random.Random, opened: float):
        self.emu, self.src, self.dst, self.rng = emu, src, dst, rng
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.in_flight = 0
        self.last_delivery = opened
        self.have_data = asyncio.Event()
        self.room = asyncio.Event()
        self.room.set()
        self.eof = False
        self.moved = 0  # bytes delivered to the receiver
        self.ended = ""  # how the sender's side ended: "eof" or the error

    def _pieces(self, data: bytes) -> list[tuple[bytes, bool]]:
        """`data` cut before every lost segment: (piece, starts with a lost segment)."""
        spec = self.emu.spec
        if spec.loss <= 0.0:
            return [(data, False)]
        pieces: list[tuple[bytes, bool]] = []
        start, lost_start = 0, False
        for seg in range(math.ceil(len(data) / spec.mss)):
            if self.rng.random() < spec.loss:
                self.src.stats.segments_lost_up += 1
                off = seg * spec.mss
                if off > start:
                    pieces.append((data[start:off], lost_start))
                start, lost_start = off, True
        pieces.append((data[start:], lost_start))
        return pieces

    def schedule(self, data: bytes) -> None:
        spec, now = self.emu.spec, time.monotonic()
        for piece, lost in self._pieces(data):
            left = self.src.up.reserve(len(piece), now)
            arrived = self.dst.down.reserve(len(piece), left + spec.rtt / 2)
            if lost:
                arrived += spec.rto
            self.last_delivery = max(self.last_delivery, arrived)  # TCP delivers in order
            self.queue.append((self.last_delivery, piece))
        self.in_flight += len(data)
        self.src.stats.bytes_up += len(data)
        self.dst.stats.bytes_down += len(data)
        self.have_data.set()
        if self.in_flight >= spec.in_flight_limit:
            self.room.clear()

    async def read_side(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                await self.room.wait()
                data = await reader.read(READ_CHUNK)
                if not data:
                    self.ended = "eof"
                    break
                self.schedule(data)
        except (ConnectionError, OSError) as e:
            self.ended = f"{type(e).__name__}: {e}"
        finally:
            self.eof = True
            self.have_data.set()

    async def write_side(self, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                if not self.queue:
                    if self.eof:
                        break
                    self.have_data.clear()
                    await self.have_data.wait()
                    continue
                due = self.queue[0][0] - time.monotonic()
                if due > 0:
                    await asyncio.sleep(due)
                now, out = time.monotonic(), []
                while self.queue and self.queue[0][0] <= now:
                    out.append(self.queue.popleft()[1])
                if not out:
                    continue
                blob = b"".join(out)
                writer.write(blob)
                await writer.drain()
                self.moved += len(blob)
                self.in_flight -= len(blob)
                if self.in_flight < self.emu.spec.in_flight_limit:
                    self.room.set()
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError) as e:
            if self.queue:  # the receiver went away with bytes still to deliver
                logger.info("%s -> %s: %d bytes undelivered (%s: %s)", self.src.name, self.dst.name,
                            sum(len(b) for _, b in self.queue), type(e).__name__, e)


class LinkEmulator:
    """The emulated network: one proxy per peer, started on its own event loop.

    Use `add_node()` for each peer before `start()` (its real and announce ports are chosen
    then), or give the ports. `start()` runs the loop in a background thread; `serve()` runs
    it in the caller's loop."""

    def __init__(self, spec: LinkSpec):
        self.spec = spec
        self.nodes: list[Node] = []
        self.stats = EmulatorStats()
        self._by_real_port: dict[int, Node] = {}
        self._by_ip: dict[str, Node] = {}  # nodes on an address of their own: who dialled, by source IP
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._conn_seq = 0

    def add_node(self, name: str, *, real_port: int = 0, announce_port: int = 0, ip: str = "127.0.0.1",
                 data: bool = False) -> Node:
        """A peer's link. `ip`: its own loopback address (127.x.y.z), on which it listens and dials, so that
        connections whose source port says nothing (direct streams) are still told apart. `data`: also
        proxy its direct streams (it listens on `node.data_port` and passes --announce-data
        `node.announce_data`)."""
        if data and ip == "127.0.0.1":
            raise ValueError("a node with direct-stream ports needs a loopback address of its own (ip=127.0.0.N)")
        node = Node(name, real_port or free_port(ip), announce_port or free_port(), self.spec, ip=ip,
                    data_port=free_port(ip) if data else 0, data_announce_port=free_port() if data else 0)
        self.nodes.append(node)
        self._by_real_port[node.real_port] = node
        if ip != "127.0.0.1":
            self._by_ip[ip] = node
        self.stats.nodes[name] = node.stats
        return node

    async def serve(self) -> None:
        """Listen on every node's announce port (returns once listening; the loop keeps serving)."""
        self._loop = asyncio.get_running_loop()
        for node in self.nodes:
            for announced, real in ((node.announce_port, node.real_port), (node.data_announce_port, node.data_port)):
                if not announced:
                    continue
                server = await asyncio.start_server(functools.partial(self._on_connection, callee=node, port=real),
                                                    "127.0.0.1", announced, reuse_address=True)
                self._servers.append(server)
        logger.info("link emulator: %s; %d node(s)", self.spec.describe(), len(self.nodes))

    def start(self) -> LinkEmulator:
        """Serve from a background thread with its own event loop."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.serve())
            except BaseException as e:  # handed to the caller of start()
                failure.append(e)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._aclose())
            loop.close()

        self._thread = threading.Thread(target=run, name="linkemu", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]
        return self

    def close(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> LinkEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def _aclose(self) -> None:
        for s in self._servers:
            s.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def stats_dict(self) -> dict[str, Any]:
        return {"link": asdict(self.spec), "describe": self.spec.describe(), **asdict(self.stats)}

    def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, callee: Node,
                       port: int) -> None:
        task = asyncio.ensure_future(self._relay(reader, writer, callee, port))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _relay(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter, callee: Node,
                     port: int) -> None:
        self._conn_seq += 1
        seq = self._conn_seq
        self.stats.connections += 1
        src_ip, src_port = c_writer.get_extra_info("peername")[:2]
        caller = self._by_ip.get(src_ip) or self._by_real_port.get(int(src_port))
        if caller is None:
            self.stats.unattributed_connections += 1
            caller = Node(f"unknown:{src_port}", src_port, 0, self.spec)
        caller.stats.connections_out += 1
        callee.stats.connections_in += 1
        try:
            await asyncio.sleep(self.spec.rtt)  # the handshake: nothing moves before it
            try:
                s_reader, s_writer = await asyncio.open_connection(callee.ip, port)
            except OSError:
                self.stats.failed_upstream_connects += 1
                return
            opened = time.monotonic()
            fwd = _Direction(self, caller, callee, random.Random(f"{self.spec.seed}/{seq}/fwd"), opened)
            back = _Direction(self, callee, caller, random.Random(f"{self.spec.seed}/{seq}/back"), opened)
            try:
                await asyncio.gather(fwd.read_side(c_reader), fwd.write_side(s_writer),
                                     back.read_side(s_reader), back.write_side(c_writer))
            finally:
                s_writer.close()
                logger.info("connection %d %s -> %s closed after %.1f s: %d bytes forward (%s), %d back (%s)",
                            seq, caller.name, callee.name, time.monotonic() - opened, fwd.moved,
                            fwd.ended or "open", back.moved, back.ended or "open")
        finally:
            c_writer.close()


# ---- CLI ------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m swarmfold.devtools.linkemu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--link", default="", help="e.g. rtt=50ms,rate=100mbit,loss=1%% (empty: loopback speed)")
    p.add_argument("--peers", type=int, default=2, help="emulated peers (one proxy each)")
    p.add_argument("--ports", type=Path, required=True,
                   help="write the peers' host and announce multiaddrs here (JSON) once listening")
    p.add_argument("--stats", type=Path, default=None, help="write byte and connection counters here on exit")
    p.add_argument("--data", action="store_true",
                   help="also proxy each peer's direct streams: peer i listens on its own address 127.0.1.(i+1) "
                        "(host_maddr, data_port) and announces announce_data")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s linkemu %(message)s", datefmt="%H:%M:%S")
    try:
        spec = LinkSpec.parse(args.link)
    except ValueError as e:
        p.error(str(e))  # exits with 2
    emu = LinkEmulator(spec)
    for i in range(args.peers):
        if args.data:
            emu.add_node(f"peer-{i}", ip=f"127.0.1.{i + 1}", data=True)
        else:
            emu.add_node(f"peer-{i}")

    async def run() -> None:
        await emu.serve()
        ports = [{"name": n.name, "host_maddr": n.host_maddr, "announce_maddr": n.announce_maddr,
                  **({"data_port": n.data_port, "announce_data": n.announce_data} if n.data_port else {})}
                 for n in emu.nodes]
        tmp = args.ports.with_name(f".{args.ports.name}.tmp")
        tmp.write_text(json.dumps(ports, indent=1))
        os.replace(tmp, args.ports)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await emu._aclose()

    asyncio.run(run())
    if args.stats is not None:
        args.stats.write_text(json.dumps(emu.stats_dict(), indent=1))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
