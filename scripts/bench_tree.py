"""Per-peer cost of one round of the live delegate tree, the span-partial alternative and today's groups, N = 2..1024.

Run (about 10 s on 2 busy cores, one process; writes the JSON and a PNG next to it, and with
--markdown the cost table of docs/tree_costs.md):

    nice -n 10 .venv/bin/python scripts/bench_tree.py --markdown docs/tree_costs.md
    nice -n 10 .venv/bin/python scripts/bench_tree.py --sizes 2 9 64 --numel 4096 --out /tmp/tree.json

In-process and without a network: N virtual peers, each with a small random Δ (float32,
`--numel` elements) and a weight. Three arms per N, same Δ:

- live: the delegate tree the swarm runs (climb.py). Level-1 groups of at most G run the
  butterfly; each group's delegate (its first member) runs it again one level up with its
  group's aggregate, recursively until one group is left; each delegate then sends the top
  aggregate F (raw float32) to the other members of every group it carried up. Costs come
  from the cost model `averaging.treecost` (butterfly bytes from codec.spans and
  codec.encoded_size, as base.butterfly_bytes); each N also runs `inprocess.reduce_tree`
  (what `simulate` and the swarm compute) and checks that every peer ends with one
  identical aggregate, that the model's groups above each peer are the levels reduce_tree
  records, and that the model's butterfly bytes are the ones reduce_tree counts.
- tree (alternative design, NOT live: averaging/tree.py): span-by-span float64 partials
  combined at span leaders (`averaging.tree.run_tree`: codec encode/decode,
  `aggregate.weighted_sum` per group, one encode of the root's mean). Every message's
  payload is real bytes, so its counts are measured; the script checks them against that
  design's cost model (`tree.plan`) and its bits against `reduce_tree_in_process`.
- today: the ready peers cut into the same level-1 groups, each running its own butterfly
  (a one-group tree, which is exactly today's butterfly: tests/test_tree.py checks its bytes
  against base.butterfly_bytes). Each group commits its own model; at the next round the
  smaller groups adopt the largest group's model, so only the largest group's Δ reaches
  the round's single model: fraction = largest group / N. In both trees it is 1.0.

Payload bytes only (headers not counted, as base.butterfly_bytes). In the tree and today
arms spans with no elements (more members than 1024-element blocks) send nothing and are
not counted; the default numel (16 blocks) gives every member of a G = 8 group a span.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from swarmfold.averaging.base import AverageRequest, group_id_for, partition_groups
from swarmfold.averaging.inprocess import reduce_tree
from swarmfold.averaging.tree import (
    PeerCost,
    build_tree,
    peer_costs,
    plan,
    reduce_tree_in_process,
    run_tree,
    tree_of_groups,
)
from swarmfold.averaging.treecost import (
    DOWNLOADS,
    costs_of,
    delegate_levels,
    delegate_plan,
    tree_records,
)
from swarmfold.spec import COMPRESSIONS

SIZES = (2, 3, 4, 6, 8, 9, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
ARMS = (("live", "-^"), ("tree", ":o"), ("today", "--s"))
LABELS = {"live": "live delegate tree", "tree": "span-partial tree (alternative, not live)", "today": "today"}
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
    out["by_level"] = {("downloads" if lv == DOWNLOADS else str(lv)): {k: max(c.by_level.get(lv, {}).get(k, 0) for c in costs.values())
                                 for k in ("messages_sent", "bytes_sent", "messages_received", "bytes_received")}
                       for lv in levels}  # the max over peers, per level
    return out


def live_row(deltas: dict[str, tuple[torch.Tensor, float]], group_size: int, numel: int, compression: str
             ) -> dict[str, Any]:
    """The live delegate tree: the cost model's counts, checked against inprocess.reduce_tree."""
    t0 = time.perf_counter()
    levels = delegate_levels(list(deltas), group_size)
    costs = costs_of(sorted(deltas), delegate_plan(levels, numel, compression))
    seconds = time.perf_counter() - t0
    out = reduce_tree({p: AverageRequest(round=0, delta=d, weight=w, model_sha256="", steps=1)
                       for p, (d, w) in deltas.items()},
                      swarm_id="bench-tree", compression=compression, rule="mean", trim_fraction=0.0,
                      group_size=group_size)
    agg = out[min(out)].aggregate
    assert agg is not None
    one = all(r.status in ("committed", "alone") and r.aggregate is not None and torch.equal(r.aggregate, agg)
              for r in out.values()) and set(out) == set(deltas)
    records = tree_records(levels)
    structure = all([(lv["level"], lv["included"]) for lv in r.tree] == records[p]
                    and [lv["group_id"] for lv in r.tree] == [group_id_for("bench-tree", 0, 0, ms, level=lv)
                                                              for lv, ms in records[p]]
                    for p, r in out.items())
    butterfly = all(sum(v["bytes_sent"] for k, v in costs[p].by_level.items() if k != DOWNLOADS) == r.bytes_sent
                    for p, r in out.items())
    return {"groups": len(levels[0]), "depth": len(levels), "groups_per_level": [len(lv) for lv in levels],
            "models": 1, "fraction_reaching_model": 1.0, "one_identical_aggregate": one,
            "levels_match_reduce_tree": structure, "butterfly_bytes_match_reduce_tree": butterfly,
            "seconds": round(seconds, 3), **_summary(costs)}


