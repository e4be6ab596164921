"""Does the swarm learn from everyone's data? Swarm vs data-parallel, a central worker and isolated peers.

Run:
    nice -n 10 .venv/bin/python scripts/bench_quality.py --quick --jobs 2   # ~4 min on 2 (shared) cores
    nice -n 10 .venv/bin/python scripts/bench_quality.py --jobs 5           # full: seq_len 128, batch 16,
                                                                            # 300 steps per peer (~20 min)
    nice -n 10 .venv/bin/python scripts/bench_quality.py --long --jobs 2    # 48 rounds (1200 steps per peer)
    nice -n 10 .venv/bin/python scripts/bench_quality.py --quick --non-iid  # one language/domain per peer
--quick uses seq_len 64, batch 8 and 200 steps per peer; the full mode has the issue's
reference scale (the preset's seq_len 128 and batch 16, 300 steps per peer); --steps or
--rounds (rounds of H steps) runs longer, and --long is 48 rounds. The swarm's H, outer
optimizer and compression are the preset's defaults in every mode (--h and --outer-*
override them).

--non-iid gives each peer one language family or domain (Python source, C headers,
English prose, numeric test vectors: `swarmfold.peer.corpus.write_family_shards`) in
place of stdlib modules, so that the peers' data differ much more.

--inner-optimizer muon trains every arm with Muon for the hidden matrices and AdamW for
the rest (`inner.optimizer`); --swarm-muon-lr and --dp-muon-lr set the Muon group's lr per
arm, as --swarm-lr and --dp-lr set AdamW's.

The inner learning rate can differ per arm: --swarm-lr sets it for the arms that train
with batch B (the swarm arms, the isolated peers and the sequential central worker),
--dp-lr for the data-parallel arm (batch K·B); each defaults to the preset's lr.
--lr-schedule (constant, cosine, wsd) sets `inner.lr_schedule` for every arm, decaying
over the run's length (the steps per peer; K× that for the sequential worker, which
takes K× the steps). --arms runs a subset (scripts/sweep_quality.py uses it); the checks
that need a missing arm are left out. --curve-every sets how often the curves are
evaluated (in inner steps per peer; the swarm arms at the end of the round it falls in).

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

Writes results/quality[_noniid][_long|_quick].json, a Markdown table beside it and a PNG
of validation loss against tokens.
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

from swarmfold.spec import LR_SCHEDULES, Spec, preset  # noqa: E402

PLAIN = {"kind": "sgd", "lr": 1.0, "momentum": 0.0}
ARM_NAMES = ("data_parallel", "sequential", "isolated", "one_shot_merge", "swarm_default", "swarm_plain",
             "swarm_int8", "swarm_uncompressed")


def make_setup(args: argparse.Namespace) -> bc.Setup:
    if args.smoke:
        spec = preset("tiny").replace(data={"seq_len": 32}, inner={"batch_size": 4, "warmup_steps": 2},
                                      round={"inner_steps": 2},
                                      model={"hidden_size": 32, "intermediate_size": 64, "num_layers": 1,
                                             "num_heads": 2, "num_kv_heads": 2})
        spec = _round_and_outer(args, spec)
        h = spec.round.inner_steps
        steps = args.rounds * h if args.rounds else (args.steps or 4)
        if steps % h:
            raise SystemExit(f"--steps {steps} must be a multiple of H ({h})")
        return bc.Setup(spec=spec, shard_paths=_shards(args, 60_000), steps=steps, eval_windows=8,
                        eval_every=args.curve_every or 2)
    spec = preset(args.preset)
    seq_len = args.seq_len or (64 if args.quick else spec.data.seq_len)
    batch = args.batch_size or (8 if args.quick else spec.inner.batch_size)
    spec = _round_and_outer(args, spec.replace(data={"seq_len": seq_len}, inner={"batch_size": batch}))
    h = spec.round.inner_steps
    rounds = args.rounds or (48 if args.long else 0)
    steps = rounds * h if rounds else (args.steps or (200 if args.quick else 300))
    if steps % h:
        raise SystemExit(f"--steps {steps} must be a multiple of the preset's round.inner_steps ({h})")
    return bc.Setup(spec=spec, shard_paths=_shards(args, 1_500_000 if args.non_iid else 3_000_000), steps=steps,
                    eval_windows=args.eval_windows, eval_every=args.curve_every or h)


def _round_and_outer(args: argparse.Namespace, spec: Spec) -> Spec:
    """--h and --outer-* replace the preset's H and outer optimizer (for the sweeps)."""
    outer = {k: v for k, v in (("kind", args.outer_kind), ("lr", args.outer_lr), ("momentum", args.outer_momentum))
             if v is not None}
    # steps mode: the swarm and its references train exactly H steps a round, on the same batches
    return spec.replace(round={"inner_steps": args.h or spec.round.inner_steps, "mode": "steps"}, outer=outer)


