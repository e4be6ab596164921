"""Mixed hardware: 4 real peers, one at 25% speed (`power = "light"`), steps mode against time mode.

Run (about 8 minutes on 2 shared cores; writes the JSON and a PNG next to it):

    nice -n 5 .venv/bin/python scripts/bench_hetero.py                       # tiny preset, H = 25, 6 steps rounds
    nice -n 5 .venv/bin/python scripts/bench_hetero.py --smoke --out /tmp/hetero.json   # seconds: the plumbing only

Design (the baseline runs in the same invocation, first, on the same shards and seeds; in both arms
the peers launch together, `run --wait-for-peers N`, so that no peer trains round 0 before all are in):

1. **steps arm**: the tiny preset with `[round] mode = "steps"` set explicitly (the presets'
   default is time mode now; H = 25, matchmaking_timeout 15 s, every other averaging setting
   the preset's), `--steps-rounds` rounds. Peers 0..N-2 run at full power,
   peer N-1 has `power = "light"` in its workdir's settings.toml (a 0.25 duty cycle: it rests
   three times as long as each step took, so it trains at 25% speed).
2. **time arm**: the same spec with `[round] mode = "time"` set explicitly, `inner_steps` = H
   (the cap), `min_steps` = 1, and `seconds` = the median training seconds per round of the fast
   peers in the steps arm (their steady rounds; not the preset's round.seconds), so that a fast peer trains about the H steps it trained
   there. It runs enough rounds to train at least the steps arm's token budget.

Same token budget: the budget is the tokens the whole steps arm trained (every peer's
`credit` trained = counted + pending + wasted in its last checkpoint: compute spent, whether
it reached the model or not). The swarm's tokens trained after round r are the sum over peers
of the `credit` in each peer's newest checkpoint of round <= r. The time arm's validation loss
and wall time at the budget are interpolated linearly between its two checkpoints around it.
Validation loss: peer 0's (a fast peer's) checkpoints, on the first `--eval-windows` held-out
windows of each peer's shard, averaged over the shards; evaluated after both arms ran.

Reported per peer and arm:
- `share_counted` = credit counted / trained, as `status` and /metrics report it. The last
  round's commit is confirmed only when the next round starts, so at the end its tokens are
  still pending; `share_reached` also counts them when that commit produced the swarm's final
  model (the peer's credit.commit_sha256 is the model most peers end on). Other pending tokens
  (an `alone` round, a rolled-back Δ) did not reach the swarm's model and count as not reached.
- steps per round (rounds.jsonl).
Per fast peer: idle = wall - train per round (wall = written_at of checkpoint r+1 minus that
of checkpoint r, train = last_round.timings.train, which includes a duty cycle's rests), with
matchmaking / all-reduce / commit from last_round.timings; steady rounds are rounds >= 1 (round
0 includes joining). Ratios time / steps are in `comparison`: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _swarm_procs import kill_all, log_tail, start_peer, wait_ready  # noqa: E402

logger = logging.getLogger("bench_hetero")
TARGET_SHARE = 0.95


def base_spec(args: argparse.Namespace) -> Any:
    from swarmfold.spec import preset

    # the steps arm: steps mode set here, not inherited (the presets default to time mode)
    spec = preset("tiny").replace(name="bench-hetero", round={"inner_steps": args.h, "mode": "steps"})
    if args.smoke:  # seconds per round: only the plumbing is checked
        spec = spec.replace(data={"seq_len": 32}, inner={"batch_size": 4, "warmup_steps": 1},
                            averaging={"matchmaking_timeout": 10.0})
    return spec


def time_spec(spec: Any, seconds: float) -> Any:
    return spec.replace(round={"mode": "time", "seconds": round(seconds, 3), "min_steps": 1,
                               "inner_steps": spec.round.inner_steps})


# ---- running one arm --------------------------------------------------------------------------

def run_arm(root: Path, spec: Any, shards: list[Path], *, rounds: int, timeout: float) -> tuple[list[Path], float, float]:
    """N peers, the last one light; returns (workdirs, start time (time.time), wall seconds)."""
    from swarmfold.spec import to_toml

    root.mkdir(parents=True, exist_ok=True)
    spec_path = root / "spec.toml"
    spec_path.write_text(to_toml(spec))
    n = len(shards)
    workdirs = [root / f"peer-{i}" for i in range(n)]
    workdirs[-1].mkdir(parents=True, exist_ok=True)
    (workdirs[-1] / "settings.toml").write_text('power = "light"\n')
    procs: list[subprocess.Popen] = []
    started, t0 = time.time(), time.monotonic()
    # a coordinated launch: no peer trains round 0 before all n are in the swarm. Started one after the
    # other on loaded cores, the first peer finished its rounds alone and exited before the others could
    # join through it (the smoke test failed so at load 8); and the arms compare modes, not start times
    extra = ["--wait-for-peers", str(n)]
    try:
        procs.append(start_peer(workdirs[0], spec_path, shards[0], rounds, [], keep=1000, extra=extra))
        first = wait_ready(workdirs[0], procs[0], 300)["maddrs"][:1]
        for i in range(1, n):
            procs.append(start_peer(workdirs[i], spec_path, shards[i], rounds, first, keep=1000, extra=extra))
        for w, p in zip(workdirs, procs, strict=True):
            try:
                code = p.wait(timeout=max(1.0, timeout - (time.monotonic() - t0)))
            except subprocess.TimeoutExpired as e:
                raise TimeoutError(f"peer in {w} did not finish {rounds} rounds:\n{log_tail(w)}") from e
            if code:
                raise RuntimeError(f"peer in {w} exited with {code}:\n{log_tail(w)}")
            logger.info("  %s finished (%.0f s)", w.name, time.monotonic() - t0)
        return workdirs, started, time.monotonic() - t0
    finally:
        kill_all(procs)


# ---- reading what the peers recorded ----------------------------------------------------------------

def checkpoints(workdir: Path) -> dict[int, dict[str, Any]]:
    out = {}
    for d in sorted((workdir / "checkpoints").glob("round-*")):
        meta_path = d / "meta.json"
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            out[int(d.name[len("round-"):])] = {"path": d, "written_at": float(meta["written_at"]),
                                                "last_round": meta.get("last_round", {}),
                                                "credit": meta.get("credit", {}), "model_sha256": meta["model_sha256"]}
    return out


def trained(credit: dict[str, Any]) -> int:
    return sum(int(credit.get(k, 0)) for k in ("counted", "wasted", "carried", "local", "committed"))


def idle_rows(ckpts: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per round this peer trained (checkpoint r+1 after checkpoint r, not a sync)."""
    rows = []
    for r in sorted(ckpts):
        last = ckpts[r]["last_round"]
        if r - 1 not in ckpts or last.get("round") != r - 1 or "timings" not in last:
            continue
        t = {k: float(last["timings"].get(k, 0.0)) for k in ("train", "matchmaking", "allreduce", "commit")}
        wall = ckpts[r]["written_at"] - ckpts[r - 1]["written_at"]
        rows.append({"round": r - 1, "status": last.get("status"), "included": len(last.get("included", [])),
                     **{k: round(v, 3) for k, v in t.items()}, "wall": round(wall, 3),
                     "idle": round(wall - t["train"], 3)})
    return rows


