"""The entry point every test peer shares: `swarmfold run`'s arguments, with a Swarm subclass."""

from __future__ import annotations

import argparse

from swarmfold.averaging.swarm import Swarm
from swarmfold.daemon.options import add_peer_arguments, options_from_args
from swarmfold.daemon.runner import PeerRunner
from swarmfold.errors import setup_logging


def run_peer(swarm_cls: type[Swarm]) -> int:
    """Parse `run --spec ... --data ...` like `swarmfold run` and run one peer whose swarm is `swarm_cls`."""
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    add_peer_arguments(sub.add_parser("run"))
    args = parser.parse_args()
    setup_logging("INFO")
    return PeerRunner(options_from_args(args), swarm_cls=swarm_cls).run()
