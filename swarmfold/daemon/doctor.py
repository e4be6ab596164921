"""`swarmfold doctor`: can this machine join the swarm, and if not, what to do.

Each check gives one line: `ok` with what it found, or `PROBLEM` with what is wrong and
the fix. The exit status is 0 when every check is ok, 1 otherwise.

  versions    Python, torch, hivemind (the swarm pins hivemind 1.1.12), swarmfold
  device      what `--device auto` would pick (peer/device.py: CUDA, then Apple MPS, then the CPU)
  disk        free space in the workdir and the token cache
  threads     the threads the peer would use against the cores this process may run on
  api port    whether the control API's port (settings.toml or --api-port) is free
  bootstrap   whether each of the spec's bootstrap peers (and --initial-peers) answers, by
              TCP and then by joining through it and checking its spec hash
  reachable   whether peers outside can connect to this one. hivemind 1.1.12 starts libp2p's
              AutoNAT service but gives no way to read its verdict, so this is inferred:
              joining a swarm with public bootstrap peers while every address this node can
              announce is private (or loopback) means it is behind NAT
  clock       skew against the swarm's peers, from the wall-clock time in their signed records
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from swarmfold.spec import Spec

logger = logging.getLogger(__name__)

PINNED_HIVEMIND = "1.1.12"
MIN_FREE_BYTES = 2 << 30  # checkpoints of the small preset, the token cache and logs fit with room to spare
MAX_CLOCK_SKEW_S = 30.0


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str  # what was found (ok) or what is wrong (problem)
    fix: str = ""

    def line(self) -> str:
        if self.ok:
            return f"ok       {self.name:<10} {self.detail}"
        return f"PROBLEM  {self.name:<10} {self.detail}; fix: {self.fix}"


def auto_device() -> str:
    """The device `--device auto` picks (peer/device.py resolve_device: CUDA, then MPS, then the CPU)."""
    from swarmfold.peer.device import describe, resolve_device

    return describe(resolve_device("auto"))


def check_versions() -> Check:
    import hivemind
    import torch

    import swarmfold

    found = (f"Python {sys.version.split()[0]}, torch {torch.__version__}, hivemind {hivemind.__version__}, "
             f"swarmfold {getattr(swarmfold, '__version__', '?')}")
    if hivemind.__version__ != PINNED_HIVEMIND:
        return Check("versions", False, f"{found}: the swarm's wire protocol is tested with hivemind "
                     f"{PINNED_HIVEMIND}", f"pip install hivemind=={PINNED_HIVEMIND}")
    return Check("versions", True, found)


def check_device() -> Check:
    return Check("device", True, f"--device auto would use {auto_device()}")


def _existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(workdir: Path, cache: Path, min_free: int = MIN_FREE_BYTES) -> list[Check]:
    out = []
    for what, path, flag in (("workdir", workdir, "--workdir on a disk with more room"),
                             ("cache", cache, "SWARMFOLD_CACHE=/a/roomier/disk")):
        free = shutil.disk_usage(_existing(path)).free
        text = f"{free / 2**30:.1f} GiB free for the {what} ({path})"
        out.append(Check("disk", True, text) if free >= min_free else
                   Check("disk", False, f"{text}, less than {min_free / 2**30:.0f} GiB",
                         f"free some space, or use {flag}"))
    return out


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def check_threads(threads: int) -> Check:
    cores = usable_cores()
    if threads > cores:
        return Check("threads", False, f"{threads} threads asked for, but this process may use {cores} cores "
                     "(oversubscribed steps are many times slower)",
                     f"--threads {cores} (or threads = {cores} in settings.toml)")
    return Check("threads", True, f"{threads} threads of {cores} usable cores")


def port_free(host: str, port: int) -> tuple[bool, str]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the API server binds: TIME_WAIT is no obstacle
        try:
            s.bind((host, port))
        except OSError as e:
            return False, "taken" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
    return True, "free"


def check_api_port(host: str, port: int) -> Check:
    if port == 0:
        return Check("api port", True, "the control API is disabled (api_port 0)")
    free, why = port_free(host, port)
    if free:
        return Check("api port", True, f"{host}:{port} is free for the dashboard and control API")
    return Check("api port", False, f"{host}:{port} is {why} (another swarmfold peer, or another program?)",
                 "stop what holds it (`swarmfold status --workdir W` shows a running peer), or pick another "
                 "port with --api-port or api_port in settings.toml")


def tcp_target(maddr: str) -> tuple[str, int] | None:
    """(host, port) of a /ip4|ip6|dns|dns4|dns6/HOST/tcp/PORT/... multiaddr, or None."""
    parts = maddr.strip("/").split("/")
    if len(parts) >= 4 and parts[0] in ("ip4", "ip6", "dns", "dns4", "dns6") and parts[2] == "tcp":
        try:
            return parts[1], int(parts[3])
        except ValueError:
            return None
    return None


def _public(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_global
    except ValueError:
        return True  # a DNS name: assume it names a machine on the internet


def probe(maddr: str, timeout: float) -> str | None:
    """None if something listens at the multiaddr's host and port, else why not."""
    target = tcp_target(maddr)
    if target is None:
        return "not a /ip4|ip6|dns/HOST/tcp/PORT/p2p/ID multiaddr"
    try:
        with socket.create_connection(target, timeout=timeout):
            return None
    except OSError as e:
        return e.strerror or type(e).__name__


