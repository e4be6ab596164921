"""Sweeps of the quality benchmark: inner lr per arm, outer lr x H, and lr schedules.

Run:
    nice -n 15 .venv/bin/python scripts/sweep_quality.py --grid inner-lr --tag quick -- --quick
    nice -n 15 .venv/bin/python scripts/sweep_quality.py --grid schedule --swarm-lr 4e-3 --dp-lr 4e-3 \\
        --tag quick -- --quick
    nice -n 15 .venv/bin/python scripts/sweep_quality.py --grid outer --hs 10,25,50 --outer-lrs 0.7,1,1.3 -- --quick
    nice -n 15 .venv/bin/python scripts/sweep_quality.py --grid muon-lr --muon-lrs 0.02,0.01,0.04 --jobs 1 \\
        --tag quick -- --quick

Every cell is one `scripts/bench_quality.py` run of one arm: the data-parallel equivalent
(batch K·B) or the swarm with the preset's defaults (batch B per peer), at one inner lr,
one lr schedule and (for the swarm) one H and outer lr. For the outer grid give the run's
length with --steps (a multiple of every H), not --rounds, so every cell trains on the same
tokens (each pair records `same_token_budget`). Arguments after `--` go to every
bench_quality run unchanged (the scale: --quick, --steps, --rounds, --non-iid, --seq-len...).
At most --jobs (1 or 2) cells run at once, each a process with one thread.

Grids:
- `inner-lr`: both arms at every lr of --lrs (constant schedule); each arm's best, and the
  swarm ÷ data-parallel at the same lr and at each arm's own best;
- `schedule`: both arms under every schedule of --schedules (the same schedule for both),
  the swarm at --swarm-lr and data-parallel at --dp-lr;
- `muon-lr`: both arms with `inner.optimizer = "muon"` at every Muon lr of --muon-lrs (AdamW,
  for embeddings, head and norms, at --swarm-lr and --dp-lr), in that order; paired as inner-lr;
- `outer`: the swarm at every H of --hs times every outer lr of --outer-lrs (outer SGD, or
  --outer-kind nesterov with --outer-momentum), against data-parallel at --dp-lr.

The results are resumable: results/sweep_quality_<grid>[_<tag>].json holds one entry per
finished cell, written as each cell ends; a restart with the same arguments skips them.
A Markdown table is written beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "scripts" / "bench_quality.py"
logger = logging.getLogger("sweep")


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def cells_of(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The grid's cells: {key, arm, lr, schedule, h, outer_lr, muon_lr} (h/outer_lr 0 = the preset's; muon_lr 0 =
    AdamW alone)."""
    def cell(arm: str, lr: float, schedule: str = "constant", h: int = 0, outer_lr: float = 0.0,
             muon_lr: float = 0.0) -> dict[str, Any]:
        key = (f"{arm} " + (f"muon_lr={muon_lr:g} adamw_lr={lr:g}" if muon_lr else f"lr={lr:g}") + f" {schedule}"
               + (f" H={h} outer_lr={outer_lr:g}" if arm == "swarm" and (h or outer_lr) else ""))
        return {"key": key, "arm": arm, "lr": lr, "schedule": schedule, "h": h, "outer_lr": outer_lr,
                "muon_lr": muon_lr}

    if args.grid == "muon-lr":
        return [cell(arm, args.dp_lr if arm == "data_parallel" else args.swarm_lr, muon_lr=m)
                for m in floats(args.muon_lrs) for arm in ("data_parallel", "swarm")]
    if args.grid == "inner-lr":
        return [cell(arm, lr) for lr in floats(args.lrs) for arm in ("data_parallel", "swarm")]
    if args.grid == "schedule":
        return [c for s in args.schedules.split(",") for c in (cell("data_parallel", args.dp_lr, s),
                                                                cell("swarm", args.swarm_lr, s))]
    out = [cell("data_parallel", args.dp_lr)]
    return out + [cell("swarm", args.swarm_lr, "constant", int(h), olr)
                  for h in floats(args.hs) for olr in floats(args.outer_lrs)]


