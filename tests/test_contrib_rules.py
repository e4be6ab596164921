"""Merge rules (task arithmetic, TIES, DARE), deny records, and the swarm's replay hook (issue 6)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import fast_spec

from swarmfold.averaging.aggregate import (
    Contribution,
    dare,
    merge_rule,
    task_arithmetic,
    ties,
    weighted_mean,
)
from swarmfold.averaging.identity import Identity, load_or_create_identity
from swarmfold.averaging.receipt import (
    RecordError,
    build_deny_record,
    denied_peers,
    validate_deny_record,
)
from swarmfold.peer.contribute import threads_set
from swarmfold.peer.data import Shard
from swarmfold.peer.local import LocalPeer, environment
from swarmfold.peer.tokenizer import load_tokenizer
from swarmfold.peer.verify import (
    VerifyInputError,
    choose_to_verify,
    deny_record_for,
    verify_contribution,
)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread: the machine is shared, and receipts record the count."""
    with threads_set(1):
        yield


def C(values: list[float], weight: float = 1.0) -> Contribution:
    return Contribution(torch.tensor(values, dtype=torch.float32), weight)


# ---- rules ------------------------------------------------------------------------------------

def test_task_arithmetic_is_a_scaled_weighted_sum() -> None:
    group = {"a": C([1, 2]), "b": C([3, 4])}
    assert torch.equal(task_arithmetic(group, scale=1.0), torch.tensor([4.0, 6.0]))
    assert torch.equal(task_arithmetic(group, scale=0.5), weighted_mean(group))
    weighted = {"a": C([1, 2], 1.0), "b": C([3, 4], 3.0)}  # weights normalised to average 1: 0.5 and 1.5
    assert torch.equal(task_arithmetic(weighted), torch.tensor([5.0, 7.0]))


def test_ties_trims_elects_a_sign_and_averages_the_agreeing() -> None:
    group = {"a": C([3, -2, 0.5, 1]), "b": C([-1, -4, 0.25, 2])}
    # density 0.5 keeps a: [3, -2, 0, 0], b: [0, -4, 0, 2]; elected signs [+, -, 0, +]
    assert torch.equal(ties(group, density=0.5), torch.tensor([3.0, -3.0, 0.0, 2.0]))
    weighted = {"a": C([3, -2, 0.5, 1], 1.0), "b": C([-1, -4, 0.25, 2], 3.0)}
    assert torch.equal(ties(weighted, density=0.5), torch.tensor([3.0, -3.5, 0.0, 2.0]))
    assert torch.equal(ties(group, density=1.0, scale=2.0), torch.tensor([6.0, -6.0, 0.75, 3.0]))


def test_dare_is_deterministic_rescaled_and_label_dependent() -> None:
    g = torch.Generator().manual_seed(0)
    group = {p: Contribution(torch.randn(100_000, generator=g), 1.0) for p in ("a", "b")}
    assert torch.equal(dare(group, drop_rate=0.0, label="w"), weighted_mean(group))
    one = dare({"a": group["a"]}, drop_rate=0.75, label="w")
    assert torch.equal(one, dare({"a": group["a"]}, drop_rate=0.75, label="w"))
    assert not torch.equal(one, dare({"a": group["a"]}, drop_rate=0.75, label="other"))
    kept = one != 0
    assert abs(kept.float().mean().item() - 0.25) < 0.01
    assert torch.equal(one[kept], (group["a"].tensor.double()[kept] / 0.25).float())
    shuffled = {"b": group["b"], "a": group["a"]}  # insertion order does not matter
    assert torch.equal(dare(shuffled, drop_rate=0.5, label="w"), dare(group, drop_rate=0.5, label="w"))


def test_unknown_merge_rule_says_which_exist() -> None:
    with pytest.raises(ValueError, match="use one of mean, task-arithmetic, ties, dare"):
        merge_rule({"a": C([1])}, "soup")


# ---- deny records -------------------------------------------------------------------------------

# the tests here share a module- or session-scoped fixture: one xdist worker runs them all (built once)
pytestmark = pytest.mark.xdist_group("test_contrib_rules")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> list[Identity]:
    d = tmp_path_factory.mktemp("keys")
    return [load_or_create_identity(d / f"k{i}") for i in range(3)]


def test_deny_record_round_trip_and_refusals(keys: list[Identity]) -> None:
    rec = build_deny_record(keys[0], swarm_id="s1", denied=keys[1].peer_id, round_idx=7, reason="replay differs",
                            evidence={"distance": 0.3}, ttl=600, now=1000.0)
    ok = validate_deny_record(rec, swarm_id="s1", max_ttl=3600, now=1100.0)
    assert (ok.issuer, ok.denied, ok.round, ok.expires_at) == (keys[0].peer_id, keys[1].peer_id, 7, 1600.0)

    with pytest.raises(RecordError, match="expired"):
        validate_deny_record(rec, swarm_id="s1", max_ttl=3600, now=1601.0)
    with pytest.raises(RecordError, match="not this swarm"):
        validate_deny_record(rec, swarm_id="s2", max_ttl=3600, now=1100.0)
    with pytest.raises(RecordError, match="more than the spec's verify.deny_ttl"):
        validate_deny_record(rec, swarm_id="s1", max_ttl=60, now=1100.0)
    with pytest.raises(RecordError, match="in the future"):
        validate_deny_record(rec, swarm_id="s1", max_ttl=3600, now=0.0)
    tampered = dict(rec, body=dict(rec["body"], denied=keys[2].peer_id))
    with pytest.raises(RecordError, match="signature does not verify"):
        validate_deny_record(tampered, swarm_id="s1", max_ttl=3600, now=1100.0)
    with pytest.raises(ValueError, match="cannot deny itself"):
        build_deny_record(keys[0], swarm_id="s1", denied=keys[0].peer_id, round_idx=7, reason="", evidence={}, ttl=1)


