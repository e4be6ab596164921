"""Inner-loop throughput on every device present: swarmfold's InnerTrainer against a plain PyTorch loop.

Run:
    .venv/bin/python scripts/bench_inner_loop.py                       # every device here, fp32 and bf16
    nice -n 10 .venv/bin/python scripts/bench_inner_loop.py --devices cpu --precisions fp32 bf16 \
        --repeats 2 --steps 12                                         # the CPU only, short (~2 min)
    .venv/bin/python scripts/bench_inner_loop.py --devices cuda --gpu-preset small --quick  # a GPU, fast

For each (device, precision) both sides train the same genesis model (`build_model`, moved to
the device) with the same AdamW hyperparameters (decay / no-decay groups, warm-up, grad
clipping) on the same batches of a real stdlib shard, at the same precision (bf16: autocast
forward, float32 cross-entropy). The baseline is the loop one would write by hand from the
PyTorch docs (`windows.to(device)`, `torch.autocast`, `loss.item()`). On a shared machine the
load of other processes moves a single timing by tens of percent, so the two sides are
interleaved two ways, and both results are kept:

- lockstep (the headline): in each repeat both sides start from genesis and take their
  steps alternately (A B, B A, ...), each step timed alone (the device synchronised); the
  ratio is the median of the per-step ratios, so a burst of load hits both sides of a pair;
- whole runs, in ABBA order, each a fresh model; wall and CPU time per run (not with --quick).

An overhead probe repeats the lockstep on a toy model (1 layer, width 16, 8 tokens per
step), where a step takes milliseconds and any per-step Python overhead of the trainer
(lr schedule, loss bookkeeping, finiteness check, the batch copy) would show up magnified.

Ratios are swarmfold tokens/s over plain tokens/s (target >= 0.97). On GPUs the script also
reports model FLOPs utilisation: 6 N + 12 L d T FLOPs per token (N parameters without the
input embedding, L layers, width d, T sequence length) times tokens/s, over the device's
peak (a table of known GPUs by name and precision, or --peak-tflops). The script also checks
that both loops computed the same thing: after the same steps their weights must be
bit-identical (torch.equal) on every device, or the comparison is void and it exits 1.

Writes results/bench_inner_loop.json and results/bench_inner_loop.png (or --out; the PNG
beside it).
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
from typing import Any

import torch
import torch.nn.functional as F

from swarmfold.peer.corpus import write_stdlib_shards
from swarmfold.peer.data import Shard
from swarmfold.peer.device import (
    available_devices,
    configure_determinism,
    device_environment,
    resolve_device,
)
from swarmfold.peer.model import build_model, flat_params, num_parameters
from swarmfold.peer.seeds import batch_order
from swarmfold.peer.tokenizer import load_tokenizer
from swarmfold.peer.trainer import InnerTrainer, set_threads
from swarmfold.spec import PRESETS, Spec, preset

TARGET = 0.97
SIDES = ("swarmfold", "plain")
CPU = torch.device("cpu")

# Dense peak TFLOPS by GPU name (substring) and precision, from the vendors' data sheets (SXM
# parts where there are several). fp32 means plain float32 (TF32 off, as swarmfold's default).
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989.0, "fp32": 67.0}, "H100": {"bf16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp32": 19.5}, "L40S": {"bf16": 362.0, "fp32": 91.6},
    "L4": {"bf16": 121.0, "fp32": 30.3}, "A10": {"bf16": 125.0, "fp32": 31.2},
    "4090": {"bf16": 165.2, "fp32": 82.6}, "3090": {"bf16": 71.0, "fp32": 35.6},
}

Steps = Callable[[torch.nn.Module, Spec, list[torch.Tensor]], Iterator[float]]


def plain_steps(model: torch.nn.Module, spec: Spec, batches: list[torch.Tensor]) -> Iterator[float]:
    """The reference: the loop one writes by hand, with the spec's hyperparameters (yields each loss)."""
    inner = spec.inner
    device = next(model.parameters()).device
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": inner.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=inner.lr, betas=(inner.beta1, inner.beta2), eps=inner.eps)
    for step, windows in enumerate(batches):
        lr = inner.lr * (step + 1) / inner.warmup_steps if step < inner.warmup_steps else inner.lr
        for group in opt.param_groups:
            group["lr"] = lr
        windows = windows.to(device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=inner.precision == "bf16"):
            logits = model(input_ids=windows[:, :-1]).logits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), windows[:, 1:].reshape(-1))
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def lockstep(spec: Spec, vocab: int, eos: int, batches: list[torch.Tensor], device: torch.device = CPU
             ) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, torch.Tensor]]:
    """Per-step wall and CPU seconds of both sides, stepping alternately from genesis; final weights."""
    models = {name: build_model(spec, vocab, eos).to(device) for name in SIDES}
    fns: dict[str, Steps] = {"swarmfold": swarmfold_steps, "plain": plain_steps}
    gens = {name: fns[name](models[name], spec, batches) for name in SIDES}
    seconds: dict[str, list[float]] = {name: [] for name in SIDES}
    cpu: dict[str, list[float]] = {name: [] for name in SIDES}
    for i in range(len(batches)):
        for name in SIDES if i % 2 == 0 else SIDES[::-1]:
            _sync(device)
            w0, c0 = time.perf_counter(), time.process_time()
            next(gens[name])
            _sync(device)
            seconds[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    return seconds, cpu, {name: flat_params(m) for name, m in models.items()}


def whole_run(fn: Callable[[torch.nn.Module, Spec, list[torch.Tensor]], None], spec: Spec, vocab: int,
              eos: int, batches: list[torch.Tensor], device: torch.device = CPU) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one run from genesis."""
    model = build_model(spec, vocab, eos).to(device)
    _sync(device)
    w0, c0 = time.perf_counter(), time.process_time()
    fn(model, spec, batches)
    _sync(device)
    return time.perf_counter() - w0, time.process_time() - c0


def overhead_probe(spec: Spec, vocab: int, eos: int, steps: int = 200, repeats: int = 3,
                   device: torch.device = CPU) -> dict[str, object]:
    """Lockstep on a toy model where per-step overhead dominates; median step ratio per repeat."""
    toy = spec.replace(model={"hidden_size": 16, "intermediate_size": 32, "num_layers": 1, "num_heads": 2,
                              "num_kv_heads": 2}, data={"seq_len": 8}, inner={"batch_size": 1})
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (1, 9), generator=g) for _ in range(steps)]
    ratios, step_us = [], []
    for _ in range(repeats):
        secs, _cpu, _weights = lockstep(toy, vocab, eos, batches, device)
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


def flops_per_token(model: torch.nn.Module, spec: Spec) -> float:
    """Training FLOPs per token: 6 N + 12 L d T (N without the input embedding; PaLM, appendix B)."""
    embed = model.get_input_embeddings().weight.numel()  # type: ignore[operator]
    n = num_parameters(model) - embed
    m = spec.model
    return 6.0 * n + 12.0 * m.num_layers * m.hidden_size * spec.data.seq_len


def peak_tflops(device: torch.device, precision: str, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS.items():
        if key in name:
            return peaks.get(precision)
    return None


def bench_config(spec: Spec, device: torch.device, *, steps: int, repeats: int, quick: bool,
                 peak_override: float | None) -> dict[str, Any]:
    """Both loops on one (device, precision): lockstep, whole runs, overhead probe."""
    tok = load_tokenizer(spec.tokenizer)
    vocab, eos = tok.vocab_size, tok.eos_id
    configure_determinism(device, allow_tf32=spec.inner.allow_tf32)
    batches = shard_batches(spec, steps)
    tokens_per_step = spec.tokens_per_step
    label = f"{device} {spec.inner.precision}"
    whole_run(swarmfold_run, spec, vocab, eos, batches[:2], device)  # warm up kernels and the allocator

    step_ratios: list[float] = []
    step_cpu_ratios: list[float] = []
    step_seconds: dict[str, list[float]] = {name: [] for name in SIDES}
    same = True
    for rep in range(repeats):
        secs, cpu, weights = lockstep(spec, vocab, eos, batches, device)
        same = same and bool(torch.equal(weights["swarmfold"], weights["plain"]))
        for name in SIDES:
            step_seconds[name] += secs[name]
        step_ratios += [p / s for s, p in zip(secs["swarmfold"], secs["plain"], strict=True)]
        step_cpu_ratios += [p / s for s, p in zip(cpu["swarmfold"], cpu["plain"], strict=True)]
        print(f"[{label}] lockstep {rep}: swarmfold "
              f"{tokens_per_step * len(batches) / sum(secs['swarmfold']):,.0f} tok/s, plain "
              f"{tokens_per_step * len(batches) / sum(secs['plain']):,.0f} tok/s", flush=True)

    whole: dict[str, Any] | None = None
    probe: dict[str, object] | None = None
    if not quick:
        runs: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in SIDES}
        pair_ratios: list[float] = []
        pair_cpu_ratios: list[float] = []
        fns = {"swarmfold": swarmfold_run, "plain": plain_run}
        for rep in range(repeats):
            order = SIDES + SIDES[::-1] if rep % 2 == 0 else SIDES[::-1] + SIDES
            pair = {name: [0.0, 0.0] for name in SIDES}
            for name in order:
                w, c = whole_run(fns[name], spec, vocab, eos, batches, device)
                runs[name]["wall"].append(w)
                runs[name]["cpu"].append(c)
                pair[name][0] += w
                pair[name][1] += c
            pair_ratios.append(pair["plain"][0] / pair["swarmfold"][0])  # tokens/s ratio = inverse time ratio
            pair_cpu_ratios.append(pair["plain"][1] / pair["swarmfold"][1])
            print(f"[{label}] ABBA pair {rep}: wall-time ratio {pair_ratios[-1]:.3f}, "
                  f"CPU-time ratio {pair_cpu_ratios[-1]:.3f}", flush=True)
        whole = {"seconds": runs, "wall_ratio_median": statistics.median(pair_ratios),
                 "cpu_ratio_median": statistics.median(pair_cpu_ratios), "pair_wall_ratios": pair_ratios,
                 "pair_cpu_ratios": pair_cpu_ratios}
        probe = overhead_probe(spec, vocab, eos, device=device)
        print(f"[{label}] overhead probe (toy model, {probe['swarmfold_median_step_us']:.0f} us/step): "
              f"ratio {probe['ratio']:.3f}", flush=True)

    ratio = statistics.median(step_ratios)
    tps = {name: tokens_per_step * len(v) / sum(v) for name, v in step_seconds.items()}
    model = build_model(spec, vocab, eos)
    fpt = flops_per_token(model, spec)
    peak = peak_tflops(device, spec.inner.precision, peak_override)
    mfu = None if peak is None else {name: tps[name] * fpt / (peak * 1e12) for name in SIDES}
    result: dict[str, Any] = {
        "device": str(device), "device_environment": device_environment(device),
        "precision": spec.inner.precision,
        "parameters": num_parameters(model),
        "batch_size": spec.inner.batch_size, "seq_len": spec.data.seq_len,
        "tokens_per_second_lockstep": tps,
        "ratio": ratio,
        "ratio_lockstep_total": tps["swarmfold"] / tps["plain"],
        "cpu_ratio": statistics.median(step_cpu_ratios),
        "whole_runs": whole,
        "overhead_probe": probe,
        "flops_per_token": fpt,
        "peak_tflops": peak,
        "mfu": mfu,
        "meets_target": ratio >= TARGET,
        "same_weights_bitwise": same,
    }
    print(f"[{label}] lockstep: swarmfold {tps['swarmfold']:,.0f} tok/s, plain {tps['plain']:,.0f} tok/s, median "
          f"step ratio {ratio:.3f} (target {TARGET}), CPU-time {result['cpu_ratio']:.3f}"
          + (f", MFU {mfu['swarmfold']:.1%}" if mfu else "") + f"; same weights: {same}", flush=True)
    return result


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['device']}\n{r['precision']}" for r in results]
    ratios = [r["ratio"] for r in results]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(results) + 1.5), 3.6))
    bars = ax.bar(labels, ratios, color=["#4c72b0" if r["meets_target"] else "#c44e52" for r in results])
    ax.axhline(TARGET, color="black", linestyle="--", linewidth=1, label=f"target {TARGET}")
    for bar, r in zip(bars, results, strict=True):
        tps = r["tokens_per_second_lockstep"]
        ax.annotate(f"{r['ratio']:.3f}\n{tps['swarmfold']:,.0f} vs\n{tps['plain']:,.0f} tok/s",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=7)
    ax.set_ylim(0.0, max(1.25, max(ratios) + 0.25))
    ax.set_ylabel("swarmfold / plain tokens/s (lockstep)")
    ax.set_title("inner loop against a plain PyTorch loop")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--devices", nargs="+", default=["all"],
                    help="devices to run on: all (every device present), or e.g. cpu cuda:0 mps")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--preset", default="tiny", choices=list(PRESETS), help="model on the CPU")
    ap.add_argument("--gpu-preset", default="small", choices=list(PRESETS), help="model on GPUs and MPS")
    ap.add_argument("--steps", type=int, default=20, help="inner steps per run")
    ap.add_argument("--repeats", type=int, default=3, help="lockstep repeats, and ABBA pairs of whole runs")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="lockstep only (no whole runs, no overhead probe)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the GPU's peak TFLOPS for the MFU figure (default: from a table of known GPUs)")
    ap.add_argument("--out", type=Path, default=Path("results/bench_inner_loop.json"))
    args = ap.parse_args()

    set_threads(args.threads)
    names = available_devices() if args.devices == ["all"] else args.devices
    devices = [resolve_device(n) for n in names]
    results = []
    for device in devices:
        base = preset(args.preset if device.type == "cpu" else args.gpu_preset)
        for precision in args.precisions:
            spec = base.replace(inner={"precision": precision})
            results.append(bench_config(spec, device, steps=args.steps, repeats=args.repeats, quick=args.quick,
                                        peak_override=args.peak_tflops))
    worst = min(r["ratio"] for r in results)
    out = {
        "benchmark": "inner_loop",
        "configs": results,
        "ratio_min": worst,
        "ratio_definition": "median over steps of plain_step_seconds / swarmfold_step_seconds (lockstep)",
        "cpu_ratio_definition": "the same with the process's CPU seconds (less sensitive to other load)",
        "mfu_definition": "tokens/s x (6 N + 12 L d T) / peak FLOPS; N without the input embedding",
        "target_ratio": TARGET,
        "meets_target": all(r["meets_target"] for r in results),
        "same_weights_bitwise": all(r["same_weights_bitwise"] for r in results),
        "presets": {"cpu": args.preset, "gpu": args.gpu_preset},
        "threads": args.threads, "steps_per_run": args.steps, "repeats": args.repeats, "quick": args.quick,
        "command": " ".join(sys.argv),
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "machine": platform.machine(),
                        "cpus": os.cpu_count(), "load_avg_1m_at_end": os.getloadavg()[0]},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    png = args.out.with_suffix(".png")
    plot(results, png)
    print(f"worst median step ratio {worst:.3f} (target {TARGET}); wrote {args.out} and {png}")
    if not out["same_weights_bitwise"]:
        print("error: the two loops did not produce the same weights; the comparison is void", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
