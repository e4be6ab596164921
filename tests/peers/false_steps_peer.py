"""A test peer that trains honestly but claims one inner step more than it trained, every round.

Run like `swarmfold run` (same arguments), as a module with tests/ on the path:
`python -m peers.false_steps_peer run ...` (swarm_helpers.peer_script). In time mode a peer
declares its own step count, and the weight it claims follows from it; this one claims the
weight of the count it declares, so every header check passes and only the replay (which
trains the declared number of steps) can catch it.
"""

from __future__ import annotations

import dataclasses
import logging
import sys

from peers._main import run_peer
from swarmfold.averaging.base import AverageRequest, AverageResult
from swarmfold.averaging.merge import expected_tokens
from swarmfold.averaging.swarm import Swarm

logger = logging.getLogger("false-steps")


class FalseStepsSwarm(Swarm):
    def average(self, request: AverageRequest) -> AverageResult:
        claimed = request.steps + 1
        logger.warning("false steps: trained %d inner steps in round %d, declaring %d", request.steps,
                       request.round, claimed)
        return super().average(dataclasses.replace(request, steps=claimed,
                                                   weight=expected_tokens(self.spec, claimed)[1]))


def main() -> int:
    return run_peer(FalseStepsSwarm)


if __name__ == "__main__":
    sys.exit(main())
