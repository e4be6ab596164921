"""`swarmfold doctor`: whether this machine can join the swarm, one line per check (see daemon/doctor.py)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="check whether this machine can join the swarm, and what to fix if not")
    p.add_argument("--spec", type=Path, default=None,
                   help="the swarm spec: its bootstrap peers are tried (without it, only this machine is checked)")
    p.add_argument("--workdir", type=Path, default=Path("."), help="the peer's workdir (default: here)")
    p.add_argument("--threads", type=int, default=None, help="the threads the peer would use (default: settings, 2)")
    p.add_argument("--api-port", type=int, default=None, help="the API port to check (default: from settings)")
    p.add_argument("--api-host", default=None, help="the API address to check (default: from settings)")
    p.add_argument("--initial-peers", nargs="*", default=[], metavar="MULTIADDR",
                   help="more peers to try, as for `swarmfold run`")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each peer (default 5)")
    p.set_defaults(handler=cmd_doctor)


def cmd_doctor(args: argparse.Namespace) -> int:
    from swarmfold.daemon.doctor import run_doctor
    from swarmfold.spec import load_spec

    spec = load_spec(args.spec) if args.spec else None
    checks = run_doctor(spec=spec, workdir=args.workdir, threads=args.threads, api_port=args.api_port,
                        api_host=args.api_host, initial_peers=args.initial_peers, timeout=args.timeout)
    for c in checks:
        print(c.line(), flush=True)
    problems = [c for c in checks if not c.ok]
    print(f"{len(problems)} problem(s): fix the lines marked PROBLEM, then run `swarmfold doctor` again"
          if problems else "all checks passed: this machine can join")
    return 1 if problems else 0
