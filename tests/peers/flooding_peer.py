"""A test peer that never trains: it floods every peer it sees with votes and parts for group ids of its
own making, and with failing votes for the group ids honest peers are about to use. Half its parts go
on direct streams (averaging/direct.py), and it asks for direct-stream offers it never uses, so each
honest peer's ticket table holds its share of them all along.

Run as a module with tests/ on the path: `python -m peers.flooding_peer --spec S --workdir W
--initial-peers MADDR` (it runs until killed). Every 500 messages it logs
"flooder: sent N votes and M parts (K offers hoarded)" so that a test can wait for the flood to be under way.
A peer that stored votes from anyone for any group (one global table of 1,024 groups, as
before issue 13) stops hearing its real group's votes, and honest commits fail.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import secrets
import sys
import time
from pathlib import Path

from swarmfold.averaging import wire
from swarmfold.averaging.base import group_id_for
from swarmfold.averaging.identity import load_or_create_identity
from swarmfold.averaging.messages import DirectRequest, PartHeader, Vote
from swarmfold.averaging.protocol import DIRECT, REDUCE, VOTE, AveragingError
from swarmfold.averaging.swarm import Swarm
from swarmfold.errors import setup_logging
from swarmfold.spec import load_spec

logger = logging.getLogger("flooder")
PARALLEL = 16


async def _part(swarm: Swarm, peer: str, group_id: str, direct: bool) -> None:
    """A part header for `group_id`, through libp2p or on a direct stream; read the reducer's answer, then
    hang up."""
    reader, writer = await (swarm.transport.open_bulk(peer, REDUCE) if direct else swarm.open_stream(peer, REDUCE))
    try:
        header = PartHeader(group_id=group_id, spec_hash=swarm.spec.spec_hash, round=0, base_sha256="0" * 64,
                            span=0, numel=1, dtype="int8-absmax", weight=1.0, steps=1, payload_bytes=1,
                            chunk=1)
        await wire.send(writer, header.to_wire())
        await asyncio.wait_for(wire.recv(reader, 1 << 20), 2.0)
    finally:
        wire.close(writer)


def _guesses(swarm: Swarm, peers: list[str], rounds: list[int]) -> list[str]:
    """The group ids honest peers would use: every pair (and all of them) at these rounds, attempts 0-2."""
    groups = [sorted(peers)] + [sorted(p) for p in itertools.combinations(peers, 2)]
    return [group_id_for(swarm.swarm_id, r, a, g, waiting=w) for r in rounds for a in range(3)
            for w in (False, True) for g in groups]


async def flood(swarm: Swarm) -> None:
    votes = parts = offers = 0
    slots = asyncio.Semaphore(PARALLEL)

    async def one(peer: str, gid: str, kind: str) -> None:
        nonlocal votes, parts, offers
        async with slots:
            try:
                if kind == "vote":
                    msg = Vote(group_id=gid, ok=False, digest="0" * 64, reason="flood").to_wire()
                    await swarm.transport.request(peer, VOTE, msg, timeout=5.0)
                    votes += 1
                elif kind == "offer":
                    await swarm.transport.request(peer, DIRECT, DirectRequest(proto=REDUCE).to_wire(), timeout=5.0)
                    offers += 1
                else:
                    await _part(swarm, peer, gid, direct=kind == "direct part")
                    parts += 1
            except (AveragingError, wire.WireError, TimeoutError, ConnectionError, OSError) as e:
                logger.debug("flood to %s: %s", peer[-8:], e)
        if (votes + parts) % 500 == 0:
            logger.warning("flooder: sent %d votes and %d parts (%d offers hoarded)", votes, parts, offers)

    while True:
        records = await swarm.directory.records()
        peers = sorted(p for p in records if p != swarm.peer_id)
        if not peers:
            await asyncio.sleep(0.2)
            continue
        rounds = sorted({r.round + d for r in records.values() for d in (0, 1)})
        targets = [secrets.token_hex(16) for _ in range(200)] + _guesses(swarm, peers, rounds)
        kinds = ("part", "vote", "vote", "vote", "direct part", "vote", "vote", "offer")
        await asyncio.gather(*(one(p, gid, kinds[i % len(kinds)]) for i, gid in enumerate(targets) for p in peers))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--initial-peers", nargs="+", required=True)
    args = parser.parse_args()
    setup_logging("INFO")
    # its own direct streams fall back to libp2p when its hoarded offers evict the ticket it is about to use
    # (the per-peer bound at work): expected, and not what its log is for
    logging.getLogger("swarmfold.averaging.direct").setLevel(logging.WARNING)
    args.workdir.mkdir(parents=True, exist_ok=True)
    swarm = Swarm(load_spec(args.spec), load_or_create_identity(args.workdir / "identity.key"),
                  initial_peers=args.initial_peers)
    swarm.start()
    logger.warning("flooder %s started", swarm.peer_id[-8:])
    try:
        swarm.run_coroutine(flood(swarm))
    finally:
        swarm.shutdown()
        time.sleep(0.1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