def summarize_arm(workdirs: list[Path], started: float, seconds: float, spec: Any) -> dict[str, Any]:
    from swarmfold.averaging.identity import load_or_create_identity
    from swarmfold.peer.roundlog import read_rounds

    ids = [load_or_create_identity(w / "identity.key").peer_id for w in workdirs]
    ck = [checkpoints(w) for w in workdirs]
    finals = [c[max(c)] for c in ck]
    final_models = [f["model_sha256"] for f in finals]
    swarm_final = max(set(final_models), key=final_models.count)
    peers = []
    for i, (w, pid, c, f) in enumerate(zip(workdirs, ids, ck, finals, strict=True)):
        cr = f["credit"]
        tot = trained(cr)
        reached = int(cr.get("counted", 0)) + (int(cr.get("committed", 0)) if cr.get("commit_sha256") == swarm_final else 0)
        log = read_rounds(w)
        steps = [int(e["steps"][pid]) for _, e in sorted(log.items()) if pid in e["steps"]]  # its own, where logged
        statuses = [e["status"] for _, e in sorted(log.items())]
        rows = idle_rows(c)
        steady = [r for r in rows if r["round"] >= 1] or rows
        wall_sum = sum(r["wall"] for r in steady)
        peers.append({
            "peer": i, "peer_id": pid, "power": "light" if i == len(workdirs) - 1 else "full",
            "tokens_trained": tot, "tokens_counted": int(cr.get("counted", 0)), "tokens_wasted": int(cr.get("wasted", 0)),
            "tokens_pending": tot - int(cr.get("counted", 0)) - int(cr.get("wasted", 0)),
            "share_counted": cr.get("counted", 0) / tot if tot else 0.0, "share_reached": reached / tot if tot else 0.0,
            "final_model_is_swarms": f["model_sha256"] == swarm_final,
            "rounds_logged": len(log), "round_statuses": statuses, "steps_per_round": steps,
            "mean_steps_per_round": statistics.fmean(steps) if steps else 0.0,
            "steady_rounds": len(steady),
            "median_train_seconds": statistics.median(r["train"] for r in steady) if steady else None,
            "median_idle_seconds": statistics.median(r["idle"] for r in steady) if steady else None,
            "idle_seconds_total": round(sum(r["idle"] for r in steady), 2),
            "idle_share": sum(r["idle"] for r in steady) / wall_sum if wall_sum > 0 else None,
            "median_seconds": {k: statistics.median(r[k] for r in steady)
                               for k in ("matchmaking", "allreduce", "commit", "wall")} if steady else {},
            "rounds": rows})
    # the swarm's tokens trained after round r, and peer 0's checkpoint r: the curve points
    curve = []
    for r in sorted(ck[0]):
        tok = sum(trained(c[max(k for k in c if k <= r)]["credit"]) if any(k <= r for k in c) else 0 for c in ck)
        curve.append({"round": r, "tokens": tok, "wall": round(ck[0][r]["written_at"] - started, 2),
                      "path": str(ck[0][r]["path"])})
    committed = [e for e in read_rounds(workdirs[0]).values() if e["status"] == "committed"]
    fast = peers[:-1]
    return {
        "wall_seconds": round(seconds, 1),
        "spec_round": spec.to_dict()["round"],
        "rounds_committed_by_peer0": len(committed),
        "rounds_with_every_peer": sum(len(e.get("included", [])) == len(workdirs) for e in committed),
        "tokens_trained_total": sum(p["tokens_trained"] for p in peers),
        "tokens_reached_total": sum(round(p["share_reached"] * p["tokens_trained"]) for p in peers),
        "fast_peers_idle": {
            "median_idle_seconds_per_round": statistics.median(
                r["idle"] for p in fast for r in p["rounds"] if r["round"] >= 1) if any(p["steady_rounds"] for p in fast) else None,
            "idle_share_of_wall": statistics.fmean(p["idle_share"] for p in fast if p["idle_share"] is not None)
            if any(p["idle_share"] is not None for p in fast) else None},
        "peers": peers, "curve": curve}


