"""Swarm commands: run (one peer in the foreground) and demo (a local swarm of real peers)."""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from pathlib import Path
from typing import Any

from swarmfold.daemon.options import add_peer_arguments, options_from_args

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run one peer in the foreground: join the swarm and train")
    add_peer_arguments(p)
    p.set_defaults(handler=cmd_run)

    p = sub.add_parser("demo", help="start N real peers on 127.0.0.1 and compare swarm vs alone vs data-parallel")
    p.add_argument("--peers", type=int, default=3)
    p.add_argument("--rounds", type=int, default=None, help="rounds to train (default: the demo's choice)")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--threads", type=int, default=1, help="threads per peer (default 1)")
    p.set_defaults(handler=cmd_demo)


def cmd_run(args: argparse.Namespace) -> int:
    from swarmfold.daemon.runner import run_peer
    from swarmfold.daemon.service import run_service

    def ready(maddrs: list[str]) -> None:
        print("joined the swarm; others can join with:", flush=True)
        for a in maddrs:
            print(f"  --initial-peers {a}", flush=True)

    def on_round(report: Any) -> None:
        print(f"round {report.round:4d}  {report.status:<11}  loss {report.train_loss:.4f}  "
              f"{report.tokens_per_second:,.0f} tok/s  model {report.model_sha256[:12]}", flush=True)

    runner = functools.partial(run_peer, on_ready=ready, on_round=on_round)
    return run_service(options_from_args(args), foreground=True, runner=runner)


def cmd_demo(args: argparse.Namespace) -> int:
    from swarmfold.daemon.demo import run_demo

    return run_demo(peers=args.peers, rounds=args.rounds, out=args.out, threads=args.threads, stdout=sys.stdout)
