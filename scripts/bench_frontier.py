"""The loss–communication frontier: final validation loss against bytes sent per peer.

Run (about an hour of one core at the default scale; resumable, finished configs are kept):

    nice -n 10 .venv/bin/python scripts/bench_frontier.py --out results/frontier.json --jobs 2

It sweeps H (1, 5, 10, 20, 25, 30, 50, 100) for plain averaging with and without int8,
the outer optimizer (plain averaging; SGD with lr 1.5; Nesterov lr 0.5/momentum 0.5 and
the DiLoCo paper's 0.7/0.9) at H = 10 and 50, and a schedule whose rounds start short and
lengthen. Every config is K = 4 swarm peers on
non-overlapping stdlib shards (`swarmfold simulate`, the live swarm's round code), with the
same token budget and inner hyperparameters as the data-parallel baseline (batch K·B, a
per-step fp32 all-reduce) and the isolated peers, which it also runs.

The grid is small on purpose: it has to finish on a 2-core machine shared by others. It
runs in the order of `grid()`, most informative first, and --out keeps what finished, so an
interrupted run resumes where it stopped.

`--grid compression` runs only the compression comparison (issue 12, direction 7): plain
averaging with int8 beside the sparse topk<K> codecs at the same H, for >= 1000x fewer
bytes than the per-step fp32 all-reduce. `--quick` is bench_quality's quick scale (200
steps per peer, seq 64, batch 8: 8 rounds at H = 25):

    nice -n 15 .venv/bin/python scripts/bench_frontier.py --quick --grid compression \
        --out results/frontier_compress_quick.json

Writes the JSON given by --out and a PNG beside it (the Pareto plot). `--smoke` runs a
seconds-long version for the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench_common as bc  # noqa: E402

from swarmfold.spec import preset  # noqa: E402

OUTERS: dict[str, dict[str, Any]] = {
    "avg": {"kind": "sgd", "lr": 1.0, "momentum": 0.0},  # plain averaging
    "sgd1.5": {"kind": "sgd", "lr": 1.5, "momentum": 0.0},  # extrapolate the average
    "nest0.5m0.5": {"kind": "nesterov", "lr": 0.5, "momentum": 0.5},  # steady-state step = averaging
    "nest0.7m0.9": {"kind": "nesterov", "lr": 0.7, "momentum": 0.9},  # the DiLoCo paper's
}
# every schedule adds up to the default 300 steps; rounds start short and lengthen
SCHEDULES = {"warm5-100": [5, 5, 10, 10, 20, 25, 25, 50, 50, 100]}


Point = tuple[str, str, int | None, str | None]


# the compression grid: (codec, H), int8 first at each H as the reference of the same run;
# bytes vs the per-step fp32 all-reduce ~ 4 H / (bytes per element): int8 ~4 H, topk64 ~39 H,
# topk32 ~73 H, topk16 ~128 H, topk8 ~205 H, sign1 ~31 H
COMPRESSION_GRID = [("int8", 25), ("topk32", 25), ("topk64", 25), ("topk16", 10), ("topk16", 25),
                    ("int8", 10), ("topk8", 5), ("topk64", 50), ("topk32", 10), ("int8", 5), ("topk16", 5),
                    ("sign1", 40), ("sign1", 25), ("sign1", 50)]


def grid(smoke: bool, which: str = "all") -> list[Point]:
    """(outer, compression, H, schedule) in the order they run: the most informative first."""
    g: list[Point] = []
    if smoke:
        g += [("avg", "none", h, None) for h in (1, 2, 4)]
        return g + [("avg", "int8", 2, None), ("nest0.7m0.9", "none", 2, None)] + (
            [("avg", "topk32", 2, None)] if which == "compression" else [])
    if which == "compression":
        return [("avg", c, h, None) for c, h in COMPRESSION_GRID]
    g += [("avg", "none", h, None) for h in (10, 50, 100, 25, 5, 30, 20, 1)]
    g += [("avg", "int8", h, None) for h in (10, 50, 100, 30, 25, 5)]
    g += [(o, "none", h, None) for h in (10, 50) for o in ("sgd1.5", "nest0.5m0.5", "nest0.7m0.9")]
    g += [("avg", c, None, sched) for sched in SCHEDULES for c in ("none", "int8")]
    return g


def config(outer: str, compression: str, *, h: int | None = None, schedule: str | None = None) -> dict[str, Any]:
    if schedule:
        return {"name": f"{schedule}-{outer}-{compression}", "schedule": SCHEDULES[schedule], "outer": OUTERS[outer],
                "outer_name": outer, "compression": compression}
    return {"name": f"H{h}-{outer}-{compression}", "h": h, "outer": OUTERS[outer], "outer_name": outer,
            "compression": compression}


def make_setup(args: argparse.Namespace) -> bc.Setup:
    if args.smoke:
        shard_paths = bc.prepare_shards(args.data, 4, 60_000)
        spec = preset("tiny").replace(data={"seq_len": 32}, inner={"batch_size": 4, "warmup_steps": 2},
                                      round={"mode": "steps"},  # every arm trains H steps a round
                                      model={"hidden_size": 32, "intermediate_size": 64, "num_layers": 1,
                                             "num_heads": 2, "num_kv_heads": 2})
        return bc.Setup(spec=spec, shard_paths=shard_paths, steps=4, eval_windows=8, eval_every=2)
    shard_paths = bc.prepare_shards(args.data, 4, 3_000_000)
    spec = preset("tiny").replace(data={"seq_len": args.seq_len}, inner={"batch_size": args.batch_size},
                                  round={"mode": "steps"})  # every arm trains H steps a round
    steps = args.steps or (200 if args.quick else 300)
    return bc.Setup(spec=spec, shard_paths=shard_paths, steps=steps, eval_windows=args.eval_windows,
                    eval_every=steps)


def run_configs(configs: list[dict[str, Any]], params: dict[str, Any], done: dict[str, Any], jobs: int,
              save: Any) -> None:
    todo = [c for c in configs if c["name"] not in done and (c.get("schedule") or params["steps"] % c["h"] == 0)]
    if not todo:
        return
    if jobs <= 1:
        for c in todo:
            done[c["name"]] = bc.run_config_worker(params, c)
            save()
        return
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        futures = {c["name"]: pool.submit(bc.run_config_worker, params, c) for c in todo}
        for name, fut in futures.items():
            done[name] = fut.result()
            save()


def pareto(points: list[tuple[int, float, str]]) -> list[tuple[int, float, str]]:
    front, best = [], float("inf")
    for b, loss, name in sorted(points):
        if loss < best:
            front.append((b, loss, name))
            best = loss
    return front


def summarize(done: dict[str, Any], baselines: dict[str, Any]) -> dict[str, Any]:
    dp = baselines["data_parallel"]
    dp_bytes, dp_loss = dp["bytes_sent_per_peer"], dp["mean_val_loss"]
    iso = baselines["isolated"]
    rows = []
    for name, r in done.items():
        r["ratio_to_data_parallel_loss"] = r["mean_val_loss"] / dp_loss
        r["bytes_reduction_vs_allreduce"] = dp_bytes / r["bytes_sent_per_peer"]
        r["beats_every_isolated_peer_on_every_shard"] = all(
            r["val_loss"][s] < min(m[s] for m in iso["matrix_peer_by_shard"].values()) for s in r["val_loss"])
        rows.append((r["bytes_sent_per_peer"], r["mean_val_loss"], name))
    front = pareto(rows)
    within = [(b, loss, n) for b, loss, n in rows if loss <= 1.02 * dp_loss]
    at_100x = [(loss, n) for b, loss, n in rows if dp_bytes / b >= 100]
    at_1000x = [(loss, n) for b, loss, n in rows if dp_bytes / b >= 1000]
    return {
        "pareto_front": [{"name": n, "bytes_sent_per_peer": b, "mean_val_loss": loss,
                          "bytes_reduction_vs_allreduce": dp_bytes / b, "ratio_to_data_parallel_loss": loss / dp_loss}
                         for b, loss, n in front],
        "within_1.02_of_data_parallel": sorted(n for _, _, n in within),
        "largest_reduction_within_1.02": (max((dp_bytes / b, n) for b, _, n in within) if within else None),
        "best_at_100x_fewer_bytes": (min(at_100x) if at_100x else None),
        "best_at_100x_ratio_to_data_parallel": (min(at_100x)[0] / dp_loss if at_100x else None),
        "best_at_1000x_fewer_bytes": (min(at_1000x) if at_1000x else None),
        "best_at_1000x_ratio_to_data_parallel": (min(at_1000x)[0] / dp_loss if at_1000x else None),
    }


def markdown(done: dict[str, Any], baselines: dict[str, Any]) -> str:
    """Every config as a Markdown table sorted by bytes (written beside the JSON)."""
    dp = baselines["data_parallel"]
    lines = ["| config | rounds | mean val loss | x data-parallel | bytes per peer | fewer bytes than (a) | "
             "beats every isolated peer on every shard |", "|---|---|---|---|---|---|---|",
             f"| data-parallel (a), per-step fp32 all-reduce | - | {dp['mean_val_loss']:.3f} | 1.000 | "
             f"{dp['bytes_sent_per_peer'] / 1e6:,.1f} MB | 1x | |",
             f"| isolated peers (b), own shard | - | {baselines['isolated']['mean_val_loss']:.3f} | "
             f"{baselines['isolated']['mean_val_loss'] / dp['mean_val_loss']:.3f} | 0 | - | |"]
    for name, r in sorted(done.items(), key=lambda kv: (-kv[1]["bytes_sent_per_peer"], kv[0])):
        lines.append(f"| {name} | {r['rounds']} | {r['mean_val_loss']:.3f} | {r['ratio_to_data_parallel_loss']:.3f} | "
                     f"{r['bytes_sent_per_peer'] / 1e6:,.2f} MB | {r['bytes_reduction_vs_allreduce']:,.1f}x | "
                     f"{'yes' if r['beats_every_isolated_peer_on_every_shard'] else 'no'} |")
    return "\n".join(lines) + "\n"


def plot(done: dict[str, Any], baselines: dict[str, Any], summary: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dp = baselines["data_parallel"]
    fig, ax = plt.subplots(figsize=(9, 6))
    markers = {"avg": "o", "sgd1.5": "s", "nest0.5m0.5": "^", "nest0.7m0.9": "v"}
    for outer, marker in markers.items():
        for comp, color in (("none", "tab:blue"), ("int8", "tab:orange"), ("topk64", "tab:green"),
                            ("topk32", "tab:purple"), ("topk16", "tab:brown"), ("topk8", "tab:olive"), ("sign1", "tab:red")):
            pts = [(r["bytes_sent_per_peer"], r["mean_val_loss"], r["config"]) for r in done.values()
                   if r["config"]["outer_name"] == outer and r["config"]["compression"] == comp]
            if not pts:
                continue
            hollow = [p for p in pts if p[2].get("schedule")]
            solid = [p for p in pts if not p[2].get("schedule")]
            if solid:
                ax.scatter([p[0] for p in solid], [p[1] for p in solid], marker=marker, color=color, s=36,
                           label=f"{outer} {comp}")
                for b, loss, c in solid:
                    ax.annotate(f"H{c['h']}", (b, loss), fontsize=6, xytext=(3, 2), textcoords="offset points")
            if hollow:
                ax.scatter([p[0] for p in hollow], [p[1] for p in hollow], marker=marker, facecolors="none",
                           edgecolors=color, s=60, label=f"{outer} {comp} (lengthening schedule)")
    front = summary["pareto_front"]
    ax.plot([p["bytes_sent_per_peer"] for p in front], [p["mean_val_loss"] for p in front], "k--", lw=0.8,
            label="Pareto front")
    ax.scatter([dp["bytes_sent_per_peer"]], [dp["mean_val_loss"]], marker="*", s=160, color="black",
               label=f"data-parallel (per-step fp32 all-reduce) {dp['mean_val_loss']:.3f}")
    ax.axhline(1.02 * dp["mean_val_loss"], color="green", ls=":", lw=1, label="1.02 x data-parallel")
    ax.axhline(baselines["isolated"]["mean_val_loss"], color="red", ls=":", lw=1,
               label=f"isolated peers (own shard) {baselines['isolated']['mean_val_loss']:.3f}")
    ax.axvline(dp["bytes_sent_per_peer"] / 100, color="gray", ls="-.", lw=0.8, label="100x fewer bytes")
    ax.axvline(dp["bytes_sent_per_peer"] / 1000, color="gray", ls=":", lw=0.8, label="1000x fewer bytes")
    ax.axhline(1.05 * dp["mean_val_loss"], color="olive", ls=":", lw=1, label="1.05 x data-parallel")
    ax.set_xscale("log")
    ax.set_xlabel("bytes sent per peer over the run (log)")
    ax.set_ylabel("final validation loss (mean over shards)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("results/frontier.json"))
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "swarmfold-bench-shards")
    ap.add_argument("--steps", type=int, default=0, help="inner steps per peer (default 300; --quick 200)")
    ap.add_argument("--quick", action="store_true", help="bench_quality's quick scale: 200 steps per peer")
    ap.add_argument("--grid", choices=("all", "compression"), default="all",
                    help="all: H x outer x int8/none; compression: int8 beside the topk<K> codecs at the same H")
    ap.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default 64, the preset has 128)")
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per inner step (default 8, the preset has 16)")
    ap.add_argument("--eval-windows", type=int, default=128, help="validation windows per shard (fixed subset)")
    ap.add_argument("--jobs", type=int, default=1, help="configs run in parallel, one thread each")
    ap.add_argument("--smoke", action="store_true", help="a seconds-long run for the tests")
    args = ap.parse_args()
    bc.configure(1)
    t0 = time.time()
    setup = make_setup(args)
    setup.load()
    params = bc.setup_params(setup)
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    if state.get("setup", {}).get("params") != params:
        state = {}  # a different scale: start over
    done: dict[str, Any] = state.get("configs", {})
    baselines: dict[str, Any] = state.get("baselines", {})

    def save() -> None:
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"setup": {"params": params, "environment": bc.environment()},
                                   "baselines": baselines, "configs": done}, indent=1))
        os.replace(tmp, out)

    h_dp = 10 if not args.smoke else 2
    if "data_parallel" not in baselines:
        dp = bc.timed(lambda: bc.run_central(setup, h=h_dp, sequential=False))
        baselines["data_parallel"] = dp.to_json(dp.bytes_per_peer)
        iso, _, _ = bc.run_isolated(setup, h=h_dp)
        bc.timed(lambda: iso)
        baselines["isolated"] = iso.to_json(dp.bytes_per_peer)
        save()
    configs = [config(o, c, h=h, schedule=sched) for o, c, h, sched in grid(args.smoke, args.grid)]
    run_configs(configs, params, done, args.jobs, save)
    summary = summarize(done, baselines)
    state = {"setup": {"params": params, "environment": bc.environment(),
                       "wall_seconds_this_invocation": round(time.time() - t0)},
             "baselines": baselines, "configs": done, "summary": summary}
    out.write_text(json.dumps(state, indent=1))
    out.with_suffix(".md").write_text(markdown(done, baselines))
    title = (f"K=4 peers, {setup.steps} inner steps each, batch {setup.spec.inner.batch_size}x"
             f"{setup.spec.data.seq_len}, tiny model; same tokens for every point")
    plot(done, baselines, summary, out.with_suffix(".png"), title)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
