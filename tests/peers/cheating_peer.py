"""A test peer that trains honestly but inflates what it hands in: Δ × 1.5, every round.

Run like `swarmfold run` (same arguments), as a module with tests/ on the path:
`python -m peers.cheating_peer run ...` (swarm_helpers.peer_script). Its parts are well-formed (right shape, round,
spec, weight), so only replay can catch it.
"""

from __future__ import annotations

import dataclasses
import logging
import sys

from peers._main import run_peer
from swarmfold.averaging.base import AverageRequest, AverageResult
from swarmfold.averaging.swarm import Swarm

logger = logging.getLogger("cheater")
SCALE = 1.5


class ScalingSwarm(Swarm):
    def average(self, request: AverageRequest) -> AverageResult:
        logger.warning("cheater: sending Δ × %s in round %d", SCALE, request.round)
        return super().average(dataclasses.replace(request, delta=request.delta * SCALE))


def main() -> int:
    return run_peer(ScalingSwarm)


if __name__ == "__main__":
    sys.exit(main())
