"""One peer's rounds: train H inner steps from θ_r, hand Δ to an averager, apply the outer step.

This is the only round code. `swarmfold train` runs it with a SoloAverager, `simulate`
with an in-process group, and `swarmfold run` with the swarm's all-reduce. The round is
split into `train_phase` and `finish_round` so that `simulate` can run many peers'
training before it averages them, through exactly the same steps.
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers

from swarmfold.averaging import codec
from swarmfold.averaging.base import Averager, AverageRequest, AverageResult
from swarmfold.averaging.outer import OuterOptimizer
from swarmfold.averaging.verification import ENVIRONMENT_CLASS
from swarmfold.peer.checkpoint import Checkpoint, CheckpointError, load_latest, save_checkpoint
from swarmfold.peer.credit import Credit
from swarmfold.peer.data import DataOptions, Shard
from swarmfold.peer.device import (
    configure_determinism,
    describe,
    device_environment,
    resolve_device,
)
from swarmfold.peer.model import build_model, flat_params, set_flat_params, tensor_sha256
from swarmfold.peer.roundlog import append_round
from swarmfold.peer.seeds import batch_order, round_seed
from swarmfold.peer.tokenizer import Tokenizer, load_tokenizer
from swarmfold.peer.trainer import InnerTrainer, StepStats, lm_loss, set_threads
from swarmfold.spec import Spec, spec_from_dict

logger = logging.getLogger(__name__)


def environment(threads: int, device: torch.device | str = "cpu") -> dict[str, Any]:
    """What the determinism contract depends on, recorded in checkpoints, receipts and records.

    The keys of `ENVIRONMENT_CLASS` (averaging/verification.py) decide whether two runs must
    agree bit for bit: torch build, threads, CPU capability, and the training device (kind,
    and for GPUs name, compute capability, CUDA, cuDNN and driver versions).
    """
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "threads": threads,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(),
        **device_environment(torch.device(device)),
    }


def replayable(spec: Spec) -> bool:
    """Whether this swarm's peers replay each other's rounds (verify.fraction > 0); see
    `LocalPeer._start_replayable_round` for what that changes in the round."""
    return spec.verify.fraction > 0


class TrainingInterrupted(Exception):
    """A stop was requested in the middle of a round's inner steps."""


@dataclass
class TrainPhase:
    """The output of a round's training: what goes to the averager."""

    round: int
    delta: torch.Tensor  # θ_r − θ_local (+ compression residual), flat float32
    weight: float
    stats: StepStats
    seconds: float
    steps: int  # inner steps trained this round: H in steps mode; in time mode what fit in round.seconds


@dataclass
class RoundReport:
    round: int  # the round that just finished
    status: str
    train_loss: float
    tokens: int
    tokens_per_second: float
    model_sha256: str  # θ_{r+1}
    result: AverageResult
    timings: dict[str, float] = field(default_factory=dict)
    steps: int = 0  # inner steps this peer trained in the round


