"""The link emulator on real sockets: latency, rate, loss and integrity, within stated bounds.

Lower bounds are hard (the emulator never delivers early, whatever the load); upper bounds
are loose (a loaded 2-core machine can only make things slower), so these cannot flake."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from swarmfold.devtools.linkemu import LinkEmulator, LinkSpec, Node, TokenBucket


class Echo:
    """A TCP server on a node's real port: echoes, or (sink) counts and hashes what it gets."""

    def __init__(self, port: int, *, sink: bool = False):
        self.sock = socket.create_server(("127.0.0.1", port))
        self.sink = sink
        self.received = 0
        self.sha = hashlib.sha256()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            while data := conn.recv(1 << 16):
                if self.sink:
                    self.received += len(data)
                    self.sha.update(data)
                else:
                    conn.sendall(data)
        self.done.set()

    def close(self) -> None:
        self.sock.close()


@contextmanager
def emulated(link: str, *, sink: bool = False) -> Iterator[tuple[LinkEmulator, Node, Node, Echo]]:
    emu = LinkEmulator(LinkSpec.parse(link))
    client, server = emu.add_node("client"), emu.add_node("server")
    echo = Echo(server.real_port, sink=sink)
    emu.start()
    try:
        yield emu, client, server, echo
    finally:
        emu.close()
        echo.close()


