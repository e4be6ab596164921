"""Offline contributions: signed receipts, streaming merge, replay verification (issue 6).

One session-scoped world: a base trained 10 rounds on stdlib shard 2, and honest
contributions of 5 steps from it on shards 0, 1 and 3 by three identities. Cheats are
built from honest contributions by changing what was done and re-signing with the
cheater's own key (a cheater always holds its key), so only replay can catch them.
"""

from __future__ import annotations

import copy
import json
import math
import random
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import fast_spec
from cryptography.hazmat.primitives.asymmetric import rsa
from safetensors.torch import load_file, save_file

from swarmfold.averaging.aggregate import Contribution, weighted_mean
from swarmfold.averaging.base import SoloAverager
from swarmfold.averaging.identity import Identity, load_or_create_identity
from swarmfold.averaging.merge import MergeError, MergeOptions
from swarmfold.averaging.outer import OuterOptimizer
from swarmfold.averaging.receipt import (
    RECEIPT_FORMAT,
    ContributionError,
    contribution_paths,
    file_sha256,
    load_contribution,
    sign_record,
)
from swarmfold.peer.checkpoint import Checkpoint, load_checkpoint_dir, resolve_checkpoint
from swarmfold.peer.contribute import (
    ContributionResult,
    contribute,
    merge_to_checkpoint,
    param_names,
    threads_set,
)
from swarmfold.peer.data import Shard
from swarmfold.peer.local import LocalPeer, evaluate_model, model_from_checkpoint
from swarmfold.peer.model import tensor_sha256
from swarmfold.peer.tokenizer import load_tokenizer
from swarmfold.peer.verify import VerifyInputError, verify_file
from swarmfold.spec import Spec


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread: the machine is shared, and receipts record the count."""
    with threads_set(1):
        yield


CONTRIBUTORS = (0, 1, 3)  # shard index of each contributor; shard 2 trains the base


@dataclass
class World:
    spec: Spec
    root: Path
    data: list[Path]
    base_dir: Path  # workdir with rounds 8, 9, 10
    base: Checkpoint  # round 10
    previous: Checkpoint  # round 9
    ids: dict[int, Identity]
    contribs: dict[int, ContributionResult]
    shards: dict[int, Shard]

    def path(self, name: str) -> Path:
        return self.root / name


# the tests here share a module- or session-scoped fixture: one xdist worker runs them all (built once)
pytestmark = pytest.mark.xdist_group("test_contrib")


@pytest.fixture(scope="session")
def world(shards: list[Path], tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("contrib")
    spec = fast_spec()
    with threads_set(1):
        peer = LocalPeer(spec, [shards[2]], peer_id="local", threads=1, workdir=root / "base")
        for _ in range(10):
            peer.run_round(SoloAverager())
            if peer.round >= 8:
                peer.save()
    base = resolve_checkpoint(root / "base")
    previous = load_checkpoint_dir(root / "base" / "checkpoints" / "round-000009")
    tok = load_tokenizer(spec.tokenizer)
    shard_objs = {i: Shard([shards[i]], tok, seq_len=spec.data.seq_len, val_fraction=spec.data.val_fraction)
                  for i in range(4)}
    # Peer ids pick the batches; fixed ids keep the loss comparison the same on every run.
    ids = {i: seeded_identity(i, root / f"id-{i}.key") for i in CONTRIBUTORS}
    contribs = {i: contribute(ckpt=base, data=[shards[i]], identity=ids[i], out=root / f"c{i}.safetensors",
                              threads=1, snapshot_interval=2, shard=shard_objs[i]) for i in CONTRIBUTORS}
    assert base.round == 10 and previous.round == 9
    return World(spec=spec, root=root, data=list(shards), base_dir=root / "base", base=base, previous=previous,
                 ids=ids, contribs=contribs, shards=shard_objs)


_SMALL_PRIMES = [n for n in range(3, 2000, 2) if all(n % k for k in range(3, int(n**0.5) + 1, 2))]
_SMALL_PRODUCT = math.prod(_SMALL_PRIMES)


def _probable_prime(n: int, rng: random.Random) -> bool:
    """Miller-Rabin after a cheap check against the odd primes below 2000."""
    if math.gcd(n, _SMALL_PRODUCT) != 1:
        return False
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for _ in range(16):
        x = pow(rng.randrange(2, n - 1), d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def seeded_identity(seed: int, path: Path) -> Identity:
    """A test-only RSA identity derived from `seed`, so peer ids (and so batch orders) repeat run to run.

    Real identities come from `load_or_create_identity` (the OS's randomness); this one is
    as public as the seed and is never written anywhere.
    """
    rng = random.Random(seed)

    def prime() -> int:
        while True:
            n = rng.getrandbits(1024) | (3 << 1022) | 1
            if _probable_prime(n, rng):
                return n

    e = 65537
    while True:
        p, q = prime(), prime()
        if p != q and math.gcd(e, (p - 1) * (q - 1)) == 1:
            break
    d = pow(e, -1, (p - 1) * (q - 1))
    key = rsa.RSAPrivateNumbers(p, q, d, rsa.rsa_crt_dmp1(d, p), rsa.rsa_crt_dmq1(d, q), rsa.rsa_crt_iqmp(p, q),
                                rsa.RSAPublicNumbers(e, p * q)).private_key()
    return Identity(path=path, private_key=key)


def forge(w: World, src: ContributionResult, name: str, identity: Identity, *,
          body: Callable[[dict[str, Any]], None] | None = None,
          delta: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None) -> Path:
    """A cheater's contribution: `src` changed, then signed properly with the cheater's own key."""
    b = copy.deepcopy(src.body)
    delta_path, receipt_path = contribution_paths(w.path(name))
    tensors = load_file(str(src.delta_path))
    if delta is not None:
        tensors = delta(tensors)
    save_file(tensors, str(delta_path))
    names = param_names(w.spec, 257, 256)
    flat = torch.cat([tensors[n].reshape(-1) for n in names])
    b["delta"].update(file=delta_path.name, file_sha256=file_sha256(delta_path), sha256=tensor_sha256(flat),
                      norm=float(flat.norm()))
    if body is not None:
        body(b)
    receipt_path.write_text(json.dumps(sign_record(RECEIPT_FORMAT, b, identity)))
    return delta_path


def val_losses(w: World, target: Path) -> dict[int, float]:
    _, model = model_from_checkpoint(resolve_checkpoint(target))
    with threads_set(1):
        return {i: evaluate_model(model, w.shards[i], w.spec.inner.batch_size) for i in CONTRIBUTORS}


# ---- contribute -------------------------------------------------------------------------------

def test_receipt_records_what_was_done(world: World) -> None:
    c = load_contribution(world.contribs[0].delta_path)
    body, spec = c.body, world.spec
    assert c.peer_id == world.ids[0].peer_id
    assert body["base"] == {"round": 10, "model_sha256": world.base.meta["model_sha256"]}
    assert body["spec_hash"] == spec.spec_hash
    assert body["data"]["manifest_hash"] == world.shards[0].manifest_hash
    assert body["seed_inputs"]["genesis_seed"] == spec.seed and body["seed_inputs"]["round"] == 10
    assert body["steps"] == 5 and len(body["losses"]) == 5
    assert body["tokens"] == 5 * spec.tokens_per_step
    assert body["inner_start"]["source"] == "fresh" and body["inner_start"]["step"] == 0  # the base is "local"'s
    assert {"torch", "threads", "cpu_capability"} <= set(body["environment"]) and body["environment"]["threads"] == 1
    assert [s["step"] for s in body["snapshots"]["files"]] == [2, 4]


def test_contribution_from_own_checkpoint_is_exactly_a_live_rounds_delta(world: World, tmp_path: Path) -> None:
    """Same code as a live round: a peer's contribution from its own checkpoint equals its next round's Δ."""
    ident = world.ids[0]
    with threads_set(1):
        peer = LocalPeer(world.spec, [world.data[0]], peer_id=ident.peer_id, threads=1, workdir=tmp_path / "w")
        peer.run_round(SoloAverager())
        peer.save()
        result = contribute(ckpt=resolve_checkpoint(tmp_path / "w"), data=[world.data[0]], identity=ident,
                            out=tmp_path / "own.safetensors", threads=1, shard=peer.shard)
        live = peer.train_phase()
    assert result.body["inner_start"]["source"] == "checkpoint"
    assert result.body["delta"]["sha256"] == tensor_sha256(live.delta)
    assert result.body["losses"] == live.stats.losses


def test_contribute_refuses_to_overwrite(world: World) -> None:
    with pytest.raises(ValueError, match="exists"):
        contribute(ckpt=world.base, data=[world.data[0]], identity=world.ids[0],
                   out=world.contribs[0].delta_path, threads=1, shard=world.shards[0])


# ---- merge ----------------------------------------------------------------------------------------

def test_mean_merge_beats_every_single_contribution_on_every_shard(world: World) -> None:
    paths = [world.contribs[i].delta_path for i in CONTRIBUTORS]
    merged, _ = merge_to_checkpoint(base=world.base_dir, contributions=paths, out=world.path("merged"),
                                    options=MergeOptions(method="mean"))
    merged_loss = val_losses(world, merged)
    for i in CONTRIBUTORS:
        single, _ = merge_to_checkpoint(base=world.base_dir, contributions=[world.contribs[i].delta_path],
                                        out=world.path(f"single-{i}"), options=MergeOptions(method="mean"))
        single_loss = val_losses(world, single)
        for shard in CONTRIBUTORS:
            assert merged_loss[shard] < single_loss[shard], (i, shard, merged_loss, single_loss)


def test_merge_is_bit_identical_in_any_argument_order(world: World) -> None:
    paths = [world.contribs[i].delta_path for i in CONTRIBUTORS]
    a, ra = merge_to_checkpoint(base=world.base_dir, contributions=paths, out=world.path("order-a"),
                                options=MergeOptions())
    b, rb = merge_to_checkpoint(base=world.base_dir, contributions=paths[::-1], out=world.path("order-b"),
                                options=MergeOptions())
    assert ra.model_sha256 == rb.model_sha256
    assert file_sha256(a / "model.safetensors") == file_sha256(b / "model.safetensors")
    ckpt = load_checkpoint_dir(a)  # a normal, hash-checked checkpoint whose meta hash is the flat model's
    names = param_names(world.spec, 257, 256)
    assert tensor_sha256(torch.cat([ckpt.model[n].reshape(-1) for n in names])) == ckpt.meta["model_sha256"]


@pytest.mark.parametrize("method", ["task-arithmetic", "ties", "dare"])
def test_other_methods_are_order_independent_and_differ_from_mean(world: World, method: str) -> None:
    paths = [world.contribs[i].delta_path for i in CONTRIBUTORS]
    _, ra = merge_to_checkpoint(base=world.base_dir, contributions=paths, out=world.path(f"{method}-a"),
                                options=MergeOptions(method=method, weights="equal"))
    _, rb = merge_to_checkpoint(base=world.base_dir, contributions=[paths[1], paths[2], paths[0]],
                                out=world.path(f"{method}-b"), options=MergeOptions(method=method, weights="equal"))
    _, rm = merge_to_checkpoint(base=world.base_dir, contributions=paths, out=world.path(f"{method}-mean"),
                                options=MergeOptions(method="mean", weights="equal"))
    assert ra.model_sha256 == rb.model_sha256
    assert ra.model_sha256 != rm.model_sha256


def test_streamed_merge_equals_one_whole_vector_outer_step(shards: list[Path], tmp_path: Path) -> None:
    """Tensor by tensor (with momentum slices) gives the bits of the live round's whole-vector step."""
    spec = fast_spec(outer={"kind": "nesterov", "lr": 0.7, "momentum": 0.9}, round={"inner_steps": 2})
    ids = [load_or_create_identity(tmp_path / f"k{i}") for i in range(2)]
    with threads_set(1):
        peer = LocalPeer(spec, [shards[0]], peer_id="local", threads=1, workdir=tmp_path / "base")
        peer.run_round(SoloAverager())  # so the momentum buffer is not zero
        peer.save()
        base = resolve_checkpoint(tmp_path / "base")
        cs = [contribute(ckpt=base, data=[shards[i + 1]], identity=ids[i], out=tmp_path / f"c{i}.safetensors",
                         threads=1) for i in range(2)]
    path, result = merge_to_checkpoint(base=tmp_path / "base", contributions=[c.delta_path for c in cs],
                                       out=tmp_path / "merged", options=MergeOptions())
    names = param_names(spec, 257, 256)
    theta = torch.cat([base.model[n].reshape(-1) for n in names])
    group = {}
    for c in cs:
        sc = load_contribution(c.delta_path)
        d = load_file(str(c.delta_path))
        group[sc.key] = Contribution(torch.cat([d[n].reshape(-1) for n in names]), sc.weight)
    outer = OuterOptimizer(kind="nesterov", lr=0.7, momentum=0.9, numel=theta.numel())
    outer.load_state_dict(base.outer)
    expected = outer.step(theta, weighted_mean(group))
    assert result.model_sha256 == tensor_sha256(expected)
    merged = load_checkpoint_dir(path)
    assert torch.equal(merged.outer["momentum"], outer.state_dict()["momentum"])


def test_merge_refuses_a_contribution_from_another_base_naming_the_file(world: World) -> None:
    other = contribute(ckpt=world.previous, data=[world.data[0]], identity=world.ids[0],
                       out=world.path("from-round-9.safetensors"), threads=1, shard=world.shards[0])
    paths = [world.contribs[1].delta_path, other.delta_path]
    with pytest.raises(MergeError, match=r"from-round-9\.safetensors: made from base round 9"):
        merge_to_checkpoint(base=world.base_dir, contributions=paths, out=world.path("refused"),
                            options=MergeOptions())
    assert not (world.path("refused") / "checkpoints").exists()


def test_merge_refuses_another_spec_naming_the_file(world: World, tmp_path: Path) -> None:
    spec = fast_spec(inner={"lr": 1e-3})
    with threads_set(1):
        LocalPeer(spec, [world.data[0]], peer_id="local", threads=1, workdir=tmp_path / "b").save()
    other = contribute(ckpt=resolve_checkpoint(tmp_path / "b"), data=[world.data[0]], identity=world.ids[0],
                       out=tmp_path / "other-spec.safetensors", threads=1)
    with pytest.raises(MergeError, match=r"other-spec\.safetensors: made under spec"):
        merge_to_checkpoint(base=world.base_dir, contributions=[world.contribs[0].delta_path, other.delta_path],
                            out=tmp_path / "m", options=MergeOptions())


def test_merge_refuses_the_same_contribution_twice(world: World, tmp_path: Path) -> None:
    p = world.contribs[0].delta_path
    with pytest.raises(MergeError, match="give each contribution once"):
        merge_to_checkpoint(base=world.base_dir, contributions=[p, p.with_name("c0.receipt.json")],
                            out=tmp_path / "m", options=MergeOptions())


# ---- tampering ---------------------------------------------------------------------------------------

def test_tampered_receipt_is_refused(world: World, tmp_path: Path) -> None:
    delta, receipt = contribution_paths(tmp_path / world.contribs[0].delta_path.name)
    shutil.copy(world.contribs[0].delta_path, delta)
    record = json.loads(world.contribs[0].receipt_path.read_text())
    record["body"]["tokens"] *= 2  # claim twice the work
    receipt.write_text(json.dumps(record))
    msg = r"signature does not verify; the record was changed after it was signed"
    with pytest.raises(ContributionError, match=msg):
        verify_file(delta, ckpt=world.base, data=[world.data[0]], shard=world.shards[0])
    with pytest.raises(ContributionError, match=msg):
        merge_to_checkpoint(base=world.base_dir, contributions=[delta], out=tmp_path / "m", options=MergeOptions())


def test_tampered_delta_is_refused(world: World, tmp_path: Path) -> None:
    delta, receipt = contribution_paths(tmp_path / world.contribs[0].delta_path.name)
    shutil.copy(world.contribs[0].receipt_path, receipt)
    tensors = load_file(str(world.contribs[0].delta_path))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1e-3
    save_file(tensors, str(delta))
    msg = r"does not match the signed receipt .*; the delta was changed or damaged after signing"
    with pytest.raises(ContributionError, match=msg):
        verify_file(delta, ckpt=world.base, data=[world.data[0]], shard=world.shards[0])
    with pytest.raises(ContributionError, match=msg):
        merge_to_checkpoint(base=world.base_dir, contributions=[delta], out=tmp_path / "m", options=MergeOptions())


def test_receipt_signed_by_another_key_is_refused(world: World, tmp_path: Path) -> None:
    """Someone re-signs peer 0's receipt with their own key but keeps peer 0's id: refused."""
    record = json.loads(world.contribs[0].receipt_path.read_text())
    forged = sign_record(RECEIPT_FORMAT, record["body"], world.ids[1])
    delta, receipt = contribution_paths(tmp_path / world.contribs[0].delta_path.name)
    shutil.copy(world.contribs[0].delta_path, delta)
    receipt.write_text(json.dumps(forged))
    with pytest.raises(ContributionError, match=f"signed by peer {world.ids[1].peer_id}, but its peer_id says"):
        load_contribution(delta)


# ---- verify -------------------------------------------------------------------------------------------

def test_verify_passes_an_honest_contribution_bitwise(world: World) -> None:
    report = verify_file(world.contribs[0].delta_path, ckpt=world.base, data=[world.data[0]], shard=world.shards[0])
    assert report.passed, report.reason
    assert report.mode == "bitwise" and report.same_environment
    assert report.replay_sha256 == report.claimed_sha256 and report.distance == 0.0
    assert report.steps_replayed == 5 and report.loss_max_abs_diff == 0.0


def test_verify_catches_different_data(world: World) -> None:
    """Trained on shard 1, claims shard 0 (the verifier replays on shard 0)."""
    cheat = contribute(ckpt=world.base, data=[world.data[1]], identity=world.ids[0],
                       out=world.path("wrong-data-src.safetensors"), threads=1, shard=world.shards[1])

    def claim_shard0(b: dict[str, Any]) -> None:
        b["data"] = copy.deepcopy(world.contribs[0].body["data"])
        b["seed_inputs"]["num_windows"] = len(world.shards[0].train_windows)

    path = forge(world, cheat, "wrong-data.safetensors", world.ids[0], body=claim_shard0)
    report = verify_file(path, ckpt=world.base, data=[world.data[0]], shard=world.shards[0])
    assert not report.passed and report.mode == "bitwise"
    assert report.replay_sha256 == world.contribs[0].body["delta"]["sha256"]  # what the claim should have been
    assert report.distance is not None and report.distance > 0.1


def test_verify_catches_fewer_steps_than_claimed(world: World) -> None:
    short = contribute(ckpt=world.base, data=[world.data[0]], identity=world.ids[0],
                       out=world.path("short-src.safetensors"), threads=1, steps=3, shard=world.shards[0])

    def claim_five(b: dict[str, Any]) -> None:
        b["steps"] = b["seed_inputs"]["steps"] = 5
        b["tokens"] = 5 * world.spec.tokens_per_step
        b["weight"] = float(b["tokens"])
        b["losses"] = b["losses"] + b["losses"][-2:]

    path = forge(world, short, "short.safetensors", world.ids[0], body=claim_five)
    report = verify_file(path, ckpt=world.base, data=[world.data[0]], shard=world.shards[0])
    assert not report.passed and report.steps_replayed == 5
    assert report.distance is not None and report.distance > 0.1


@pytest.mark.parametrize("change", ["scaled", "noise"])
def test_verify_catches_a_scaled_or_noisy_delta(world: World, change: str) -> None:
    def edit(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if change == "scaled":
            return {k: v * 1.5 for k, v in t.items()}
        g = torch.Generator().manual_seed(0)
        return {k: v + 1e-3 * v.std() * torch.randn(v.shape, generator=g) if v.numel() > 1 else v
                for k, v in t.items()}

    path = forge(world, world.contribs[0], f"{change}.safetensors", world.ids[0], delta=edit)
    report = verify_file(path, ckpt=world.base, data=[world.data[0]], shard=world.shards[0])
    assert not report.passed
    assert report.replay_sha256 == world.contribs[0].body["delta"]["sha256"]
    assert report.distance is not None and report.distance > 0
    if change == "scaled":
        assert abs(report.distance - 1 / 3) < 1e-4  # |Δ − 1.5Δ| / |1.5Δ|


def test_verify_catches_a_different_base(world: World) -> None:
    """Trained from round 9, claims round 10's model (the verifier replays from round 10)."""
    old = contribute(ckpt=world.previous, data=[world.data[0]], identity=world.ids[0],
                     out=world.path("old-base-src.safetensors"), threads=1, shard=world.shards[0])

    def claim_round10(b: dict[str, Any]) -> None:
        b["base"] = {"round": 10, "model_sha256": world.base.meta["model_sha256"]}
        b["seed_inputs"]["round"] = 10

    path = forge(world, old, "old-base.safetensors", world.ids[0], body=claim_round10)
    report = verify_file(path, ckpt=world.base, data=[world.data[0]], shard=world.shards[0])
    assert not report.passed and report.distance is not None and report.distance > 0.01


def test_verify_refuses_to_replay_from_a_base_the_receipt_does_not_name(world: World) -> None:
    with pytest.raises(VerifyInputError, match="made from base round 10 .* is round 9"):
        verify_file(world.contribs[0].delta_path, ckpt=world.previous, data=[world.data[0]], shard=world.shards[0])


def test_verify_refuses_data_that_is_not_the_receipts(world: World) -> None:
    with pytest.raises(VerifyInputError, match="files that differ"):
        verify_file(world.contribs[0].delta_path, ckpt=world.base, data=[world.data[1]], shard=world.shards[1])


def test_verify_in_another_environment_judges_by_tolerance(world: World) -> None:
    """The tolerance path, tested with a perturbation this test controls.

    Whether 1 and 2 threads round differently depends on the CPU (on AVX2 they differ by
    about 1e-6, on AVX-512 they give identical bits), so the difference to judge is made
    here: the honest delta scaled by (1 + 1e-5) and signed by its own contributor. Replayed
    with another thread count (another environment class) it is judged by distance and
    passes; replayed in the claimed environment, where bits must match, it fails.
    """
    eps = 1e-5
    assert eps * 10 <= world.spec.verify.tolerance
    src = world.contribs[0]
    path = forge(world, src, "perturbed.safetensors", world.ids[0],
                 delta=lambda t: {k: v * (1 + eps) for k, v in t.items()})

    report = verify_file(path, ckpt=world.base, data=[world.data[0]], threads=2, shard=world.shards[0])
    assert report.mode == "tolerance" and not report.same_environment
    assert report.environment_here["threads"] == 2 and report.environment_claimed["threads"] == 1
    assert report.passed, report.reason
    assert report.distance is not None and eps / 2 <= report.distance <= 2 * eps, report.distance
    assert report.replay_sha256 != report.claimed_sha256
    assert f"{report.distance:.3g}" in report.reason

    same = verify_file(path, ckpt=world.base, data=[world.data[0]], threads=1, shard=world.shards[0])
    assert same.mode == "bitwise" and same.same_environment
    assert not same.passed and "same environment" in same.reason

    far = forge(world, src, "perturbed-far.safetensors", world.ids[0],
                delta=lambda t: {k: v * (1 + 20 * world.spec.verify.tolerance) for k, v in t.items()})
    assert not verify_file(far, ckpt=world.base, data=[world.data[0]], threads=2, shard=world.shards[0]).passed


def test_spot_check_passes_honest_and_catches_a_scaled_delta(world: World) -> None:
    honest = verify_file(world.contribs[0].delta_path, ckpt=world.base, data=[world.data[0]], spot_check=2, seed=1,
                         shard=world.shards[0])
    assert honest.passed, honest.reason
    assert honest.spot_check and len(honest.segments) == 2 and honest.segments[-1]["to_step"] == 5
    assert honest.steps_replayed < 5
    cheat = forge(world, world.contribs[0], "scaled-spot.safetensors", world.ids[0],
                  delta=lambda t: {k: v * 1.5 for k, v in t.items()})
    report = verify_file(cheat, ckpt=world.base, data=[world.data[0]], spot_check=1, seed=1, shard=world.shards[0])
    assert not report.passed and report.segments[-1]["passed"] is False


def test_spot_check_catches_a_forged_snapshot_chain(world: World) -> None:
    """Snapshots copied from another peer's run instead of kept along one's own: no segment replays."""
    other = world.contribs[1]  # the snapshots of another peer's honest run

    def borrow_snapshots(b: dict[str, Any]) -> None:
        b["snapshots"] = copy.deepcopy(other.body["snapshots"])

    path = forge(world, world.contribs[0], "borrowed.safetensors", world.ids[0], body=borrow_snapshots)
    report = verify_file(path, ckpt=world.base, data=[world.data[0]], spot_check=3, shard=world.shards[0])
    assert not report.passed
    assert all(not s["passed"] for s in report.segments)


def test_spot_check_refuses_a_changed_snapshot(world: World, tmp_path: Path) -> None:
    src = world.contribs[3]
    for p in [src.delta_path, src.receipt_path, *src.snapshot_paths]:
        shutil.copy(p, tmp_path / p.name)
    snap = tmp_path / src.snapshot_paths[0].name
    tensors = load_file(str(snap))
    key = sorted(tensors)[0]
    tensors[key] = tensors[key] * 2
    save_file(tensors, str(snap))
    with pytest.raises(ContributionError, match="sha256 does not match the signed receipt; the snapshot was changed"):
        verify_file(tmp_path / src.delta_path.name, ckpt=world.base, data=[world.data[3]], spot_check=3,
                    shard=world.shards[3])


# ---- the command line ----------------------------------------------------------------------------------

def test_cli_contribute_verify_merge_eval(world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from swarmfold.cli import main

    key = tmp_path / "me.key"
    rc = main(["contribute", "--base", str(world.base_dir), "--data", str(world.data[0]), "--out",
               str(tmp_path / "mine.safetensors"), "--rounds-of-steps", "2", "--identity", str(key), "--threads", "1"])
    out = capsys.readouterr().out
    assert rc == 0 and "2 steps from round 10" in out
    assert key.stat().st_mode & 0o777 == 0o600

    rc = main(["verify", str(tmp_path / "mine.receipt.json"), "--base", str(world.base_dir), "--data",
               str(world.data[0]), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["passed"] and report["mode"] == "bitwise" and report["steps_replayed"] == 2

    rc = main(["verify", str(tmp_path / "mine.safetensors"), "--base", str(world.base_dir), "--data",
               str(world.data[1])])
    assert rc == 2 and "pass the data the receipt lists" in capsys.readouterr().err

    rc = main(["merge", "--base", str(world.base_dir), str(tmp_path / "mine.safetensors"),
               str(world.contribs[1].delta_path), "--out", str(tmp_path / "merged"), "--json"])
    merged = json.loads(capsys.readouterr().out)
    assert rc == 0 and merged["round"] == 11 and len(merged["contributions"]) == 2

    rc = main(["eval", str(tmp_path / "merged"), "--data", str(world.data[0]), "--threads", "1", "--json"])
    evaluated = json.loads(capsys.readouterr().out)
    assert rc == 0 and evaluated["round"] == 11 and evaluated["val_loss"] < 3.0

    rc = main(["merge", "--base", str(world.previous.path), str(tmp_path / "mine.safetensors"),
               "--out", str(tmp_path / "refused")])
    err = capsys.readouterr().err
    assert rc == 2 and "mine.safetensors: made from base round 10" in err

    receipt = tmp_path / "mine.receipt.json"
    record = json.loads(receipt.read_text())
    record["body"]["losses"][0] = 0.5
    receipt.write_text(json.dumps(record))
    rc = main(["verify", str(receipt), "--base", str(world.base_dir), "--data", str(world.data[0])])
    assert rc == 1 and "FAIL (refused)" in capsys.readouterr().out
