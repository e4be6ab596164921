"""Verification by replay: redo a contribution's inner steps and compare with what it claims.

Trust comes from replay, not from the receipt. The receipt's signature only says who
claims what; `verify` rebuilds the contributor's peer (same spec, base θ_r, peer id,
data, inner-optimizer start state), runs the same `InnerTrainer` steps on the batches
the seed schedule gives, and compares the resulting Δ with the delta file:

- same environment class (torch build, thread count, CPU capability, training device and, for
  GPUs, its name, compute capability and CUDA/cuDNN/driver versions): the bits must match;
- otherwise: the relative distance ||Δ_replay − Δ_claim|| / ||Δ_claim|| must be within the
  spec's `verify.tolerance` (1 vs 2 threads measured about 1e-6 here; the default is 1e-4).

`--spot-check K` replays only K segments between the snapshots the contributor kept
(always including the last, which ties the chain to the delta), so a verifier spends
about K × interval steps instead of H.

`verify_contribution` is the same check as a library call on flat tensors, for peers that
replay part of their group's contributions on public data during a live round;
`deny_record_for` turns a failure into a signed, expiring deny record.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from swarmfold.averaging.identity import Identity
from swarmfold.averaging.merge import expected_tokens
from swarmfold.averaging.receipt import (
    ContributionError,
    DenyRecord,
    SignedContribution,
    build_deny_record,
    denied_peers,
    file_sha256,
    load_contribution,
    validate_deny_record,
)
from swarmfold.averaging.verification import (
    choose_to_verify,  # the swarm's draw, re-exported
    environment_class,
)
from swarmfold.errors import UserError
from swarmfold.peer.checkpoint import Checkpoint
from swarmfold.peer.contribute import (
    inner_state_record,
    load_snapshot,
    named_delta,
    round_batches,
    run_steps,
    start_peer,
    state_sha256,
    threads_set,
)
from swarmfold.peer.data import Shard
from swarmfold.peer.device import resolve_device
from swarmfold.peer.local import LocalPeer, environment
from swarmfold.peer.model import flat_params, set_flat_params, tensor_sha256
from swarmfold.peer.tokenizer import load_tokenizer
from swarmfold.spec import Spec, spec_from_dict

logger = logging.getLogger(__name__)


__all__ = [
    "DenyRecord", "VerifyInputError", "VerifyReport", "build_deny_record", "choose_to_verify", "deny_record_for",
    "denied_peers", "relative_distance", "validate_deny_record", "verify_contribution", "verify_file",
]


class VerifyInputError(UserError):
    """The verifier's own inputs cannot check this contribution (wrong data, base or start state)."""


@dataclass
class VerifyReport:
    passed: bool
    mode: str  # "bitwise" or "tolerance"
    reason: str
    peer_id: str
    steps_claimed: int
    steps_replayed: int
    tolerance: float
    distance: float | None = None  # ||Δ_replay − Δ_claim|| / ||Δ_claim|| (or per segment, the largest)
    claimed_sha256: str = ""
    replay_sha256: str = ""
    same_environment: bool = True
    environment_claimed: dict[str, Any] = field(default_factory=dict)
    environment_here: dict[str, Any] = field(default_factory=dict)
    loss_max_abs_diff: float | None = None
    spot_check: bool = False
    segments: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("distance", "loss_max_abs_diff"):  # JSON has no inf/nan
            if d[k] is not None and not math.isfinite(d[k]):
                d[k] = str(d[k])
        return d


def same_environment_class(claimed: dict[str, Any], here: dict[str, Any]) -> bool:
    return environment_class(claimed) == environment_class(here)


def relative_distance(replay: torch.Tensor, claim: torch.Tensor, reference: torch.Tensor | None = None) -> float:
    """||replay − claim|| / ||reference|| (reference defaults to claim), in float64."""
    ref = claim if reference is None else reference
    num = float((replay.to(torch.float64) - claim.to(torch.float64)).norm())
    den = float(ref.to(torch.float64).norm())
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def _loss_diff(replay: Sequence[float], claim: Sequence[float]) -> float:
    return max((abs(a - b) for a, b in zip(replay, claim, strict=True)), default=0.0)


