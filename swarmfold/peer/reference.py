"""Reference runs that a swarm is measured against, on exactly the batches the swarm peers train on.

- data-parallel equivalent: one model, batch K·B (the K peers' batches of each step
  concatenated) for the same number of steps: what K machines reach with per-step
  gradient all-reduce in the same wall time.
- isolated: each peer alone on its own shard (the same round code with no averaging).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from swarmfold.averaging.base import SoloAverager
from swarmfold.peer.data import Shard
from swarmfold.peer.local import LocalPeer
from swarmfold.peer.model import build_model
from swarmfold.peer.seeds import batch_order
from swarmfold.peer.tokenizer import load_tokenizer
from swarmfold.peer.trainer import InnerTrainer
from swarmfold.spec import Spec


def load_shards(spec: Spec, shard_paths: Sequence[Path]) -> list[Shard]:
    tok = load_tokenizer(spec.tokenizer)
    return [Shard([p], tok, seq_len=spec.data.seq_len, val_fraction=spec.data.val_fraction) for p in shard_paths]


def train_data_parallel(spec: Spec, shards: Sequence[Shard], peer_ids: Sequence[str], *, rounds: int,
                        on_round: Callable[[int], None] | None = None) -> torch.nn.Module:
    """One model trained on the concatenation of every peer's batch at every step."""
    tok = shards[0].tokenizer
    model = build_model(spec, tok.vocab_size, tok.eos_id)
    trainer = InnerTrainer(model, spec.inner)
    h = spec.round.inner_steps
    for r in range(rounds):
        per_peer = []
        for pid, shard in zip(peer_ids, shards, strict=True):
            order = batch_order(spec.seed, r, pid, num_windows=len(shard.train_windows), steps=h,
                                batch_size=spec.inner.batch_size)
            per_peer.append([shard.train_batch(row) for row in order])
        for t in range(h):
            trainer.step(torch.cat([batches[t] for batches in per_peer]))
        if on_round is not None:
            on_round(r + 1)
    return model


def train_isolated(spec: Spec, shard: Shard, peer_id: str, *, rounds: int, threads: int,
                   device: torch.device | str = "cpu", on_round: Callable[[int], None] | None = None) -> LocalPeer:
    """One peer alone for `rounds` rounds: the swarm's round code with no one to average with."""
    peer = LocalPeer(spec, [], peer_id=peer_id, threads=threads, shard=shard, tokenizer=shard.tokenizer,
                     device=device)
    averager = SoloAverager()
    for r in range(rounds):
        peer.run_round(averager)
        if on_round is not None:
            on_round(r + 1)
    return peer
