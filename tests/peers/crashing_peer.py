"""A test peer: the real swarm code, which SIGKILLs its own process group at a chosen point of a round.

Run like `swarmfold run` (same arguments), as a module with tests/ on the path:
`python -m peers.crashing_peer run ...` (swarm_helpers.peer_script), with
SWARMFOLD_TEST_FAULT=PHASE@R or PHASE@R@L: the first time this peer enters PHASE (matchmaking,
send, reduce or commit: protocol.Phase) at a round >= R, at tree level L (default 1, its own
group; 2 is the level of the groups' delegates), it kills its whole process group (the DHT and
its libp2p daemon included), as a power cut would.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from peers._main import run_peer
from swarmfold.averaging.protocol import Phase
from swarmfold.averaging.swarm import Swarm

logger = logging.getLogger("crasher")


class CrashingSwarm(Swarm):
    def phase_entered(self, phase: Phase, round_idx: int, level: int = 1) -> None:
        name, _, at = os.environ.get("SWARMFOLD_TEST_FAULT", "").partition("@")
        at, _, at_level = at.partition("@")
        if (name == phase.value and at.isdigit() and round_idx >= int(at)
                and level == (int(at_level) if at_level.isdigit() else 1)):
            logger.warning("[%s] fault injection: SIGKILL in phase %s of round %d, tree level %d",
                           self.peer_id[-8:], phase.value, round_idx, level)
            logging.shutdown()
            os.killpg(os.getpgid(0), signal.SIGKILL)


def main() -> int:
    return run_peer(CrashingSwarm)


if __name__ == "__main__":
    sys.exit(main())
