"""A test peer: the real swarm code, but every contribution it sends is corrupted.

Run like `swarmfold run` (same arguments), as a module with tests/ on the path:
`python -m peers.hostile_peer run ...` (swarm_helpers.peer_script). Each time it sends its parts it uses the next
fault of `Fault`, so one run exercises every kind of bad contribution.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import sys
from typing import Any

import numpy as np

from peers._main import run_peer
from swarmfold.averaging import codec
from swarmfold.averaging.base import AverageRequest
from swarmfold.averaging.protocol import encode_span
from swarmfold.averaging.swarm import Group, Swarm

logger = logging.getLogger("hostile")


class Fault(enum.Enum):
    """Each bad contribution, with the named error the reducers must answer it with."""

    NAN = ("nan", "nonfinite")
    INF = ("inf", "nonfinite")
    WRONG_SHAPE = ("shape", "wrong_shape")
    WRONG_DTYPE = ("dtype", "wrong_dtype")
    WRONG_ROUND = ("round", "wrong_round")
    WRONG_SPEC = ("spec", "wrong_spec")
    OVERSIZED = ("oversized", "oversized")
    WEIGHT_ABOVE_CAP = ("weight", "weight_above_cap")

    @property
    def label(self) -> str:
        return self.value[1]


FAULTS = list(Fault.__members__.values())


class HostileSwarm(Swarm):
    """Each part it sends (one per remote reducer) carries the next fault, round after round."""

    sends = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # once rejected, give the round up at once (a local setting: the spec, and so the swarm id,
        # is unchanged), resync and attack the next round instead of waiting to be let back in
        self.avg = dataclasses.replace(self.avg, max_attempts=1)

    def _make_part(self, group: Group, req: AverageRequest, span_index: int, payload: bytes | memoryview,
                   numel: int) -> dict[str, Any]:
        f = FAULTS[self.sends % len(FAULTS)]
        self.sends += 1
        logger.warning("hostile: sending %s (%s) in round %d", f.name, f.label, req.round)
        msg = super()._make_part(group, req, span_index, payload, numel)
        comp = self.avg.compression
        lo = codec.spans(req.delta.numel(), len(group.reducers))[span_index][0]
        if f in (Fault.NAN, Fault.INF):
            # NaN in the first element (caught before any chunk is averaged), Inf in the last (caught in the
            # last chunk, after the others were averaged and sent back: the reducer cuts the span off)
            values = req.delta[lo:lo + numel].clone()
            values[0 if f is Fault.NAN else -1] = np.nan if f is Fault.NAN else np.inf
            msg["payload"] = encode_span(comp, values)
        elif f is Fault.WRONG_SHAPE:
            msg["numel"] = numel + 1
            msg["payload"] = bytes(payload) + b"\0\0\0\0"
        elif f is Fault.WRONG_DTYPE:
            msg["dtype"] = "float64"
        elif f is Fault.WRONG_ROUND:
            msg["round"] = req.round + 1
        elif f is Fault.WRONG_SPEC:
            msg["spec_hash"] = "0" * 64
        elif f is Fault.OVERSIZED:
            msg["payload"] = bytes(self.avg.max_message_bytes + 1)
        elif f is Fault.WEIGHT_ABOVE_CAP:
            msg["weight"] = float(self.spec.token_cap) * 10
        return msg


def main() -> int:
    return run_peer(HostileSwarm)


if __name__ == "__main__":
    sys.exit(main())
