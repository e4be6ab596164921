"""The seed schedule is a pure function of (genesis seed, round, peer): the same in any process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from swarmfold.peer.seeds import batch_order, derive_seed, round_seed

# Each child prints the orders of a few (seed, round, peer) inputs as JSON.
CHILD = """
import json, sys
from swarmfold.peer.seeds import batch_order, round_seed
inputs = json.loads(sys.argv[1])
print(json.dumps([[round_seed(s, r, p), batch_order(s, r, p, num_windows=97, steps=6, batch_size=5).tolist()]
                  for s, r, p in inputs]))
"""
INPUTS = [[1234, 0, "local"], [1234, 7, "peer-b"], [99, 3, "12D3KooWAbc"]]


def _orders_in_child(hash_seed: str) -> list:
    # Different PYTHONHASHSEED per child: nothing may depend on Python's salted hash().
    env = dict(os.environ, PYTHONHASHSEED=hash_seed)
    run = subprocess.run([sys.executable, "-c", CHILD, json.dumps(INPUTS)], capture_output=True, text=True,
                         env=env, timeout=120, check=True)
    return json.loads(run.stdout)


@pytest.mark.slow
def test_same_inputs_same_order_in_two_processes() -> None:
    first, second = _orders_in_child("1"), _orders_in_child("2")
    assert first == second
    here = [[round_seed(s, r, p), batch_order(s, r, p, num_windows=97, steps=6, batch_size=5).tolist()]
            for s, r, p in INPUTS]
    assert here == first


def test_seed_derivation_is_pinned() -> None:
    # sha256-based, so it must never change: a change would fork every existing swarm.
    assert derive_seed(1234, "data", 0, "local") == 8904605691917976576
    assert round_seed(1234, 0, "local") == 8904605691917976576


@pytest.mark.parametrize("other", [(1234, 1, "local"), (1234, 0, "other"), (1235, 0, "local")])
def test_a_different_round_peer_or_genesis_gives_a_different_order(other: tuple[int, int, str]) -> None:
    base = batch_order(1234, 0, "local", num_windows=500, steps=4, batch_size=8)
    changed = batch_order(*other, num_windows=500, steps=4, batch_size=8)
    assert round_seed(1234, 0, "local") != round_seed(*other)
    assert not torch.equal(base, changed)


def test_purposes_are_independent_streams() -> None:
    assert round_seed(1234, 0, "local", "data") != round_seed(1234, 0, "local", "dropout")


def test_order_draws_whole_permutations() -> None:
    # 3 windows, 7 draws: each pass over the shard shows every window exactly once.
    order = batch_order(5, 2, "p", num_windows=3, steps=7, batch_size=1).reshape(-1).tolist()
    assert sorted(order[:3]) == [0, 1, 2]
    assert sorted(order[3:6]) == [0, 1, 2]
    assert 0 <= order[6] < 3
    with pytest.raises(ValueError, match="no training windows"):
        batch_order(5, 2, "p", num_windows=0, steps=1, batch_size=1)
