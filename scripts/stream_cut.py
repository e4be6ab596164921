"""Measure how often an answer is cut off when the answering side closes its stream at once,
against wire.finish (wait for the caller's end first). Writes JSON.

    python scripts/stream_cut.py --trials 20 --size-mb 4 --out stream_cut.json                # loopback
    python scripts/stream_cut.py --link rtt=50ms,rate=100mbit --trials 5 --out stream_cut_wan.json

Two real p2pd daemons (hivemind P2P) in this process; with --link every byte between them
crosses swarmfold/devtools/linkemu.py. Modes alternate (close, finish, close, ...) so that
both see the same machine load. See docs/swarm.md, "Streams cut off mid-message".
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

from swarmfold.devtools.streamcut import MODES, pair

logger = logging.getLogger("stream_cut")


async def run(args: argparse.Namespace) -> dict:
    size = int(args.size_mb * (1 << 20))
    trials = []
    async with pair(args.link, finish_timeout=args.timeout) as (p, emu):
        for i in range(args.trials):
            for mode in MODES:
                t = await p.trial(mode, seed=1000 * i + MODES.index(mode), size=size, timeout=args.timeout,
                                  upload=int(args.upload_mb * (1 << 20)))
                logger.info("%s #%d: %s (%d of %d bytes) %s", mode, i, t.outcome, t.received, size, t.error)
                trials.append(t.to_dict())
        emu_stats = emu.stats_dict() if emu is not None else None
    summary = {m: dict(collections.Counter(t["outcome"] for t in trials if t["mode"] == m)) for m in MODES}
    return {"setup": {"link": args.link, "size_bytes": size, "upload_bytes": int(args.upload_mb * (1 << 20)),
                      "trials_per_mode": args.trials,
                      "python": sys.version.split()[0], "machine": platform.machine(), "cpus": os.cpu_count(),
                      "load_average_before": list(args.load_before), "load_average_after": list(os.getloadavg()),
                      "command": " ".join(sys.argv)},
            "summary": summary, "trials": trials, "emulator": emu_stats}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--link", default=None, help="a linkemu spec, e.g. rtt=50ms,rate=100mbit (default: direct loopback)")
    ap.add_argument("--trials", type=int, default=20, help="trials per mode")
    ap.add_argument("--size-mb", type=float, default=4.0, help="answer size in MiB")
    ap.add_argument("--upload-mb", type=float, default=0.0,
                    help="MiB the caller keeps sending after its request, never read by the answerer")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per trial (and finish's wait)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    args.load_before = os.getloadavg()
    t0 = time.monotonic()
    report = asyncio.run(run(args))
    report["setup"]["seconds"] = round(time.monotonic() - t0, 1)
    args.out.write_text(json.dumps(report, indent=1))
    logger.info("summary: %s", report["summary"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
