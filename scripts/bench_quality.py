"""Does the swarm learn from everyone's data? Swarm vs data-parallel, a central worker and isolated peers.

Run:
    nice -n 10 .venv/bin/python scripts/bench_quality.py --quick --jobs 2   # ~4 min on 2 (shared) cores
    nice -n 10 .venv/bin/python scripts/bench_quality.py --jobs 5           # full: seq_len 128, batch 16,
                                                                            # 300 steps per peer (~20 min)
--quick uses seq_len 64, batch 8 and 200 steps per peer; the full mode has the issue's
reference scale (the preset's seq_len 128 and batch 16, 300 steps per peer); --steps
runs longer. The swarm's H, outer optimizer and compression are the preset's defaults in
both modes.

K = 4 peers on non-overlapping stdlib shards (split by module). Every arm gets the same
token budget, the same genesis model and the same inner hyperparameters, and trains on
the very batches that the seed schedule gives the swarm peers:

  (a)  data-parallel equivalent: one model, batch K·B, as many steps as each peer takes.
       What K machines reach with a per-step fp32 all-reduce in the same wall time; the
       quality reference and the communication baseline.
  (a') sequential central: one worker, batch B, K× the steps (K× the wall time).
  (b)  isolated: each peer alone on its own shard.
  (c)  one-shot merge: the plain average of the isolated models.
  (d)  swarm with the preset's defaults (H, outer optimizer, compression).
  (e)  swarm with plain averaging (outer SGD, lr 1, no momentum).
  (f)  swarm with int8 compression (the default outer optimizer), and, where the default
       is compressed, the same swarm uncompressed, so the cost of int8 is measured.
Arms whose settings coincide are run once and reported as the same.

Swarm arms run `swarmfold.peer.simulate.simulate`: the live swarm's round code, averaged
in-process. Validation loss is measured on the first --eval-windows held-out windows of
every shard (a fixed subset, the same for every arm).

Writes results/quality[_quick].json and a PNG of validation loss against tokens.
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

from swarmfold.spec import Spec, preset  # noqa: E402

PLAIN = {"kind": "sgd", "lr": 1.0, "momentum": 0.0}


def make_setup(args: argparse.Namespace) -> bc.Setup:
    if args.smoke:
        spec = preset("tiny").replace(data={"seq_len": 32}, inner={"batch_size": 4, "warmup_steps": 2},
                                      round={"inner_steps": 2},
                                      model={"hidden_size": 32, "intermediate_size": 64, "num_layers": 1,
                                             "num_heads": 2, "num_kv_heads": 2})
        return bc.Setup(spec=spec, shard_paths=bc.prepare_shards(args.data, 4, 60_000), steps=4, eval_windows=8,
                        eval_every=2)
    spec = preset(args.preset)
    seq_len = args.seq_len or (64 if args.quick else spec.data.seq_len)
    batch = args.batch_size or (8 if args.quick else spec.inner.batch_size)
    spec = spec.replace(data={"seq_len": seq_len}, inner={"batch_size": batch})
    steps = args.steps or (200 if args.quick else 300)
    h = spec.round.inner_steps
    if steps % h:
        raise SystemExit(f"--steps {steps} must be a multiple of the preset's round.inner_steps ({h})")
    return bc.Setup(spec=spec, shard_paths=bc.prepare_shards(args.data, 4, 3_000_000), steps=steps,
                    eval_windows=args.eval_windows, eval_every=h)


def swarm_arms(spec: Spec) -> list[dict[str, Any]]:
    """(d), (e), (f) and the uncompressed twin of a compressed default; duplicates dropped."""
    default_outer = spec.to_dict()["outer"]
    comp = spec.averaging.compression
    h = spec.round.inner_steps
    wanted = [
        ("swarm_default", f"(d) swarm, defaults: H={h}, {_outer_text(default_outer)}, {comp}", default_outer, comp),
        ("swarm_plain", f"(e) swarm, plain averaging, H={h}, none", PLAIN, "none"),
        ("swarm_int8", f"(f) swarm, int8, H={h}, {_outer_text(default_outer)}", default_outer, "int8"),
        ("swarm_uncompressed", f"swarm, uncompressed, H={h}, {_outer_text(default_outer)}", default_outer, "none"),
    ]
    arms: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    for name, label, outer, c in wanted:
        key = json.dumps([outer, c], sort_keys=True)
        if key in seen:
            arms.append({"name": name, "same_as": seen[key]})
            continue
        seen[key] = name
        arms.append({"name": name, "label": label, "kind": "swarm", "h": h, "outer": outer, "compression": c})
    return arms


def _outer_text(outer: dict[str, Any]) -> str:
    if outer["kind"] == "sgd" and outer["lr"] == 1.0 and outer["momentum"] == 0.0:
        return "plain averaging"
    return f"outer {outer['kind']} lr {outer['lr']} momentum {outer['momentum']}"


def run_arms(params: dict[str, Any], arms: list[dict[str, Any]], jobs: int) -> dict[str, bc.ArmResult]:
    runnable = [a for a in arms if "same_as" not in a]
    results: list[bc.ArmResult] = []
    if jobs <= 1:
        for a in runnable:
            results += bc.run_arm_worker(params, a)
    else:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
            for fut in [pool.submit(bc.run_arm_worker, params, a) for a in runnable]:
                results += fut.result()
    return {r.name: r for r in results}


def checks(res: dict[str, bc.ArmResult], aliases: dict[str, str]) -> dict[str, Any]:
    def get(name: str) -> bc.ArmResult:
        return res[aliases.get(name, name)]

    dp, iso, swarm = res["data_parallel"], res["isolated"], get("swarm_default")
    matrix: dict[str, dict[str, float]] = iso.extra["matrix_peer_by_shard"]
    best_alone = {s: min(m[s] for m in matrix.values()) for s in swarm.val_loss}
    int8, unc = get("swarm_int8"), get("swarm_uncompressed")
    return {
        "swarm_beats_every_isolated_peer_on_every_shard": all(swarm.val_loss[s] < best_alone[s] for s in best_alone),
        "margin_to_best_isolated_peer_per_shard": {s: best_alone[s] - swarm.val_loss[s] for s in best_alone},
        "swarm_default_over_data_parallel_loss": swarm.mean / dp.mean,
        "swarm_default_bytes_reduction_vs_allreduce": dp.bytes_per_peer / swarm.bytes_per_peer,
        "target_1.02x_data_parallel_at_100x_fewer_bytes": (swarm.mean <= 1.02 * dp.mean
                                                           and dp.bytes_per_peer >= 100 * swarm.bytes_per_peer),
        "int8_loss_cost_vs_uncompressed": int8.mean / unc.mean - 1.0,
        "int8_bytes_reduction_vs_uncompressed": unc.bytes_per_peer / int8.bytes_per_peer,
        "target_int8_within_1pct": int8.mean <= 1.01 * unc.mean,
        "swarm_hashes_agree_every_round": all(r.extra.get("hashes_agree_every_round", True) for r in res.values()),
    }


def markdown(report: dict[str, Any]) -> str:
    """The arms as a Markdown table (written beside the JSON, pasted into docs/results.md)."""
    shards = sorted(next(a for a in report["arms"].values() if "val_loss" in a)["val_loss"])
    lines = ["| arm | " + " | ".join(shards) + " | mean | bytes sent per peer | fewer bytes than (a) |",
             "|---|" + "---|" * (len(shards) + 3)]
    for name, arm in report["arms"].items():
        if "same_as" in arm:
            lines.append(f"| {name} | same settings as {arm['same_as']} |" + " |" * (len(shards) + 2))
            continue
        red = arm["bytes_reduction_vs_allreduce"]
        cells = [f"{arm['val_loss'][s]:.3f}" for s in shards]
        lines.append(f"| {arm['label']} | " + " | ".join(cells) + f" | **{arm['mean_val_loss']:.3f}** | "
                     f"{arm['bytes_sent_per_peer'] / 1e6:,.1f} MB | " + (f"{red:,.1f}x" if red else "none sent") + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="seq_len 64, batch 8, 200 steps per peer (~5 min)")
    ap.add_argument("--smoke", action="store_true", help="a seconds-long run for the tests")
    ap.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    ap.add_argument("--steps", type=int, default=0, help="inner steps per peer (quick 200, full 300)")
    ap.add_argument("--seq-len", type=int, default=0, help="override data.seq_len (quick 64, full: the preset's)")
    ap.add_argument("--batch-size", type=int, default=0, help="override inner.batch_size (quick 8, full: the preset's)")
    ap.add_argument("--eval-windows", type=int, default=128, help="validation windows per shard (fixed subset)")
    ap.add_argument("--jobs", type=int, default=1, help="arms run in parallel, one thread each")
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "swarmfold-bench-shards")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default results/quality[_quick].json)")
    args = ap.parse_args()
    out: Path = args.out or Path("results") / ("quality_quick.json" if args.quick else "quality.json")
    bc.configure(1)
    t0 = time.time()
    setup = make_setup(args)
    setup.load()
    h = setup.spec.round.inner_steps
    arms = [{"name": "data_parallel", "kind": "data_parallel", "h": h},
            {"name": "sequential", "kind": "sequential", "h": h},
            {"name": "isolated", "kind": "isolated", "h": h}] + swarm_arms(setup.spec)
    res = run_arms(bc.setup_params(setup), arms, args.jobs)
    start = bc.genesis_loss(setup)
    aliases = {a["name"]: a["same_as"] for a in arms if "same_as" in a}
    dp_bytes = res["data_parallel"].bytes_per_peer
    order = ["data_parallel", "sequential", "isolated", "one_shot_merge", "swarm_default", "swarm_plain",
             "swarm_int8", "swarm_uncompressed"]
    report: dict[str, Any] = {
        "setup": {"mode": "smoke" if args.smoke else "quick" if args.quick else "full", "peers": setup.k,
                  "inner_steps_per_peer": setup.steps, "tokens_total": setup.steps * setup.k
                  * setup.tokens_per_peer_step(), "eval_windows_per_shard": setup.eval_windows,
                  "shards": [str(p) for p in setup.shard_paths], "spec": setup.spec.to_dict(),
                  "threads_per_run": 1, "jobs": args.jobs, "wall_seconds": round(time.time() - t0),
                  "genesis_mean_val_loss": start, "environment": bc.environment()},
        "arms": {n: ({"same_as": aliases[n]} if n in aliases else res[n].to_json(dp_bytes)) for n in order
                 if n in res or n in aliases},
        "checks": checks(res, aliases),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(markdown(report))
    title = (f"{report['setup']['mode']}: K=4 peers, {setup.steps} inner steps each, batch "
             f"{setup.spec.inner.batch_size}x{setup.spec.data.seq_len}, same tokens for every arm")
    bc.plot_curves([res[n] for n in order if n in res], out.with_suffix(".png"), title, start)
    for n in order:
        if n in res:
            r = res[n]
            print(f"{r.label:70s} mean {r.mean:.4f}  bytes/peer {r.bytes_per_peer:>12,}")
        elif n in aliases:
            print(f"{n:70s} = {aliases[n]}")
    print(json.dumps(report["checks"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
