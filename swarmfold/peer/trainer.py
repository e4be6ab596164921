"""The inner loop: AdamW (or Muon for the hidden matrices, `inner.optimizer`) with linear warm-up (then a constant, cosine or WSD lr: `lr_at`) and
global-norm gradient clipping.

One inner step is: forward, float32 cross-entropy on the shifted window, backward,
clip, AdamW. It runs on the model's device (peer/device.py): the batch is copied there
(pinned, asynchronously on CUDA), the AdamW state lives there, and `state_tensors` hands
the state back as CPU tensors for checkpoints. With `inner.precision = "bf16"` the forward
pass runs under autocast (so does the backward, whose ops follow the forward's dtypes);
the master weights, AdamW's moments, the loss and so the pseudo-gradient stay float32.
On the CPU the thread count is part of the determinism contract and is recorded in
checkpoints; on CUDA, peer/device.py `configure_determinism` sets the rest.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F

from swarmfold.peer.device import to_device
from swarmfold.spec import InnerSpec, wsd_decay_start

logger = logging.getLogger(__name__)


def set_threads(threads: int) -> None:
    """Fix intra-op threads (part of the determinism contract)."""
    if threads < 1:
        raise ValueError(f"--threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def lm_loss(model: torch.nn.Module, windows: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """Mean next-token cross-entropy of (B, T+1) windows, computed in float32 on the model's device.

    `precision = "bf16"` runs the model under bfloat16 autocast; the cross-entropy is always
    float32 (computed outside the autocast region, on float32 logits).
    """
    windows = to_device(windows, model_device(model))
    inputs, targets = windows[:, :-1], windows[:, 1:]
    if precision == "bf16":
        with torch.autocast(device_type=windows.device.type, dtype=torch.bfloat16):
            logits = model(input_ids=inputs).logits
    elif precision == "fp32":
        logits = model(input_ids=inputs).logits
    else:
        raise ValueError(f"precision {precision!r} is unknown; use 'fp32' or 'bf16'")
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def set_activation_checkpointing(model: torch.nn.Module, on: bool) -> None:
    """Recompute each block's activations in the backward pass instead of keeping them.

    A local setting, not part of the spec: the recomputed forward runs the same kernels on
    the same inputs, so the gradients have the same bits (tests/test_presets.py checks it);
    it trades about one more forward pass for activation memory of one block at a time.
    """
    new_api = hasattr(model, "activation_checkpointing_enable")  # transformers >= 5 renamed it
    if not new_api and not hasattr(model, "gradient_checkpointing_enable"):
        raise TypeError(f"{type(model).__name__} has no activation checkpointing")
    hf: Any = model
    kwargs = {"use_reentrant": False}
    if on and new_api:
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif on:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif new_api:
        hf.activation_checkpointing_disable()
    else:
        hf.gradient_checkpointing_disable()


def make_optimizer(model: torch.nn.Module, inner: InnerSpec,
                   exclude: Collection[torch.nn.Parameter] = ()) -> torch.optim.AdamW:
    """AdamW over every parameter but `exclude` (those Muon owns); matrices get weight decay, norms and
    biases do not."""
    skip = {id(p) for p in exclude}
    params = [p for p in model.parameters() if id(p) not in skip]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": inner.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=inner.lr, betas=(inner.beta1, inner.beta2), eps=inner.eps)


def muon_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters Muon trains: the hidden weight matrices (attention and MLP projections).

    Muon's authors (Keller Jordan; Moonshot's "Muon is Scalable") orthogonalise only the hidden
    layers' 2-D weights: the input embedding is a lookup table whose rows are updated one token at a
    time, and the output head maps onto the vocabulary; both, with the norms' gains and any bias,
    stay on AdamW. Found by identity (not by name), so any causal-LM architecture works, and a tied
    embedding is left out once.
    """
    hf: Any = model
    embeddings = {id(hf.get_input_embeddings().weight)}
    head = hf.get_output_embeddings()
    if head is not None:
        embeddings.add(id(head.weight))
    return [p for p in model.parameters() if p.dim() == 2 and id(p) not in embeddings]


def make_muon(params: list[torch.nn.Parameter], inner: InnerSpec) -> torch.optim.Muon:
    return torch.optim.Muon(params, lr=inner.muon_lr, weight_decay=inner.muon_weight_decay,
                            momentum=inner.muon_momentum, nesterov=inner.muon_nesterov,
                            adjust_lr_fn=inner.muon_adjust_lr)