class LocalPeer:
    """The whole state of one peer: spec, shard, model at θ_r, inner and outer optimizers."""

    def __init__(self, spec: Spec, data: Sequence[str | Path], *, peer_id: str, threads: int,
                 workdir: Path | None = None, keep_checkpoints: int = 3, tokenizer: Tokenizer | None = None,
                 shard: Shard | None = None, device: torch.device | str = "cpu",
                 activation_checkpointing: bool = False,
                 data_options: DataOptions | None = None):
        self.spec = spec
        self.peer_id = peer_id
        self.threads = threads
        # the model, AdamW and the inner loop live here; θ_r, Δ, the outer state and checkpoints on the CPU
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        configure_determinism(self.device, allow_tf32=spec.inner.allow_tf32)
        self.workdir = Path(workdir) if workdir else None
        self.keep_checkpoints = keep_checkpoints
        set_threads(threads)  # the thread count is part of the determinism contract, and recorded
        self.tokenizer = tokenizer or load_tokenizer(spec.tokenizer)
        self.shard = shard or Shard(data, self.tokenizer, seq_len=spec.data.seq_len,
                                    val_fraction=spec.data.val_fraction, options=data_options)
        genesis = build_model(spec, self.tokenizer.vocab_size, self.tokenizer.eos_id)  # on the CPU, on every device
        self.theta = flat_params(genesis)  # θ_r, the round's shared starting point (CPU, float32)
        self.model = genesis.to(self.device)
        # activation checkpointing is local (the same bits either way), so not in the spec
        self.trainer = InnerTrainer(self.model, spec.inner, activation_checkpointing=activation_checkpointing)
        if self.device.type != "cpu":
            logger.info("[%s] training on %s (%s)", peer_id[-8:], describe(self.device), spec.inner.precision)
        self.outer = OuterOptimizer(kind=spec.outer.kind, lr=spec.outer.lr, momentum=spec.outer.momentum,
                                    numel=self.theta.numel())
        self.round = 0
        self.tokens_total = 0
        # which trained tokens reached a committed swarm model (peer/credit.py); it also holds
        # `carried_tokens`, the tokens of a rolled-back delta still in the local weights
        self.credit = Credit()
        self.residual: torch.Tensor | None = None  # compression error feedback
        self.theta_sha256 = tensor_sha256(self.theta)
        self.last_checkpoint_time: float | None = None
        self.last_round: dict[str, Any] = {}  # what happened in the latest round (kept in meta.json)
        # where θ_r came from (kept in meta.json): genesis, a group's commit, a round alone, or a sync
        self.provenance: dict[str, Any] = {"source": "genesis", "theta_round": 0}
        self.counters: dict[str, int] = {"bytes_sent": 0, "bytes_received": 0, "committed": 0, "alone": 0,
                                         "rolled_back": 0}  # lifetime totals, kept in meta.json

    # ---- the round -----------------------------------------------------------------
    @property
    def round_start_step(self) -> int:
        """The swarm's inner step at the start of this round (round × H): the lr schedule's clock."""
        return self.round * self.spec.round.inner_steps

    def batches_for_round(self, round_idx: int) -> list[torch.Tensor]:
        order = batch_order(self.spec.seed, round_idx, self.peer_id,
                            num_windows=len(self.shard.train_windows),
                            steps=self.spec.round.inner_steps, batch_size=self.spec.inner.batch_size)
        return [self.shard.train_batch(row) for row in order]

    def train_phase(self, step_hook: Callable[[int], None] | None = None, *, steps: int | None = None) -> TrainPhase:
        """One round's inner steps from θ_r: H in steps mode; in time mode as many as fit in
        round.seconds of this peer's clock (at least min_steps, at most H). `steps` forces the
        number (a replay, or `simulate --steps-from` reproducing what a peer recorded); the batches
        are the first `steps` of the round's H, so a round of k steps is a prefix of the full one.
        `step_hook` may raise TrainingInterrupted: the model is then mid-round and must not be
        saved; the last checkpoint remains the state."""
        t0 = time.perf_counter()
        r = self.spec.round
        if steps is not None and not 1 <= steps <= r.inner_steps:
            raise ValueError(f"a round has 1 to round.inner_steps = {r.inner_steps} steps, not {steps}")
        stop_before = None
        if steps is not None:
            stop_before = (lambda i: i >= steps)  # noqa: E731 - a one-line rule
        elif r.mode == "time":
            stop_before = (lambda i: i >= r.min_steps and time.perf_counter() - t0 >= r.seconds)  # noqa: E731
        self.credit.confirm(self.theta_sha256)  # we train on from our last commit's model: it counts
        if replayable(self.spec):
            self._start_replayable_round()
        # any draw from torch's global generator (dropout, a model's own sampling) is seeded too
        torch.manual_seed(round_seed(self.spec.seed, self.round, self.peer_id, "torch"))
        stats = self.trainer.run(self.batches_for_round(self.round), step_hook,
                                 first_step=self.round_start_step, stop_before=stop_before)
        delta = flat_params(self.model)  # the one new full copy: θ_local, turned into Δ in place
        torch.sub(self.theta, delta, out=delta)  # Δ = θ_r − θ_local, the same bits as `theta - local`
        if self.residual is not None:
            delta.add_(self.residual)
        tokens = stats.tokens + self.carried_tokens
        weight = float(min(tokens, self.spec.token_cap))
        logger.info("[%s] round %d: trained %d steps, loss %.4f, %.0f tokens/s",
                    self.peer_id[-8:], self.round, len(stats.losses), stats.mean_loss, stats.tokens_per_second)
        return TrainPhase(round=self.round, delta=delta, weight=weight, stats=stats,
                          seconds=time.perf_counter() - t0, steps=len(stats.losses))

    def _start_replayable_round(self) -> None:
        """In a swarm that verifies by replay, a round depends only on public inputs: θ_r, the
        round, the peer id and the public data. So no private state crosses rounds: AdamW starts
        fresh (its step count, which sets the warm-up, is round × H), and neither a rolled-back
        round's local progress nor the compression residual is carried."""
        set_flat_params(self.model, self.theta)
        self.credit.drop_carried()
        self.residual = None
        self.trainer.load_state_tensors({}, self.round_start_step)

    def request(self, phase: TrainPhase) -> AverageRequest:
        return AverageRequest(round=phase.round, delta=phase.delta, weight=phase.weight,
                              model_sha256=self.theta_sha256, steps=phase.steps)

    def finish_round(self, phase: TrainPhase, result: AverageResult) -> RoundReport:
        """Apply the outcome: outer step on the aggregate, or keep θ_r and carry Δ after a rollback."""
        base_sha256 = self.theta_sha256
        if result.status in ("committed", "alone"):
            if result.aggregate is None:
                raise ValueError("averager returned no aggregate for a committed round")
            self.provenance = _provenance_of(self.round, result)
            self.theta = self.outer.step(self.theta, result.aggregate)
            set_flat_params(self.model, self.theta)
            self.theta_sha256 = tensor_sha256(self.theta)
            compression = self.spec.averaging.compression
            if result.compressed and compression != "none":
                sent = codec.roundtrip(compression, phase.delta)  # what the others received
                if codec.topk_size(compression):
                    # the aggregate is re-sparsified: what I sent on a coordinate that it dropped was applied
                    # by nobody, so it stays mine. Over the members this re-queues exactly the dropped part
                    # of the mean (error feedback for the return path), from bits every replay has.
                    sent.masked_fill_(result.aggregate == 0, 0.0)
                self.residual = torch.sub(phase.delta, sent, out=sent)  # Δ − decode(encode(Δ)), in place
            else:
                self.residual = None
        # else rolled back: θ_r stays, the local weights (and so Δ) carry into the next round
        included = (not result.included or self.peer_id in result.included) and result.reached_top
        self.credit.on_round(result.status, phase.stats.tokens, included=included, theta_sha256=self.theta_sha256)
        self.tokens_total += phase.stats.tokens
        self.counters["bytes_sent"] += result.bytes_sent
        self.counters["bytes_received"] += result.bytes_received
        self.counters[result.status] = self.counters.get(result.status, 0) + 1
        self.last_round = {"round": self.round, "status": result.status, "group_id": result.group_id,
                           "members": list(result.members), "included": list(result.included),
                           "weights": dict(result.weights), "steps": dict(result.steps) or {self.peer_id: phase.steps},
                           "confirmed": list(result.confirmed),
                           "rejected": dict(result.rejected), "attempts": result.attempts, "reason": result.reason,
                           "timings": dict(result.timings, train=phase.seconds), "bytes_sent": result.bytes_sent,
                           **({"digest": result.digest} if result.digest else {}),
                           **({"tree": list(result.tree)} if result.tree else {})}
        report = RoundReport(round=self.round, status=result.status, train_loss=phase.stats.mean_loss,
                             tokens=phase.stats.tokens, tokens_per_second=phase.stats.tokens_per_second,
                             model_sha256=self.theta_sha256, result=result,
                             timings=dict(result.timings, train=phase.seconds), steps=phase.steps)
        if self.workdir is not None:
            try:  # the round log is a record for simulate --steps-from, not the state: a full disk costs a line
                self.workdir.mkdir(parents=True, exist_ok=True)
                append_round(self.workdir, {"round": self.round, "status": result.status,
                                            "group_id": result.group_id, "included": list(result.included),
                                            "weights": dict(result.weights), "steps": self.last_round["steps"],
                                            "base_sha256": base_sha256, "model_sha256": self.theta_sha256,
                                            **({"tree": list(result.tree)} if result.tree else {})})
            except OSError as e:
                logger.warning("[%s] round %d: could not append to the round log in %s: %s", self.peer_id[-8:],
                               self.round, self.workdir, e)
        self.round += 1
        return report

    def run_round(self, averager: Averager) -> RoundReport:
        phase = self.train_phase()
        return self.finish_round(phase, averager.average(self.request(phase)))

    # ---- state ---------------------------------------------------------------------
    @property
    def carried_tokens(self) -> int:
        """Tokens of rolled-back rounds whose Δ is still in the local weights."""
        return self.credit.carried

    @carried_tokens.setter
    def carried_tokens(self, tokens: int) -> None:  # a copy of a peer (contribute) that starts at θ_r
        self.credit.carried = tokens

    @property
    def carrying(self) -> bool:
        return self.carried_tokens > 0 or self.residual is not None

    def load_shared_state(self, round_idx: int, theta: torch.Tensor, outer_state: dict[str, torch.Tensor],
                          source: str = "") -> None:
        """Adopt θ_r and outer state downloaded from peer `source` (late join / catch-up). The next
        checkpoint then says so: its provenance is the sync, and its last round is no round of ours.

        The tensors are taken over, not copied (a download allocates them for us): the caller must not
        use them afterwards."""
        if theta.shape != self.theta.shape or theta.dtype != torch.float32:
            raise ValueError(f"downloaded weights have shape {tuple(theta.shape)}/{theta.dtype}, "
                             f"this spec's model needs ({self.theta.numel()},)/float32")
        self.outer.load_state_dict(outer_state, copy=False)
        self.theta = theta
        set_flat_params(self.model, self.theta)
        self.theta_sha256 = tensor_sha256(self.theta)
        self.round = round_idx
        self.credit.on_sync()  # what only our own weights held is gone
        self.residual = None
        self.provenance = {"source": "synced", "theta_round": round_idx, "from_peer": source,
                           "model_sha256": self.theta_sha256}
        self.last_round = {"round": round_idx, "status": "synced", "source": source,
                           "reason": f"downloaded θ of round {round_idx} from {source or 'a peer'}"}

    def meta(self) -> dict[str, Any]:
        return {
            "step": self.trainer.step_count,
            "peer_id": self.peer_id,
            "spec_hash": self.spec.spec_hash,
            "spec": self.spec.to_dict(),
            "manifest_hash": self.shard.manifest_hash,
            "manifest": self.shard.manifest_json(),
            "manifest_skipped": self.shard.skipped_json(),
            "model_sha256": self.theta_sha256,
            "tokens_total": self.tokens_total,
            "carried_tokens": self.carried_tokens,
            "credit": self.credit.to_meta(),
            "data_cursor": {"round": self.round, "step_in_round": 0, "seed_inputs": {
                "genesis_seed": self.spec.seed, "round": self.round, "peer_id": self.peer_id}},
            "rng": {"torch_cpu": torch.get_rng_state().numpy().tobytes().hex()},
            "vocab_size": self.tokenizer.vocab_size,
            "eos_id": self.tokenizer.eos_id,
            "environment": environment(self.threads, self.device),
            "last_round": self.last_round,
            "provenance": self.provenance,
            "counters": dict(self.counters),
            "written_at": time.time(),
        }

    def save(self) -> Path:
        if self.workdir is None:
            raise ValueError("this peer has no workdir to save checkpoints in")
        # No full copies: the files are written from views of θ_r, the residual and the outer
        # state, and from AdamW's own moments (on the CPU; from a GPU they come over once).
        names = [n for n, _ in self.model.named_parameters()]
        model_tensors = dict(zip(names, _split(self.theta, self.model, copy=False), strict=True))
        local: dict[str, torch.Tensor] | None = None
        if self.carrying:
            local = {"local_params": flat_params(self.model)}
            if self.residual is not None:
                local["ef_residual"] = self.residual
        outer = {} if self.outer.buf is None else {"momentum": self.outer.buf}
        path = save_checkpoint(self.workdir, round_idx=self.round, model=model_tensors,
                               inner=self.trainer.state_tensors(copy=False), outer=outer, local=local,
                               meta=self.meta(), keep=self.keep_checkpoints)
        self.last_checkpoint_time = time.time()
        return path

    def restore(self, ckpt: Checkpoint) -> None:
        """Continue exactly where a checkpoint left off (bit-identical to never stopping)."""
        meta = ckpt.meta
        if meta.get("spec_hash") != self.spec.spec_hash:
            raise CheckpointError(f"{ckpt.path}: written for spec {str(meta.get('spec_hash'))[:12]}…, "
                                  f"this run's spec is {self.spec.spec_hash[:12]}…; use a fresh --workdir "
                                  "or the spec that wrote it")
        names = [n for n, _ in self.model.named_parameters()]
        missing = [n for n in names if n not in ckpt.model]
        if missing:
            raise CheckpointError(f"{ckpt.path}: model.safetensors lacks {missing[:3]}; not this spec's model")
        theta = torch.cat([ckpt.model[n].reshape(-1) for n in names]).to(torch.float32)
        self.theta = theta
        self.theta_sha256 = tensor_sha256(theta)
        self.outer.load_state_dict(ckpt.outer)
        self.trainer.load_state_tensors(ckpt.inner, int(meta["step"]))
        self.round = ckpt.round
        self.tokens_total = int(meta.get("tokens_total", 0))
        self.credit = Credit.from_meta(meta)
        if self.credit.trained != self.tokens_total:  # only a hand-edited meta.json: keep the invariant
            logger.warning("[%s] %s: its credit accounts for %d tokens, it trained %d; the credit's total is kept",
                           self.peer_id[-8:], ckpt.path.name, self.credit.trained, self.tokens_total)
            self.tokens_total = self.credit.trained
        self.counters.update({k: int(v) for k, v in meta.get("counters", {}).items()})
        self.last_round = dict(meta.get("last_round", {}))
        self.provenance = dict(meta.get("provenance") or {"source": "unknown",
                                                          "reason": "written before checkpoints recorded it"})
        set_flat_params(self.model, ckpt.local.get("local_params", theta))
        self.residual = ckpt.local.get("ef_residual")
        recorded = meta.get("environment", {})
        current = environment(self.threads, self.device)
        changed = {k: (recorded.get(k), current[k]) for k in ENVIRONMENT_CLASS
                   if k in recorded and recorded.get(k) != current[k]}
        if changed:
            logger.warning("[%s] %s was written with %s; now %s: training continues, but not bit-identically "
                           "to a run that never stopped (the determinism contract needs the same environment)",
                           self.peer_id[-8:], ckpt.path.name,
                           ", ".join(f"{k}={a}" for k, (a, _) in changed.items()),
                           ", ".join(f"{k}={b}" for k, (_, b) in changed.items()))
        rng = meta.get("rng", {}).get("torch_cpu")
        if rng:
            torch.set_rng_state(torch.frombuffer(bytearray(bytes.fromhex(rng)), dtype=torch.uint8))
        logger.info("[%s] resumed from %s (round %d, step %d)", self.peer_id[-8:], ckpt.path, self.round,
                    self.trainer.step_count)

    def resume(self) -> bool:
        """Load the newest sound checkpoint in the workdir, if any."""
        if self.workdir is None:
            return False
        ckpt = load_latest(self.workdir)
        if ckpt is None:
            return False
        self.restore(ckpt)
        return True

    # ---- evaluation ----------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, shard: Shard | None = None, max_windows: int | None = None) -> float:
        return evaluate_model(self.model, shard or self.shard, self.spec.inner.batch_size, max_windows,
                              precision=self.spec.inner.precision)


