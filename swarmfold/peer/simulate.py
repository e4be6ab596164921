"""`swarmfold simulate`: one peer per shard in one process, averaged in-process.

It drives the same LocalPeer round code as the real swarm, and groups peers the way the
swarm's matchmaking does when every peer is ready (sorted ids cut into groups of at most
G). It is the reference the real swarm must equal, and the engine of the benchmarks.

With more peers than `group_size`, the groups are joined by the tree into one model per
round, as the live swarm joins them (averaging/climb.py, inprocess.reduce_tree); with
N <= G that is the single group it always was.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from swarmfold.averaging.base import AverageResult
from swarmfold.averaging.inprocess import reduce_tree
from swarmfold.peer.local import LocalPeer, RoundReport
from swarmfold.peer.roundlog import RoundLogError
from swarmfold.spec import Spec

logger = logging.getLogger(__name__)


@dataclass
class SimulationResult:
    peer_ids: list[str]
    rounds: int
    per_round: list[dict[str, dict[str, object]]] = field(default_factory=list)  # round -> peer -> summary


def simulate(spec: Spec, shards: Sequence[Sequence[str | Path]], *, rounds: int, threads: int,
             out: Path | None = None, peer_ids: Sequence[str] | None = None,
             on_round: Callable[[int, list[LocalPeer], dict[str, RoundReport]], None] | None = None,
             save_checkpoints: bool = True, keep_checkpoints: int = 3,
             device: torch.device | str = "cpu",
             steps: Mapping[int, Mapping[str, int]] | None = None) -> tuple[list[LocalPeer], SimulationResult]:
    """`steps`: round -> peer id -> the inner steps that peer trained (a time-mode swarm's round logs,
    `roundlog.steps_from`); every peer of every round must be there. Without it each peer trains
    as its spec says (H steps; in time mode, as many as fit in round.seconds here)."""
    ids = list(peer_ids) if peer_ids else [f"sim-{i}" for i in range(len(shards))]
    if len(ids) != len(shards):
        raise ValueError(f"simulate: {len(shards)} shards but {len(ids)} peer ids; give one id per shard")
    if len(set(ids)) != len(ids):
        raise ValueError("simulate: peer ids must be distinct")
    if len(ids) < spec.averaging.min_group_size:
        raise ValueError(f"simulate: {len(ids)} peers can never form a group of min_group_size "
                         f"{spec.averaging.min_group_size}; add shards or lower averaging.min_group_size")
    peers = [LocalPeer(spec, shard, peer_id=pid, threads=threads,
                       workdir=(out / f"peer-{i}") if out and save_checkpoints else None,
                       keep_checkpoints=keep_checkpoints, device=device)
             for i, (pid, shard) in enumerate(zip(ids, shards, strict=True))]
    by_id = {p.peer_id: p for p in peers}
    result = SimulationResult(peer_ids=ids, rounds=rounds)
    if steps is not None:
        missing = [(r, pid) for r in range(rounds) for pid in ids if pid not in steps.get(r, {})]
        if missing:
            r, pid = missing[0]
            raise RoundLogError(f"simulate: the round logs give no steps for peer {pid} in round {r} "
                               f"({len(missing)} (round, peer) pairs missing); pass the logs of every peer, with "
                               "--peer-ids naming the swarm's peers")
    for r in range(rounds):
        phases = {p.peer_id: p.train_phase(steps=None if steps is None else steps[r][p.peer_id]) for p in peers}
        outcomes: dict[str, AverageResult] = reduce_tree(
            {pid: by_id[pid].request(phases[pid]) for pid in ids}, swarm_id=spec.swarm_id,
            compression=spec.averaging.compression, rule=spec.averaging.aggregation,
            trim_fraction=spec.averaging.trim_fraction, group_size=spec.averaging.group_size)
        reports = {pid: by_id[pid].finish_round(phases[pid], outcomes[pid]) for pid in ids}
        for p in peers:
            if p.workdir is not None:
                p.save()
        result.per_round.append({pid: {"status": rep.status, "train_loss": rep.train_loss,
                                       "steps": phases[pid].steps,
                                       "model_sha256": rep.model_sha256, "bytes_sent": rep.result.bytes_sent}
                                 for pid, rep in reports.items()})
        logger.info("simulate round %d: mean train loss %.4f", r,
                    sum(rep.train_loss for rep in reports.values()) / len(reports))
        if on_round:
            on_round(r, peers, reports)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "simulation.json").write_text(json.dumps(
            {"peer_ids": ids, "rounds": rounds, "per_round": result.per_round}, indent=1))
    return peers, result
