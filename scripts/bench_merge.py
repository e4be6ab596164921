"""Peak memory of `swarmfold merge` (streaming, tensor by tensor) against loading every contribution at once.

Run:
    .venv/bin/python scripts/bench_merge.py [--preset small] [--contributions 4] [--steps 1] \
        [--workdir /tmp/bench-merge] [--out results/bench_merge.json]

It prepares (once, kept in --workdir) a genesis checkpoint of the preset and N contributions
of `--steps` inner steps on N stdlib shards, then merges them with `mean`, each run in a
fresh subprocess with the same imports, with all N contributions and with 1 (so the cost
of each added contribution shows):
  streaming     swarmfold's merge (`merge_to_checkpoint`), one tensor of each file at a time;
  all_at_once   the naive way: load the base and every delta whole, flatten, average, step.
Each child resets its peak RSS after the imports (/proc/self/clear_refs), so the numbers are
the merge's own: peak RSS above the post-import baseline (the baseline, mostly torch and
transformers, is reported too). Both must produce the same
model sha256 (checked). Writes JSON to --out and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def _status() -> dict[str, int]:
    """VmRSS / VmHWM / RssAnon of this process in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


# ---- children ---------------------------------------------------------------------------------

def child(mode: str, workdir: Path, n: int) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    from swarmfold.averaging.aggregate import Contribution, weighted_mean
    from swarmfold.averaging.merge import MergeOptions
    from swarmfold.averaging.outer import OuterOptimizer
    from swarmfold.averaging.receipt import load_contribution
    from swarmfold.peer.checkpoint import save_checkpoint
    from swarmfold.peer.contribute import checkpoint_meta, merge_to_checkpoint, param_names
    from swarmfold.peer.model import tensor_sha256
    from swarmfold.spec import spec_from_dict

    torch.set_num_threads(1)
    contributions = sorted(str(p) for p in (workdir / "contributions").glob("*.receipt.json"))[:n]
    out = workdir / f"out-{mode}"
    shutil.rmtree(out, ignore_errors=True)
    # Warm the lazy imports both modes need (transformers' model module, via a weightless model).
    _, warm_meta = checkpoint_meta(workdir / "base")
    param_names(spec_from_dict(warm_meta["spec"]), int(warm_meta["vocab_size"]), int(warm_meta["eos_id"]))
    _reset_peak()
    before = _status()
    t0 = time.perf_counter()
    if mode == "streaming":
        _, result = merge_to_checkpoint(base=workdir / "base", contributions=contributions, out=out,
                                        options=MergeOptions(method="mean"))
        sha = result.model_sha256
    else:
        base_dir, meta = checkpoint_meta(workdir / "base")
        spec = spec_from_dict(meta["spec"])
        names = param_names(spec, int(meta["vocab_size"]), int(meta["eos_id"]))
        base = load_file(str(base_dir / "model.safetensors"))
        signed = [load_contribution(c) for c in contributions]
        deltas = [load_file(str(c.delta_path)) for c in signed]  # every contribution whole, at once
        theta = torch.cat([base[n].reshape(-1) for n in names])
        group = {c.key: Contribution(torch.cat([d[n].reshape(-1) for n in names]), c.weight)
                 for c, d in zip(signed, deltas, strict=True)}
        outer = OuterOptimizer(kind=spec.outer.kind, lr=spec.outer.lr, momentum=spec.outer.momentum,
                               numel=theta.numel())
        new = outer.step(theta, weighted_mean(group))
        sha = tensor_sha256(new)
        model: dict[str, torch.Tensor] = {}
        offset = 0
        for name in names:
            model[name] = new[offset : offset + base[name].numel()].view(base[name].shape).clone()
            offset += base[name].numel()
        save_checkpoint(out, round_idx=int(meta["round"]) + 1, model=model, inner={}, outer=outer.state_dict(),
                        local=None, meta={"model_sha256": sha, "spec": meta["spec"]})
    seconds = time.perf_counter() - t0
    after = _status()
    shutil.rmtree(out, ignore_errors=True)
    return {"mode": mode, "contributions": len(contributions), "seconds": round(seconds, 3), "baseline_rss_bytes": before["VmRSS"],
            "peak_rss_bytes": after["VmHWM"], "merge_peak_bytes": after["VmHWM"] - before["VmRSS"],
            "model_sha256": sha}


# ---- setup ------------------------------------------------------------------------------------

