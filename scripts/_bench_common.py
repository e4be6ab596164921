"""Shared machinery of the quality and frontier benchmarks (not a script; imported by them).

Every arm trains the same genesis model with the same inner hyperparameters on the same
tokens: the batches that the seed schedule gives each swarm peer (peer id `sim-k` on
shard k). The swarm arms run `swarmfold.peer.simulate.simulate`, the same round code as
the live swarm. The reference arms reuse those batches:

- data-parallel equivalent: one model, one AdamW step per inner step on the K peers'
  batches concatenated (batch K·B). This is what K machines reach with a per-step fp32
  all-reduce in the same wall time, and the communication baseline.
- sequential central: one model, batch B, the K peers' batches one after the other
  (K× the steps).

Validation loss is measured on a fixed subset of each shard's held-out windows (the first
`eval_windows` of them), identical for every arm.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from swarmfold.averaging.aggregate import Contribution, aggregate
from swarmfold.averaging.base import allreduce_fp32_bytes_per_step
from swarmfold.peer.corpus import FAMILIES, write_family_shards, write_stdlib_shards
from swarmfold.peer.data import Shard
from swarmfold.peer.local import LocalPeer, RoundReport, evaluate_model
from swarmfold.peer.model import build_model, flat_params, set_flat_params
from swarmfold.peer.seeds import batch_order
from swarmfold.peer.simulate import simulate
from swarmfold.peer.tokenizer import load_tokenizer
from swarmfold.peer.trainer import InnerTrainer, set_threads
from swarmfold.spec import Spec

logger = logging.getLogger("bench")

Curve = list[tuple[int, float]]  # (tokens trained by all workers together, mean validation loss)


@dataclass
class Setup:
    """What every arm shares: base spec, shards, token budget, evaluation subset."""

    spec: Spec
    shard_paths: list[Path]
    steps: int  # inner steps per peer; the total budget is K * steps * B * T tokens
    eval_windows: int  # validation windows per shard (the first ones: a fixed subset)
    eval_every: int  # evaluate the curves every this many inner steps (per peer)
    threads: int = 1
    shards: list[Shard] = field(default_factory=list)

    @property
    def k(self) -> int:
        return len(self.shard_paths)

    @property
    def peer_ids(self) -> list[str]:
        return [f"sim-{i}" for i in range(self.k)]

    def tokens_per_peer_step(self) -> int:
        return self.spec.inner.batch_size * self.spec.data.seq_len

    def load(self) -> None:
        tok = load_tokenizer(self.spec.tokenizer)
        self.shards = [Shard([p], tok, seq_len=self.spec.data.seq_len, val_fraction=self.spec.data.val_fraction)
                       for p in self.shard_paths]


@dataclass
class ArmResult:
    name: str
    label: str
    val_loss: dict[str, float]  # shard name -> loss
    bytes_per_peer: int
    curve: Curve
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mean(self) -> float:
        return sum(self.val_loss.values()) / len(self.val_loss)

    def to_json(self, dp_bytes: int) -> dict[str, Any]:
        return {
            "label": self.label,
            "val_loss": self.val_loss,
            "mean_val_loss": self.mean,
            "bytes_sent_per_peer": self.bytes_per_peer,
            "bytes_reduction_vs_allreduce": (dp_bytes / self.bytes_per_peer) if self.bytes_per_peer else None,
            "curve": [list(p) for p in self.curve],
            "seconds": round(self.seconds, 1),
            **self.extra,
        }


# ---- setup -----------------------------------------------------------------------------

def prepare_shards(out: Path, k: int, max_bytes: int) -> list[Path]:
    """K non-overlapping stdlib shards split by module (reused when already written)."""
    existing = [out / f"shard-{i}" for i in range(k)]
    return _written_once(out, f".done-{k}-{max_bytes}", existing,
                         lambda: write_stdlib_shards(k, out, max_bytes_per_shard=max_bytes))


def prepare_family_shards(out: Path, max_bytes: int) -> list[Path]:
    """The non-IID stress: one shard per language family or domain (reused when already written)."""
    existing = [out / f"family-{f}" for f in FAMILIES]
    return _written_once(out, f".done-{max_bytes}", existing,
                         lambda: write_family_shards(out, max_bytes_per_shard=max_bytes))


def _written_once(out: Path, marker_name: str, existing: list[Path], write: Callable[[], list[Path]]) -> list[Path]:
    """Write the shards unless a marker says they are there; under a file lock, so that the
    sweep's parallel cells neither write them twice at once nor read a half-written folder."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    marker = out / marker_name
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists() and all(p.is_dir() for p in existing):
            return existing
        paths = write()
        marker.touch()
        return paths