def evaluate_curves(arms: dict[str, dict[str, Any]], shards: list[Path], windows: int) -> None:
    from swarmfold.peer.checkpoint import load_checkpoint_dir
    from swarmfold.peer.data import Shard
    from swarmfold.peer.local import evaluate_model, model_from_checkpoint
    from swarmfold.peer.tokenizer import load_tokenizer

    cache: dict[int, list[Shard]] = {}
    for name, arm in arms.items():
        for pt in arm["curve"]:
            spec, model = model_from_checkpoint(load_checkpoint_dir(Path(pt["path"])))
            if spec.data.seq_len not in cache:
                tok = load_tokenizer(spec.tokenizer)
                cache[spec.data.seq_len] = [Shard([s], tok, seq_len=spec.data.seq_len,
                                                  val_fraction=spec.data.val_fraction) for s in shards]
            losses = [evaluate_model(model, s, 32, windows) for s in cache[spec.data.seq_len]]
            pt["val_loss"] = sum(losses) / len(losses)
            del pt["path"]
        logger.info("evaluated %d checkpoints of the %s arm", len(arm["curve"]), name)


def at(curve: list[dict[str, Any]], key: str, x: float, want: str) -> float | None:
    """`want` at `key` = x, linear between the two curve points around it (None past the end)."""
    for a, b in zip(curve, curve[1:], strict=False):
        if a[key] <= x <= b[key]:
            if b[key] == a[key]:
                return float(b[want])
            return float(a[want] + (b[want] - a[want]) * (x - a[key]) / (b[key] - a[key]))
    return float(curve[-1][want]) if curve and math.isclose(curve[-1][key], x) else None