def lr_at(inner: InnerSpec, step: int, local_step: int | None = None) -> float:
    """The inner learning rate at the swarm's inner step `step` (round × H + the step in the round,
    0-based), for a peer whose own optimizer has taken `local_step` steps (default: `step`).

    The one schedule of every path that trains (run, simulate, contribute, verify and the
    benchmarks' reference arms). The warm-up follows the peer's own steps: it is there for its
    AdamW moments, which a peer that joins late starts fresh. The decay follows the swarm's: it is
    the run's schedule, and a peer that syncs to round k trains at round k's lr (a late joiner that
    counted from its own step 0 would restart a decaying schedule). A peer that trained every round
    from the start has local_step == step, and this is the usual schedule: linear warm-up over
    `warmup_steps`, then
    - 'constant': `lr` for ever (rounds never end, so no decay; the default);
    - 'cosine': from `lr` at the end of the warm-up down to `min_lr_ratio * lr` at `decay_steps`;
    - 'wsd': `lr` until the last `wsd_decay_fraction` of `decay_steps`, then linearly down to
      `min_lr_ratio * lr` at `decay_steps`.
    Past `decay_steps` the decaying schedules stay at the floor.
    """
    warm = step if local_step is None else local_step
    if inner.warmup_steps and warm < inner.warmup_steps:
        # (base * (warm + 1)) / warmup_steps: with base == lr these are the bits of the plain warm-up
        return _decayed(inner, step) * (warm + 1) / inner.warmup_steps
    return _decayed(inner, step)


def _decayed(inner: InnerSpec, step: int) -> float:
    """The schedule after the warm-up, at the swarm's step (`lr` until the warm-up's end)."""
    kind = inner.lr_schedule
    if kind == "constant" or step < inner.warmup_steps:
        return inner.lr
    floor = inner.min_lr_ratio
    if kind == "cosine":
        span = inner.decay_steps - inner.warmup_steps
        p = min(1.0, (step - inner.warmup_steps) / span)
        return inner.lr * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * p)))
    if kind == "wsd":
        start = wsd_decay_start(inner.decay_steps, inner.wsd_decay_fraction)
        if step < start:
            return inner.lr
        p = min(1.0, (step - start) / (inner.decay_steps - start))
        return inner.lr * (1.0 - (1.0 - floor) * p)
    raise ValueError(f"inner.lr_schedule {kind!r} is unknown; use 'constant', 'cosine' or 'wsd'")


@dataclass
class StepStats:
    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def mean_loss(self) -> float:
        return sum(self.losses) / len(self.losses) if self.losses else math.nan