def model_numel(setup: Setup) -> int:
    tok = load_tokenizer(setup.spec.tokenizer)
    return sum(p.numel() for p in build_model(setup.spec, tok.vocab_size, tok.eos_id).parameters())


def configure(threads: int) -> None:
    os.environ.setdefault("SWARMFOLD_CACHE", str(Path.home() / ".cache" / "swarmfold" / "tokens"))
    set_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("swarmfold.peer.local", "swarmfold.peer.simulate", "swarmfold.peer.corpus"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def environment() -> dict[str, Any]:
    return {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cores": os.cpu_count(),
            "load_average_at_end": list(os.getloadavg())}


def evaluate_all(model: torch.nn.Module, setup: Setup) -> dict[str, float]:
    return {p.name: evaluate_model(model, s, 64, setup.eval_windows)
            for p, s in zip(setup.shard_paths, setup.shards, strict=True)}


def mean(d: dict[str, float]) -> float:
    return sum(d.values()) / len(d)


# ---- reference arms (one model) ---------------------------------------------------------

def peer_batches(setup: Setup, round_idx: int, h: int) -> list[list[torch.Tensor]]:
    """batches[k][t]: what swarm peer k trains on at step t of round `round_idx` (rounds of h steps)."""
    out = []
    for pid, shard in zip(setup.peer_ids, setup.shards, strict=True):
        order = batch_order(setup.spec.seed, round_idx, pid, num_windows=len(shard.train_windows),
                            steps=h, batch_size=setup.spec.inner.batch_size)
        out.append([shard.train_batch(row) for row in order])
    return out


def run_central(setup: Setup, *, h: int, sequential: bool) -> ArmResult:
    """Data-parallel equivalent (batch K·B, `steps` steps) or sequential central (batch B, K·steps steps).

    Both consume exactly the swarm peers' batches for rounds of `h` steps, so every arm
    sees the same tokens.
    """
    t0 = time.perf_counter()
    spec = setup.spec
    tok = setup.shards[0].tokenizer
    model = build_model(spec, tok.vocab_size, tok.eos_id)
    trainer = InnerTrainer(model, spec.inner)
    k, per_step = setup.k, setup.tokens_per_peer_step()
    curve: Curve = []
    done = 0
    for r in range(setup.steps // h):
        batches = peer_batches(setup, r, h)
        for t in range(h):
            if sequential:
                for b in range(k):
                    trainer.step(batches[b][t])
            else:
                trainer.step(torch.cat([batches[b][t] for b in range(k)]))
            done += 1
            if done % setup.eval_every == 0 or done == setup.steps:
                curve.append((done * k * per_step, mean(evaluate_all(model, setup))))
    numel = sum(p.numel() for p in model.parameters())
    dp_bytes = setup.steps * allreduce_fp32_bytes_per_step(numel, k)
    val = evaluate_all(model, setup)
    if sequential:
        return ArmResult("sequential", f"(a') sequential central: batch B, {k}x steps", val, 0, curve,
                         time.perf_counter() - t0, {"steps": setup.steps * k, "batch_size": spec.inner.batch_size})
    return ArmResult("data_parallel", f"(a) data-parallel equivalent: batch {k}B, per-step fp32 all-reduce", val,
                     dp_bytes, curve, time.perf_counter() - t0,
                     {"steps": setup.steps, "batch_size": k * spec.inner.batch_size, "numel": numel})


# ---- swarm arms (simulate: the real round code) -------------------------------------------

def run_swarm(setup: Setup, spec: Spec, *, name: str, label: str, eval_curve: bool = True,
              schedule: Sequence[int] | None = None) -> ArmResult:
    """K peers averaged in-process every H steps (or by an H schedule); evaluates θ_r on every shard."""
    t0 = time.perf_counter()
    h = spec.round.inner_steps
    rounds = list(schedule) if schedule else [h] * (setup.steps // h)
    if sum(rounds) != setup.steps:
        raise ValueError(f"{name}: rounds of {rounds} steps do not add up to {setup.steps} steps per peer")
    curve: Curve = []
    hashes_agree = True
    bytes_sent = {pid: 0 for pid in setup.peer_ids}
    state = {"steps": 0, "next_eval": setup.eval_every}
    per_step = setup.tokens_per_peer_step() * setup.k

    def on_round(r: int, peers: list[LocalPeer], reports: dict[str, RoundReport]) -> None:
        nonlocal hashes_agree
        hashes_agree &= len({rep.model_sha256 for rep in reports.values()}) == 1
        for pid, rep in reports.items():
            bytes_sent[pid] += rep.result.bytes_sent
        state["steps"] += rounds[r]
        if r + 1 < len(rounds):  # the next round's length (a schedule changes H between rounds)
            for p in peers:
                p.spec = spec.replace(round={"inner_steps": rounds[r + 1]})
        if eval_curve and (state["steps"] >= state["next_eval"] or r + 1 == len(rounds)):
            curve.append((state["steps"] * per_step, mean(evaluate_all(peers[0].model, setup))))
            while state["next_eval"] <= state["steps"]:
                state["next_eval"] += setup.eval_every

    first = spec.replace(round={"inner_steps": rounds[0]}) if schedule else spec
    peers, _ = simulate(first, [[p] for p in setup.shard_paths], rounds=len(rounds), threads=setup.threads,
                        peer_ids=setup.peer_ids, on_round=on_round, save_checkpoints=False)
    val = evaluate_all(peers[0].model, setup)
    # mean over members: with the butterfly, K members together send exactly what a per-step
    # fp32 all-reduce sends, so H = 1 without compression is 1.0x (the max member sends ~0.1% more)
    per_peer = round(sum(bytes_sent.values()) / len(bytes_sent))
    extra: dict[str, Any] = {"bytes_sent_max_member": max(bytes_sent.values()),"inner_steps": h if not schedule else list(rounds), "rounds": len(rounds),
                             "outer": spec.to_dict()["outer"], "compression": spec.averaging.compression,
                             "hashes_agree_every_round": hashes_agree}
    return ArmResult(name, label, val, per_peer, curve, time.perf_counter() - t0, extra)


def run_isolated(setup: Setup, *, h: int) -> tuple[ArmResult, list[torch.Tensor], dict[str, dict[str, float]]]:
    """Each peer alone (plain local training), every peer evaluated on every shard."""
    t0 = time.perf_counter()
    spec = setup.spec.replace(outer={"kind": "sgd", "lr": 1.0, "momentum": 0.0},
                              averaging={"group_size": 1, "compression": "none"}, round={"inner_steps": h})
    curve: Curve = []
    per_step = setup.tokens_per_peer_step() * setup.k
    steps_per_eval = max(1, setup.eval_every // h)

    def on_round(r: int, peers: list[LocalPeer], reports: dict[str, RoundReport]) -> None:
        if (r + 1) % steps_per_eval == 0 or r + 1 == setup.steps // h:
            own = [evaluate_model(p.model, s, 64, setup.eval_windows) for p, s in zip(peers, setup.shards, strict=True)]
            curve.append(((r + 1) * h * per_step, sum(own) / len(own)))

    peers, _ = simulate(spec, [[p] for p in setup.shard_paths], rounds=setup.steps // h, threads=setup.threads,
                        peer_ids=setup.peer_ids, on_round=on_round, save_checkpoints=False)
    matrix = {pid: evaluate_all(p.model, setup) for pid, p in zip(setup.peer_ids, peers, strict=True)}
    own = {sp.name: matrix[pid][sp.name] for pid, sp in zip(setup.peer_ids, setup.shard_paths, strict=True)}
    arm = ArmResult("isolated", "(b) isolated: each peer alone (own shard)", own, 0, curve,
                    time.perf_counter() - t0, {"matrix_peer_by_shard": matrix,
                                               "mean_over_all_shards": {pid: mean(m) for pid, m in matrix.items()}})
    return arm, [flat_params(p.model) for p in peers], matrix


def one_shot_merge(setup: Setup, thetas: list[torch.Tensor], tokens: int) -> ArmResult:
    """(c): the plain average of the isolated peers' final weights."""
    t0 = time.perf_counter()
    merged = aggregate({f"p{i}": Contribution(t, 1.0) for i, t in enumerate(thetas)}, "mean")
    tok = setup.shards[0].tokenizer
    model = build_model(setup.spec, tok.vocab_size, tok.eos_id)
    set_flat_params(model, merged)
    val = evaluate_all(model, setup)
    return ArmResult("one_shot_merge", "(c) one-shot merge: average of the isolated models", val, 0,
                     [(tokens, mean(val))], time.perf_counter() - t0)


# ---- reporting -----------------------------------------------------------------------------

def genesis_loss(setup: Setup) -> float:
    """Mean validation loss of the genesis weights: where every curve starts."""
    tok = setup.shards[0].tokenizer
    return mean(evaluate_all(build_model(setup.spec, tok.vocab_size, tok.eos_id), setup))


def plot_curves(arms: Sequence[ArmResult], path: Path, title: str, start: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for arm in arms:
        points = ([(0, start)] if start is not None and len(arm.curve) > 1 else []) + list(arm.curve)
        xs = [t / 1e6 for t, _ in points]
        ys = [v for _, v in points]
        style: dict[str, Any] = {"marker": "*", "markersize": 12, "linestyle": "none"} if len(xs) == 1 else {}
        if arm.name == "sequential":
            style["linestyle"] = "--"
        ax.plot(xs, ys, label=f"{arm.label} — {arm.mean:.3f}", **style)
    ax.set_xlabel("tokens trained by all workers together (millions)")
    ax.set_ylabel("validation loss (mean over shards)")
    if start is not None:  # the first steps fall from ~5.6; show where the arms differ
        finals = [v for arm in arms for _, v in arm.curve]
        ax.set_ylim(min(finals) - 0.05, min(start, max(finals) + 0.6))
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def timed(fn: Callable[[], ArmResult]) -> ArmResult:
    res = fn()
    logger.info("%-16s mean val %.4f  bytes/peer %12d  %.0fs  %s", res.name, res.mean, res.bytes_per_peer,
                res.seconds, {k: round(v, 3) for k, v in res.val_loss.items()})
    return res


# ---- running arms in worker processes ------------------------------------------------------

def setup_params(setup: Setup) -> dict[str, Any]:
    return {"spec": setup.spec.to_dict(), "shard_paths": [str(p) for p in setup.shard_paths], "steps": setup.steps,
            "eval_windows": setup.eval_windows, "eval_every": setup.eval_every, "threads": setup.threads}


def setup_from_params(params: dict[str, Any]) -> Setup:
    from swarmfold.spec import spec_from_dict

    setup = Setup(spec=spec_from_dict(params["spec"]), shard_paths=[Path(p) for p in params["shard_paths"]],
                  steps=params["steps"], eval_windows=params["eval_windows"], eval_every=params["eval_every"],
                  threads=params["threads"])
    setup.load()
    return setup


def swarm_config_spec(base: Spec, config: dict[str, Any]) -> Spec:
    """The spec of one frontier/quality swarm arm: H, outer optimizer and compression replaced."""
    h = config["schedule"][0] if config.get("schedule") else config["h"]
    return base.replace(round={"inner_steps": h}, outer=dict(config["outer"]),
                        averaging={"compression": config["compression"]}, inner=dict(config.get("inner", {})))


def run_config_worker(params: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """Entry point of a worker process: one swarm arm, returned as JSON-ready data."""
    configure(params["threads"])
    setup = setup_from_params(params)
    spec = swarm_config_spec(setup.spec, config)
    res = run_swarm(setup, spec, name=config["name"], label=config["name"], eval_curve=config.get("curve", False),
                    schedule=config.get("schedule"))
    logger.info("%-28s mean val %.4f  bytes/peer %12d  %.0fs", res.name, res.mean, res.bytes_per_peer, res.seconds)
    return {"config": config, "val_loss": res.val_loss, "mean_val_loss": res.mean,
            "bytes_sent_per_peer": res.bytes_per_peer, "curve": [list(p) for p in res.curve],
            "seconds": round(res.seconds, 1), **res.extra}


def run_arm_worker(params: dict[str, Any], arm: dict[str, Any]) -> list[ArmResult]:
    """Entry point of a worker process for the quality benchmark: one arm (or isolated + merge)."""
    configure(params["threads"])
    setup = setup_from_params(params)
    setup.spec = setup.spec.replace(inner=dict(arm.get("inner", {})))  # this arm's lr and lr schedule
    kind = arm["kind"]
    if kind in ("data_parallel", "sequential"):
        return [timed(lambda: run_central(setup, h=arm["h"], sequential=kind == "sequential"))]
    if kind == "isolated":
        iso, thetas, _ = run_isolated(setup, h=arm["h"])
        timed(lambda: iso)
        tokens = setup.steps * setup.k * setup.tokens_per_peer_step()
        return [iso, timed(lambda: one_shot_merge(setup, thetas, tokens))]
    spec = swarm_config_spec(setup.spec, arm)
    return [timed(lambda: run_swarm(setup, spec, name=arm["name"], label=arm["label"]))]