def test_denied_peers_needs_a_quorum_of_distinct_issuers(keys: list[Identity]) -> None:
    victim, other = "QmVictim", "QmOther"

    def deny(k: Identity, who: str) -> dict:
        return build_deny_record(k, swarm_id="s", denied=who, round_idx=1, reason="r", evidence={}, ttl=100, now=0.0)

    records = [deny(keys[0], victim), deny(keys[0], victim), deny(keys[1], victim), deny(keys[2], other),
               {"format": "garbage"}]
    assert set(denied_peers(records, swarm_id="s", max_ttl=100, quorum=2, now=50.0)) == {victim}
    assert set(denied_peers(records, swarm_id="s", max_ttl=100, quorum=1, now=50.0)) == {victim, other}
    assert denied_peers(records, swarm_id="s", max_ttl=100, quorum=1, now=150.0) == {}


# ---- the swarm's replay hook -------------------------------------------------------------------------

def test_verify_contribution_replays_a_group_members_round(shards: list[Path], keys: list[Identity]) -> None:
    tok = load_tokenizer(fast_spec().tokenizer)
    shard = Shard([shards[0]], tok, seq_len=64, val_fraction=0.05)
    spec = fast_spec(verify={"public_data": shard.manifest_hash, "fraction": 0.5})
    with threads_set(1):
        member = LocalPeer(spec, [], peer_id="member-a", threads=1, tokenizer=tok, shard=shard)
        theta = member.theta.clone()
        phase = member.train_phase()
    kwargs = dict(spec=spec, theta=theta, round_idx=0, peer_id="member-a", shard=shard, threads=1,
                  claimed_environment=environment(1), claimed_losses=phase.stats.losses)
    honest = verify_contribution(delta=phase.delta, **kwargs)  # type: ignore[arg-type]
    assert honest.passed and honest.mode == "bitwise", honest.reason
    inflated = verify_contribution(delta=phase.delta * 1.01, **kwargs)  # type: ignore[arg-type]
    assert not inflated.passed and inflated.distance is not None and inflated.distance > 0.005

    record = deny_record_for(inflated, identity=keys[0], spec=spec, round_idx=0, now=10.0)
    rec = validate_deny_record(record, swarm_id=spec.swarm_id, max_ttl=spec.verify.deny_ttl, now=20.0)
    assert rec.denied == "member-a" and rec.evidence["claimed_sha256"] == inflated.claimed_sha256

    private = fast_spec(verify={"public_data": "0" * 64, "fraction": 0.5})
    with pytest.raises(VerifyInputError, match="only replays on public data"):
        verify_contribution(delta=phase.delta, **dict(kwargs, spec=private))  # type: ignore[arg-type]


def test_choose_to_verify_skips_self_and_follows_the_fraction() -> None:
    import random

    members = [f"p{i}" for i in range(1000)]
    chosen = choose_to_verify(members, self_id="p0", fraction=0.25, rng=random.Random(1))
    assert "p0" not in chosen and 200 < len(chosen) < 300
    assert choose_to_verify(members, self_id="p0", fraction=0.0) == []


# ---- streaming reads -----------------------------------------------------------------------------

def test_tensor_file_reads_what_safetensors_wrote_and_refuses_damage(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from swarmfold.averaging.merge import MergeError, TensorFile

    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g), "c": torch.zeros(0)}
    save_file(tensors, str(tmp_path / "t.safetensors"), metadata={"format": "x"})
    with TensorFile(tmp_path / "t.safetensors") as f:
        assert sorted(f.keys()) == ["a", "b", "c"]
        for name, t in tensors.items():
            assert torch.equal(f.get(name), t)
        assert torch.equal(f.get("a", 4, 9), tensors["a"].reshape(-1)[4:9])
        with pytest.raises(MergeError, match="outside tensor"):
            f.get("b", 5, 8)

    raw = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "short.safetensors").write_bytes(raw[:-8])
    with pytest.raises(MergeError, match="expected float32 inside the file"):
        TensorFile(tmp_path / "short.safetensors")
    save_file({"h": torch.zeros(4, dtype=torch.float16)}, str(tmp_path / "half.safetensors"))
    with pytest.raises(MergeError, match="is F16"):
        TensorFile(tmp_path / "half.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(MergeError, match="bad header length"):
        TensorFile(tmp_path / "junk.safetensors")
