"""Two peers left at one round with models of their own find one model again.

This is what a restart can leave behind (tests/test_daemon_lifecycle.py's kill -9 test
failed this way under load): the restarted peer syncs late, misses the survivor's
matchmaking window, and both finish the round alone, each with its own θ at the same
round number. Matchmaking groups only equal base models, so unless one of them adopts
the other's state they train alone for ever. Here both peers are put in that state on
purpose (each trained alone, to the same round) and then run side by side.

After a round alone, the two split peers end it at the same gathering deadline, and which
of them publishes its next round first used to decide whether the split was settled: CI
once saw four rounds in a row go the wrong way. `AdverseOrder` makes that order the
losing one every round (the peer whose model the other must adopt publishes only after the
other has read the records), so the test fails without the catch-up's wait for split peers
(runner.split_peers) instead of failing one run in many.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from typing import ClassVar

import pytest
from conftest import fast_spec, write_spec
from daemon_helpers import LOOPBACK, NET

from swarmfold.averaging.records import PeerRecord
from swarmfold.daemon.options import PeerOptions
from swarmfold.daemon.runner import PeerRunner
from swarmfold.peer.local import RoundReport

pytestmark = pytest.mark.slow

ROUNDS_ALONE = 2
ROUNDS_TOGETHER = 4


class AdverseOrder(PeerRunner):
    """Two of these in one process: after a round alone, the peer whose new model hash sorts
    first (the one the tie-break keeps) holds its record back until the other has read the
    records for the new round. Bounded, so that a peer whose partner went away goes on."""

    board: ClassVar[dict[tuple[int, str], str]] = {}  # (round, peer id) -> the model it will publish
    read: ClassVar[set[tuple[int, str]]] = set()  # (round, peer id): its catch-up read the records
    cond: ClassVar[threading.Condition] = threading.Condition()
    BOUND = 120.0

    def _after_round(self, report: RoundReport) -> None:
        assert self.peer is not None
        me, rnd = self.peer.peer_id, self.peer.round
        if report.status == "alone":
            with self.cond:
                self.board[rnd, me] = self.peer.theta_sha256
                self.cond.notify_all()
                self.cond.wait_for(lambda: any(r == rnd and p != me for r, p in self.board), timeout=self.BOUND)
                other = next((p for r, p in self.board if r == rnd and p != me), None)
                if other is not None and self.board[rnd, me] < self.board[rnd, other]:
                    self.cond.wait_for(lambda: (rnd, other) in self.read, timeout=self.BOUND)
        super()._after_round(report)

    def _read_records(self) -> dict[str, PeerRecord]:
        records = super()._read_records()
        assert self.peer is not None
        with self.cond:
            self.read.add((self.peer.round, self.peer.peer_id))
            self.cond.notify_all()
        return records


def train_alone(spec: Path, shard: Path, workdir: Path) -> None:
    subprocess.run([sys.executable, "-m", "swarmfold", "run", "--spec", str(spec), "--data", str(shard),
                    "--workdir", str(workdir), "--threads", "1", "--host-maddrs", LOOPBACK,
                    "--rounds", str(ROUNDS_ALONE), "--api-port", "0"], check=True, capture_output=True, timeout=240)


def test_two_peers_at_one_round_with_their_own_models_converge(tmp_path: Path, shards: list[Path]) -> None:
    spec = write_spec(fast_spec(averaging=NET), tmp_path / "spec.toml")
    a, b = tmp_path / "a", tmp_path / "b"
    train_alone(spec, shards[0], a)
    train_alone(spec, shards[1], b)

    def runner(workdir: Path, shard: Path, peers: list[str]) -> PeerRunner:
        return AdverseOrder(PeerOptions(spec=spec, data=[str(shard)], workdir=workdir, initial_peers=peers,
                                      host_maddrs=[LOOPBACK], threads=1, rounds=ROUNDS_ALONE + ROUNDS_TOGETHER,
                                      api_port=0))

    ra = runner(a, shards[0], [])
    rb = None
    try:
        ra._setup()
        rb = runner(b, shards[1], list(ra.swarm.maddrs) if ra.swarm else [])
        rb._setup()
        assert ra.peer is not None and rb.peer is not None
        # the split: one round, two models, both trained alone
        assert ra.peer.round == rb.peer.round == ROUNDS_ALONE
        assert ra.peer.theta_sha256 != rb.peer.theta_sha256
        assert ra._provenance() == rb._provenance() == "local"
        codes: dict[str, int] = {}
        loops = [threading.Thread(target=lambda r=r, n=n: codes.__setitem__(n, r._loop()), name=f"peer-{n}")
                 for n, r in (("a", ra), ("b", rb))]
        for t in loops:
            t.start()
        for t in loops:
            t.join(timeout=300)
        assert not any(t.is_alive() for t in loops) and codes == {"a": 0, "b": 0}
    finally:
        for r in (rb, ra):
            if r is not None:
                r.controls.stop.set()
                if r.swarm is not None:
                    r.swarm.shutdown()
    histories = [{h["round"]: h for h in r.status.snapshot()["history"]} for r in (ra, rb)]
    together = [k for k in histories[0] if k in histories[1]
                and histories[0][k]["status"] == histories[1][k]["status"] == "committed"]
    assert together, f"no round committed by both: {[sorted((k, h['status']) for k, h in x.items()) for x in histories]}"
    k = together[0]
    assert histories[0][k]["model_sha256"] == histories[1][k]["model_sha256"]