def dial(via: Node, *, source: Node | None = None) -> socket.socket:
    """Connect to `via`'s announced port, from `source`'s real port as libp2p does (SO_REUSEPORT)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if source is not None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", source.real_port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.connect(("127.0.0.1", via.announce_port))
    return s


def ping(s: socket.socket, payload: bytes) -> float:
    t0 = time.monotonic()
    s.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = s.recv(len(payload) - len(got))
        assert chunk, "the emulator closed the connection"
        got += chunk
    assert got == payload
    return time.monotonic() - t0


def test_parse_and_its_errors() -> None:
    s = LinkSpec.parse("rtt=50ms,rate=100mbit,loss=1%")
    assert (s.rtt, s.up, s.down, s.loss, s.rto) == (0.05, 100e6, 100e6, 0.01, 0.2)
    assert LinkSpec.parse("delay=60ms,up=20mbit").rtt == pytest.approx(0.12)
    assert LinkSpec.parse("rtt=150ms").rto == pytest.approx(0.3)  # 2*RTT beats the 200 ms floor
    assert LinkSpec.parse("") == LinkSpec()
    for bad, words in (("rtt=fast", "duration"), ("rate=lots", "rate"), ("loss=120%", "loss"),
                       ("jitter=5ms", "unknown key 'jitter'"), ("rtt", "key=value"), ("up=0mbit", "positive")):
        with pytest.raises(ValueError, match=words):
            LinkSpec.parse(bad)


def test_token_bucket_is_a_fifo_link_with_a_burst() -> None:
    b = TokenBucket(8e6, burst=1000)  # 1 MB/s
    assert b.reserve(1000, 10.0) == 10.0  # the burst leaves at once
    assert b.reserve(1000, 10.0) == pytest.approx(10.001)  # then one byte per microsecond
    assert b.reserve(500, 10.0) == pytest.approx(10.0015)  # queued behind the previous booking
    assert b.reserve(1000, 20.0) == 20.0  # idle long enough: the burst is back
    assert TokenBucket(None, burst=1).reserve(10**9, 5.0) == 5.0


def test_latency_is_one_rtt_per_round_trip() -> None:
    rtt = 0.08
    with emulated(f"rtt={rtt * 1000:g}ms") as (emu, client, server, _):
        t0 = time.monotonic()
        with dial(server, source=client) as s:
            first = ping(s, b"x")
            times = [ping(s, b"y" * 100) for _ in range(5)]
        assert time.monotonic() - t0 >= 2 * rtt  # the handshake, then a round trip
        assert first >= 2 * rtt - 0.005
        assert min(times) >= rtt - 0.002, times
        assert sorted(times)[2] < rtt + 0.25, f"median far above one RTT even for a loaded machine: {times}"
        assert emu.stats.unattributed_connections == 0  # dialled from the client's real port
        assert emu.stats.nodes["client"].bytes_up == 501 and emu.stats.nodes["server"].bytes_up == 501


def test_rate_limits_throughput_and_every_byte_arrives_in_order() -> None:
    mbit, n = 20.0, 1_500_000  # 2.5 MB/s: 0.6 s for 1.5 MB
    data = os.urandom(n)
    with emulated(f"rate={mbit:g}mbit,loss=1%", sink=True) as (emu, client, server, echo):
        t0 = time.monotonic()
        with dial(server, source=client) as s:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            assert echo.done.wait(60), "the sink never saw the end of the stream"
        seconds = time.monotonic() - t0
        burst = emu.spec.burst
        assert emu.stats.nodes["client"].segments_lost_up > 0  # the loss path ran, and lost no byte
    assert echo.received == n and echo.sha.hexdigest() == hashlib.sha256(data).hexdigest()
    floor = (n - burst) * 8 / (mbit * 1e6)
    assert seconds >= floor, f"{seconds:.3f}s: faster than the link allows ({floor:.3f}s)"
    assert seconds < 4 * floor + 2.0, f"{seconds:.3f}s for {n} bytes at {mbit} Mbit/s"


def test_loss_stalls_a_round_trip_for_one_rto_and_keeps_the_stream_whole() -> None:
    """One-segment pings: each lost segment stalls its ping by at least the RTO; the count of
    lost segments follows the seeded draws (10% of 2 x 60 segments: about 12)."""
    rto = 0.12
    pings = 60
    with emulated(f"loss=10%,rto_min={rto * 1000:g}ms,seed=7") as (emu, client, server, _):
        with dial(server, source=client) as s:
            times = []
            for i in range(pings):
                before = emu.stats.nodes["client"].segments_lost_up + emu.stats.nodes["server"].segments_lost_up
                t = ping(s, i.to_bytes(2, "big") * 50)
                after = emu.stats.nodes["client"].segments_lost_up + emu.stats.nodes["server"].segments_lost_up
                times.append((t, after - before))
    lost = sum(k for _, k in times)
    assert 3 <= lost <= 30, f"{lost} of {2 * pings} segments lost at p = 0.1"
    stalled = [t for t, k in times if k]
    assert stalled and min(stalled) >= rto - 0.002, "a lost segment is delivered only after the RTO"
    clean = sorted(t for t, k in times if not k)
    assert clean[len(clean) // 2] < rto, "pings without loss are not delayed (median)"


def test_unknown_source_port_is_counted_and_still_shaped() -> None:
    with emulated("rtt=20ms") as (emu, _client, server, _):
        with dial(server) as s:  # an ephemeral source port: not any node's real port
            assert ping(s, b"z") >= 0.02
        deadline = time.monotonic() + 5
        while emu.stats.connections < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert emu.stats.unattributed_connections == 1


def test_a_closed_upstream_is_counted_not_fatal() -> None:
    emu = LinkEmulator(LinkSpec())
    node = emu.add_node("nobody-listens")
    with emu:
        with dial(node) as s:
            assert s.recv(1) == b""  # the emulator closes the connection it could not forward
        assert emu.stats.failed_upstream_connects == 1


def test_a_nodes_direct_streams_cross_its_link_and_are_charged_to_it_by_source_ip() -> None:
    """A node on its own loopback address with direct-stream ports: a connection to its announced data
    port reaches its real data port on its address, and one dialled from a node's address, from any port,
    is that node's upload."""
    emu = LinkEmulator(LinkSpec.parse("rtt=20ms"))
    client = emu.add_node("client", ip="127.0.1.1", data=True)
    server = emu.add_node("server", ip="127.0.1.2", data=True)
    assert server.host_maddr.startswith("/ip4/127.0.1.2/tcp/") and server.announce_data.startswith("127.0.0.1:")
    sink = socket.create_server((server.ip, server.data_port))
    got = bytearray()

    def serve() -> None:
        conn, _ = sink.accept()
        with conn:
            while data := conn.recv(1 << 16):
                got.extend(data)
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    payload = os.urandom(100_000)
    with emu:
        with socket.create_connection(("127.0.0.1", server.data_announce_port), source_address=(client.ip, 0)) as s:
            s.sendall(payload)
        thread.join(timeout=10)
        assert bytes(got) == payload
        assert emu.stats.unattributed_connections == 0
        assert client.stats.bytes_up == len(payload) and server.stats.bytes_down == len(payload)
    sink.close()
    with pytest.raises(ValueError, match="address of its own"):
        LinkEmulator(LinkSpec()).add_node("x", data=True)


def test_the_in_flight_limit_is_twice_the_bandwidth_delay_product_by_default() -> None:
    assert LinkSpec.parse("rtt=50ms,rate=100mbit").in_flight_limit == 1_250_000
    assert LinkSpec.parse("rate=20mbit").in_flight_limit == 256 * 1024, "at least 256 KiB"
    assert LinkSpec.parse("rtt=100ms").in_flight_limit == 4 * 1024 * 1024, "an unlimited link"
    assert LinkSpec.parse("rate=20mbit,window=1048576").in_flight_limit == 1 << 20