def _losses_agree(replay: Sequence[float], claim: Sequence[float], bitwise: bool, tolerance: float) -> bool:
    if bitwise:
        return list(replay) == list(claim)
    return all(abs(a - b) <= tolerance * max(abs(b), 1.0) for a, b in zip(replay, claim, strict=True))


# ---- the core comparison (used by files and by the swarm) -----------------------------------

def _compare_full(peer: LocalPeer, *, round_idx: int, steps: int, claim: torch.Tensor, claimed_losses: Sequence[float],
                  bitwise: bool, tolerance: float, report: VerifyReport) -> VerifyReport:
    losses, _ = run_steps(peer, round_batches(peer, round_idx, steps))
    replay, _ = named_delta(peer)
    report.steps_replayed = steps
    report.replay_sha256 = tensor_sha256(replay)
    report.distance = relative_distance(replay, claim)
    report.loss_max_abs_diff = _loss_diff(losses, claimed_losses)
    losses_ok = _losses_agree(losses, claimed_losses, bitwise, tolerance)
    if bitwise:
        report.passed = report.replay_sha256 == report.claimed_sha256 and losses_ok
        report.reason = ("replayed bits match the delta" if report.passed else
                         f"replay differs from the claimed delta (relative distance {report.distance:.3g}"
                         f"{'' if losses_ok else ', and the per-step losses differ'}) in the same environment, "
                         "where bits must match")
    else:
        report.passed = report.distance <= tolerance and losses_ok
        report.reason = (f"relative distance {report.distance:.3g} {'<=' if report.passed else '>'} "
                         f"tolerance {tolerance:g} (another environment class, so bits may differ)"
                         f"{'' if losses_ok else '; the per-step losses differ beyond tolerance'}")
    return report


def verify_contribution(*, spec: Spec, theta: torch.Tensor, round_idx: int, peer_id: str, delta: torch.Tensor,
                        shard: Shard, threads: int, steps: int | None = None,
                        inner_state: dict[str, torch.Tensor] | None = None, inner_step: int = 0,
                        claimed_losses: Sequence[float] | None = None,
                        claimed_environment: dict[str, Any] | None = None,
                        device: torch.device | str = "cpu") -> VerifyReport:
    """Replay group member `peer_id`'s round `round_idx` from θ_r on public data and judge its Δ.

    For the live swarm: `theta` is the round's θ_r (flat float32), `delta` the member's
    pseudo-gradient as received (flat float32), `shard` the spec's public data
    (`verify.public_data` must be its manifest hash). The member's inner-optimizer start
    state must be known: pass it (committed by hash before the round) or leave it None
    when the swarm starts every round with a fresh AdamW at step 0.
    Without `claimed_environment` the comparison is by tolerance.
    """
    if not spec.verify.public_data or shard.manifest_hash != spec.verify.public_data:
        raise VerifyInputError(f"the shard's manifest {shard.manifest_hash[:12]}… is not the spec's public data "
                               f"({spec.verify.public_data[:12] or 'none'}); the swarm only replays on public data")
    if theta.shape != delta.shape or delta.dtype != torch.float32:
        raise VerifyInputError(f"delta {tuple(delta.shape)}/{delta.dtype} does not match θ {tuple(theta.shape)}")
    steps = spec.round.inner_steps if steps is None else steps
    device = resolve_device(device) if isinstance(device, str) else device
    here = environment(threads, device)
    claimed_env = claimed_environment or {}
    bitwise = claimed_environment is not None and same_environment_class(claimed_env, here)
    report = VerifyReport(passed=False, mode="bitwise" if bitwise else "tolerance", reason="", peer_id=peer_id,
                          steps_claimed=steps, steps_replayed=0, tolerance=spec.verify.tolerance,
                          claimed_sha256=tensor_sha256(delta), same_environment=bitwise,
                          environment_claimed=claimed_env, environment_here=here)
    with threads_set(threads):
        peer = LocalPeer(spec, [], peer_id=peer_id, threads=threads, tokenizer=shard.tokenizer, shard=shard,
                         device=device)
        peer.theta = theta.clone()
        peer.theta_sha256 = tensor_sha256(peer.theta)
        peer.round = round_idx
        set_flat_params(peer.model, peer.theta)
        peer.trainer.load_state_tensors(inner_state or {}, inner_step)
        losses = list(claimed_losses) if claimed_losses is not None else None
        result = _compare_full(peer, round_idx=round_idx, steps=steps, claim=delta,
                               claimed_losses=losses if losses is not None else [], bitwise=bitwise,
                               tolerance=spec.verify.tolerance, report=report)
    if claimed_losses is None:
        result.loss_max_abs_diff = None
    return result


