"""What the power settings (light, medium, full) do to a peer's training: CPU use and throughput.

Run:
    .venv/bin/python scripts/measure_power.py                  # tiny preset, 1 thread, ~1.5 min
    .venv/bin/python scripts/measure_power.py --steps 40 --repeats 3 --out results/power.json

Each power level is a duty cycle (swarmfold/daemon/settings.py): the fraction of wall-clock
time the peer computes. The daemon keeps it with `DutyCycle`, the step hook the round loop
calls before every inner step, which rests in proportion to the previous step's time.
This script runs the same rounds of a real LocalPeer (tiny preset, real stdlib shard)
through that same hook at each level, and measures per level:

  - cpu_per_wall: process CPU seconds / wall seconds of the training phase
    (the "load" the peer puts on the machine; target ~ duty x full's),
  - tokens_per_second: training throughput as the swarm sees it (rests included),
  - the ratios of both to `full`, measured in the same run (the baseline).

Levels are interleaved (full, medium, light, light, medium, full, ...) so that the load of
other processes on a shared machine hits them alike. Writes results/power.json (or --out).
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

from swarmfold.daemon.resources import DutyCycle
from swarmfold.daemon.settings import POWER_DUTY, Settings
from swarmfold.daemon.state import Controls
from swarmfold.peer.corpus import write_stdlib_shards
from swarmfold.peer.local import LocalPeer
from swarmfold.peer.trainer import set_threads
from swarmfold.spec import Spec, preset

LEVELS = ("full", "medium", "light")


def bench_spec(steps: int) -> Spec:
    return preset("tiny").replace(data={"seq_len": 64}, inner={"batch_size": 8, "warmup_steps": 5},
                                  round={"inner_steps": steps, "mode": "steps"})


def measure(peer: LocalPeer, power: str) -> dict[str, float]:
    """One round's training phase under `power`, from the peer's current state."""
    hook = DutyCycle(Settings(power=power), Controls())
    wall0, cpu0 = time.perf_counter(), time.process_time()
    phase = peer.train_phase(step_hook=hook)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {"wall_s": wall, "cpu_s": cpu, "cpu_per_wall": cpu / wall, "rested_s": hook.rested,
            "tokens": phase.stats.tokens, "tokens_per_second": phase.stats.tokens / wall}


def run(steps: int, repeats: int, threads: int) -> dict[str, Any]:
    set_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        shard = write_stdlib_shards(1, Path(tmp), max_bytes_per_shard=300_000)[0]
        peer = LocalPeer(bench_spec(steps), [shard], peer_id="power", threads=threads)
        measure(peer, "full")  # warm-up: allocator, first-step compilation of kernels
        order = [lvl for r in range(repeats) for lvl in (LEVELS if r % 2 == 0 else LEVELS[::-1])]
        samples: dict[str, list[dict[str, float]]] = {lvl: [] for lvl in LEVELS}
        for lvl in order:
            samples[lvl].append(measure(peer, lvl))
            logging.info("%-6s %s", lvl, {k: round(v, 3) for k, v in samples[lvl][-1].items()})
    out: dict[str, Any] = {"levels": {}}
    for lvl in LEVELS:
        med = {k: statistics.median(s[k] for s in samples[lvl]) for k in samples[lvl][0]}
        out["levels"][lvl] = {"duty_cycle": POWER_DUTY[lvl], **med, "samples": samples[lvl]}
    full = out["levels"]["full"]
    for lvl in LEVELS:
        d = out["levels"][lvl]
        d["cpu_per_wall_vs_full"] = d["cpu_per_wall"] / full["cpu_per_wall"]
        d["tokens_per_second_vs_full"] = d["tokens_per_second"] / full["tokens_per_second"]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20, help="inner steps per measured round (default 20)")
    p.add_argument("--repeats", type=int, default=2, help="rounds per level (default 2)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("results/power.json"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = run(args.steps, args.repeats, args.threads)
    result.update(steps=args.steps, repeats=args.repeats, threads=args.threads, torch=torch.__version__,
                  machine=platform.machine(), written_at=time.time())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'power':<7} {'duty':>5} {'cpu/wall':>9} {'vs full':>8} {'tokens/s':>9} {'vs full':>8}")
    for lvl, d in result["levels"].items():
        print(f"{lvl:<7} {d['duty_cycle']:>5.2f} {d['cpu_per_wall']:>9.3f} {d['cpu_per_wall_vs_full']:>8.2f} "
              f"{d['tokens_per_second']:>9.0f} {d['tokens_per_second_vs_full']:>8.2f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