def _shards(args: argparse.Namespace, max_bytes: int) -> list[Path]:
    if args.non_iid:
        return bc.prepare_family_shards(args.data.with_name(args.data.name + "-families"), max_bytes)
    return bc.prepare_shards(args.data, 4, max_bytes)


def arm_inner(args: argparse.Namespace, spec: Spec, steps: int, k: int) -> dict[str, dict[str, Any]]:
    """The `inner` overrides of each kind of arm: its lr and the schedule over its run's length."""
    sched: dict[str, Any] = {"lr_schedule": args.lr_schedule}
    if args.lr_schedule != "constant":
        sched.update(min_lr_ratio=args.min_lr_ratio, wsd_decay_fraction=args.wsd_decay_fraction)
    swarm_lr = args.swarm_lr or spec.inner.lr
    dp_lr = args.dp_lr or spec.inner.lr

    swarm_muon = args.swarm_muon_lr or spec.inner.muon_lr
    dp_muon = args.dp_muon_lr or spec.inner.muon_lr

    def with_len(lr: float, n: int, muon_lr: float) -> dict[str, Any]:
        # every arm runs the same inner optimizer (a fair ratio); AdamW's overrides are as before Muon
        optim = {"optimizer": "muon", "muon_lr": muon_lr} if args.inner_optimizer == "muon" else {}
        return {"lr": lr, **sched, **({"decay_steps": n} if args.lr_schedule != "constant" else {}), **optim}

    return {"data_parallel": with_len(dp_lr, steps, dp_muon), "sequential": with_len(swarm_lr, k * steps, swarm_muon),
            "isolated": with_len(swarm_lr, steps, swarm_muon), "swarm": with_len(swarm_lr, steps, swarm_muon)}


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
    """The targets, each computed where the arms it needs ran (--arms may leave some out)."""
    def get(name: str) -> bc.ArmResult | None:
        return res.get(aliases.get(name, name))

    dp, iso, swarm = res.get("data_parallel"), res.get("isolated"), get("swarm_default")
    out: dict[str, Any] = {}
    if swarm is not None and iso is not None:
        matrix: dict[str, dict[str, float]] = iso.extra["matrix_peer_by_shard"]
        best_alone = {s: min(m[s] for m in matrix.values()) for s in swarm.val_loss}
        out["swarm_beats_every_isolated_peer_on_every_shard"] = all(swarm.val_loss[s] < best_alone[s]
                                                                    for s in best_alone)
        out["margin_to_best_isolated_peer_per_shard"] = {s: best_alone[s] - swarm.val_loss[s] for s in best_alone}
    if swarm is not None and dp is not None:
        out["swarm_default_over_data_parallel_loss"] = swarm.mean / dp.mean
        out["swarm_default_bytes_reduction_vs_allreduce"] = dp.bytes_per_peer / swarm.bytes_per_peer
        out["target_1.02x_data_parallel_at_100x_fewer_bytes"] = (swarm.mean <= 1.02 * dp.mean
                                                                and dp.bytes_per_peer >= 100 * swarm.bytes_per_peer)
    int8, unc = get("swarm_int8"), get("swarm_uncompressed")
    if int8 is not None and unc is not None:
        out["int8_loss_cost_vs_uncompressed"] = int8.mean / unc.mean - 1.0
        out["int8_bytes_reduction_vs_uncompressed"] = unc.bytes_per_peer / int8.bytes_per_peer
        out["target_int8_within_1pct"] = int8.mean <= 1.01 * unc.mean
    out["swarm_hashes_agree_every_round"] = all(r.extra.get("hashes_agree_every_round", True) for r in res.values())
    return out


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
    ap.add_argument("--long", action="store_true", help="48 rounds of H steps (does the gap close, narrow or stay?)")
    ap.add_argument("--non-iid", action="store_true",
                    help="one language family or domain per peer (Python, C, English prose, numeric vectors)")
    ap.add_argument("--steps", type=int, default=0, help="inner steps per peer (quick 200, full 300)")
    ap.add_argument("--rounds", type=int, default=0, help="rounds of H inner steps per peer (overrides --steps)")
    ap.add_argument("--swarm-lr", type=float, default=0.0,
                    help="inner lr of the batch-B arms: swarm, isolated, sequential (default: the preset's)")
    ap.add_argument("--dp-lr", type=float, default=0.0,
                    help="inner lr of the data-parallel arm, batch K*B (default: the preset's)")
    ap.add_argument("--inner-optimizer", default="adamw", choices=["adamw", "muon"],
                    help="inner.optimizer of every arm: muon = Muon for the hidden matrices, AdamW (at --swarm-lr / "
                    "--dp-lr) for embeddings, head and norms")
    ap.add_argument("--swarm-muon-lr", type=float, default=0.0,
                    help="with --inner-optimizer muon: inner.muon_lr of the batch-B arms (default: the preset's)")
    ap.add_argument("--dp-muon-lr", type=float, default=0.0,
                    help="with --inner-optimizer muon: inner.muon_lr of the data-parallel arm (default: the preset's)")
    ap.add_argument("--lr-schedule", default="constant", choices=list(LR_SCHEDULES),
                    help="inner.lr_schedule of every arm, decaying over the run's length")
    ap.add_argument("--min-lr-ratio", type=float, default=0.1, help="floor of cosine and wsd, as a fraction of lr")
    ap.add_argument("--wsd-decay-fraction", type=float, default=0.2, help="fraction of the run wsd spends decaying")
    ap.add_argument("--h", type=int, default=0, help="override round.inner_steps (default: the preset's)")
    ap.add_argument("--outer-kind", default=None, choices=["sgd", "nesterov"], help="override outer.kind")
    ap.add_argument("--outer-lr", type=float, default=None, help="override outer.lr")
    ap.add_argument("--outer-momentum", type=float, default=None, help="override outer.momentum")
    ap.add_argument("--curve-every", type=int, default=0, help="evaluate the curves every N inner steps (default H)")
    ap.add_argument("--arms", default="", help="comma-separated subset of arms to run (default: all); "
                    "names: " + ", ".join(ARM_NAMES))
    ap.add_argument("--seq-len", type=int, default=0, help="override data.seq_len (quick 64, full: the preset's)")
    ap.add_argument("--batch-size", type=int, default=0, help="override inner.batch_size (quick 8, full: the preset's)")
    ap.add_argument("--eval-windows", type=int, default=128, help="validation windows per shard (fixed subset)")
    ap.add_argument("--jobs", type=int, default=1, help="arms run in parallel, one thread each")
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "swarmfold-bench-shards")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default results/quality[_quick].json)")
    args = ap.parse_args()
    mode = "smoke" if args.smoke else "quick" if args.quick else "long" if args.long else "full"
    default_name = "quality" + ("_noniid" if args.non_iid else "") + {"quick": "_quick", "long": "_long"}.get(mode, "")
    out: Path = args.out or Path("results") / f"{default_name}.json"
    wanted = {a.strip() for a in args.arms.split(",") if a.strip()}
    if wanted - set(ARM_NAMES):
        raise SystemExit(f"--arms: unknown {sorted(wanted - set(ARM_NAMES))}; choose from {', '.join(ARM_NAMES)}")
    bc.configure(1)
    t0 = time.time()
    setup = make_setup(args)
    setup.load()
    h = setup.spec.round.inner_steps
    inner = arm_inner(args, setup.spec, setup.steps, setup.k)
    arms = [{"name": "data_parallel", "kind": "data_parallel", "h": h},
            {"name": "sequential", "kind": "sequential", "h": h},
            {"name": "isolated", "kind": "isolated", "h": h}] + swarm_arms(setup.spec)
    if wanted:  # a subset; an alias whose original is left out runs under its own name
        keep = {a["name"] for a in arms if a["name"] in wanted}
        if "one_shot_merge" in wanted:
            keep.add("isolated")
        by_name = {a["name"]: a for a in arms}
        arms = [a if "same_as" not in a or a["same_as"] in keep else {**by_name[a["same_as"]], "name": a["name"]}
                for a in arms if a["name"] in keep]
    for a in arms:
        if "same_as" not in a:
            a["inner"] = inner[a["kind"]]
    for overrides in inner.values():  # the flags' values, validated (SpecError) before any run
        setup.spec.replace(inner=overrides)
    res = run_arms(bc.setup_params(setup), arms, args.jobs)
    start = bc.genesis_loss(setup)
    aliases = {a["name"]: a["same_as"] for a in arms if "same_as" in a}
    dp_bytes = (res["data_parallel"].bytes_per_peer if "data_parallel" in res
                else setup.steps * bc.allreduce_fp32_bytes_per_step(bc.model_numel(setup), setup.k))
    order = ["data_parallel", "sequential", "isolated", "one_shot_merge", "swarm_default", "swarm_plain",
             "swarm_int8", "swarm_uncompressed"]
    report: dict[str, Any] = {
        "setup": {"mode": mode, "peers": setup.k, "non_iid": args.non_iid, "rounds": setup.steps // h,
                  "inner_per_arm": inner, "swarm_lr": inner["swarm"]["lr"], "dp_lr": inner["data_parallel"]["lr"],
                  "lr_schedule": args.lr_schedule, "inner_optimizer": args.inner_optimizer,
                  "inner_steps_per_peer": setup.steps, "tokens_total": setup.steps * setup.k
                  * setup.tokens_per_peer_step(), "eval_windows_per_shard": setup.eval_windows,
                  "shards": [str(p) for p in setup.shard_paths], "spec": setup.spec.to_dict(),
                  "threads_per_run": 1, "jobs": args.jobs, "wall_seconds": round(time.time() - t0),
                  "genesis_mean_val_loss": start, "environment": bc.environment()},
        "arms": {n: ({"same_as": aliases[n]} if n in aliases else res[n].to_json(dp_bytes)) for n in order
                 if n in res or n in aliases},
        "checks": checks(res, aliases),
    }
    if "data_parallel" in res:  # every arm against the quality reference (the sweep reads these)
        for arm in report["arms"].values():
            if "mean_val_loss" in arm:
                arm["over_data_parallel"] = arm["mean_val_loss"] / res["data_parallel"].mean
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(markdown(report))
    title = (f"{mode}{' non-IID' if args.non_iid else ''}: K=4 peers, {setup.steps} inner steps each, batch "
             f"{setup.spec.inner.batch_size}x{setup.spec.data.seq_len}, same tokens for every arm")
    if args.swarm_lr or args.dp_lr or args.lr_schedule != "constant":
        title += (f"\ninner lr swarm {inner['swarm']['lr']:g}, data-parallel {inner['data_parallel']['lr']:g}, "
                  f"schedule {args.lr_schedule}")
    if args.inner_optimizer == "muon":
        title += (f"\nMuon for the matrices: muon_lr swarm {inner['swarm']['muon_lr']:g}, "
                  f"data-parallel {inner['data_parallel']['muon_lr']:g}")
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
