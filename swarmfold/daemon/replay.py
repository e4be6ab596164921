"""The replay a verifying swarm injects into `Swarm` (averaging/ cannot import peer/, the daemon can).

To replay member m's round r, a peer rebuilds a LocalPeer with m's peer id on the public
shard, at this peer's θ_r, and runs the same `train_phase` that m ran. In a verifying
swarm that round depends only on public inputs (peer/local.py `replayable`), so an honest
member's Δ comes out bit-identical in the same environment class.
"""

from __future__ import annotations

import logging

import torch

from swarmfold.averaging.merge import expected_tokens
from swarmfold.averaging.verification import SwarmVerifier
from swarmfold.errors import UserError
from swarmfold.peer.contribute import threads_set
from swarmfold.peer.local import LocalPeer, environment
from swarmfold.peer.model import set_flat_params, tensor_sha256

logger = logging.getLogger(__name__)


class PublicDataError(UserError):
    """A peer of a verifying swarm does not train on the swarm's public data."""


def make_swarm_verifier(peer: LocalPeer) -> SwarmVerifier:
    """The verifier for `peer`'s Swarm; raises PublicDataError unless its shard is the public data."""
    spec = peer.spec
    public = spec.verify.public_data
    if peer.shard.manifest_hash != public:
        raise PublicDataError(
            f"this swarm verifies contributions by replay (verify.fraction = {spec.verify.fraction}), so every peer "
            f"trains on its public data, the shard with manifest {public[:12]}…; --data has manifest "
            f"{peer.shard.manifest_hash[:12]}…. Pass the public shard's files with --data")
    threads = peer.threads

    def replay(member: str, round_idx: int, base_sha256: str, steps: int) -> torch.Tensor:
        if round_idx != peer.round or base_sha256 != peer.theta_sha256:
            raise ValueError(f"we hold round {peer.round} (model {peer.theta_sha256[:12]}), not round {round_idx} "
                             f"(model {base_sha256[:12]})")
        with threads_set(threads):
            other = LocalPeer(spec, [], peer_id=member, threads=threads, tokenizer=peer.shard.tokenizer,
                              shard=peer.shard, device=peer.device)
            other.theta = peer.theta.clone()
            other.theta_sha256 = tensor_sha256(other.theta)
            other.round = round_idx
            set_flat_params(other.model, other.theta)
            return other.train_phase(steps=steps).delta  # the steps it declared: a false count replays differently

    def weight_for(steps: int) -> float:
        return expected_tokens(spec, steps)[1]

    return SwarmVerifier(replay=replay, environment=environment(threads, peer.device), fraction=spec.verify.fraction,
                         tolerance=spec.verify.tolerance, weight_for=weight_for)