def compare(steps: dict[str, Any], timed: dict[str, Any]) -> dict[str, Any]:
    budget = steps["tokens_trained_total"]
    s_end, t_curve = steps["curve"][-1], timed["curve"]
    t_loss, t_wall = at(t_curve, "tokens", budget, "val_loss"), at(t_curve, "tokens", budget, "wall")
    wall = min(s_end["wall"], t_curve[-1]["wall"])
    s_at_wall, t_at_wall = at(steps["curve"], "wall", wall, "val_loss"), at(t_curve, "wall", wall, "val_loss")
    slow_s, slow_t = steps["peers"][-1], timed["peers"][-1]
    fi_s, fi_t = steps["fast_peers_idle"], timed["fast_peers_idle"]
    return {
        "token_budget": budget,
        "time_arm_reached_budget": t_loss is not None,
        "val_loss_at_budget": {"steps": s_end["val_loss"], "time": t_loss if t_loss is not None else t_curve[-1]["val_loss"]},
        "wall_seconds_to_budget": {"steps": s_end["wall"], "time": t_wall},
        "wall_ratio_time_over_steps": (t_wall / s_end["wall"]) if t_wall else None,
        "equal_wall_seconds": wall,
        "val_loss_at_equal_wall": {"steps": s_at_wall, "time": t_at_wall},
        "slow_peer_share_reached": {"steps": slow_s["share_reached"], "time": slow_t["share_reached"]},
        "min_share_reached": {"steps": min(p["share_reached"] for p in steps["peers"]),
                              "time": min(p["share_reached"] for p in timed["peers"])},
        "every_peer_at_target_in_time_mode": all(p["share_reached"] >= TARGET_SHARE for p in timed["peers"]),
        "fast_idle_share": {"steps": fi_s["idle_share_of_wall"], "time": fi_t["idle_share_of_wall"]},
        "time_mode_at_least_as_good": (t_loss is not None and t_loss <= s_end["val_loss"]
                                       and (t_wall or math.inf) <= s_end["wall"]),
    }


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = report["arms"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    ax = axes[0][0]
    n = len(arms["steps"]["peers"])
    for j, (name, color) in enumerate((("steps", "tab:blue"), ("time", "tab:orange"))):
        vals = [p["share_reached"] for p in arms[name]["peers"]]
        ax.bar([i + (j - 0.5) * 0.38 for i in range(n)], vals, width=0.38, color=color, label=f"{name} mode")
    ax.axhline(TARGET_SHARE, color="gray", ls="--", lw=1, label=f"target {TARGET_SHARE}")
    ax.set_xticks(range(n), [f"peer {p['peer']}\n({p['power']})" for p in arms["steps"]["peers"]])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share of trained tokens that reached the model")
    ax.legend(fontsize=8)
    ax = axes[0][1]
    for j, name in enumerate(("steps", "time")):
        fast = [p for p in arms[name]["peers"] if p["power"] == "full"]
        tr = statistics.fmean(p["median_train_seconds"] or 0 for p in fast)
        idle = statistics.fmean(p["median_idle_seconds"] or 0 for p in fast)
        ax.bar(j, tr, color="tab:green", label="train" if j == 0 else None)
        ax.bar(j, idle, bottom=tr, color="tab:gray", label="idle (waiting, averaging)" if j == 0 else None)
        ax.text(j, tr + idle, f"{100 * idle / (tr + idle):.0f}% idle", ha="center", va="bottom", fontsize=8)
    ax.set_xticks([0, 1], ["steps mode", "time mode"])
    ax.set_ylabel("fast peers: median seconds per round")
    ax.legend(fontsize=8)
    for ax, key, label in ((axes[1][0], "wall", "wall seconds since the peers started"),
                           (axes[1][1], "tokens", "tokens trained by the whole swarm")):
        for name, color in (("steps", "tab:blue"), ("time", "tab:orange")):
            c = arms[name]["curve"]
            ax.plot([p[key] for p in c], [p["val_loss"] for p in c], "o-", ms=3, color=color, label=f"{name} mode")
        ax.set_xlabel(label)
        ax.set_ylabel("validation loss (peer 0's model)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[1][1].axvline(report["comparison"]["token_budget"], color="gray", ls="--", lw=1)
    s = report["setup"]
    fig.suptitle(f"{s['peers']} peers on loopback, one at 25% speed (power = light); tiny preset, H = {s['h']}, "
                 f"time mode {s['time_seconds']:.1f} s rounds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", type=int, default=4, help="peers, the last one at power = light (default 4)")
    p.add_argument("--h", type=int, default=25, help="H: inner steps per round in steps mode, the cap in time mode")
    p.add_argument("--steps-rounds", type=int, default=6, help="rounds of the steps arm (default 6)")
    p.add_argument("--seconds", type=float, default=0.0,
                   help="time mode's round.seconds (default: the fast peers' median train seconds in the steps arm)")
    p.add_argument("--eval-windows", type=int, default=32, help="held-out windows per shard for the loss")
    p.add_argument("--smoke", action="store_true", help="seq_len 32, batch 4, H = 3, 2 rounds: the plumbing only")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per arm before it is abandoned")
    p.add_argument("--keep", action="store_true", help="keep the peers' workdirs")
    p.add_argument("--out", type=Path, default=Path("results/bench_hetero.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.smoke:
        args.h = 3 if args.h == 25 else args.h
        args.steps_rounds = min(args.steps_rounds, 2)
    if args.peers < 2 or args.steps_rounds < 1 or args.h < 1:
        print("bench_hetero: needs --peers >= 2, --steps-rounds >= 1 and --h >= 1", file=sys.stderr)
        return 2
    from swarmfold.daemon.settings import POWER_DUTY
    from swarmfold.peer.corpus import write_stdlib_shards

    root = Path(tempfile.mkdtemp(prefix="bench-hetero-"))
    os.environ.setdefault("SWARMFOLD_CACHE", str(root / "cache"))
    t_start = time.monotonic()
    try:
        shards = write_stdlib_shards(args.peers, root / "data",
                                     max_bytes_per_shard=150_000 if args.smoke else 1_000_000)
        spec = base_spec(args)
        logger.info("steps arm: %d peers (the last at power = light), %d rounds of H = %d", args.peers,
                    args.steps_rounds, args.h)
        w, started, secs = run_arm(root / "steps", spec, shards, rounds=args.steps_rounds, timeout=args.timeout)
        steps_arm = summarize_arm(w, started, secs, spec)
        fast = [p for p in steps_arm["peers"][:-1] if p["median_train_seconds"] is not None]
        # (the smoke's rounds take a few hundredths of a second; 1 s keeps its peers' ready times together)
        seconds = args.seconds or max(1.0 if args.smoke else 0.05,
                                      statistics.median(p["median_train_seconds"] for p in fast))
        per_round = steps_arm["tokens_trained_total"] / max(1, args.steps_rounds)
        # expected tokens per time round: the fast peers as in steps mode, the light one a duty's share
        expect = per_round * (args.peers - 1 + POWER_DUTY["light"]) / args.peers
        time_rounds = max(args.steps_rounds + 1, math.ceil(1.15 * steps_arm["tokens_trained_total"] / expect))
        logger.info("steps arm done in %.0f s; time arm: round.seconds = %.2f, %d rounds", secs, seconds, time_rounds)
        tspec = time_spec(spec, seconds)
        w, started, secs = run_arm(root / "time", tspec, shards, rounds=time_rounds, timeout=args.timeout)
        time_arm = summarize_arm(w, started, secs, tspec)
        logger.info("time arm done in %.0f s; evaluating the checkpoints", secs)
        arms = {"steps": steps_arm, "time": time_arm}
        evaluate_curves(arms, shards, args.eval_windows)
    finally:
        if args.keep:
            print(f"bench_hetero: workdirs kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    report = {
        "benchmark": "hetero",
        "setup": {"peers": args.peers, "slow_peer": args.peers - 1, "slow_power": "light",
                  "slow_duty_cycle": POWER_DUTY["light"], "preset": "tiny", "h": args.h,
                  "steps_rounds": args.steps_rounds, "time_rounds": time_rounds, "time_seconds": seconds,
                  "smoke": args.smoke, "threads_per_peer": 1, "seq_len": spec.data.seq_len,
                  "batch_size": spec.inner.batch_size, "averaging": spec.to_dict()["averaging"],
                  "eval_windows_per_shard": args.eval_windows},
        "definitions": {
            "share_counted": "credit counted / trained in the peer's last checkpoint",
            "share_reached": "(counted + the pending tokens of its last group commit, when that commit produced the "
                             "model most peers end on) / trained; other pending tokens did not reach the model",
            "idle": "wall (checkpoint r to r+1) minus train (last_round.timings.train), rounds >= 1",
            "token_budget": "tokens the whole steps arm trained (all peers, wasted included)",
            "val_loss": "peer 0's checkpoint, mean over the peers' shards of the first eval_windows held-out windows"},
        "arms": arms,
        "comparison": compare(steps_arm, time_arm),
        "environment": {"cores": os.cpu_count(), "load_average_at_end": list(os.getloadavg()),
                        "seconds": round(time.monotonic() - t_start, 1)},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, args.out)
    plot(report, args.out.with_suffix(".png"))
    c = report["comparison"]
    for name in ("steps", "time"):
        a = arms[name]
        print(f"{name} mode: {a['wall_seconds']:.0f} s, {a['rounds_with_every_peer']}/{a['rounds_committed_by_peer0']} "
              f"committed rounds with every peer; share reached per peer "
              + ", ".join(f"{p['share_reached']:.2f}" for p in a["peers"])
              + f"; fast peers idle {100 * (a['fast_peers_idle']['idle_share_of_wall'] or 0):.0f}% of each round")
    print(f"token budget {c['token_budget']}: val loss steps {c['val_loss_at_budget']['steps']:.4f} in "
          f"{c['wall_seconds_to_budget']['steps']:.0f} s, time {c['val_loss_at_budget']['time']:.4f} in "
          f"{c['wall_seconds_to_budget']['time'] or float('nan'):.0f} s"
          + ("" if c["time_arm_reached_budget"] else " (time arm short of the budget: its last checkpoint)"))
    print(f"time mode at least as good (loss and wall at the budget): {c['time_mode_at_least_as_good']}")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
