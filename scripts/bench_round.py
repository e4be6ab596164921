"""Round wall time of a real swarm, split into train / matchmaking / all-reduce / commit / between rounds.

Run (about 6 minutes on 2 cores; writes the JSON and a stacked-bar PNG next to it):

    nice -n 10 .venv/bin/python scripts/bench_round.py                      # 2 peers, tiny preset, H = 100, 6 rounds
    nice -n 10 .venv/bin/python scripts/bench_round.py --peers 3 --rounds 4 --out /tmp/round.json
    nice -n 10 .venv/bin/python scripts/bench_round.py --smoke --out /tmp/round.json   # seconds: H = 3, small batches
    nice -n 10 .venv/bin/python scripts/bench_round.py --link rtt=50ms,rate=100mbit --rounds 4 \
        --out results/bench_round_wan_50ms_100mbit.json     # the same swarm on loopback, then over an emulated WAN

With `--link`, the run has two arms, one after the other with the same spec, shards and
seeds: plain loopback (the baseline), then every peer behind its own emulated access link
(swarmfold.devtools.linkemu: one-way latency rtt/2, per-peer up/down token buckets, optional
loss; each peer announces the emulator's port for it, so every byte between peers crosses
the link). The report's `arms` holds both, and `link_vs_loopback` the ratios of their
steady-state medians.

It starts N real peers (`swarmfold run`, separate processes, each with its own hivemind
DHT node and libp2p daemon) on 127.0.0.1 with the tiny preset and H = 100 inner steps,
one stdlib shard each and one thread each, and lets them train R rounds. Nothing else in
the spec is changed (averaging settings, compression and timeouts are the preset's).

Afterwards it reads every peer's checkpoints. The checkpoint of round r holds in
meta.json `last_round.timings` (train, matchmaking, allreduce, commit: seconds of the
round that produced it) and `written_at`. Per peer and round:
  - wall = written_at(r) - written_at(r - 1): the whole round, checkpoint to checkpoint;
  - between = wall - (train + matchmaking + allreduce + commit): what the round loop does
    outside the timed phases: the outer step, writing the checkpoint, publishing the
    record to the DHT, reading the swarm's records (catch-up check);
  - checkpoint_write = when the round's checkpoint folder was renamed into place (its
    ctime) - written_at: the part of `between` spent saving.
utilization = train / wall. The first round of each peer (DHT join, first connections,
the other peers still starting) is reported but left out of the steady-state summary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _swarm_procs import EmulatedLink, kill_all, log_tail, start_peer, wait_ready  # noqa: E402

PHASES = ("train", "matchmaking", "allreduce", "commit")
TARGET = 0.95


def bench_spec(*, peers: int, inner_steps: int, smoke: bool, min_group_size: int | None) -> Any:
    from swarmfold.spec import preset

    spec = preset("tiny").replace(name="bench-round", round={"inner_steps": inner_steps, "mode": "steps"})
    if smoke:  # seconds per round: only the plumbing is checked (every peer waits for the others)
        spec = spec.replace(data={"seq_len": 32}, inner={"batch_size": 4, "warmup_steps": 1},
                            averaging={"matchmaking_timeout": 10.0, "min_group_size": peers})
    if min_group_size is not None:
        spec = spec.replace(averaging={"min_group_size": min_group_size})
    return spec


# ---- running the peers ------------------------------------------------------------------------









def run_swarm(root: Path, spec: Any, *, peers: int, rounds: int, shard_bytes: int, timeout: float,
              link: str = "", link_stats: dict[str, Any] | None = None) -> tuple[list[Path], list[int], float]:
    from swarmfold.peer.corpus import write_stdlib_shards
    from swarmfold.spec import to_toml

    shards = write_stdlib_shards(peers, root / "data", max_bytes_per_shard=shard_bytes)
    spec_path = root / "spec.toml"
    spec_path.write_text(to_toml(spec))
    workdirs = [root / f"peer-{i}" for i in range(peers)]
    procs: list[subprocess.Popen] = []
    emu = EmulatedLink(link, peers, root) if link else None

    def addrs(i: int) -> dict[str, Any]:
        if emu is None:
            return {}
        return {"host": emu.ports[i]["host_maddr"], "announce": emu.ports[i]["announce_maddr"]}

    t0 = time.monotonic()
    try:
        procs.append(start_peer(workdirs[0], spec_path, shards[0], rounds, [], keep=1000, **addrs(0)))
        first = wait_ready(workdirs[0], procs[0], 300)["maddrs"][:1]
        for i in range(1, peers):
            procs.append(start_peer(workdirs[i], spec_path, shards[i], rounds, first, keep=1000, **addrs(i)))
        codes = []
        for w, p in zip(workdirs, procs, strict=True):
            try:
                codes.append(p.wait(timeout=max(1.0, timeout - (time.monotonic() - t0))))
            except subprocess.TimeoutExpired as e:
                raise TimeoutError(f"peer in {w} did not finish {rounds} rounds:\n{log_tail(w)}") from e
        return workdirs, codes, time.monotonic() - t0
    finally:
        kill_all(procs)
        if emu is not None:
            stats = emu.stop()
            if link_stats is not None:
                link_stats.update(stats)


# ---- reading the checkpoints ---------------------------------------------------------------------

def read_checkpoints(workdir: Path) -> dict[int, dict[str, Any]]:
    """round r -> meta.json of checkpoint r (last_round, written_at, model hash) and when it was saved."""
    out = {}
    for d in sorted((workdir / "checkpoints").glob("round-*")):
        meta_path = d / "meta.json"
        if not meta_path.exists():
            continue
        meta = json.loads(meta_path.read_text())
        out[int(d.name[len("round-"):])] = {
            "written_at": float(meta["written_at"]), "saved_at": d.stat().st_ctime,
            "last_round": meta.get("last_round", {}), "model_sha256": meta.get("model_sha256")}
    return out


def round_rows(peer: int, ckpts: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per round r >= 1 of one peer: its phases, wall time and utilization."""
    rows = []
    for r in sorted(ckpts):
        if r == 0 or r - 1 not in ckpts:
            continue
        last = ckpts[r]["last_round"]
        t = {k: float(last.get("timings", {}).get(k, 0.0)) for k in PHASES}
        wall = ckpts[r]["written_at"] - ckpts[r - 1]["written_at"]
        rows.append({
            "peer": peer, "round": r - 1, "status": last.get("status"), "group_size": len(last.get("included", [])),
            "attempts": last.get("attempts"), **t, "wall": wall, "between": wall - sum(t.values()),
            "checkpoint_write": max(0.0, ckpts[r - 1]["saved_at"] - ckpts[r - 1]["written_at"]),
            "utilization": t["train"] / wall if wall > 0 else None, "model_sha256": ckpts[r]["model_sha256"]})
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    if not rows:
        return {}
    keys = (*PHASES, "between", "checkpoint_write", "wall")
    total_wall = sum(r["wall"] for r in rows)
    return {
        "rounds_counted": len(rows),
        "median_seconds": {k: statistics.median(r[k] for r in rows) for k in keys},
        "mean_seconds": {k: statistics.fmean(r[k] for r in rows) for k in keys},
        "share_of_wall": {k: sum(r[k] for r in rows) / total_wall for k in (*PHASES, "between")},
        "utilization": sum(r["train"] for r in rows) / total_wall,
        "utilization_median": statistics.median(r["utilization"] for r in rows),
        "utilization_min": min(r["utilization"] for r in rows),
    }


