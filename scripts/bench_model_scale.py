"""A swarm at model scale: two real peers with the `base` preset (113.5M parameters) on the CPU.

Run (heavy: about 1.4 GB per checkpoint, ~3 GB of RAM per peer; 5-10 minutes on 2 cores):

    nice -n 10 .venv/bin/python scripts/bench_model_scale.py                   # base, 3 rounds
    nice -n 10 .venv/bin/python scripts/bench_model_scale.py --smoke --out /tmp/scale.json   # small preset, seconds

What it measures, each against a baseline taken in the same run:

1. genesis: `build_model` (transformers' init skipped, one randn per matrix) against the
   transformers build with its own init followed by our genesis (what it was before);
2. checkpoint write: `LocalPeer.save` (atomic: temp folder, fsync, rename; sha256 of every
   file) of a peer that has taken an inner step, so AdamW's moments are full size, against
   writing and fsyncing the same number of bytes to one plain file;
3. state sync: θ_r served by one in-process `Swarm` and downloaded by another over real
   libp2p on 127.0.0.1 (the path a late joiner takes), in seconds and MB/s, with the
   transient memory it takes, in full float32 copies of the parameters (peak RSS from
   /proc/self/status VmHWM, reset through /proc/self/clear_refs, minus RSS before);
4. the swarm: two `swarmfold run` processes (one thread each, one stdlib shard each,
   min_group_size 2) train R rounds of the preset with its batch shrunk to seconds (2
   sequences of 64 tokens in micro-batches of 1, H = 2). From their checkpoints: the round
   split (train / matchmaking / all-reduce / commit / between; `between` holds the outer
   step and the checkpoint write), all-reduce MB/s (bytes a peer sent / its all-reduce
   seconds), checkpoint write seconds (folder ctime - written_at), and each peer's peak
   memory (VmHWM of its process, sampled until it exits) as bytes per parameter, next to
   the count in docs/foundation.md ("Memory").

The first swarm round (joining, first connections) is reported but left out of the means.
Writes results/bench_model_scale.json and .png (and the machine's load before and after).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _swarm_procs import kill_all, log_tail, start_peer, wait_ready  # noqa: E402

PHASES = ("train", "matchmaking", "allreduce", "commit")
MB = 1e6


def bench_spec(smoke: bool) -> Any:
    from swarmfold.spec import preset

    name = "small" if smoke else "base"
    return preset(name).replace(
        name=f"bench-model-scale-{name}", data={"seq_len": 64},
        inner={"batch_size": 2, "micro_batch_size": 1, "warmup_steps": 1}, round={"inner_steps": 2, "mode": "steps"},
        averaging={"min_group_size": 2, "matchmaking_timeout": 60.0, "allreduce_timeout": 300.0,
                   "commit_timeout": 60.0, "record_ttl": 300.0},
        network={"state_sync_timeout": 600.0})


def vm_kib(field: str, pid: int | str = "self") -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ---- 1. genesis ---------------------------------------------------------------------------

def bench_genesis(spec: Any) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from swarmfold.peer.model import (
        build_config,
        build_model,
        flat_params,
        genesis_init,
        tensor_sha256,
    )

    build_model(spec.replace(model={"hidden_size": 64, "intermediate_size": 128, "num_layers": 1, "num_heads": 2,
                                    "num_kv_heads": 2}), 257, 256)  # warm-up: transformers' lazy imports
    t0 = time.perf_counter()
    fast = build_model(spec, 257, 256)
    fast_s = time.perf_counter() - t0
    fast_hash = tensor_sha256(flat_params(fast))
    numel = sum(p.numel() for p in fast.parameters())
    del fast
    gc.collect()
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        slow = AutoModelForCausalLM.from_config(build_config(spec, 257, 256), dtype=torch.float32)
    genesis_init(slow, spec)
    slow_s = time.perf_counter() - t0
    same = tensor_sha256(flat_params(slow)) == fast_hash
    del slow
    gc.collect()
    return {"parameters": numel, "seconds": fast_s, "baseline_seconds": slow_s, "speedup": slow_s / fast_s,
            "same_weights": same,
            "baseline": "AutoModelForCausalLM.from_config (transformers' own init) + genesis_init"}


# ---- 2. checkpoint write ------------------------------------------------------------------

def bench_checkpoint(spec: Any, shard: Path, work: Path) -> dict[str, Any]:
    from swarmfold.peer.local import LocalPeer

    peer = LocalPeer(spec.replace(round={"inner_steps": 1}), [shard], peer_id="bench", threads=1,
                     workdir=work / "ckpt", keep_checkpoints=1)
    peer.train_phase()  # one inner step: AdamW's moments exist, full size
    rss_before = vm_kib("VmRSS")
    reset_peak()
    t0 = time.perf_counter()
    path = peer.save()
    save_s = time.perf_counter() - t0
    extra = max(0, vm_kib("VmHWM") - rss_before) * 1024
    size = sum(f.stat().st_size for f in path.iterdir())
    numel = peer.theta.numel()
    del peer
    gc.collect()
    # baseline: the same bytes, one plain file, written and fsynced
    blob = bytearray(os.urandom(1 << 20)) * 64
    plain = work / "plain.bin"
    t0 = time.perf_counter()
    with open(plain, "wb") as f:
        left = size
        while left > 0:
            n = min(left, len(blob))
            f.write(memoryview(blob)[:n])
            left -= n
        f.flush()
        os.fsync(f.fileno())
    plain_s = time.perf_counter() - t0
    plain.unlink()
    shutil.rmtree(work / "ckpt", ignore_errors=True)
    return {"bytes": size, "seconds": save_s, "MB_per_s": size / save_s / MB, "baseline_seconds": plain_s,
            "ratio_to_plain_write": save_s / plain_s, "extra_peak_bytes": extra,
            "extra_peak_full_copies": extra / (4 * numel),
            "baseline": "the same number of bytes written to one file and fsynced"}


# ---- 3. state sync ------------------------------------------------------------------------

def bench_state_sync(spec: Any, work: Path) -> dict[str, Any]:
    import torch

    from swarmfold.averaging.identity import load_or_create_identity
    from swarmfold.averaging.records import PeerRecord
    from swarmfold.averaging.swarm import Swarm
    from swarmfold.peer.memory import count_parameters

    numel = count_parameters(spec, 257, 256)
    theta = torch.randn(numel, generator=torch.Generator().manual_seed(0))
    swarms: list[Any] = []
    try:
        for name in ("server", "joiner"):
            s = Swarm(spec, load_or_create_identity(work / f"{name}.key"),
                      initial_peers=swarms[0].maddrs if swarms else None)
            s.start()
            swarms.append(s)
        server, joiner = swarms
        rss_before = vm_kib("VmRSS")
        reset_peak()
        model_sha, outer_sha = server.serve_state(1, theta, {})
        serve_extra = max(0, vm_kib("VmHWM") - rss_before) * 1024
        rec = PeerRecord(peer_id=server.peer_id, round=1, model_sha256=model_sha, outer_sha256=outer_sha,
                         spec_hash=spec.spec_hash, client_mode=False, maddrs=list(server.maddrs), state="training")
        rss_before = vm_kib("VmRSS")
        reset_peak()
        t0 = time.perf_counter()
        rnd, got, _, _ = joiner.download_state([rec], numel=numel)
        seconds = time.perf_counter() - t0
        download_extra = max(0, vm_kib("VmHWM") - rss_before) * 1024
        assert rnd == 1 and torch.equal(got, theta)
    finally:
        for s in reversed(swarms):
            s.shutdown()
    return {"bytes": numel * 4, "seconds": seconds, "MB_per_s": numel * 4 / seconds / MB,
            "serve_extra_bytes": serve_extra, "serve_extra_full_copies": serve_extra / (4 * numel),
            "download_extra_bytes": download_extra, "download_extra_full_copies": download_extra / (4 * numel),
            "note": "one process holds both ends here, so the download's peak includes the server's send buffers"}


# ---- 4. the swarm -------------------------------------------------------------------------

def run_swarm(spec_path: Path, shards: list[Path], work: Path, rounds: int, timeout: float) -> dict[str, Any]:
    procs: list[Any] = []
    workdirs = [work / f"peer-{i}" for i in range(2)]
    peaks = {str(w): 0 for w in workdirs}
    try:
        procs.append(start_peer(workdirs[0], spec_path, shards[0], rounds, [], keep=rounds + 1))
        first = wait_ready(workdirs[0], procs[0], timeout=300)["maddrs"][:1]
        procs.append(start_peer(workdirs[1], spec_path, shards[1], rounds, first, keep=rounds + 1))
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                raise TimeoutError("the peers did not finish:\n" + "\n".join(log_tail(w) for w in workdirs))
            for p, w in zip(procs, workdirs, strict=True):
                peaks[str(w)] = max(peaks[str(w)], vm_kib("VmHWM", p.pid) * 1024)
            time.sleep(0.5)
        for p, w in zip(procs, workdirs, strict=True):
            if p.returncode != 0:
                raise RuntimeError(f"peer in {w} exited with {p.returncode}:\n{log_tail(w)}")
    finally:
        kill_all(procs)
    return {"workdirs": [str(w) for w in workdirs], "peak_rss_bytes": peaks}


def read_rounds(workdir: Path) -> list[dict[str, Any]]:
    out = []
    ckpts = sorted((workdir / "checkpoints").glob("round-*"))
    prev_written = None
    for d in ckpts:
        meta = json.loads((d / "meta.json").read_text())
        written = float(meta["written_at"])
        last = meta.get("last_round", {})
        t = {k: float(last.get("timings", {}).get(k, 0.0)) for k in PHASES}
        row: dict[str, Any] = {"round": int(meta["round"]), "status": last.get("status"),
                               "checkpoint_write": d.stat().st_ctime - written, **t,
                               "bytes_sent": int(last.get("bytes_sent", 0))}
        if prev_written is not None and last:
            row["wall"] = written - prev_written
            row["between"] = row["wall"] - sum(t.values())
        if t["allreduce"] > 0:
            row["allreduce_MB_per_s"] = row["bytes_sent"] / t["allreduce"] / MB
        out.append(row)
        prev_written = written
    return out


def expected_bytes_per_param(spec: Any) -> dict[str, float]:
    """The count of docs/foundation.md ("Memory") for a CPU peer, in bytes per parameter."""
    count = {"weights": 4.0, "gradients": 4.0, "adamw_moments": 8.0, "theta_r": 4.0, "delta": 4.0,
             "aggregate": 4.0, "int8_wire": 1.0}
    if spec.averaging.compression != "none":
        count["residual"] = 4.0
    if spec.outer.momentum > 0:
        count["outer_momentum"] = 4.0
    return count


def summarize(rows: list[dict[str, Any]]) -> dict[str, float]:
    steady = [r for r in rows if "wall" in r][1:]  # the first swarm round joins the DHT and connects
    keys = ("wall", *PHASES, "between", "checkpoint_write", "allreduce_MB_per_s")
    return {k: statistics.mean(r[k] for r in steady if k in r) for k in keys
            if any(k in r for r in steady)}


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(report["swarm"]["per_peer"])
    bottoms = [0.0] * len(names)
    colors = {"train": "tab:green", "matchmaking": "tab:orange", "allreduce": "tab:blue", "commit": "tab:purple",
              "between": "tab:gray"}
    for key in (*PHASES, "between"):
        vals = [report["swarm"]["per_peer"][n]["steady"].get(key, 0.0) for n in names]
        left.bar(names, vals, bottom=bottoms, label=key, color=colors[key])
        bottoms = [a + b for a, b in zip(bottoms, vals, strict=True)]
    left.set_ylabel("seconds per round (steady rounds, mean)")
    left.set_title(f"round split, {report['parameters'] / 1e6:.1f}M parameters")
    left.legend(fontsize=8)
    exp = report["memory"]["expected_bytes_per_param"]
    measured = [report["swarm"]["per_peer"][n]["peak_bytes_per_param"] for n in names]
    right.bar(["expected (docs)"] + names, [sum(exp.values())] + measured,
              color=["tab:gray"] + ["tab:blue"] * len(names))
    right.set_ylabel("peak memory, bytes per parameter")
    right.set_title("peak RSS per peer vs the count of copies")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="the small preset: checks the plumbing in seconds")
    ap.add_argument("--out", type=Path, default=Path("results/bench_model_scale.json"))
    ap.add_argument("--data", type=Path, default=None, help="where to write the two stdlib shards (default: temp)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds the swarm may take")
    args = ap.parse_args()

    import logging

    logging.basicConfig(level=logging.WARNING)
    import torch

    from swarmfold.peer.corpus import write_stdlib_shards
    from swarmfold.spec import to_toml

    torch.set_num_threads(1)
    spec = bench_spec(args.smoke)
    report: dict[str, Any] = {"command": " ".join(sys.argv), "load_before": load(),
                              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                          "torch": torch.__version__,
                                          "cpu_capability": torch.backends.cpu.get_cpu_capability()},
                              "spec": spec.to_dict()}
    tmp = Path(tempfile.mkdtemp(prefix="bench-model-scale-"))
    try:
        data = args.data or tmp / "data"
        shards = write_stdlib_shards(2, data, max_bytes_per_shard=300_000)
        print("genesis ...", flush=True)
        report["genesis"] = bench_genesis(spec)
        report["parameters"] = report["genesis"]["parameters"]
        print(f"  {report['genesis']['seconds']:.2f} s (baseline {report['genesis']['baseline_seconds']:.2f} s)",
              flush=True)
        print("checkpoint write ...", flush=True)
        report["checkpoint"] = bench_checkpoint(spec, shards[0], tmp)
        print(f"  {report['checkpoint']['seconds']:.2f} s for {report['checkpoint']['bytes'] / MB:.0f} MB",
              flush=True)
        print("state sync ...", flush=True)
        report["state_sync"] = bench_state_sync(spec, tmp)
        print(f"  {report['state_sync']['seconds']:.2f} s, {report['state_sync']['MB_per_s']:.0f} MB/s", flush=True)
        gc.collect()
        spec_path = tmp / "spec.toml"
        spec_path.write_text(to_toml(spec))
        print(f"swarm: 2 peers, {args.rounds} rounds ...", flush=True)
        t0 = time.perf_counter()
        swarm = run_swarm(spec_path, shards, tmp / "swarm", args.rounds, args.timeout)
        per_peer: dict[str, Any] = {}
        numel = report["parameters"]
        for i, w in enumerate(swarm["workdirs"]):
            rows = read_rounds(Path(w))
            peak = swarm["peak_rss_bytes"][w]
            per_peer[f"peer-{i}"] = {"rounds": rows, "steady": summarize(rows), "peak_rss_bytes": peak,
                                     "peak_bytes_per_param": peak / numel}
        report["swarm"] = {"seconds": time.perf_counter() - t0, "per_peer": per_peer}
        expected = expected_bytes_per_param(spec)
        report["memory"] = {"expected_bytes_per_param": expected,
                            "expected_total_bytes_per_param": sum(expected.values()),
                            "measured_over_expected": [p["peak_bytes_per_param"] / sum(expected.values())
                                                       for p in per_peer.values()]}
        report["load_after"] = load()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
        plot(report, args.out.with_suffix(".png"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for name, p in report["swarm"]["per_peer"].items():
        s = p["steady"]
        print(f"{name}: round {s.get('wall', 0):.1f} s (train {s.get('train', 0):.1f}, all-reduce "
              f"{s.get('allreduce', 0):.1f} at {s.get('allreduce_MB_per_s', 0):.1f} MB/s, checkpoint "
              f"{s.get('checkpoint_write', 0):.1f} s); peak {p['peak_bytes_per_param']:.1f} bytes/parameter")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