def check_network(spec: Spec, peers: list[str], timeout: float,
                  clock: Callable[[], float] = time.time) -> list[Check]:
    """bootstrap (one line per peer), reachable and clock: join through the answering peers as a client."""
    if not peers:
        return [Check("bootstrap", True, "no bootstrap peers in the spec and no --initial-peers: this peer "
                                         "would start a new swarm")]
    out: list[Check] = []
    answering = []
    for addr in peers:
        why = probe(addr, timeout)
        if why is None:
            answering.append(addr)
        else:
            out.append(Check("bootstrap", False, f"{addr} does not answer ({why})",
                             "check the address and that the peer runs; ask the swarm for a current address "
                             "(bootstrap_peers in its spec), or pass a live one with --initial-peers"))
    if not answering:
        return out
    from swarmfold.averaging.identity import load_or_create_identity
    from swarmfold.averaging.protocol import SpecMismatch
    from swarmfold.averaging.swarm import JoinError, Swarm

    with tempfile.TemporaryDirectory(prefix="swarmfold-doctor-") as tmp:
        swarm = Swarm(spec, load_or_create_identity(Path(tmp) / "identity.key"), initial_peers=answering,
                      host_maddrs=["/ip4/0.0.0.0/tcp/0"], client_mode=True)
        try:
            swarm.start()
        except JoinError as e:
            return [*out, Check("bootstrap", False, str(e), "check that those addresses are swarmfold peers")]
        try:
            try:
                swarm.check_spec(answering)
            except SpecMismatch as e:
                out.append(Check("bootstrap", False, str(e).split(". Every")[0],
                                 "get the swarm's spec file and pass it with --spec"))
            else:
                out += [Check("bootstrap", True, f"{a} answers, spec {spec.spec_hash[:12]}…") for a in answering]
            out.append(_reachability(answering, swarm.maddrs))
            out.append(_clock(swarm, clock))
        finally:
            swarm.shutdown()
    return out


def _reachability(peers: list[str], ours: list[str]) -> Check:
    hosts = [t[0] for t in (tcp_target(a) for a in ours) if t]
    public_swarm = any(_public(t[0]) for t in (tcp_target(a) for a in peers) if t)
    if not public_swarm:
        return Check("reachable", True, "the bootstrap peers are on a private network, as are we: "
                                        f"{', '.join(sorted(set(hosts))) or 'no addresses'}")
    if any(_public(h) for h in hosts):
        return Check("reachable", True, f"announces a public address ({', '.join(h for h in hosts if _public(h))}; "
                                        "inferred: hivemind exposes no AutoNAT verdict)")
    return Check("reachable", False, "every address this machine can announce is private "
                 f"({', '.join(sorted(set(hosts)))}): peers outside cannot connect to it (behind NAT; inferred, "
                 "hivemind exposes no AutoNAT verdict)",
                 "forward a TCP port and run with --host-maddrs /ip4/0.0.0.0/tcp/PORT --announce-maddrs "
                 "/ip4/PUBLIC_IP/tcp/PORT; or --auto-relay; or --client-mode (sends its contributions, never reduces)")


def _clock(swarm: object, clock: Callable[[], float]) -> Check:
    from swarmfold.averaging.swarm import Swarm

    assert isinstance(swarm, Swarm)
    records = {pid: r for pid, r in swarm.records().items() if pid != swarm.peer_id}
    now = clock()
    if not records:
        return Check("clock", True, "no peer records yet to compare clocks with")
    # A record is stamped with its peer's clock when published, at most record_ttl/3 (the heartbeat) before
    # we read it: their clock minus ours lies in [stamp - now, stamp - now + ttl/3].
    beat = swarm.spec.averaging.record_ttl / 3
    lows = sorted(r.time - now for r in records.values())
    low = lows[len(lows) // 2]
    high = low + beat
    if low > MAX_CLOCK_SKEW_S or high < -MAX_CLOCK_SKEW_S:
        ahead = "behind" if low > 0 else "ahead of"
        return Check("clock", False, f"this machine's clock is {ahead} the swarm's by at least "
                     f"{min(abs(low), abs(high)):.0f} s (median of {len(records)} peers)",
                     "turn on time synchronisation (e.g. `timedatectl set-ntp true`, or enable NTP in the OS "
                     "settings)")
    return Check("clock", True, f"within {max(abs(low), abs(high)):.0f} s of {len(records)} peers' clocks")


def run_doctor(*, spec: Spec | None, workdir: Path, threads: int | None = None, api_port: int | None = None,
               api_host: str | None = None, initial_peers: list[str] | None = None,
               timeout: float = 5.0, clock: Callable[[], float] = time.time) -> list[Check]:
    """Every check, in the order of the module docstring; `clock` is this machine's wall clock."""
    from swarmfold.daemon.settings import SettingsError, load_settings
    from swarmfold.peer.data import cache_dir

    checks = [check_versions(), check_device(), *check_disk(workdir, cache_dir())]
    try:
        settings = load_settings(workdir)
    except SettingsError as e:
        checks.append(Check("settings", False, str(e), "correct settings.toml"))
        from swarmfold.daemon.settings import Settings

        settings = Settings()
    checks.append(check_threads(threads or settings.threads or 2))
    checks.append(check_api_port(api_host or settings.api_host, settings.api_port if api_port is None else api_port))
    if spec is not None:
        checks += check_network(spec, list(initial_peers or []) + list(spec.network.bootstrap_peers), timeout,
                                clock)
    else:
        checks.append(Check("bootstrap", True, "no --spec given: the swarm's peers, reachability and clock "
                                               "are not checked"))
    return checks
