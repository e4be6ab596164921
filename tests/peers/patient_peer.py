"""A test peer: the real swarm code, which starts its first round's averaging only once it sees the
records of every peer of the test (SWARMFOLD_TEST_PEERS=N) in the DHT.

Peers of a test start a few seconds apart; a real swarm's first round sorts that out over time
(peers that came late join the next round), but a test that compares every round with `simulate`
needs every peer in round 0's matchmaking. Waiting on the DHT's state, not on a clock, gives it
that. Run like `swarmfold run`: `python -m peers.patient_peer run ...` (swarm_helpers.peer_script).
It is also a crashing peer: SWARMFOLD_TEST_FAULT=PHASE@R kills it as tests/peers/crashing_peer.py says.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from peers._main import run_peer
from peers.crashing_peer import CrashingSwarm
from swarmfold.averaging.base import AverageRequest, AverageResult

logger = logging.getLogger("patient")


class PatientSwarm(CrashingSwarm):
    def average(self, request: AverageRequest) -> AverageResult:
        want = int(os.environ.get("SWARMFOLD_TEST_PEERS", "0"))
        deadline = time.monotonic() + 120
        while request.round == 0 and len(self.records()) < want:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(self.records())} of {want} peers appeared in 120 s")
            self._stopping.wait(0.2)
        return super().average(request)


def main() -> int:
    return run_peer(PatientSwarm)


if __name__ == "__main__":
    sys.exit(main())