def _split(flat: torch.Tensor, model: torch.nn.Module, *, copy: bool = True) -> list[torch.Tensor]:
    """`flat` cut into the parameters' shapes: copies, or views of `flat` (copy=False)."""
    out, offset = [], 0
    for p in model.parameters():
        view = flat[offset : offset + p.numel()].view_as(p)
        out.append(view.clone() if copy else view)
        offset += p.numel()
    return out


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, shard: Shard, batch_size: int, max_windows: int | None = None,
                   precision: str = "fp32") -> float:
    """Mean validation loss over the shard's held-out windows (token-weighted), on the model's device."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for windows in shard.val_batches(batch_size, max_windows):
        n = windows.shape[0] * (windows.shape[1] - 1)
        total += float(lm_loss(model, windows, precision)) * n
        count += n
    model.train(was_training)
    return total / count


def model_from_checkpoint(ckpt: Checkpoint, device: torch.device | str = "cpu") -> tuple[Spec, torch.nn.Module]:
    """Rebuild the spec and the model at θ_r from a checkpoint alone, on `device`."""
    spec = spec_from_dict(ckpt.meta["spec"], str(ckpt.path))
    model = build_model(spec, int(ckpt.meta["vocab_size"]), int(ckpt.meta["eos_id"]), genesis=False)
    names = [n for n, _ in model.named_parameters()]
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n not in ckpt.model or ckpt.model[n].shape != p.shape:
                raise CheckpointError(f"{ckpt.path}: tensor {n} missing or mis-shaped in model.safetensors")
            p.copy_(ckpt.model[n])
    del names
    model.eval()
    target = device if isinstance(device, torch.device) else resolve_device(device)
    configure_determinism(target, allow_tf32=spec.inner.allow_tf32)
    return spec, model.to(target)


def _provenance_of(round_idx: int, result: AverageResult) -> dict[str, Any]:
    """Where θ_{r+1} comes from when round r's outcome is applied (committed or alone). A rolled-back
    round keeps θ_r, and so its provenance: `theta_round` then lags the checkpoint's round."""
    where = {"theta_round": round_idx + 1, "averaged_round": round_idx}
    if result.status == "committed":
        return {"source": "committed", **where, "group_id": result.group_id, "members": list(result.members),
                "included": list(result.included), "weights": dict(result.weights), "steps": dict(result.steps),
                **({"tree": list(result.tree)} if result.tree else {})}
    return {"source": "alone", **where, "reason": result.reason}