def bench_command(args: argparse.Namespace, cell: dict[str, Any], out: Path) -> list[str]:
    cmd = [sys.executable, str(BENCH), *args.bench_args, "--jobs", "1", "--out", str(out),
           "--arms", "data_parallel" if cell["arm"] == "data_parallel" else "swarm_default",
           "--lr-schedule", cell["schedule"]]
    cmd += ["--dp-lr" if cell["arm"] == "data_parallel" else "--swarm-lr", repr(cell["lr"])]
    if cell.get("muon_lr"):
        cmd += ["--inner-optimizer", "muon",
                "--dp-muon-lr" if cell["arm"] == "data_parallel" else "--swarm-muon-lr", repr(cell["muon_lr"])]
    if cell["h"]:
        cmd += ["--h", str(cell["h"])]
    if cell["outer_lr"]:
        cmd += ["--outer-lr", repr(cell["outer_lr"]), "--outer-kind", args.outer_kind]
        if args.outer_kind == "nesterov":
            cmd += ["--outer-momentum", repr(args.outer_momentum)]
    return cmd


def run_cell(args: argparse.Namespace, cell: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """One bench_quality run; the arm's numbers (or the failure) as JSON-ready data."""
    out = workdir / (cell["key"].replace(" ", "_").replace("=", "-") + ".json")
    cmd = bench_command(args, cell, out)
    logger.info("start %s", cell["key"])
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        logger.error("%s failed (exit %d): %s", cell["key"], proc.returncode, proc.stderr[-2000:])
        return {**cell, "error": proc.stderr[-2000:], "exit_code": proc.returncode}
    report = json.loads(out.read_text())
    arm = next(a for a in report["arms"].values() if "mean_val_loss" in a)
    logger.info("done  %s: mean val %.4f in %ss", cell["key"], arm["mean_val_loss"], arm["seconds"])
    return {**cell, "mean_val_loss": arm["mean_val_loss"], "val_loss": arm["val_loss"],
            "bytes_sent_per_peer": arm["bytes_sent_per_peer"], "curve": arm["curve"], "seconds": arm["seconds"],
            "inner": report["setup"]["inner_per_arm"]["data_parallel" if cell["arm"] == "data_parallel" else "swarm"],
            "inner_steps": report["setup"]["spec"]["round"]["inner_steps"], "outer": report["setup"]["spec"]["outer"],
            "steps_per_peer": report["setup"]["inner_steps_per_peer"],
            "load_average_at_end": report["setup"]["environment"]["load_average_at_end"]}


def summarise(args: argparse.Namespace, done: dict[str, dict[str, Any]]) -> dict[str, Any]:
    ok = [c for c in done.values() if "mean_val_loss" in c]
    dp = [c for c in ok if c["arm"] == "data_parallel"]
    sw = [c for c in ok if c["arm"] == "swarm"]
    out: dict[str, Any] = {}
    if not dp or not sw:
        return out
    best_dp = min(dp, key=lambda c: c["mean_val_loss"])
    best_sw = min(sw, key=lambda c: c["mean_val_loss"])
    out["best_data_parallel"] = {"key": best_dp["key"], "mean_val_loss": best_dp["mean_val_loss"]}
    out["best_swarm"] = {"key": best_sw["key"], "mean_val_loss": best_sw["mean_val_loss"]}
    out["swarm_best_over_data_parallel_best"] = best_sw["mean_val_loss"] / best_dp["mean_val_loss"]
    rows = []
    for s in sw:  # each swarm cell against the data-parallel cell it pairs with
        if args.grid == "inner-lr":
            pair = next((d for d in dp if d["lr"] == s["lr"]), None)
        elif args.grid == "muon-lr":
            pair = next((d for d in dp if d["muon_lr"] == s["muon_lr"]), None)
        elif args.grid == "schedule":
            pair = next((d for d in dp if d["schedule"] == s["schedule"]), None)
        else:
            pair = dp[0]
        if pair is not None:
            rows.append({"swarm": s["key"], "data_parallel": pair["key"], "swarm_loss": s["mean_val_loss"],
                         "data_parallel_loss": pair["mean_val_loss"],
                         "swarm_over_data_parallel": s["mean_val_loss"] / pair["mean_val_loss"],
                         "swarm_over_best_data_parallel": s["mean_val_loss"] / best_dp["mean_val_loss"],
                         "same_token_budget": s["steps_per_peer"] == pair["steps_per_peer"]})
    out["pairs"] = rows
    return out


def markdown(report: dict[str, Any]) -> str:
    lines = [f"sweep `{report['grid']}`, bench_quality {' '.join(report['bench_args']) or '(full scale)'}", "",
             "| swarm cell | swarm loss | data-parallel cell | data-parallel loss | swarm ÷ DP | swarm ÷ best DP |",
             "|---|---|---|---|---|---|"]
    for r in report["summary"].get("pairs", []):
        lines.append(f"| {r['swarm']} | {r['swarm_loss']:.4f} | {r['data_parallel']} | {r['data_parallel_loss']:.4f} "
                     f"| {r['swarm_over_data_parallel']:.4f} | {r['swarm_over_best_data_parallel']:.4f} |")
    s = report["summary"]
    if s:
        lines += ["", f"best data-parallel: {s['best_data_parallel']['key']} ({s['best_data_parallel']['mean_val_loss']:.4f}); "
                  f"best swarm: {s['best_swarm']['key']} ({s['best_swarm']['mean_val_loss']:.4f}); "
                  f"best ÷ best: {s['swarm_best_over_data_parallel_best']:.4f}"]
    failed = [k for k, c in report["cells"].items() if "error" in c]
    if failed:
        lines += ["", "failed cells: " + ", ".join(failed)]
    return "\n".join(lines) + "\n"


def write(path: Path, report: dict[str, Any]) -> None:
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, path)
    path.with_suffix(".md").write_text(markdown(report))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", required=True, choices=["inner-lr", "schedule", "outer", "muon-lr"])
    ap.add_argument("--muon-lrs", default="0.01,0.02,0.04", help="Muon lrs of the muon-lr grid, run in this order")
    ap.add_argument("--lrs", default="1e-3,2e-3,4e-3,8e-3", help="inner lrs of the inner-lr grid")
    ap.add_argument("--schedules", default="constant,cosine,wsd", help="lr schedules of the schedule grid")
    ap.add_argument("--swarm-lr", type=float, default=2e-3,
                    help="the swarm's inner (AdamW) lr (schedule, outer and muon-lr grids)")
    ap.add_argument("--dp-lr", type=float, default=2e-3,
                    help="data-parallel's inner (AdamW) lr (schedule, outer and muon-lr grids)")
    ap.add_argument("--hs", default="10,25,50", help="H values of the outer grid")
    ap.add_argument("--outer-lrs", default="0.7,1.0,1.3", help="outer lrs of the outer grid")
    ap.add_argument("--outer-kind", default="sgd", choices=["sgd", "nesterov"])
    ap.add_argument("--outer-momentum", type=float, default=0.9, help="with --outer-kind nesterov")
    ap.add_argument("--jobs", type=int, default=2, choices=[1, 2], help="cells at once (one thread each)")
    ap.add_argument("--tag", default="", help="suffix of the results file, e.g. the scale")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default results/sweep_quality_<grid>[_<tag>].json)")
    ap.add_argument("bench_args", nargs="*", help="after --: arguments for every bench_quality run")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    name = f"sweep_quality_{args.grid.replace('-', '_')}" + (f"_{args.tag}" if args.tag else "")
    out: Path = args.out or REPO / "results" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"grid": args.grid, "bench_args": args.bench_args, "cells": {}, "summary": {}}
    if out.exists():
        old = json.loads(out.read_text())
        if old.get("bench_args") != args.bench_args:
            raise SystemExit(f"{out} holds a sweep with other bench arguments ({old.get('bench_args')}); "
                             "use another --tag or --out")
        report["cells"] = {k: c for k, c in old["cells"].items() if "error" not in c}  # failed cells run again
    todo = [c for c in cells_of(args) if c["key"] not in report["cells"]]
    logger.info("%d cells, %d finished before, %d to run", len(todo) + len(report["cells"]), len(report["cells"]),
                len(todo))
    with tempfile.TemporaryDirectory(prefix="swarmfold-sweep-") as tmp, ThreadPoolExecutor(args.jobs) as pool:
        running: dict[Future[dict[str, Any]], str] = {}
        queue = list(todo)
        while queue or running:
            while queue and len(running) < args.jobs:
                c = queue.pop(0)
                running[pool.submit(run_cell, args, c, Path(tmp))] = c["key"]
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                key = running.pop(fut)
                report["cells"][key] = fut.result()
                report["summary"] = summarise(args, report["cells"])
                write(out, report)
    report["summary"] = summarise(args, report["cells"])
    write(out, report)
    print(markdown(report))
    return 0 if all("error" not in c for c in report["cells"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