def deny_record_for(report: VerifyReport, *, identity: Identity, spec: Spec, round_idx: int,
                    now: float | None = None) -> dict[str, Any]:
    """A signed deny record against the peer whose contribution failed `report`, valid verify.deny_ttl s."""
    if report.passed:
        raise ValueError("the contribution passed verification; there is nothing to deny")
    evidence = {"mode": report.mode, "distance": report.distance if report.distance is None or
                math.isfinite(report.distance) else str(report.distance), "tolerance": report.tolerance,
                "claimed_sha256": report.claimed_sha256, "replay_sha256": report.replay_sha256,
                "steps": report.steps_claimed}
    return build_deny_record(identity, swarm_id=spec.swarm_id, denied=report.peer_id, round_idx=round_idx,
                             reason=report.reason, evidence=evidence, ttl=spec.verify.deny_ttl, now=now)


# ---- verify a contribution file ------------------------------------------------------------------

def _claimed_delta(c: SignedContribution, names: Sequence[str]) -> torch.Tensor:
    tensors = load_file(str(c.delta_path))
    missing = [n for n in names if n not in tensors]
    if missing or len(tensors) != len(names):
        raise VerifyInputError(f"{c.delta_path}: tensors do not match the base model (missing {missing[:3]})")
    return torch.cat([tensors[n].reshape(-1).to(torch.float32) for n in names])


def _check_base(c: SignedContribution, ckpt: Checkpoint, spec: Spec) -> None:
    model_sha = str(ckpt.meta.get("model_sha256"))
    if c.spec_hash != spec.spec_hash or c.base_round != ckpt.round or c.base_model_sha256 != model_sha:
        raise VerifyInputError(
            f"{c.receipt_path}: made from base round {c.base_round} (model {c.base_model_sha256[:12]}…, spec "
            f"{c.spec_hash[:12]}…), but --base {ckpt.path} is round {ckpt.round} (model {model_sha[:12]}…, spec "
            f"{spec.spec_hash[:12]}…); pass the checkpoint the receipt names")


def _check_data(c: SignedContribution, shard: Shard) -> None:
    claimed = c.body["data"]
    if shard.manifest_hash == claimed["manifest_hash"]:
        return
    ours = {str(e["name"]): str(e["sha256"]) for e in shard.manifest_json()}
    theirs = {str(e.get("name")): str(e.get("sha256")) for e in claimed["files"] if isinstance(e, dict)}
    diff = sorted(n for n in set(ours) | set(theirs) if ours.get(n) != theirs.get(n))
    raise VerifyInputError(f"--data has manifest {shard.manifest_hash[:12]}…, the receipt's is "
                           f"{claimed['manifest_hash'][:12]}…; files that differ: {diff[:5] or 'tokenizer'}; "
                           "pass the data the receipt lists")


def _receipt_consistency(c: SignedContribution, spec: Spec) -> str:
    steps = int(c.body["steps"])
    tokens, weight = expected_tokens(spec, steps)
    if steps < 1 or int(c.body["tokens"]) != tokens or float(c.body["weight"]) != weight:
        return (f"receipt claims {c.body['tokens']} tokens and weight {c.body['weight']} for {steps} steps; "
                f"{steps} steps of this spec are {tokens} tokens, weight {weight}")
    if len(c.body["losses"]) != steps:
        return f"receipt lists {len(c.body['losses'])} losses for {steps} steps"
    seeds = c.body["seed_inputs"]
    if seeds["genesis_seed"] != spec.seed or seeds["round"] != c.base_round or seeds["peer_id"] != c.peer_id:
        return f"receipt's seed inputs {seeds} are not (genesis seed, base round, peer id)"
    return ""