class InnerTrainer:
    """Owns the model's inner-optimizer state (AdamW, or Muon + AdamW) and the count of inner steps
    taken (for the lr schedule)."""

    def __init__(self, model: torch.nn.Module, inner: InnerSpec, *, activation_checkpointing: bool = False):
        self.model = model  # already on its training device: the optimizer state is created there
        self.inner = inner
        if activation_checkpointing:
            set_activation_checkpointing(model, True)
        self.device = model_device(model)
        matrices = muon_parameters(model) if inner.optimizer == "muon" else []
        self.optimizer = make_optimizer(model, inner, exclude=matrices)
        self.muon = make_muon(matrices, inner) if matrices else None
        # the Muon group follows the same warm-up and schedule (lr_at), with muon_lr as its peak
        self._muon_inner = replace(inner, lr=inner.muon_lr)
        self.step_count = 0
        self._params = [p for p in model.parameters()]

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer] if self.muon is None else [self.optimizer, self.muon]

    def step(self, windows: torch.Tensor, swarm_step: int | None = None) -> float:
        """One inner step; `swarm_step` (round × H + the step in the round) sets the lr's decay
        (default: this trainer's own count, the same for a peer that trained every round)."""
        at = self.step_count if swarm_step is None else swarm_step
        lr = lr_at(self.inner, at, self.step_count)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.muon is not None:
            muon_lr = lr_at(self._muon_inner, at, self.step_count)
            for group in self.muon.param_groups:
                group["lr"] = muon_lr
        loss = self._forward_backward(windows)
        if self.inner.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self._params, self.inner.grad_clip)
        for opt in self.optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        self.step_count += 1
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"training loss became {value} at inner step {self.step_count}; "
                                     "lower inner.lr (or inner.muon_lr) or raise inner.warmup_steps")
        return value

    def _forward_backward(self, windows: torch.Tensor) -> torch.Tensor:
        """The batch's mean loss and its gradient in `.grad`: in one pass, or accumulated over
        micro-batches of `inner.micro_batch_size` sequences (each pass weighs 1/n of the batch;
        every micro-batch has the same token count, so the mean of their means is the batch mean).

        Micro-batching gives the same gradient in exact arithmetic but not the same bits: each
        weight's gradient is a sum over the batch's tokens, which one pass reduces inside one
        matmul and n passes reduce in n partial sums added in float32 — another rounding order.
        """
        mb = self.inner.micro_batch_size
        batch = windows.shape[0]
        if mb <= 0 or mb >= batch:
            loss = lm_loss(self.model, windows, self.inner.precision)
            loss.backward()
            return loss
        if batch % mb:
            raise ValueError(f"inner.micro_batch_size ({mb}) must divide the batch ({batch} sequences)")
        n = batch // mb
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for k in range(n):
            part = lm_loss(self.model, windows[k * mb:(k + 1) * mb], self.inner.precision) / n
            part.backward()
            total += part.detach()
        return total

    def run(self, batches: list[torch.Tensor], step_hook: Callable[[int], None] | None = None, *,
            first_step: int | None = None, stop_before: Callable[[int], bool] | None = None) -> StepStats:
        """Train on `batches`; `step_hook(i)` runs before step i (it may sleep, or raise to interrupt).
        `first_step`: the swarm's step of the first batch (round × H), for the lr schedule.
        `stop_before(i)`: asked before each step i, after its `step_hook` (so a rest the hook takes
        for the duty cycle counts as time of the steps before it); True ends the run there, with i
        steps trained (a time-boxed round's clock)."""
        stats = StepStats()
        t0 = time.perf_counter()
        for i, windows in enumerate(batches):
            if step_hook is not None:
                step_hook(i)
            if stop_before is not None and stop_before(i):
                break
            stats.losses.append(self.step(windows, None if first_step is None else first_step + i))
            stats.tokens += windows.shape[0] * (windows.shape[1] - 1)
        stats.seconds = time.perf_counter() - t0
        return stats

    # ---- state as flat named tensors (for safetensors; no pickle) -----------------------
    def state_tensors(self, *, copy: bool = True) -> dict[str, torch.Tensor]:
        """The optimizer state as CPU float32 tensors, named by parameter: AdamW's `.exp_avg`,
        `.exp_avg_sq`, `.step`, and Muon's `.momentum_buffer` (Muon keeps no step count). Copies, or
        (copy=False, for a checkpoint written at once) the tensors themselves where already on the CPU."""
        out: dict[str, torch.Tensor] = {}
        names = {id(p): n for n, p in self.model.named_parameters()}
        for p in self._params:
            n = names[id(p)]
            st = self.optimizer.state.get(p)
            if st:
                out[f"{n}.exp_avg"] = st["exp_avg"].detach().to("cpu", copy=copy)
                out[f"{n}.exp_avg_sq"] = st["exp_avg_sq"].detach().to("cpu", copy=copy)
                out[f"{n}.step"] = torch.as_tensor(st["step"], dtype=torch.float32, device="cpu").reshape(1).clone()
            mst = self.muon.state.get(p) if self.muon is not None else None
            if mst:
                out[f"{n}.momentum_buffer"] = mst["momentum_buffer"].detach().to("cpu", copy=copy)
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], step_count: int) -> None:
        names = {id(p): n for n, p in self.model.named_parameters()}
        muon_owned = {id(p) for g in self.muon.param_groups for p in g["params"]} if self.muon is not None else set()
        for opt in self.optimizers:
            opt.state.clear()
        known: set[str] = set()
        for p in self._params:
            n = names[id(p)]
            keys: tuple[str, ...] = ((f"{n}.momentum_buffer",) if id(p) in muon_owned
                                     else (f"{n}.exp_avg", f"{n}.exp_avg_sq", f"{n}.step"))
            if keys[0] not in tensors:
                continue
            known.update(keys)
            for key in keys[:2]:
                if tensors[key].shape != p.shape:
                    raise ValueError(f"inner optimizer state {key} has shape {tuple(tensors[key].shape)}, "
                                     f"model has {tuple(p.shape)}; the checkpoint belongs to another spec")
            if self.muon is not None and id(p) in muon_owned:
                self.muon.state[p] = {"momentum_buffer": tensors[keys[0]].to(p.device, copy=True)}
            else:
                self.optimizer.state[p] = {
                    "step": tensors[keys[2]].reshape(()).clone(),  # AdamW keeps its step count on the CPU
                    "exp_avg": tensors[keys[0]].to(p.device, copy=True),
                    "exp_avg_sq": tensors[keys[1]].to(p.device, copy=True),
                }
        stray = sorted(set(tensors) - known)
        if stray:  # e.g. Muon's buffers offered to AdamW: silently dropping them would change the replay
            raise ValueError(f"inner optimizer state has {len(stray)} tensors this trainer has no place for "
                             f"(first: {stray[0]}); the checkpoint was written with another inner.optimizer")
        self.step_count = step_count