def bench_one(n: int, group_size: int, numel: int, compression: str, seed: int) -> dict[str, Any]:
    deltas = _deltas(n, numel, seed)
    live = live_row(deltas, group_size, numel, compression)
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
    return {"n": n, "live": live, "tree": tree_row, "today": today_row}


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    ns = [r["n"] for r in rows]
    delta_bytes = 4 * report["config"]["numel"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    for arm, style in ARMS:
        ax.plot(ns, [r[arm]["fan_out"]["max"] for r in rows], style, label=f"{LABELS[arm]}: max")
        ax.plot(ns, [r[arm]["fan_out"]["mean"] for r in rows], style, alpha=0.5, label=f"{LABELS[arm]}: mean")
    ax.set_title(f"fan-out per peer per round (G = {report['config']['group_size']})")
    ax.set_ylabel("distinct peers it sends to")
    ax = axes[1]
    for arm, style in ARMS:
        ax.plot(ns, [r[arm]["bytes_sent"]["max"] / delta_bytes for r in rows], style, label=f"{LABELS[arm]}: max")
        ax.plot(ns, [r[arm]["bytes_sent"]["mean"] / delta_bytes for r in rows], style, alpha=0.5,
                label=f"{LABELS[arm]}: mean")
    ax.set_yscale("log")
    ax.set_title("bytes sent per peer per round")
    ax.set_ylabel("x the size of one float32 Δ")
    ax = axes[2]
    for arm, style in ARMS:
        ax.plot(ns, [r[arm]["fraction_reaching_model"] for r in rows], style, label=LABELS[arm])
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


def markdown(report: dict[str, Any], argv: list[str] | None) -> str:
    """The cost table (docs/tree_costs.md): per N and arm, depth, fan-out, messages and bytes sent."""
    cfg = report["config"]
    delta = 4 * cfg["numel"]
    cmd = " ".join(["nice -n 10 .venv/bin/python scripts/bench_tree.py", *(argv if argv is not None else sys.argv[1:])])
    la = cfg["load_average"]
    lines = [
        "# Cost per peer per round of the trees (N > G)",
        "",
        "Written by `scripts/bench_tree.py`; reproduce with:",
        "",
        f"    {cmd}",
        "",
        f"Measured in one process on {cfg['machine']} (torch {cfg['torch']}), {cfg['seconds']} s; load average "
        f"(1/5/15 min) {' / '.join(f'{x:.1f}' for x in la['start'])} at the start and "
        f"{' / '.join(f'{x:.1f}' for x in la['end'])} at the end. The counts do not depend on the load.",
        "",
        f"- G = {cfg['group_size']}, Δ = {cfg['numel']:,} float32 ({delta:,} bytes), compression "
        f"{cfg['compression']}. Bytes are payload only (no headers) and shown as multiples of Δ.",
        "- **live**: the delegate tree the swarm runs (climb.py, `inprocess.reduce_tree`); counts from "
        "`averaging/treecost.py`, checked each N against `inprocess.reduce_tree` (one identical aggregate on "
        "every peer, the same groups at every level, the same butterfly bytes). It includes the F downloads: "
        "each delegate sends the top aggregate as raw float32 (1 Δ) to each other member of every group it "
        "carried up.",
        "- **tree**: the span-partial alternative (averaging/tree.py), NOT live: lower bytes, but every "
        "group's partial is needed before any group can commit. Counted from a real span-by-span run.",
        "- **today**: the same level-1 groups, each its own butterfly and its own model (only the largest "
        "group's Δ reaches the round's model).",
        "- fan-out: distinct peers a peer sends to in the round; messages: messages it sends.",
        "",
        "| N | arm | depth | fan-out max / mean | messages sent max / mean | bytes sent max / mean (× Δ) |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        for arm, _ in ARMS:
            a = r[arm]
            lines.append(f"| {r['n']} | {arm} | {a['depth']} | {a['fan_out']['max']} / {a['fan_out']['mean']:.2f} | "
                         f"{a['messages_sent']['max']} / {a['messages_sent']['mean']:.2f} | "
                         f"{a['bytes_sent']['max'] / delta:.2f} / {a['bytes_sent']['mean'] / delta:.2f} |")
    big = report["rows"][-1]
    lv, alt = big["live"], big["tree"]
    lines += [
        "",
        f"Reading (N = {big['n']}):",
        f"- live: the heaviest peer is the one that is its group's delegate at every level (the first peer): "
        f"it runs {lv['depth']} butterflies and sends F to the other members of each group it carried "
        f"below the top, so its fan-out ({lv['fan_out']['max']}) and bytes "
        f"({lv['bytes_sent']['max'] / delta:.2f} Δ) grow with the depth (about log_G N), not with N: at most "
        f"(G - 1) peers a level, and (G - 1) Δ of downloads a level below the top. The mean peer sends "
        f"{lv['bytes_sent']['mean'] / delta:.2f} Δ.",
        f"- tree (alternative): bounded by about 2G whatever N ({alt['fan_out']['max']} peers, "
        f"{alt['bytes_sent']['max'] / delta:.2f} Δ at most), but no group can commit before every group's "
        "partial is in.",
        "- F travels as raw float32; forwarding the top level's encoded bytes instead would cut the "
        "downloads to what a part costs with compression.",
        "", "![tree cost](../results/bench_tree.png)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--numel", type=int, default=16 * 1024)
    ap.add_argument("--compression", default="none", choices=COMPRESSIONS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("results/bench_tree.json"))
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--markdown", type=Path, default=None, help="also write the cost table as markdown here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    load_start = list(os.getloadavg())
    rows = []
    for n in args.sizes:
        row = bench_one(n, args.group_size, args.numel, args.compression, args.seed + n)
        rows.append(row)
        lv, t, d = row["live"], row["tree"], row["today"]
        print(f"N={n:5d}  live: depth {lv['depth']}, fan-out max {lv['fan_out']['max']:3d}, "
              f"msgs sent max {lv['messages_sent']['max']:3d}, bytes sent max {lv['bytes_sent']['max']:8d} "
              f"mean {lv['bytes_sent']['mean']:10.0f}, checked "
              f"{lv['one_identical_aggregate'] and lv['levels_match_reduce_tree']}  |  tree (alt): depth {t['depth']}, fan-out max {t['fan_out']['max']:3d}, "
              f"msgs sent max {t['messages_sent']['max']:3d}, bytes sent max {t['bytes_sent']['max']:8d} "
              f"mean {t['bytes_sent']['mean']:10.0f}, identical {t['bit_identical_to_reference']}  |  "
              f"today: {d['models']} models, fan-out max {d['fan_out']['max']}, "
              f"bytes sent max {d['bytes_sent']['max']}, reach {d['fraction_reaching_model']:.3f}", flush=True)
        if not (t["bit_identical_to_reference"] and t["messages_match_cost_model"]):
            print(f"N={n}: the tree run disagrees with its reference or cost model", file=sys.stderr)
            return 1
        if not (lv["one_identical_aggregate"] and lv["levels_match_reduce_tree"]
                and lv["butterfly_bytes_match_reduce_tree"]):
            print(f"N={n}: the delegate tree's cost model disagrees with inprocess.reduce_tree", file=sys.stderr)
            return 1
    report = {"config": {"group_size": args.group_size, "numel": args.numel, "compression": args.compression,
                         "seed": args.seed, "torch": torch.__version__, "machine": platform.machine(),
                         "payload_bytes_only": True, "load_average": {"start": load_start, "end": list(os.getloadavg())},
                         "seconds": round(time.perf_counter() - started, 1),
                         "arms": LABELS},
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    if not args.no_plot:
        plot(report, args.out.with_suffix(".png"))
    if args.markdown is not None:
        args.markdown.write_text(markdown(report, argv))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
