"""Inner-loop throughput: swarmfold's InnerTrainer against a hand-written PyTorch loop.

Run:
    .venv/bin/python scripts/bench_inner_loop.py                 # tiny preset, 1 thread, ~1.5 min
    .venv/bin/python scripts/bench_inner_loop.py --preset small --threads 2 --repeats 4

Both sides train the same genesis model (`build_model`) with the same AdamW
hyperparameters (decay / no-decay groups, warm-up, grad clipping) on the same batches
of a real stdlib shard. The baseline is the loop one would write by hand from the
PyTorch docs. On a shared machine the load of other processes moves a single timing by
tens of percent, so the two sides are interleaved two ways, and both results are kept:

- lockstep (the headline): in each repeat both sides start from genesis and take their
  steps alternately (A B, B A, ...), each step timed alone; the ratio is the median of
  the per-step ratios, so a burst of load hits both sides of a pair alike;
- whole runs, in ABBA order, each a fresh model; wall and CPU time per run.

An overhead probe repeats the lockstep on a toy model (1 layer, width 16, 8 tokens per
step), where a step takes milliseconds and any per-step Python overhead of the trainer
(lr schedule, loss bookkeeping, finiteness check) would show up magnified.

Ratios are swarmfold tokens/s over plain tokens/s (target >= 0.97). The script also
checks that both loops computed the same thing: after the same steps their weights must
be bit-identical (torch.equal), or the comparison is void and it exits 1.

Writes results/bench_inner_loop.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from swarmfold.peer.corpus import write_stdlib_shards
from swarmfold.peer.data import Shard
from swarmfold.peer.model import build_model, flat_params, num_parameters
from swarmfold.peer.seeds import batch_order
from swarmfold.peer.tokenizer import load_tokenizer
from swarmfold.peer.trainer import InnerTrainer, set_threads
from swarmfold.spec import Spec, preset

TARGET = 0.97
SIDES = ("swarmfold", "plain")

Steps = Callable[[torch.nn.Module, Spec, list[torch.Tensor]], Iterator[float]]


def plain_steps(model: torch.nn.Module, spec: Spec, batches: list[torch.Tensor]) -> Iterator[float]:
    """The reference: the loop one writes by hand, with the spec's hyperparameters (yields each loss)."""
    inner = spec.inner
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": inner.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=inner.lr, betas=(inner.beta1, inner.beta2), eps=inner.eps)
    for step, windows in enumerate(batches):
        lr = inner.lr * (step + 1) / inner.warmup_steps if step < inner.warmup_steps else inner.lr
        for group in opt.param_groups:
            group["lr"] = lr
        logits = model(input_ids=windows[:, :-1]).logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), windows[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), inner.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        yield loss.item()


def swarmfold_steps(model: torch.nn.Module, spec: Spec, batches: list[torch.Tensor]) -> Iterator[float]:
    trainer = InnerTrainer(model, spec.inner)
    for windows in batches:
        yield trainer.step(windows)


def swarmfold_run(model: torch.nn.Module, spec: Spec, batches: list[torch.Tensor]) -> None:
    InnerTrainer(model, spec.inner).run(batches)


def plain_run(model: torch.nn.Module, spec: Spec, batches: list[torch.Tensor]) -> None:
    for _ in plain_steps(model, spec, batches):
        pass