def verify_file(contribution: str | Path, *, ckpt: Checkpoint, data: Sequence[str | Path], threads: int | None = None,
                spot_check: int | None = None, seed: int | None = None, shard: Shard | None = None,
                device: torch.device | str = "cpu") -> VerifyReport:
    """`swarmfold verify`: check the receipt, then replay the steps (all, or K spot-check segments).

    Raises ContributionError for a tampered or malformed contribution and VerifyInputError
    when the base, data or start state given cannot replay it; returns a report otherwise.
    """
    c = load_contribution(contribution)
    spec = spec_from_dict(ckpt.meta["spec"], str(ckpt.path))
    _check_base(c, ckpt, spec)
    shard = shard or Shard(data, load_tokenizer(spec.tokenizer), seq_len=spec.data.seq_len,
                           val_fraction=spec.data.val_fraction)
    _check_data(c, shard)
    claimed_env = dict(c.body["environment"])
    threads = int(claimed_env.get("threads", 1)) if threads is None else threads
    device = resolve_device(device) if isinstance(device, str) else device
    here = environment(threads, device)
    bitwise = same_environment_class(claimed_env, here)
    steps = int(c.body["steps"])
    report = VerifyReport(passed=False, mode="bitwise" if bitwise else "tolerance", reason="", peer_id=c.peer_id,
                          steps_claimed=steps, steps_replayed=0, tolerance=spec.verify.tolerance,
                          claimed_sha256=c.delta_sha256, same_environment=bitwise,
                          environment_claimed=claimed_env, environment_here=here, spot_check=spot_check is not None)
    problem = _receipt_consistency(c, spec)
    if problem:
        report.reason = problem
        return report
    with threads_set(threads):
        start = c.body["inner_start"]
        if start["source"] not in ("fresh", "checkpoint"):
            report.reason = f"receipt's inner_start.source {start['source']!r} is not 'fresh' or 'checkpoint'"
            return report
        peer = start_peer(spec, ckpt, shard, peer_id=c.peer_id, threads=threads, inner_source=start["source"],
                          device=device)
        ours = inner_state_record(peer, start["source"])
        if ours["sha256"] != start["sha256"] or ours["step"] != start["step"]:
            raise VerifyInputError(
                f"the receipt's inner optimizer started from state {start['sha256'][:12]}… at step {start['step']} "
                f"({start['source']}), this base gives {ours['sha256'][:12]}… at step {ours['step']}; for "
                "'checkpoint' pass the contributor's own checkpoint of that round")
        names = [n for n, _ in peer.model.named_parameters()]
        claim = _claimed_delta(c, names)
        if tensor_sha256(claim) != c.delta_sha256:
            report.reason = "the delta file's tensors do not hash to the receipt's delta sha256"
            return report
        if spot_check is None:
            return _compare_full(peer, round_idx=c.base_round, steps=steps, claim=claim,
                                 claimed_losses=c.body["losses"], bitwise=bitwise, tolerance=spec.verify.tolerance,
                                 report=report)
        return _spot_check(c, peer, claim=claim, start_inner=peer.trainer.state_tensors(), k=spot_check, seed=seed,
                           bitwise=bitwise, tolerance=spec.verify.tolerance, report=report)


# ---- spot checks ------------------------------------------------------------------------------------

def _segments(c: SignedContribution) -> tuple[list[tuple[int, int]], dict[int, dict[str, Any]]]:
    steps = int(c.body["steps"])
    snaps = c.body["snapshots"]
    interval = int(snaps["interval"])
    files = {int(s["step"]): s for s in snaps["files"] if isinstance(s, dict) and "step" in s}
    expected = list(range(interval, steps, interval)) if interval > 0 else []
    if not expected:
        raise VerifyInputError(f"{c.receipt_path}: the contribution kept no snapshots, so it cannot be spot-checked; "
                               "verify it in full (leave out --spot-check), or contribute with --snapshot-every N")
    if sorted(files) != expected:
        raise VerifyInputError(f"{c.receipt_path}: snapshots at steps {sorted(files)}, expected {expected} "
                               f"for interval {interval}")
    bounds = [0, *expected, steps]
    return list(zip(bounds[:-1], bounds[1:], strict=True)), files