def agreement(rows: list[dict[str, Any]], peers: int) -> dict[str, Any]:
    """Whether all peers hold the same model after each round (they do when every round is committed
    in one group of all of them)."""
    by_round: dict[int, set[str]] = {}
    for r in rows:
        by_round.setdefault(r["round"], set()).add(r["model_sha256"])
    committed_all = all(r["status"] == "committed" and r["group_size"] == peers for r in rows)
    return {"every_round_committed_by_all": committed_all,
            "same_model_every_round": all(len(h) == 1 for h in by_round.values())}


def plot(report: dict[str, Any], path: Path) -> None:
    """Top: each round checkpoint to checkpoint, stacked by phase. Bottom: the same without training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rounds"]
    colors = {"train": "tab:green", "matchmaking": "tab:orange", "allreduce": "tab:blue", "commit": "tab:purple",
              "between": "tab:gray"}
    labels = [f"r{r['round']}\np{r['peer']}" for r in rows]
    x = range(len(rows))
    fig, (top, bottom_ax) = plt.subplots(2, 1, figsize=(max(7.0, 0.6 * len(rows) + 2), 7.5), sharex=True,
                                         gridspec_kw={"height_ratios": [3, 2]})
    for ax, keys in ((top, (*PHASES, "between")), (bottom_ax, ("matchmaking", "allreduce", "commit", "between"))):
        bottom = [0.0] * len(rows)
        for k in keys:
            vals = [max(0.0, r[k]) for r in rows]
            ax.bar(x, vals, bottom=bottom, color=colors[k], label=k, width=0.8)
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
        for i, r in enumerate(rows):
            if r["round"] == 0:
                ax.axvspan(i - 0.45, i + 0.45, color="black", alpha=0.06)
        ax.grid(axis="y", alpha=0.3)
    for i, r in enumerate(rows):
        top.text(i, r["wall"], f"{100 * r['utilization']:.0f}%", ha="center", va="bottom", fontsize=7)
    steady = [r for r in rows if r["round"] >= 1]
    if steady:  # round 0 (joining) would squash the scale of the rest
        bottom_ax.set_ylim(0, 1.15 * max(r["wall"] - r["train"] for r in steady))
    top.set_ylabel("seconds, checkpoint to checkpoint")
    bottom_ax.set_ylabel("seconds outside training")
    bottom_ax.set_xticks(list(x), labels, fontsize=7)
    bottom_ax.set_xlabel("round r, peer p (shaded: round 0, includes joining; not in the steady state)")
    s = report["steady_state"]
    setup = report["setup"]
    top.set_title(f"{setup['peers']} peers {setup.get('where', 'on loopback')}, tiny preset, "
                  f"H = {setup['inner_steps']}\n"
                  f"steady-state utilization (train / wall) {100 * s.get('utilization', float('nan')):.1f}% "
                  f"(target {100 * TARGET:.0f}%)", fontsize=10)
    top.legend(fontsize=8, loc="lower right")
    bottom_ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_arm(root: Path, spec: Any, args: argparse.Namespace, link: str) -> dict[str, Any] | None:
    """One swarm run (on loopback, or behind `link`) and what its checkpoints say; None if a peer failed."""
    stats: dict[str, Any] = {}
    workdirs, codes, seconds = run_swarm(root, spec, peers=args.peers, rounds=args.rounds,
                                         shard_bytes=150_000 if args.smoke else 1_000_000, timeout=args.timeout,
                                         link=link, link_stats=stats)
    if any(codes):
        print(f"bench_round: peers exited with {codes}; logs:\n" + "\n".join(log_tail(w) for w in workdirs),
              file=sys.stderr)
        return None
    rows = [row for i, w in enumerate(workdirs) for row in round_rows(i, read_checkpoints(w))]
    rows.sort(key=lambda r: (r["round"], r["peer"]))
    out: dict[str, Any] = {
        "steady_state": summarize([r for r in rows if r["round"] >= 1]),
        "first_round": summarize([r for r in rows if r["round"] == 0]),
        "agreement": agreement(rows, args.peers),
        "rounds": rows,
        "seconds": round(seconds, 1),
    }
    if link:
        nodes = stats.get("nodes", {})
        out["link"] = {"spec": link, "model": stats.get("describe"), "connections": stats.get("connections"),
                       "unattributed_connections": stats.get("unattributed_connections"),
                       "bytes_up_per_peer": {k: v["bytes_up"] for k, v in nodes.items()},
                       "segments_lost": sum(v["segments_lost_up"] for v in nodes.values()),
                       "emulator_cpu_seconds": stats.get("emulator_cpu_seconds")}
    return out


def compare_arms(base: dict[str, Any], link: dict[str, Any]) -> dict[str, Any]:
    """link / loopback for each steady-state median (seconds per round) and the utilization."""
    b, w = base.get("steady_state", {}), link.get("steady_state", {})
    if not b or not w:
        return {}
    out = {k: (w["median_seconds"][k] / v if v > 0 else None) for k, v in b["median_seconds"].items()}
    out["utilization"] = w["utilization"] / b["utilization"] if b["utilization"] else None
    return {"ratio_of_medians": out, "note": "link / loopback, the same spec, shards and seeds in the same run"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--inner-steps", type=int, default=100, help="H (default 100)")
    p.add_argument("--min-group-size", type=int, default=None, help="override averaging.min_group_size")
    p.add_argument("--smoke", action="store_true", help="tiny batches, H = 3, 2 rounds: a seconds-long check")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds before the run is abandoned")
    p.add_argument("--keep", action="store_true", help="keep the peers' workdirs (printed at the end)")
    p.add_argument("--out", type=Path, default=Path("results/bench_round.json"))
    p.add_argument("--link", default="", help="also run the swarm behind an emulated link, e.g. rtt=50ms,rate=100mbit "
                   "(keys: see swarmfold.devtools.linkemu), after a loopback arm in the same run")
    args = p.parse_args(argv)
    if args.smoke:
        args.inner_steps = 3 if args.inner_steps == 100 else args.inner_steps
        args.rounds = min(args.rounds, 2)
    if args.peers < 2 or args.rounds < 1:
        print("bench_round: needs --peers >= 2 and --rounds >= 1", file=sys.stderr)
        return 2

    if args.link:
        from swarmfold.devtools.linkemu import LinkSpec

        try:
            LinkSpec.parse(args.link)
        except ValueError as e:
            print(f"bench_round: {e}", file=sys.stderr)
            return 2
    root = Path(tempfile.mkdtemp(prefix="bench-round-"))
    os.environ.setdefault("SWARMFOLD_CACHE", str(root / "cache"))
    spec = bench_spec(peers=args.peers, inner_steps=args.inner_steps, smoke=args.smoke, min_group_size=args.min_group_size)
    print(f"bench_round: {args.peers} peers, {args.rounds} rounds of H = {args.inner_steps}"
          f"{' (smoke)' if args.smoke else ''} in {root}", flush=True)
    arms: dict[str, dict[str, Any]] = {}
    try:
        for arm, link in ([("loopback", ""), ("link", args.link)] if args.link else [("loopback", "")]):
            print(f"bench_round: arm {arm}" + (f" ({link})" if link else ""), flush=True)
            result = run_arm(root / arm, spec, args, link)
            if result is None:
                return 1
            arms[arm] = result
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    main_arm = arms["link" if args.link else "loopback"]
    report: dict[str, Any] = {
        "benchmark": "round",
        "setup": {"peers": args.peers, "rounds": args.rounds, "inner_steps": args.inner_steps, "preset": "tiny",
                  "smoke": args.smoke, "threads_per_peer": 1,
                  "transport": ("127.0.0.1, one process per peer, each behind an emulated link: " + args.link
                                if args.link else "127.0.0.1, one process per peer"),
                  "where": f"over {args.link}" if args.link else "on loopback",
                  "averaging": spec.to_dict()["averaging"], "batch_size": spec.inner.batch_size,
                  "seq_len": spec.data.seq_len},
        "definitions": {
            "wall": "written_at of checkpoint r+1 minus written_at of checkpoint r (meta.json)",
            "phases": "last_round.timings of checkpoint r+1: train, matchmaking, allreduce, commit",
            "between": "wall minus the four phases: outer step, checkpoint write, DHT publish and records read",
            "checkpoint_write": "ctime of the checkpoint folder (renamed into place) minus its written_at",
            "utilization": "train / wall; steady state = rounds >= 1 (round 0 includes joining)"},
        "target_utilization": TARGET,
        **main_arm,
        "environment": {"python": platform.python_version(), "cores": os.cpu_count(),
                        "load_average_at_end": list(os.getloadavg()),
                        "seconds": round(sum(a["seconds"] for a in arms.values()), 1)},
    }
    if args.link:
        report["arms"] = arms
        report["link_vs_loopback"] = compare_arms(arms["loopback"], arms["link"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, args.out)
    plot(report, args.out.with_suffix(".png"))
    s: dict[str, Any] = report["steady_state"]
    if s:
        med = s["median_seconds"]
        print("steady state, median seconds per round: " + ", ".join(f"{k} {med[k]:.2f}" for k in med), flush=True)
        print(f"utilization (train / wall): {100 * s['utilization']:.1f}% (target {100 * TARGET:.0f}%); "
              f"share of wall: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in s["share_of_wall"].items()),
              flush=True)
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