def lockstep(spec: Spec, vocab: int, eos: int, batches: list[torch.Tensor]
             ) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, torch.Tensor]]:
    """Per-step wall and CPU seconds of both sides, stepping alternately from genesis; final weights."""
    models = {name: build_model(spec, vocab, eos) for name in SIDES}
    fns: dict[str, Steps] = {"swarmfold": swarmfold_steps, "plain": plain_steps}
    gens = {name: fns[name](models[name], spec, batches) for name in SIDES}
    seconds: dict[str, list[float]] = {name: [] for name in SIDES}
    cpu: dict[str, list[float]] = {name: [] for name in SIDES}
    for i in range(len(batches)):
        for name in SIDES if i % 2 == 0 else SIDES[::-1]:
            w0, c0 = time.perf_counter(), time.process_time()
            next(gens[name])
            seconds[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    return seconds, cpu, {name: flat_params(m) for name, m in models.items()}


def whole_run(fn: Callable[[torch.nn.Module, Spec, list[torch.Tensor]], None], spec: Spec, vocab: int,
              eos: int, batches: list[torch.Tensor]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one run from genesis."""
    model = build_model(spec, vocab, eos)
    w0, c0 = time.perf_counter(), time.process_time()
    fn(model, spec, batches)
    return time.perf_counter() - w0, time.process_time() - c0


def overhead_probe(spec: Spec, vocab: int, eos: int, steps: int = 200, repeats: int = 3) -> dict[str, object]:
    """Lockstep on a toy model where per-step overhead dominates; median step ratio per repeat."""
    toy = spec.replace(model={"hidden_size": 16, "intermediate_size": 32, "num_layers": 1, "num_heads": 2,
                              "num_kv_heads": 2}, data={"seq_len": 8}, inner={"batch_size": 1})
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (1, 9), generator=g) for _ in range(steps)]
    ratios, step_us = [], []
    for _ in range(repeats):
        secs, _cpu, _weights = lockstep(toy, vocab, eos, batches)
        ratios.append(statistics.median(p / s for s, p in zip(secs["swarmfold"], secs["plain"], strict=True)))
        step_us.append(1e6 * statistics.median(secs["swarmfold"]))
    return {"steps": steps, "median_step_ratio_per_repeat": ratios, "ratio": statistics.median(ratios),
            "swarmfold_median_step_us": statistics.median(step_us)}


def shard_batches(spec: Spec, steps: int) -> list[torch.Tensor]:
    """`steps` real training batches of one stdlib shard, in the seed schedule's order."""
    tok = load_tokenizer(spec.tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("SWARMFOLD_CACHE", str(Path(tmp) / "cache"))
        shard_dir = write_stdlib_shards(1, Path(tmp) / "data", max_bytes_per_shard=1_500_000)[0]
        shard = Shard([shard_dir], tok, seq_len=spec.data.seq_len, val_fraction=spec.data.val_fraction)
        order = batch_order(spec.seed, 0, "bench", num_windows=len(shard.train_windows), steps=steps,
                            batch_size=spec.inner.batch_size)
        return [shard.train_batch(row) for row in order]


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    ap.add_argument("--steps", type=int, default=20, help="inner steps per run")
    ap.add_argument("--repeats", type=int, default=3, help="lockstep repeats, and ABBA pairs of whole runs")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("results/bench_inner_loop.json"))
    args = ap.parse_args()

    set_threads(args.threads)
    spec = preset(args.preset)
    tok = load_tokenizer(spec.tokenizer)
    vocab, eos = tok.vocab_size, tok.eos_id
    batches = shard_batches(spec, args.steps)
    tokens_per_step = spec.tokens_per_step
    whole_run(swarmfold_run, spec, vocab, eos, batches[:2])  # warm up kernels and the allocator

    step_ratios: list[float] = []
    step_cpu_ratios: list[float] = []
    step_seconds: dict[str, list[float]] = {name: [] for name in SIDES}
    same = True
    for rep in range(args.repeats):
        secs, cpu, weights = lockstep(spec, vocab, eos, batches)
        same = same and bool(torch.equal(weights["swarmfold"], weights["plain"]))
        for name in SIDES:
            step_seconds[name] += secs[name]
        step_ratios += [p / s for s, p in zip(secs["swarmfold"], secs["plain"], strict=True)]
        step_cpu_ratios += [p / s for s, p in zip(cpu["swarmfold"], cpu["plain"], strict=True)]
        print(f"lockstep {rep}: swarmfold {tokens_per_step * len(batches) / sum(secs['swarmfold']):,.0f} tok/s, "
              f"plain {tokens_per_step * len(batches) / sum(secs['plain']):,.0f} tok/s", flush=True)

    runs: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in SIDES}
    pair_ratios: list[float] = []
    pair_cpu_ratios: list[float] = []
    fns = {"swarmfold": swarmfold_run, "plain": plain_run}
    for rep in range(args.repeats):
        order = SIDES + SIDES[::-1] if rep % 2 == 0 else SIDES[::-1] + SIDES
        pair = {name: [0.0, 0.0] for name in SIDES}
        for name in order:
            w, c = whole_run(fns[name], spec, vocab, eos, batches)
            runs[name]["wall"].append(w)
            runs[name]["cpu"].append(c)
            pair[name][0] += w
            pair[name][1] += c
        pair_ratios.append(pair["plain"][0] / pair["swarmfold"][0])  # tokens/s ratio = inverse time ratio
        pair_cpu_ratios.append(pair["plain"][1] / pair["swarmfold"][1])
        print(f"ABBA pair {rep}: wall-time ratio {pair_ratios[-1]:.3f}, CPU-time ratio {pair_cpu_ratios[-1]:.3f}",
              flush=True)

    probe = overhead_probe(spec, vocab, eos)
    print(f"overhead probe (toy model, {probe['swarmfold_median_step_us']:.0f} us/step): ratio {probe['ratio']:.3f}",
          flush=True)
    ratio = statistics.median(step_ratios)
    wall_ratio, cpu_ratio = statistics.median(pair_ratios), statistics.median(pair_cpu_ratios)
    tps = {name: tokens_per_step * len(v) / sum(v) for name, v in step_seconds.items()}
    result = {
        "benchmark": "inner_loop",
        "preset": args.preset,
        "parameters": num_parameters(build_model(spec, vocab, eos)),
        "threads": args.threads,
        "steps_per_run": args.steps,
        "batch_size": spec.inner.batch_size,
        "seq_len": spec.data.seq_len,
        "repeats": args.repeats,
        "tokens_per_second_lockstep": tps,
        "ratio": ratio,
        "ratio_definition": "median over steps of plain_step_seconds / swarmfold_step_seconds (lockstep)",
        "ratio_lockstep_total": tps["swarmfold"] / tps["plain"],
        "cpu_ratio": statistics.median(step_cpu_ratios),
        "cpu_ratio_definition": "the same with the process's CPU seconds (less sensitive to other load)",
        "whole_runs": {
            "seconds": runs,
            "wall_ratio_median": wall_ratio,
            "cpu_ratio_median": cpu_ratio,
            "pair_wall_ratios": pair_ratios,
            "pair_cpu_ratios": pair_cpu_ratios,
        },
        "overhead_probe": probe,
        "target_ratio": TARGET,
        "meets_target": ratio >= TARGET,
        "same_weights_bitwise": same,
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "machine": platform.machine(),
                        "cpus": os.cpu_count(), "load_avg_1m_at_end": os.getloadavg()[0]},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"lockstep: swarmfold {tps['swarmfold']:,.0f} tok/s, plain {tps['plain']:,.0f} tok/s, "
          f"median step ratio {ratio:.3f} (target {TARGET}), CPU-time {statistics.median(step_cpu_ratios):.3f}; whole runs: wall ratio {wall_ratio:.3f}, "
          f"CPU ratio {cpu_ratio:.3f}; same weights: {same}; wrote {args.out}")
    if not same:
        print("error: the two loops did not produce the same weights; the comparison is void", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
