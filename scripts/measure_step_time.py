"""Seconds per inner step of the presets on this CPU: what time mode's `round.seconds` is chosen from.

Run:
    nice -n 5 .venv/bin/python scripts/measure_step_time.py              # tiny and small, 1 and 2 threads (~6 min)
    nice -n 5 .venv/bin/python scripts/measure_step_time.py --presets tiny --steps 10 --repeats 1   # quick
    nice -n 5 .venv/bin/python scripts/measure_step_time.py --probe-base  # + a base step at batch 1 (~2 min more)

A time-mode round should last about as long as H = round.inner_steps steps take on a typical
CPU laptop for that preset: a peer on such a machine then trains about H steps, a faster one
reaches the cap H, a slower one trains fewer and still counts. For each measured preset and
thread count this script trains real rounds of a `LocalPeer` (the preset's own model, batch and
sequence length, on a real stdlib shard) through `train_phase`, the code whose clock time mode
reads, and records every step's wall time. The first `--warmup` steps of each round are left
out (allocator, first kernels); thread counts are interleaved (1, 2, 2, 1, ...) so that the load
of other processes on a shared machine hits them alike.

The presets too slow to train here (base, 1b) are derived: training FLOPs per step are
tokens per step x (6 N + 12 L d T), with N the parameters that take part in a matmul per token
(all but the input embedding; a tied output head counted once more, because it still multiplies),
L layers, d the width, T the sequence length (PaLM, appendix B). Their seconds per step are the
largest measured preset's seconds per FLOP times their FLOPs. `--probe-base` also times a few
steps of base at batch 1 (same model and sequence length), to check that extrapolation at that
width.

Writes results/step_time.json (or --out); prints one line per preset with H x seconds per step.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from swarmfold.peer.corpus import write_stdlib_shards
from swarmfold.peer.local import LocalPeer
from swarmfold.peer.memory import train_flops_per_step as flops_per_step
from swarmfold.peer.tokenizer import load_tokenizer
from swarmfold.peer.trainer import set_threads
from swarmfold.spec import PRESETS, Spec, preset

logger = logging.getLogger("measure_step_time")
THREADS = (1, 2)


def train_flops_per_step(spec: Spec) -> float:
    """Training FLOPs of one inner step: tokens x (6 N + 12 L d T) (see the module docstring)."""
    tok = load_tokenizer(spec.tokenizer)
    return flops_per_step(spec, tok.vocab_size, tok.eos_id)


def step_seconds(peer: LocalPeer) -> list[float]:
    """The wall seconds of every step of one train phase (steps mode: all of the round's batches)."""
    marks: list[float] = []
    phase = peer.train_phase(step_hook=lambda _i: marks.append(time.perf_counter()))
    marks.append(marks[0] + phase.stats.seconds)  # the end of the last step, on the trainer's clock
    return [b - a for a, b in zip(marks, marks[1:], strict=False)]


def measure(name: str, spec: Spec, shard: Path, *, steps: int, warmup: int, repeats: int) -> dict[str, Any]:
    spec = spec.replace(round={"mode": "steps", "inner_steps": warmup + steps})
    peers = {t: LocalPeer(spec, [shard], peer_id=f"steptime-{t}", threads=t) for t in THREADS}
    samples: dict[int, list[float]] = {t: [] for t in THREADS}
    order = [t for r in range(repeats) for t in (THREADS if r % 2 == 0 else THREADS[::-1])]
    for t in order:
        set_threads(t)
        secs = step_seconds(peers[t])[warmup:]
        samples[t].extend(secs)
        logger.info("%-6s %d thread(s): median %.3f s/step over %d steps (min %.3f, max %.3f)", name, t,
                    statistics.median(secs), len(secs), min(secs), max(secs))
    flops = train_flops_per_step(spec)
    out: dict[str, Any] = {"measured": True, "tokens_per_step": spec.tokens_per_step, "train_flops_per_step": flops,
                           "inner_steps": preset(name).round.inner_steps if name in PRESETS else None,
                           "threads": {}}
    for t in THREADS:
        med = statistics.median(samples[t])
        out["threads"][str(t)] = {"median_s_per_step": med, "mean_s_per_step": statistics.fmean(samples[t]),
                                  "min_s_per_step": min(samples[t]), "steps_timed": len(samples[t]),
                                  "gflops_per_s": flops / med / 1e9, "samples": samples[t]}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "small"], choices=PRESETS,
                   help="presets to time (default tiny small; the rest are derived from the FLOP ratio)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per round (default 25 tiny, 6 others)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each round (default 2)")
    p.add_argument("--repeats", type=int, default=2, help="rounds per thread count (default 2)")
    p.add_argument("--probe-base", action="store_true", help="also time base at batch 1 (2 threads)")
    p.add_argument("--out", type=Path, default=Path("results/step_time.json"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result: dict[str, Any] = {"presets": {}, "threads": list(THREADS), "warmup": args.warmup,
                              "repeats": args.repeats, "torch": torch.__version__, "machine": platform.machine(),
                              "processor": platform.processor(), "written_at": time.time()}
    with tempfile.TemporaryDirectory() as tmp:
        shard = write_stdlib_shards(1, Path(tmp), max_bytes_per_shard=1_500_000)[0]
        for name in args.presets:
            steps = args.steps or (25 if name == "tiny" else 6)
            result["presets"][name] = measure(name, preset(name), shard, steps=steps, warmup=args.warmup,
                                              repeats=args.repeats)
        if args.probe_base:
            probe = preset("base").replace(inner={"batch_size": 1, "micro_batch_size": 0})
            result["base_batch1_probe"] = measure("base@1", probe, shard, steps=2, warmup=1, repeats=1)
    measured = [n for n in PRESETS if n in result["presets"]]
    ref = measured[-1]  # the largest measured preset: its FLOP rate is the closest to the larger ones'
    for name in PRESETS:
        spec = preset(name)
        entry = result["presets"].setdefault(name, {"measured": False, "tokens_per_step": spec.tokens_per_step,
                                                    "train_flops_per_step": train_flops_per_step(spec),
                                                    "derived_from": ref, "threads": {}})
        entry["inner_steps"] = spec.round.inner_steps
        for t in THREADS:
            rate = result["presets"][ref]["threads"][str(t)]
            s = entry["threads"].setdefault(str(t), {})
            if not entry["measured"]:
                s["median_s_per_step"] = rate["median_s_per_step"] * entry["train_flops_per_step"] / \
                    result["presets"][ref]["train_flops_per_step"]
            s["h_steps_seconds"] = s["median_s_per_step"] * spec.round.inner_steps
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'preset':<7} {'GFLOP/step':>11} {'s/step 1t':>10} {'s/step 2t':>10} {'H':>4} {'H steps 1t':>11} "
          f"{'H steps 2t':>11}")
    for name in PRESETS:
        e = result["presets"][name]
        one, two = e["threads"]["1"], e["threads"]["2"]
        how = "measured" if e["measured"] else f"derived from {e['derived_from']}'s FLOP rate"
        print(f"{name:<7} {e['train_flops_per_step'] / 1e9:>11.1f} {one['median_s_per_step']:>10.3f} "
              f"{two['median_s_per_step']:>10.3f} {e['inner_steps']:>4} {one['h_steps_seconds']:>10.1f}s "
              f"{two['h_steps_seconds']:>10.1f}s  {how}")
    if "base_batch1_probe" in result:
        b = result["base_batch1_probe"]["threads"]
        print(f"base at batch 1: {b['1']['median_s_per_step']:.2f} s/step (1 thread), "
              f"{b['2']['median_s_per_step']:.2f} (2); {b['2']['gflops_per_s']:.1f} GFLOP/s at 2 threads against "
              f"{result['presets'][ref]['threads']['2']['gflops_per_s']:.1f} for {ref}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