def prepare(workdir: Path, preset_name: str, n: int, steps: int, threads: int) -> dict[str, Any]:
    """A genesis checkpoint and n contributions (kept; reused when the spec matches)."""
    from swarmfold.averaging.identity import load_or_create_identity
    from swarmfold.peer.checkpoint import resolve_checkpoint
    from swarmfold.peer.contribute import contribute
    from swarmfold.peer.corpus import write_stdlib_shards
    from swarmfold.peer.local import LocalPeer
    from swarmfold.peer.model import num_parameters
    from swarmfold.spec import preset

    spec = preset(preset_name).replace(round={"mode": "steps"})  # the base trains H steps a round: reproducible
    stamp = workdir / "prepared.json"
    info = {"preset": preset_name, "spec_hash": spec.spec_hash, "contributions": n, "steps": steps}
    if stamp.is_file() and json.loads(stamp.read_text()).get("key") == info:
        return dict(json.loads(stamp.read_text()), reused=True)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    os.environ.setdefault("SWARMFOLD_CACHE", str(workdir / "token-cache"))
    shards = write_stdlib_shards(n, workdir / "data", max_bytes_per_shard=400_000)
    peer = LocalPeer(spec, [shards[0]], peer_id="genesis", threads=threads, workdir=workdir / "base")
    peer.save()
    params = num_parameters(peer.model)
    del peer
    base = resolve_checkpoint(workdir / "base")
    (workdir / "contributions").mkdir()
    for i, shard in enumerate(shards):
        ident = load_or_create_identity(workdir / "keys" / f"peer-{i}.key")
        contribute(ckpt=base, data=[shard], identity=ident, out=workdir / "contributions" / f"c{i}.safetensors",
                   threads=threads, steps=steps)
    result = {"key": info, "parameters": params,
              "delta_file_bytes": (workdir / "contributions" / "c0.safetensors").stat().st_size}
    stamp.write_text(json.dumps(result))
    return result


def run_child(mode: str, workdir: Path, n: int) -> dict[str, Any]:
    env = dict(os.environ, SWARMFOLD_CACHE=str(workdir / "token-cache"))
    proc = subprocess.run([sys.executable, __file__, "--child", mode, "--n", str(n), "--workdir", str(workdir)],
                          capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small", choices=["tiny", "small"])
    ap.add_argument("--contributions", type=int, default=4)
    ap.add_argument("--steps", type=int, default=1, help="inner steps per contribution (memory does not depend on it)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=2, help="runs of each mode; the largest peak is reported")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/swarmfold-bench-merge"))
    ap.add_argument("--out", type=Path, default=REPO / "results" / "bench_merge.json")
    ap.add_argument("--child", choices=["streaming", "all_at_once"], help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.workdir, args.n)))
        return
    prepared = prepare(args.workdir, args.preset, args.contributions, args.steps, args.threads)
    runs: dict[str, list[dict[str, Any]]] = {"streaming": [], "all_at_once": []}
    single: dict[str, list[dict[str, Any]]] = {"streaming": [], "all_at_once": []}
    for _ in range(args.repeat):
        for mode in runs:  # interleaved, so a change in machine load hits both alike
            runs[mode].append(run_child(mode, args.workdir, args.contributions))
            single[mode].append(run_child(mode, args.workdir, 1))
    worst = {mode: max(rs, key=lambda r: r["merge_peak_bytes"]) for mode, rs in runs.items()}
    worst1 = {mode: max(rs, key=lambda r: r["merge_peak_bytes"]) for mode, rs in single.items()}
    model_bytes = 4 * int(prepared["parameters"])
    mib = 2**20
    summary = {
        "benchmark": "merge peak memory",
        "preset": args.preset,
        "parameters": prepared["parameters"],
        "model_mib": round(model_bytes / mib, 1),
        "contributions": args.contributions,
        "streaming": {"merge_peak_mib": round(worst["streaming"]["merge_peak_bytes"] / mib, 1),
                      "peak_rss_mib": round(worst["streaming"]["peak_rss_bytes"] / mib, 1),
                      "seconds": worst["streaming"]["seconds"]},
        "all_at_once": {"merge_peak_mib": round(worst["all_at_once"]["merge_peak_bytes"] / mib, 1),
                        "peak_rss_mib": round(worst["all_at_once"]["peak_rss_bytes"] / mib, 1),
                        "seconds": worst["all_at_once"]["seconds"]},
        "one_contribution": {mode: {"merge_peak_mib": round(r["merge_peak_bytes"] / mib, 1)}
                             for mode, r in worst1.items()},
        "extra_mib_per_added_contribution": {
            mode: round((worst[mode]["merge_peak_bytes"] - worst1[mode]["merge_peak_bytes"])
                        / max(1, args.contributions - 1) / mib, 1) for mode in worst},
        "streaming_peak_in_models": round(worst["streaming"]["merge_peak_bytes"] / model_bytes, 2),
        "all_at_once_peak_in_models": round(worst["all_at_once"]["merge_peak_bytes"] / model_bytes, 2),
        "ratio_all_at_once_over_streaming": round(worst["all_at_once"]["merge_peak_bytes"]
                                                  / max(1, worst["streaming"]["merge_peak_bytes"]), 2),
        "same_model_sha256": len({r["model_sha256"] for rs in runs.values() for r in rs}) == 1
        and len({r["model_sha256"] for rs in single.values() for r in rs}) == 1,
        "model_sha256": worst["streaming"]["model_sha256"],
        "runs": runs,
        "runs_one_contribution": single,
        "note": "merge_peak = peak RSS during the merge minus RSS after imports, in a fresh process per run",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
    }
    import torch

    summary["machine"]["torch"] = torch.__version__
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if not k.startswith("runs")}, indent=1))
    if not summary["same_model_sha256"]:
        raise SystemExit("streaming and all-at-once merges gave different models")


if __name__ == "__main__":
    main()
