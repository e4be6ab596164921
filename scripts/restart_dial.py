"""A peer restarted with the same identity: which directions work, and from when. Writes JSON.

    python scripts/restart_dial.py --downtime 20 --out restart_dial.json            # SIGKILL, same port
    python scripts/restart_dial.py --downtime 3 --orphan --out restart_orphan.json  # old daemon left alive

Two hivemind DHTs (each with its own p2pd) on 127.0.0.1: a survivor S and a victim X with an
identity file and a fixed port. X is killed (its DHT process and p2pd, SIGKILL), and while it is
down S keeps trying to open a stream to it at its address (as a swarm peer keeps calling a peer
whose record has not expired yet), which puts that address into go-libp2p's dial backoff. X then
restarts with the same identity (on the same port unless --new-port) and S as its initial peer.
Every 0.5 s for --watch seconds the script tries: a stream X->S, a stream S->X (dialing X's
addresses if there is no connection), S reading X's new DHT record, X reading S's.

With --orphan, X's old DHT process and p2pd are left running instead (what a SIGKILL of a
peer's main process alone leaves behind: hivemind's DHT process and its daemon survive their
parent), without the stream handler, which lived in the killed process.
See docs/swarm.md, "A restarted peer and the survivors".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import hivemind
import psutil
from hivemind.p2p import P2P, PeerID
from hivemind.utils import get_dht_time

from swarmfold.averaging import wire
from swarmfold.averaging.hivemind_adapter import connect

logger = logging.getLogger("restart_dial")
PING = "/swarmfold-restart-probe/ping"
KEY = "restart-probe"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def kill_tree(pid: int) -> None:
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)


async def on_ping(_info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        await wire.recv(reader, 1024)
        await wire.send(writer, {"pong": True})
    except (wire.WireError, ConnectionError):
        pass
    finally:
        await wire.finish(reader, writer, 5.0)


async def ping(p2p: P2P, peer: str, maddrs: list[str], timeout: float = 3.0) -> str:
    """'ok', or the error of one request to `peer` (dialing `maddrs` if no connection works)."""
    pid = PeerID.from_base58(peer)

    async def go() -> None:
        try:
            _, r, w = await p2p.call_binary_stream_handler(pid, PING)
        except Exception:  # hivemind's P2PHandlerError, P2PDaemonError...: dial, as Transport.open does
            await connect(p2p, pid, maddrs)
            _, r, w = await p2p.call_binary_stream_handler(pid, PING)
        try:
            await wire.send(w, {"ping": True})
            await wire.recv(r, 1024)
        finally:
            wire.close(w)
    try:
        await asyncio.wait_for(go(), timeout)
        return "ok"
    except Exception as e:  # every failure is a data point here
        return f"{type(e).__name__}: {e}"


def short(error: str) -> str:
    """An error's kind and its end (go-libp2p puts the reason last)."""
    return error if len(error) <= 160 else f"{error[:40]} ... {error[-110:]}"


def sees(dht: hivemind.DHT, owner: str, value: str) -> bool:
    found = dht.get(KEY, latest=True)
    return found is not None and owner in found.value and found.value[owner].value == value


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    loop = asyncio.new_event_loop()
    port_s, port_x = free_port(), free_port()
    s = hivemind.DHT(start=True, host_maddrs=[f"/ip4/127.0.0.1/tcp/{port_s}"], identity_path=str(tmp / "s.key"))
    s_maddrs = [str(m) for m in s.get_visible_maddrs()]

    def start_x(port: int) -> hivemind.DHT:
        return hivemind.DHT(start=True, initial_peers=s_maddrs, host_maddrs=[f"/ip4/127.0.0.1/tcp/{port}"],
                            identity_path=str(tmp / "x.key"), check_if_identity_free=False)

    x = start_x(port_x)
    s_id, x_id = str(s.peer_id), str(x.peer_id)
    x_maddrs = [str(m) for m in x.get_visible_maddrs()]
    sp = loop.run_until_complete(s.replicate_p2p())
    loop.run_until_complete(sp.add_binary_stream_handler(PING, on_ping))
    xp = loop.run_until_complete(x.replicate_p2p())
    loop.run_until_complete(xp.add_binary_stream_handler(PING, on_ping))
    before = {"S->X": loop.run_until_complete(ping(sp, x_id, x_maddrs)),
              "X->S": loop.run_until_complete(ping(xp, s_id, s_maddrs))}
    loop.run_until_complete(xp.shutdown())  # the handler dies with the victim's main process
    if not args.orphan:
        kill_tree(x.pid)
    down: dict[str, int] = {}
    t0 = time.monotonic()
    while time.monotonic() - t0 < args.downtime:
        r = loop.run_until_complete(ping(sp, x_id, x_maddrs, timeout=2.0))
        down[short(r)] = down.get(short(r), 0) + 1
        time.sleep(1.0)
    x2 = start_x(port_x if not args.new_port else free_port())
    x2_maddrs = [str(m) for m in x2.get_visible_maddrs()]
    xp2 = loop.run_until_complete(x2.replicate_p2p())
    loop.run_until_complete(xp2.add_binary_stream_handler(PING, on_ping))
    s.store(KEY, "s", get_dht_time() + 600, subkey=s_id)
    x2.store(KEY, "x2", get_dht_time() + 600, subkey=x_id)
    checks = ("X->S stream", "S->X stream", "S reads X's new record", "X reads S's record")
    tally: dict[str, dict[str, Any]] = {c: {"ok": 0, "failed": 0, "first_ok_s": None, "errors": {}} for c in checks}
    t1 = time.monotonic()
    while time.monotonic() - t1 < args.watch:
        at = round(time.monotonic() - t1, 1)
        x_to_s = loop.run_until_complete(ping(xp2, s_id, s_maddrs))
        s_to_x = loop.run_until_complete(ping(sp, x_id, x2_maddrs))
        results = (x_to_s, s_to_x, "ok" if sees(s, x_id, "x2") else "not yet", "ok" if sees(x2, s_id, "s") else "not yet")
        for c, r in zip(checks, results, strict=True):
            t = tally[c]
            if r == "ok":
                t["ok"] += 1
                t["first_ok_s"] = at if t["first_ok_s"] is None else t["first_ok_s"]
            else:
                t["failed"] += 1
                t["errors"][short(r)] = t["errors"].get(short(r), 0) + 1
        time.sleep(0.5)
    for p2p in (sp, xp2):
        loop.run_until_complete(p2p.shutdown())
    for dht in (x2, s):
        dht.shutdown()
    if args.orphan:
        kill_tree(x.pid)
    return {"before_kill": before, "during_downtime_S->X": down, "after_restart": tally,
            "x_maddrs_before": x_maddrs, "x_maddrs_after": x2_maddrs}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--downtime", type=float, default=20.0, help="seconds the victim is down (S keeps dialing it)")
    ap.add_argument("--watch", type=float, default=40.0, help="seconds to watch after the restart")
    ap.add_argument("--new-port", action="store_true", help="restart on another port")
    ap.add_argument("--orphan", action="store_true", help="leave the old DHT process and p2pd running")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        report = run(args, Path(tmp))
    report["setup"] = {"downtime_s": args.downtime, "watch_s": args.watch, "same_port": not args.new_port,
                       "orphan": args.orphan, "load_average_before": list(load),
                       "load_average_after": list(os.getloadavg()), "command": " ".join(sys.argv)}
    args.out.write_text(json.dumps(report, indent=1))
    logger.info("after the restart: %s", {c: (t["ok"], t["failed"], t["first_ok_s"])
                                          for c, t in report["after_restart"].items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
