"""Per-peer cost of one round of the averaging tree against today's independent groups, N = 2..1024.

Run (about a minute on 2 cores, one process; writes the JSON and a PNG next to it):

    nice -n 15 .venv/bin/python scripts/bench_tree.py
    nice -n 15 .venv/bin/python scripts/bench_tree.py --sizes 2 9 64 --numel 4096 --out /tmp/tree.json

In-process and without a network: N virtual peers, each with a small random Δ (float32,
`--numel` elements) and a weight, run one round span by span with the real code
(`averaging.tree.run_tree`: codec encode/decode, `aggregate.weighted_sum` per group,
float64 partials combined at the leaders, one encode of the root's mean). Every message's
payload is real bytes, so fan-out, messages and bytes per peer are counted, not estimated;
the script also checks that the count equals the cost model (`tree.plan`) and that every
peer assembled the bits of the whole-vector reference (`reduce_tree_in_process`).

Two arms per N, same Δ:
- tree: one tree over all N ready peers (groups of at most G, then groups of groups).
- today: the ready peers cut into the same level-1 groups, each running its own butterfly
  (a one-group tree, which is exactly today's butterfly: tests/test_tree.py checks its bytes
  against base.butterfly_bytes). Each group commits its own model; at the next round the
  smaller groups adopt the largest group's model, so only the largest group's Δ reaches
  the round's single model: fraction = largest group / N. In the tree it is 1.0.

Payload bytes only (headers not counted, as base.butterfly_bytes). Spans with no elements
(more members than 1024-element blocks) send nothing and are not counted; the default
numel (16 blocks) gives every member of a G = 8 group a span.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from swarmfold.averaging.base import AverageRequest, partition_groups
from swarmfold.averaging.tree import (
    PeerCost,
    build_tree,
    peer_costs,
    plan,
    reduce_tree_in_process,
    run_tree,
    tree_of_groups,
)

SIZES = (2, 3, 4, 6, 8, 9, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
STATS = ("fan_out", "fan_in", "messages_sent", "messages_received", "bytes_sent", "bytes_received")


def _deltas(n: int, numel: int, seed: int) -> dict[str, tuple[torch.Tensor, float]]:
    g = torch.Generator().manual_seed(seed)
    return {f"peer-{i:05d}": (torch.randn(numel, generator=g) * 1e-3, float(1000 + (i * 7919) % 997))
            for i in range(n)}


def _summary(costs: dict[str, PeerCost]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in STATS:
        vals = [getattr(c, k) for c in costs.values()]
        out[k] = {"max": max(vals), "mean": statistics.fmean(vals)}
    levels = sorted({lv for c in costs.values() for lv in c.by_level})
    out["by_level"] = {str(lv): {k: max(c.by_level.get(lv, {}).get(k, 0) for c in costs.values())
                                 for k in ("messages_sent", "bytes_sent", "messages_received", "bytes_received")}
                       for lv in levels}  # the max over peers, per level
    return out


def bench_one(n: int, group_size: int, numel: int, compression: str, seed: int) -> dict[str, Any]:
    deltas = _deltas(n, numel, seed)
    t0 = time.perf_counter()
    tree = build_tree(list(deltas), group_size, swarm_id="bench-tree", round_idx=0)
    run = run_tree(tree, deltas, compression)
    seconds = time.perf_counter() - t0
    key = lambda m: (m.span, m.level, m.direction, m.sender, m.receiver)  # noqa: E731
    planned = sorted(plan(tree, numel, compression), key=key) == sorted(run.messages, key=key)
    reference = reduce_tree_in_process(
        {p: AverageRequest(round=0, delta=d, weight=w, model_sha256="", steps=1) for p, (d, w) in deltas.items()},
        swarm_id="bench-tree", compression=compression, group_size=group_size)
    ref = reference[min(deltas)].aggregate
    assert ref is not None
    identical = all(torch.equal(a, ref) for a in run.aggregate.values())
    tree_row = {"groups": len(tree.groups), "depth": tree.depth, "models": 1, "fraction_reaching_model": 1.0,
                "bit_identical_to_reference": identical, "messages_match_cost_model": planned,
                "seconds": round(seconds, 3), **_summary(peer_costs(tree, run.messages))}
    # today: the same level-1 groups, each its own one-group butterfly and its own model
    costs: dict[str, PeerCost] = {}
    groups = partition_groups(list(deltas), group_size)
    for g in groups:
        one = tree_of_groups([g], group_size, swarm_id="bench-tree", round_idx=0)
        if len(g) > 1:
            r = run_tree(one, {p: deltas[p] for p in g}, compression)
            costs.update(peer_costs(one, r.messages))
        else:
            costs.update(peer_costs(one, []))
    today_row = {"groups": len(groups), "depth": 1, "models": len(groups),
                 "fraction_reaching_model": max(len(g) for g in groups) / n, **_summary(costs)}
    return {"n": n, "tree": tree_row, "today": today_row}


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    ns = [r["n"] for r in rows]
    delta_bytes = 4 * report["config"]["numel"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    for arm, style in (("tree", "-o"), ("today", "--s")):
        ax.plot(ns, [r[arm]["fan_out"]["max"] for r in rows], style, label=f"{arm}: max")
        ax.plot(ns, [r[arm]["fan_out"]["mean"] for r in rows], style, alpha=0.5, label=f"{arm}: mean")
    ax.set_title(f"fan-out per peer per round (G = {report['config']['group_size']})")
    ax.set_ylabel("distinct peers it sends to")
    ax = axes[1]
    for arm, style in (("tree", "-o"), ("today", "--s")):
        ax.plot(ns, [r[arm]["bytes_sent"]["max"] / delta_bytes for r in rows], style, label=f"{arm}: max")
        ax.plot(ns, [r[arm]["bytes_sent"]["mean"] / delta_bytes for r in rows], style, alpha=0.5,
                label=f"{arm}: mean")
    ax.set_title("bytes sent per peer per round")
    ax.set_ylabel("x the size of one float32 Δ")
    ax = axes[2]
    for arm, style in (("tree", "-o"), ("today", "--s")):
        ax.plot(ns, [r[arm]["fraction_reaching_model"] for r in rows], style, label=arm)
    ax.set_title("fraction of peers whose Δ reaches the round's model")
    ax.set_ylim(0, 1.05)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("ready peers N")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--numel", type=int, default=16 * 1024)
    ap.add_argument("--compression", default="none", choices=("none", "fp16", "int8"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("results/bench_tree.json"))
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for n in args.sizes:
        row = bench_one(n, args.group_size, args.numel, args.compression, args.seed + n)
        rows.append(row)
        t, d = row["tree"], row["today"]
        print(f"N={n:5d}  tree: depth {t['depth']}, fan-out max {t['fan_out']['max']:3d}, "
              f"msgs sent max {t['messages_sent']['max']:3d}, bytes sent max {t['bytes_sent']['max']:8d} "
              f"mean {t['bytes_sent']['mean']:10.0f}, identical {t['bit_identical_to_reference']}  |  "
              f"today: {d['models']} models, fan-out max {d['fan_out']['max']}, "
              f"bytes sent max {d['bytes_sent']['max']}, reach {d['fraction_reaching_model']:.3f}", flush=True)
        if not (t["bit_identical_to_reference"] and t["messages_match_cost_model"]):
            print(f"N={n}: the tree run disagrees with its reference or cost model", file=sys.stderr)
            return 1
    report = {"config": {"group_size": args.group_size, "numel": args.numel, "compression": args.compression,
                         "seed": args.seed, "torch": torch.__version__, "machine": platform.machine(),
                         "payload_bytes_only": True},
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    if not args.no_plot:
        plot(report, args.out.with_suffix(".png"))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
