"""A test peer that trains honestly but inflates what it hands in: Δ × 1.5, every round.

Run like `swarmfold run` (same arguments). Its parts are well-formed (right shape, round,
spec, weight), so only replay can catch it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from swarmfold.averaging.base import AverageRequest, AverageResult
from swarmfold.averaging.swarm import Swarm
from swarmfold.daemon.options import add_peer_arguments, options_from_args
from swarmfold.daemon.runner import PeerRunner

logger = logging.getLogger("cheater")
SCALE = 1.5


class ScalingSwarm(Swarm):
    def average(self, request: AverageRequest) -> AverageResult:
        logger.warning("cheater: sending Δ × %s in round %d", SCALE, request.round)
        return super().average(dataclasses.replace(request, delta=request.delta * SCALE))


def main() -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    add_peer_arguments(sub.add_parser("run"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("hivemind").setLevel(logging.WARNING)
    return PeerRunner(options_from_args(args), swarm_cls=ScalingSwarm).run()


if __name__ == "__main__":
    sys.exit(main())