def _load_checked_snapshot(c: SignedContribution, entry: dict[str, Any]) -> dict[str, torch.Tensor]:
    path = c.snapshot_path(str(entry["file"]))
    if not path.is_file():
        raise VerifyInputError(f"{path}: snapshot missing; keep the snapshot files beside the contribution")
    if file_sha256(path) != entry["sha256"]:
        raise ContributionError(f"{path}: sha256 does not match the signed receipt; the snapshot was changed")
    return load_file(str(path))


def _spot_check(c: SignedContribution, peer: LocalPeer, *, claim: torch.Tensor, start_inner: dict[str, torch.Tensor],
                k: int, seed: int | None, bitwise: bool, tolerance: float, report: VerifyReport) -> VerifyReport:
    if k < 1:
        raise VerifyInputError(f"--spot-check must be at least 1, got {k}")
    segments, snaps = _segments(c)
    rng = random.Random(seed) if seed is not None else random.SystemRandom()
    last = len(segments) - 1
    chosen = sorted({last, *rng.sample(range(last), min(k - 1, last))})
    batches = round_batches(peer, c.base_round, int(c.body["steps"]))
    start_step = int(c.body["inner_start"]["step"])
    claimed_losses = c.body["losses"]
    worst, loss_diff, failures = 0.0, 0.0, []
    for j in chosen:
        a, b = segments[j]
        if a > 0:
            entry = snaps[a]
            if int(entry.get("inner_step", -1)) != start_step + a:
                raise VerifyInputError(f"{c.receipt_path}: snapshot at step {a} has inner step {entry.get('inner_step')}, "
                                       f"expected {start_step + a}")
            load_snapshot(peer, _load_checked_snapshot(c, entry), start_step + a)
        else:
            set_flat_params(peer.model, peer.theta)
            peer.trainer.load_state_tensors(start_inner, start_step)
        seg_start = flat_params(peer.model)
        losses, _ = run_steps(peer, batches[a:b], first_step=a)
        loss_diff = max(loss_diff, _loss_diff(losses, claimed_losses[a:b]))
        losses_ok = _losses_agree(losses, claimed_losses[a:b], bitwise, tolerance)
        ok, dist = _segment_end(c, peer, b, snaps, claim, seg_start, bitwise, tolerance)
        worst = max(worst, dist)
        report.segments.append({"from_step": a, "to_step": b, "passed": ok and losses_ok, "distance": dist,
                                "losses_agree": losses_ok})
        report.steps_replayed += b - a
        if not (ok and losses_ok):
            failures.append(f"steps {a}-{b}")
    report.distance = worst
    report.loss_max_abs_diff = loss_diff
    report.passed = not failures
    what = "bits match" if bitwise else f"largest relative distance {worst:.3g} within tolerance {tolerance:g}"
    report.reason = (f"{len(chosen)} of {len(segments)} segments replayed, {what}" if report.passed else
                     f"segment(s) {', '.join(failures)} do not replay to the claimed state (largest relative "
                     f"distance {worst:.3g}, {'bits must match' if bitwise else f'tolerance {tolerance:g}'})")
    return report


def _segment_end(c: SignedContribution, peer: LocalPeer, b: int, snaps: dict[int, dict[str, Any]],
                 claim: torch.Tensor, seg_start: torch.Tensor, bitwise: bool, tolerance: float) -> tuple[bool, float]:
    """Does the replayed state at step b match what the contributor committed to for step b?"""
    if b == int(c.body["steps"]):  # the end of the chain is the delta itself
        replay, _ = named_delta(peer)
        claimed_end = peer.theta - claim
        dist = relative_distance(replay, claim, reference=seg_start - claimed_end)
        return (tensor_sha256(replay) == c.delta_sha256 if bitwise else dist <= tolerance), dist
    snap = _load_checked_snapshot(c, snaps[b])
    names = [n for n, _ in peer.model.named_parameters()]
    claimed = torch.cat([snap[f"param/{n}"].reshape(-1) for n in names])
    replay = flat_params(peer.model)
    dist = relative_distance(replay, claimed, reference=claimed - seg_start)
    if not bitwise:
        return dist <= tolerance, dist
    inner = {k[len("inner/"):]: v for k, v in snap.items() if k.startswith("inner/")}
    step = peer.trainer.step_count
    same = (tensor_sha256(replay) == tensor_sha256(claimed) and
            state_sha256(peer.trainer.state_tensors(), step) == state_sha256(inner, step))
    return same, dist

