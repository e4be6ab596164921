"""Transport: this peer's DHT node, its P2P handle, the network loop, calls and streams to peers, and
the hello that refuses peers of another spec.

`Transport` starts a hivemind DHT (which runs hivemind's bundled libp2p daemon in a
child process, with this peer's identity key) and takes a replica of its P2P handle in
an asyncio loop on a background thread. Everything network-side of the round runs on
that loop; `call()` hands it a coroutine from another thread and waits for the result.
The phase modules only see the `Net` protocol below: `open`, `request`, `dht_call`,
`add_handler`, so each can run on an in-process fake (tests/test_round_components.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import hivemind
from hivemind.p2p import P2P, PeerID

from swarmfold.averaging import wire
from swarmfold.averaging.direct import DirectStreams, listen_host
from swarmfold.averaging.hivemind_adapter import connect
from swarmfold.averaging.identity import Identity
from swarmfold.averaging.messages import Hello, HelloReply
from swarmfold.averaging.protocol import DIRECT, HELLO, AveragingError, Rejected, SpecMismatch
from swarmfold.averaging.records import make_validator
from swarmfold.averaging.timeouts import RoundTimeouts
from swarmfold.spec import Spec

logger = logging.getLogger(__name__)

PARENT_POLL = 1.0  # seconds between a DHT process's checks that the peer's main process is still there


class OrphanSafeDHT(hivemind.DHT):
    """hivemind's DHT process, which ends itself and its libp2p daemon once the peer's main process
    is gone. Without this, a SIGKILL of the main process alone (a user's kill -9, the OOM killer)
    leaves both running, with the peer's identity, port and connections, and a restart of that
    identity is then unreachable from the survivors a large part of the time: docs/swarm.md,
    "A restarted peer and the survivors"."""

    def run(self) -> None:  # in the forked DHT process
        threading.Thread(target=_end_with_parent, args=(os.getppid(),), name="swarmfold-parent-watch",
                         daemon=True).start()
        super().run()


def _end_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_POLL)
    import psutil
    for child in psutil.Process().children(recursive=True):  # the libp2p daemon
        with contextlib.suppress(psutil.Error):
            child.kill()
    os._exit(1)

T = TypeVar("T")
SMALL_MESSAGE = 1 << 20  # proposals, votes, hello: never need more
# what a DHT operation raises when the DHT or the network misbehaves (retry loops catch these; anything
# else is a bug, logged at warning with its traceback): our own bound, hivemind's future timing out,
# a reset connection, the DHT's child process gone (pipe errors)
DHT_ERRORS: tuple[type[BaseException], ...] = (AveragingError, TimeoutError, ConnectionError, OSError, EOFError)
Handler = Callable[[Any, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class JoinError(Exception):
    """The DHT could not start or reach any initial peer."""


class Net(Protocol):
    """What the phase modules need of the network (Transport, or a fake in tests)."""

    peer_id: str

    async def open(self, peer: str, proto: str, maddrs: list[str] | None = None
                   ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]: ...

    async def request(self, peer: str, proto: str, msg: dict[str, Any], *, timeout: float,
                      max_reply: int = SMALL_MESSAGE, maddrs: list[str] | None = None,
                      after_send: Callable[[], None] | None = None) -> tuple[dict[str, Any], int, int]: ...

    async def open_bulk(self, peer: str, proto: str) -> tuple[Any, Any]: ...


class Transport:
    def __init__(self, spec: Spec, identity: Identity, timeouts: RoundTimeouts, *,
                 initial_peers: list[str] | None = None, host_maddrs: list[str] | None = None,
                 announce_maddrs: list[str] | None = None, client_mode: bool = False, use_relay: bool = True,
                 use_auto_relay: bool = False, announce_data: list[str] | None = None):
        self.spec = spec
        self.identity = identity
        self.peer_id = identity.peer_id
        self.timeouts = timeouts
        self.initial_peers = list(initial_peers or [])
        self.host_maddrs = list(host_maddrs or ["/ip4/127.0.0.1/tcp/0"])
        self.announce_maddrs = list(announce_maddrs or [])
        self.client_mode = client_mode
        self.use_relay, self.use_auto_relay = use_relay, use_auto_relay
        self.validator = make_validator(identity)
        self.dht: hivemind.DHT | None = None
        self.p2p: P2P | None = None
        self.maddrs: list[str] = []
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="swarmfold-net", daemon=True)
        self._handlers: dict[str, Handler] = {HELLO: self._on_hello}
        self.direct = DirectStreams(self.peer_id, self.request, listen=self._direct_listen(),
                                    announce=list(announce_data or []), timeout=timeouts.join)

    def _direct_listen(self) -> tuple[str, int] | None:
        """Where direct streams are accepted: libp2p's listen IP with network.data_port, unless the spec turns
        them off or this peer accepts no connections (client mode)."""
        host = listen_host(self.host_maddrs)
        if not self.spec.network.direct_streams or self.client_mode or host is None:
            return None
        return host, self.spec.network.data_port

    # ---- lifecycle ------------------------------------------------------------------------
    def _direct_hosts(self) -> list[str]:
        """The IPs our direct-stream offers name (with --announce-data, that is used instead): none when
        libp2p announces other addresses (a port forward, an emulated link: only --announce-data knows
        where to dial then); the IPs libp2p sees when listening on every interface; else the listen IP."""
        host = listen_host(self.host_maddrs)
        if self.announce_maddrs or host is None:
            return []
        return _visible_ips(self.maddrs) if ipaddress.ip_address(host).is_unspecified else [host]

    def start(self, handlers: dict[str, Handler], direct: tuple[str, ...] = ()) -> None:
        """Join the DHT (JoinError on unreachable initial peers) and serve `handlers` (protocol -> handler),
        those named in `direct` on direct streams too (averaging/direct.py)."""
        try:
            self.dht = OrphanSafeDHT(
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
        self._handlers.update(handlers)
        self._handlers[DIRECT] = self.direct.on_offer
        self.call(self._setup({p: _quiet_on_cancel(handlers[p]) for p in direct}), timeout=self.timeouts.dht_call)

    async def _setup(self, direct: dict[str, Handler]) -> None:
        assert self.dht is not None  # start() set it
        self.p2p = await self.dht.replicate_p2p()
        for name, handler in self._handlers.items():
            await self.p2p.add_binary_stream_handler(name, _quiet_on_cancel(handler))
        await self.direct.start(direct, hosts=self._direct_hosts())

    def shutdown(self) -> None:
        if self._thread.is_alive():
            try:
                self.call(self._teardown(), timeout=self.timeouts.local_call)
            except (TimeoutError, AveragingError, OSError, ConnectionError) as e:  # the process is leaving
                logger.debug("teardown: %s", e)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=self.timeouts.local_call)
            if not self._thread.is_alive():
                self.loop.close()
        if self.dht is not None:
            self.dht.shutdown()
            self.dht = None

    async def _teardown(self) -> None:
        """Cancel our tasks and close the P2P replica (the DHT process owns the daemon itself)."""
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks(self.loop) if t is not current]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.direct.close()
        if self.p2p is not None:
            await self.p2p.shutdown()
            self.p2p = None

    def call(self, coro: Awaitable[T], timeout: float | None = None) -> T:
        """Run `coro` on the network loop from another thread and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def add_handler(self, proto: str, handler: Handler) -> None:
        """Serve `proto` with `handler(info, reader, writer)` (after start())."""
        assert self.p2p is not None, "start() the swarm first"
        self.call(self.p2p.add_binary_stream_handler(proto, _quiet_on_cancel(handler)),
                  timeout=self.timeouts.local_call)

    async def dht_call(self, future: Any) -> Any:
        """Await a DHT operation, bounded: a stuck DHT must not stall the round."""
        try:
            return await asyncio.wait_for(future, self.timeouts.dht)
        except TimeoutError as e:
            raise AveragingError(f"the DHT did not answer within {self.timeouts.dht}s (network.dht_timeout)") from e

    # ---- calling peers -----------------------------------------------------------------------
    async def open(self, peer: str, proto: str, maddrs: list[str] | None = None
                   ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A stream to `peer`'s `proto` handler, dialing `maddrs` if the daemon has no route yet."""
        assert self.p2p is not None
        pid = PeerID.from_base58(peer)
        try:
            _, reader, writer = await self.p2p.call_binary_stream_handler(pid, proto)
            return reader, writer
        except Exception as first:  # hivemind's P2PHandlerError, P2PDaemonError, ConnectionError...: dial
            if not maddrs:
                raise AveragingError(f"cannot reach {peer}: {first}") from first
            logger.debug("no stream to %s (%s); connecting to %s", peer[-8:], first, maddrs)
            try:
                await connect(self.p2p, pid, maddrs)
                _, reader, writer = await self.p2p.call_binary_stream_handler(pid, proto)
                return reader, writer
            except Exception as e:  # the same errors, after dialing: the peer is unreachable
                raise AveragingError(f"cannot reach {peer}: {first}; then dialing {maddrs}: {e}") from e

    async def open_bulk(self, peer: str, proto: str) -> tuple[Any, Any]:
        """A stream for bulk bytes (tensor chunks): a direct one where `peer` offers it, else through libp2p."""
        return await self.direct.open(peer, proto) or await self.open(peer, proto)

    async def request(self, peer: str, proto: str, msg: dict[str, Any], *, timeout: float,
                      max_reply: int = SMALL_MESSAGE, maddrs: list[str] | None = None,
                      after_send: Callable[[], None] | None = None) -> tuple[dict[str, Any], int, int]:
        """One request/response exchange: (reply, bytes sent, bytes received)."""
        async def exchange() -> tuple[dict[str, Any], int, int]:
            reader, writer = await self.open(peer, proto, maddrs)
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

    # ---- hello: refuse peers of another spec --------------------------------------------------
    async def _on_hello(self, info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            msg, _ = await wire.recv(reader, SMALL_MESSAGE)
            theirs = Hello.from_wire(msg)
            ok = theirs.spec_hash == self.spec.spec_hash
            if not ok:
                logger.warning("[%s] refused peer %s: its spec hash %s… differs from this swarm's %s… (%s); "
                               "it must run this swarm's spec file", self.peer_id[-8:], info.peer_id,
                               theirs.spec_hash[:12], self.spec.spec_hash[:12], self.spec.name)
            await wire.send(writer, HelloReply(ok=ok, spec_hash=self.spec.spec_hash, name=self.spec.name).to_wire())
        except (wire.WireError, Rejected, ConnectionError) as e:
            logger.info("bad hello from %s: %s", info.peer_id, e)
        finally:
            await wire.finish(reader, writer, self.timeouts.join)

    async def check_spec(self, peers: list[str]) -> None:
        """Ask each initial peer for its spec hash; SpecMismatch if one differs."""
        hello = Hello(spec_hash=self.spec.spec_hash, name=self.spec.name).to_wire()
        for addr in peers:
            peer = addr.rsplit("/p2p/", 1)[-1]
            try:
                raw, _, _ = await self.request(peer, HELLO, hello, timeout=self.timeouts.join, maddrs=[addr])
                reply = HelloReply.from_wire(raw)
            except (AveragingError, Rejected) as e:
                logger.warning("[%s] could not check the spec of %s: %s", self.peer_id[-8:], peer, e)
                continue
            if not reply.ok:
                raise SpecMismatch(
                    f"refused by {peer}: that swarm ('{reply.name}') runs spec {reply.spec_hash[:12]}…, but your "
                    f"spec hashes to {self.spec.spec_hash[:12]}…. Every peer of a swarm must use the same spec "
                    "file: get the swarm's spec and pass it with --spec")


def _visible_ips(maddrs: list[str]) -> list[str]:
    """The IPv4 addresses in `maddrs`, those other peers can reach first (loopback last)."""
    ips = [m.split("/")[2] for m in maddrs if m.startswith("/ip4/")]
    ips = [ip for ip in dict.fromkeys(ips) if ip != "0.0.0.0"]
    return sorted(ips, key=lambda ip: ip.startswith("127."))


def _quiet_on_cancel(handler: Handler) -> Handler:
    """`handler`, ending quietly when it is cancelled (at shutdown, with a call still in flight).

    asyncio's stream server (Python 3.11) asks a finished handler task for its exception, which for a
    cancelled task raises CancelledError inside the event loop's callback: an ERROR with a traceback
    in the log for every call in flight at shutdown, though nothing went wrong. The stream is closed."""
    @functools.wraps(handler)
    async def run(info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(info, reader, writer)
        except asyncio.CancelledError:
            wire.close(writer)
    return run
