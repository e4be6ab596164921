"""The shared seed schedule: every random draw is a pure function of (genesis seed, round, peer).

Seeds come from sha256 over a canonical JSON list, never from Python's `hash()` (salted
per process), the clock or the process id. Anyone holding the spec and a peer id can
replay that peer's data order for any round.
"""

from __future__ import annotations

import hashlib
import json

import torch

_DOMAIN = "swarmfold-seed-v1"


def derive_seed(genesis_seed: int, *parts: str | int) -> int:
    """A 63-bit seed from the genesis seed and any labels (purpose, round, peer id...)."""
    blob = json.dumps([_DOMAIN, int(genesis_seed), *parts], separators=(",", ":")).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") & (2**63 - 1)


def round_seed(genesis_seed: int, round_idx: int, peer_id: str, purpose: str = "data") -> int:
    """Seed of peer `peer_id`'s draws for `purpose` in round `round_idx`."""
    return derive_seed(genesis_seed, purpose, int(round_idx), str(peer_id))


def make_generator(seed: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def batch_order(genesis_seed: int, round_idx: int, peer_id: str, *, num_windows: int, steps: int,
                batch_size: int) -> torch.Tensor:
    """Window indices (steps × batch_size) that peer `peer_id` trains on in round `round_idx`.

    Draws whole permutations of the shard's training windows, so a round sees each window
    at most once per pass.
    """
    if num_windows < 1:
        raise ValueError("batch_order: the shard has no training windows")
    g = make_generator(round_seed(genesis_seed, round_idx, peer_id, "data"))
    need = steps * batch_size
    chunks, have = [], 0
    while have < need:
        perm = torch.randperm(num_windows, generator=g)
        chunks.append(perm)
        have += num_windows
    return torch.cat(chunks)[:need].view(steps, batch_size)
