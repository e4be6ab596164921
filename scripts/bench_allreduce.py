"""All-reduce throughput: swarmfold's `Swarm.average()` against hivemind's `DecentralizedAverager`.

Run (about 3 minutes on 2 cores; writes the JSON and a PNG next to it):

    nice -n 10 .venv/bin/python scripts/bench_allreduce.py                         # 40 MB, 4 peers, 5 repeats
    nice -n 10 .venv/bin/python scripts/bench_allreduce.py --numel 100000 --repeats 1 --out /tmp/a.json
    nice -n 10 .venv/bin/python scripts/bench_allreduce.py --link rtt=50ms,rate=100mbit --numel 2500000 \
        --repeats 3 --out results/bench_allreduce_wan_50ms_100mbit.json          # over an emulated WAN

`--link` puts every peer behind its own emulated access link (swarmfold.devtools.linkemu,
a TCP proxy: one-way latency rtt/2, per-peer up/down token buckets, optional loss; see its
docstring for the model). Each peer listens on a real port and announces the emulator's
port for it, so every byte between peers, of both systems, crosses the emulated links;
the report gives the bytes that did, per system.

Both systems average the same 10M-float32 vector (40 MB) among 4 peers on 127.0.0.1.
Every peer is its own process with its own DHT node and libp2p daemon (8 peer processes
in all, 4 per system, all started once). Repeats alternate between the systems (ABBA),
so that drift in the machine's load hits both alike; one warm-up repeat per system
(connections, first allocations) is run first and not counted.

For each repeat the coordinator picks one random vector and one weight per peer (the
same for both systems), tells the 4 peers of one system to prepare them, then to go at
the same moment, and collects:
  - swarmfold: the whole `Swarm.average()` call and its timings (matchmaking, allreduce,
    commit), from a random AverageRequest (same base hash; weight within the spec's token
    cap); nothing else runs (no training, no checkpoint);
  - hivemind: the whole `step()` call, and its all-reduce part (`_aggregate_with_group`:
    from the formed group to the averaged tensor in place), timed inside the averager
    process by a subclass.
MB/s, the same for both: 40 MB (numel * 4 bytes, decimal MB) divided by the time of the
slowest of the 4 peers in that repeat (the all-reduce is done when every peer holds the
result); the median over repeats is reported. "after matchmaking" is swarmfold's
allreduce + commit (its digest vote is part of its all-reduce) against hivemind's
`_aggregate_with_group`; "whole call" is average() against step().

Correctness, per repeat: sha256 of every peer's result (swarmfold's aggregate; hivemind's
averaged tensor), and peer 0's result against the float64 weighted mean of the inputs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any

import numpy as np
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _swarm_procs import EmulatedLink  # noqa: E402

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
TAG = "@@BENCH "  # stdout lines of a worker that carry a reply (libraries may print other lines)
# swarmfold-libp2p: swarmfold with [network] direct_streams = false, every byte through the libp2p daemons
# (what swarmfold did before direct streams; run it beside the others with --systems)
SYSTEMS = ("swarmfold", "swarmfold-libp2p", "hivemind")
DEFAULT_SYSTEMS = ("swarmfold", "hivemind")
BASE_HASH = hashlib.sha256(b"bench_allreduce base model").hexdigest()


# ---- the inputs of one repeat (recomputed identically by worker and coordinator) ---------------

def make_delta(seed: int, numel: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(numel, generator=g, dtype=torch.float32)


def input_seed(repeat: int, index: int) -> int:
    return 1_000_003 * (repeat + 1) + index


def bench_spec(peers: int, *, direct: bool = True, data_port: int = 0) -> Any:
    """The tiny preset with a group of exactly `peers`, timeouts far above what a repeat takes, and
    no compression: both systems move the same 40 MB of float32 (the preset's default is int8)."""
    from swarmfold.spec import preset

    return preset("tiny").replace(name="bench-allreduce", round={"mode": "steps"}, network={
        "direct_streams": direct, "data_port": data_port}, averaging={
        "compression": "none", "aggregation": "mean",
        "group_size": peers, "min_group_size": peers, "matchmaking_timeout": 60.0, "join_timeout": 10.0,
        "allreduce_timeout": 120.0, "commit_timeout": 30.0, "max_attempts": 1, "record_ttl": 300.0})


# ---- workers: one process per peer; JSON commands on stdin, tagged JSON replies on stdout ----------

def reply(msg: dict[str, Any]) -> None:
    sys.stdout.write(TAG + json.dumps(msg) + "\n")
    sys.stdout.flush()


def commands() -> Any:
    for line in sys.stdin:
        if line.strip():
            yield json.loads(line)


def thread_cpu() -> dict[str, float]:
    """CPU seconds so far of each thread of this process, by thread name."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, float] = {}
    for t in psutil.Process().threads():
        name = names.get(t.id, "other")
        out[name] = out.get(name, 0.0) + t.user_time + t.system_time
    return out


class Worker:
    """What both workers share: prepare an input, then run one averaging on `go`."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.delta: torch.Tensor | None = None
        self.weight = 1.0
        self.round = 0

    def serve(self) -> None:
        for cmd in commands():
            if cmd["cmd"] == "quit":
                break
            if cmd["cmd"] == "prepare":
                self.round, self.weight = int(cmd["round"]), float(cmd["weight"])
                self.delta = make_delta(int(cmd["seed"]), self.args.numel)
                self.load()
                reply({"ready": True})
            elif cmd["cmd"] == "go":
                before = thread_cpu()
                out = self.go()
                after = thread_cpu()
                out["thread_cpu_seconds"] = {k: round(after[k] - before.get(k, 0.0), 4) for k in after
                                             if after[k] - before.get(k, 0.0) > 0.0005}
                reply(out)
            elif cmd["cmd"] == "result":  # after the coordinator has read the CPU counters
                reply(self.save_result(cmd.get("save")))
        self.close()

    def save_result(self, path: str | None) -> dict[str, Any]:
        result = self.result()
        digest = hashlib.sha256(result.numpy().tobytes()).hexdigest() if result is not None else None
        if path and result is not None:
            result.numpy().tofile(path)
        return {"sha256": digest}

    def load(self) -> None: ...
    def go(self) -> dict[str, Any]: raise NotImplementedError
    def result(self) -> torch.Tensor | None: raise NotImplementedError
    def close(self) -> None: ...


class SwarmfoldWorker(Worker):
    def __init__(self, args: argparse.Namespace):
        from swarmfold.averaging.identity import load_or_create_identity
        from swarmfold.averaging.swarm import Swarm

        super().__init__(args)
        self.spec = bench_spec(args.peers, direct=args.worker == "swarmfold", data_port=args.data_port)
        identity = load_or_create_identity(Path(args.workdir) / "identity.key")
        self.swarm = Swarm(self.spec, identity, initial_peers=args.initial, host_maddrs=[args.host_maddr],
                           announce_maddrs=[args.announce_maddr] if args.announce_maddr else None,
                           announce_data=[args.announce_data] if args.announce_data else None)
        self.swarm.start()
        self.aggregate: torch.Tensor | None = None
        reply({"maddrs": self.swarm.maddrs, "peer_id": self.swarm.peer_id, "token_cap": self.spec.token_cap})

    def go(self) -> dict[str, Any]:
        from swarmfold.averaging.base import AverageRequest

        assert self.delta is not None
        req = AverageRequest(round=self.round, delta=self.delta, weight=self.weight, model_sha256=BASE_HASH,
                             steps=self.spec.round.inner_steps)  # steps mode: every part declares H
        t0 = time.perf_counter()
        res = self.swarm.average(req)
        seconds = time.perf_counter() - t0
        self.aggregate = res.aggregate
        return {"seconds": seconds, "status": res.status, "attempts": res.attempts, "reason": res.reason,
                "timings": res.timings, "group_size": len(res.members), "included": len(res.included),
                "bytes_sent": res.bytes_sent, "bytes_received": res.bytes_received,
                "direct_streams_opened": self.swarm.transport.direct.opened,
                "direct_streams_fell_back": self.swarm.transport.direct.fell_back}

    def result(self) -> torch.Tensor | None:
        return self.aggregate

    def close(self) -> None:
        self.swarm.shutdown()


def timed_averager_class() -> type:
    from hivemind.averaging import DecentralizedAverager

    class TimedAverager(DecentralizedAverager):
        """Times the all-reduce part of step() inside the averager process (a forked child)."""

        async def _aggregate_with_group(self, group_info: Any, min_vector_size: int, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return await super()._aggregate_with_group(group_info, min_vector_size, **kwargs)
            finally:
                self.allreduce_seconds.value = time.perf_counter() - t0

    return TimedAverager


class HivemindWorker(Worker):
    def __init__(self, args: argparse.Namespace):
        import ctypes
        import multiprocessing as mp

        import hivemind

        super().__init__(args)
        self.dht = hivemind.DHT(start=True, initial_peers=args.initial or None, host_maddrs=[args.host_maddr],
                                announce_maddrs=[args.announce_maddr] if args.announce_maddr else None)
        self.averager = timed_averager_class()(
            [torch.zeros(args.numel)], self.dht, start=False, prefix="bench_allreduce",
            target_group_size=args.peers, min_group_size=args.peers, allreduce_timeout=120.0,
            allow_state_sharing=False)
        self.averager.allreduce_seconds = mp.Value(ctypes.c_double, float("nan"))
        self.averager.run_in_background(await_ready=True)
        maddrs = [str(a) for a in self.dht.get_visible_maddrs()]
        reply({"maddrs": maddrs, "peer_id": str(self.dht.peer_id)})

    def load(self) -> None:
        with self.averager.get_tensors() as tensors:
            tensors[0].copy_(self.delta)

    def go(self) -> dict[str, Any]:
        self.averager.allreduce_seconds.value = float("nan")
        t0 = time.perf_counter()
        try:
            gathered = self.averager.step(weight=self.weight, timeout=120.0)
            error = ""
        except Exception as e:  # hivemind raises several types when a step fails
            gathered, error = None, f"{type(e).__name__}: {e}"
        seconds = time.perf_counter() - t0
        ok = gathered is not None
        return {"seconds": seconds, "status": "ok" if ok else "failed", "reason": error,
                "allreduce_seconds": self.averager.allreduce_seconds.value,
                "group_size": len(gathered) if ok else 0}

    def result(self) -> torch.Tensor | None:
        with self.averager.get_tensors() as tensors:
            return tensors[0].clone()

    def close(self) -> None:
        self.averager.shutdown()
        self.dht.shutdown()


def worker_main(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)  # the same for both systems; 4 peers share 2 cores
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s {args.worker}-{args.index} %(name)s %(message)s")
    worker = SwarmfoldWorker(args) if args.worker.startswith("swarmfold") else HivemindWorker(args)
    worker.serve()
    return 0


# ---- the coordinator -------------------------------------------------------------------------------

class Peer:
    """A worker process seen from the coordinator."""

    def __init__(self, system: str, index: int, args: argparse.Namespace, root: Path, initial: list[str],
                 port: dict[str, str] | None):
        self.system, self.index = system, index
        workdir = root / f"{system}-{index}"
        workdir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", system, "--index", str(index),
               "--numel", str(args.numel), "--peers", str(args.peers), "--workdir", str(workdir)]
        if port is not None:  # behind the emulated link: listen on the real port, announce the emulator's
            cmd += ["--host-maddr", port["host_maddr"], "--announce-maddr", port["announce_maddr"]]
            if "data_port" in port:  # and its direct streams too
                cmd += ["--data-port", str(port["data_port"]), "--announce-data", port["announce_data"]]
        if args.verbose:
            cmd.append("--verbose")
        if initial:
            cmd += ["--initial", *initial]
        self.log = workdir / "worker.log"
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=open(self.log, "ab"), text=True, start_new_session=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.replies: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            if line.startswith(TAG):
                self.replies.put(json.loads(line[len(TAG):]))

    def send(self, msg: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()

    def get(self, timeout: float, waiting_for: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                return self.replies.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
        state = f"exited with {self.proc.returncode}" if self.proc.poll() is not None else f"no answer in {timeout:.0f}s"
        raise RuntimeError(f"{self.system} peer {self.index}: {state} while waiting for {waiting_for}; "
                           f"log:\n{tail(self.log)}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send({"cmd": "quit"})
                self.proc.wait(timeout=20)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)
        else:  # the DHT child and p2pd of a clean exit are gone; this catches any left behind
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def cpu_seconds(peers: list[Peer]) -> dict[str, float]:
    """CPU seconds (user + system) used so far by the peers' process trees, by kind of process:
    the peer's own Python process, its Python children (hivemind's DHT, hivemind's averager),
    and the libp2p daemons (p2pd, Go)."""
    out = {"peer_process": 0.0, "python_children": 0.0, "p2pd": 0.0}
    for p in peers:
        try:
            root = psutil.Process(p.proc.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for proc in procs:
            try:
                t = proc.cpu_times()
                kind = ("peer_process" if proc.pid == root.pid
                        else "p2pd" if "p2pd" in proc.name() else "python_children")
            except psutil.NoSuchProcess:
                continue
            out[kind] += t.user + t.system
    return out


def tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"


def start_system(system: str, args: argparse.Namespace, root: Path, ports: list[dict[str, str]] | None
                 ) -> list[Peer]:
    def port(i: int) -> dict[str, str] | None:
        return None if ports is None else ports[i]

    first = Peer(system, 0, args, root, [], port(0))
    hello = first.get(120, "its addresses")
    peers = [first] + [Peer(system, i, args, root, hello["maddrs"][:1], port(i)) for i in range(1, args.peers)]
    for p in peers[1:]:
        p.get(120, "its addresses")
    return peers


def weights_for(repeat: int, peers: int, cap: float) -> list[float]:
    g = torch.Generator().manual_seed(7919 * (repeat + 1))
    return [float(round(cap * (0.5 + 0.5 * float(u)))) for u in torch.rand(peers, generator=g)]


def reference_mean(repeat: int, numel: int, weights: list[float]) -> torch.Tensor:
    acc = torch.zeros(numel, dtype=torch.float64)
    for i, w in enumerate(weights):
        acc.add_(make_delta(input_seed(repeat, i), numel).to(torch.float64), alpha=w)
    return acc.div_(sum(weights))


def run_repeat(system: str, peers: list[Peer], repeat: int, weights: list[float], round_idx: int,
               save: Path) -> dict[str, Any]:
    for i, p in enumerate(peers):
        p.send({"cmd": "prepare", "round": round_idx, "seed": input_seed(repeat, i), "weight": weights[i]})
    for p in peers:
        p.get(120, "the input to be prepared")
    cpu0 = cpu_seconds(peers)
    for p in peers:
        p.send({"cmd": "go"})
    outs = [p.get(900, "the averaging to finish") for p in peers]
    cpu1 = cpu_seconds(peers)
    for i, p in enumerate(peers):
        p.send({"cmd": "result", "save": str(save) if i == 0 else None})
    for o, p in zip(outs, peers, strict=True):
        o.update(p.get(120, "the result hash"))
    row: dict[str, Any] = {"repeat": repeat, "peers": outs,
                           "identical": len({o["sha256"] for o in outs}) == 1 and outs[0]["sha256"] is not None,
                           "distinct_results": len({o["sha256"] for o in outs}),
                           "whole_call_seconds": max(o["seconds"] for o in outs),
                           "cpu_seconds": {k: cpu1[k] - cpu0[k] for k in cpu0}}
    if system.startswith("swarmfold"):
        row["ok"] = all(o["status"] == "committed" and o["included"] == len(peers) for o in outs)
        row["allreduce_only_seconds"] = max(o["timings"]["allreduce"] for o in outs)
        row["after_matchmaking_seconds"] = max(o["timings"]["allreduce"] + o["timings"]["commit"] for o in outs)
        row["matchmaking_seconds"] = max(o["timings"]["matchmaking"] for o in outs)
    else:
        row["ok"] = all(o["status"] == "ok" and o["group_size"] == len(peers) for o in outs)
        row["after_matchmaking_seconds"] = max(o["allreduce_seconds"] for o in outs)
    return row


def check_against_reference(row: dict[str, Any], ref: torch.Tensor, saved: Path) -> None:
    if not saved.exists():
        row["max_abs_error_vs_float64_mean"] = None
        return
    got = torch.from_numpy(np.fromfile(saved, dtype=np.float32))
    row["max_abs_error_vs_float64_mean"] = float((got.to(torch.float64) - ref).abs().max())
    row["equals_float64_mean_rounded_to_float32"] = bool(torch.equal(got, ref.to(torch.float32)))
    saved.unlink()


def mbps(numel: int, seconds: float) -> float:
    return numel * 4 / 1e6 / seconds


def summarize(rows: dict[str, list[dict[str, Any]]], numel: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for system, rs in rows.items():
        ok = [r for r in rs if r["ok"]]
        s: dict[str, Any] = {"repeats": len(rs), "repeats_ok": len(ok)}
        for key in ("after_matchmaking_seconds", "whole_call_seconds", "allreduce_only_seconds",
                    "matchmaking_seconds"):
            vals = [r[key] for r in ok if key in r]
            if vals:
                s[key] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "all": vals}
        if ok:
            s["mbps_after_matchmaking"] = mbps(numel, s["after_matchmaking_seconds"]["median"])
            s["mbps_whole_call"] = mbps(numel, s["whole_call_seconds"]["median"])
            if "allreduce_only_seconds" in s:
                s["mbps_allreduce_only"] = mbps(numel, s["allreduce_only_seconds"]["median"])
        cpu = [r["cpu_seconds"] for r in ok]
        if cpu:
            s["cpu_seconds_median"] = {k: statistics.median(c[k] for c in cpu) for k in cpu[0]}
            s["cpu_seconds_median"]["total"] = statistics.median(sum(c.values()) for c in cpu)
        s["all_peers_bit_identical_every_repeat"] = all(r["identical"] for r in ok)
        s["distinct_results_per_repeat"] = [r["distinct_results"] for r in ok]
        s["failed_repeats"] = [{"repeat": r["repeat"], "reasons": sorted({p.get("reason", "") for p in r["peers"]})}
                               for r in rs if not r["ok"]]
        errs = [r.get("max_abs_error_vs_float64_mean") for r in rs]
        s["max_abs_error_vs_float64_mean"] = max((e for e in errs if e is not None), default=None)
        out[system] = s
    sf, hm = out.get("swarmfold", {}), out.get("hivemind", {})
    if "mbps_after_matchmaking" in sf and "mbps_after_matchmaking" in hm:
        out["ratio_after_matchmaking"] = sf["mbps_after_matchmaking"] / hm["mbps_after_matchmaking"]
        out["ratio_whole_call"] = sf["mbps_whole_call"] / hm["mbps_whole_call"]
        # per-repeat pairs (ABBA neighbours), a check that the median ratio is not one lucky repeat
        pairs = [(a["after_matchmaking_seconds"], b["after_matchmaking_seconds"])
                 for a, b in zip(rows["swarmfold"], rows["hivemind"], strict=False) if a["ok"] and b["ok"]]
        out["ratio_after_matchmaking_per_repeat"] = [h / s for s, h in pairs]
    lp = out.get("swarmfold-libp2p", {})
    if "mbps_after_matchmaking" in lp and "mbps_after_matchmaking" in hm:
        out["ratio_libp2p_after_matchmaking"] = lp["mbps_after_matchmaking"] / hm["mbps_after_matchmaking"]
        out["ratio_libp2p_whole_call"] = lp["mbps_whole_call"] / hm["mbps_whole_call"]
    if "mbps_after_matchmaking" in lp and "mbps_after_matchmaking" in sf:
        out["direct_over_libp2p_after_matchmaking"] = sf["mbps_after_matchmaking"] / lp["mbps_after_matchmaking"]
    return out


def plot(report: dict[str, Any], path: Path) -> None:
    """Left: MB/s per system (bars: medians, dots: repeats). Right: CPU seconds per all-reduce."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numel = report["numel"]
    summ = report["summary"]
    systems = [s for s in SYSTEMS if s in summ and "after_matchmaking_seconds" in summ[s]]
    fig, (ax, cpu_ax) = plt.subplots(1, 2, figsize=(11, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    metrics = [("after_matchmaking_seconds", "all-reduce\n(after matchmaking)"), ("whole_call_seconds", "whole call")]
    colors = {"swarmfold": "tab:blue", "swarmfold-libp2p": "tab:cyan", "hivemind": "tab:orange"}
    width = 0.76 / len(systems)
    for k, (key, _) in enumerate(metrics):
        for j, system in enumerate(systems):
            s = summ[system]
            x = k + (j - (len(systems) - 1) / 2) * width
            med = mbps(numel, s[key]["median"])
            ax.bar(x, med, width, color=colors.get(system, "tab:gray"), label=system if k == 0 else None)
            ax.scatter([x] * len(s[key]["all"]), [mbps(numel, v) for v in s[key]["all"]], color="black", s=10,
                       zorder=3)
            ax.text(x, med, f"{med:.1f}", ha="center", va="bottom", fontsize=9)
    ax.set_xticks(range(len(metrics)), [label for _, label in metrics])
    ax.set_ylabel("MB/s = 40 MB / slowest peer's seconds")
    ratio = summ.get("ratio_after_matchmaking")
    where = f"over {report['link']['spec']}" if report.get("link") else "on loopback"
    ax.set_title(f"all-reduce of {numel * 4 / 1e6:.0f} MB among {report['peers']} peers {where}"
                 + (f"\nswarmfold / hivemind: {ratio:.2f}x after matchmaking, {summ['ratio_whole_call']:.2f}x "
                    "whole call" if ratio else ""), fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    kinds = [("peer_process", "peer process (Python)"), ("python_children", "Python children (DHT; hivemind's "
                                                                               "averager)"), ("p2pd", "libp2p daemons")]
    for j, system in enumerate(systems):
        cpu = summ[system].get("cpu_seconds_median", {})
        bottom = 0.0
        for n, (kind, label) in enumerate(kinds):
            v = cpu.get(kind, 0.0)
            cpu_ax.bar(j, v, 0.6, bottom=bottom, color=f"C{n + 2}", label=label if j == 0 else None)
            bottom += v
        cpu_ax.text(j, bottom, f"{bottom:.2f}", ha="center", va="bottom", fontsize=9)
    cpu_ax.set_xticks(range(len(systems)), systems)
    cpu_ax.set_ylabel("CPU seconds per all-reduce, all 4 peers (median)")
    cpu_ax.set_title("CPU used (the machine has 2 cores)", fontsize=10)
    top = max((sum(summ[x].get("cpu_seconds_median", {}).get(k, 0.0) for k, _ in kinds) for x in systems),
              default=1.0)
    cpu_ax.set_ylim(0, 1.45 * top)  # room for the legend above the bars
    cpu_ax.legend(fontsize=7, loc="upper right")
    cpu_ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def link_report(link: str, stats: dict[str, Any], systems: list[str], peers: int) -> dict[str, Any]:
    """The emulated link's settings and what crossed it, per system (its nodes are the systems' peers in order)."""
    nodes = list(stats.get("nodes", {}).values())
    per_system = {}
    for k, system in enumerate(systems):
        mine = nodes[k * peers:(k + 1) * peers]
        per_system[system] = {"bytes_up": sum(n["bytes_up"] for n in mine),
                              "connections_in": sum(n["connections_in"] for n in mine),
                              "segments_lost": sum(n["segments_lost_up"] for n in mine)}
    return {"spec": link, "model": stats.get("describe"), "per_system": per_system,
            "connections": stats.get("connections"), "unattributed_connections": stats.get("unattributed_connections"),
            "emulator_cpu_seconds": stats.get("emulator_cpu_seconds"),
            "note": "each peer listens on a real port and announces only the emulator's port for it; "
                    "bytes_up counts every byte a system's peers sent through the emulated links"}


def coordinator_main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    log = logging.getLogger("bench_allreduce")
    systems = [s for s in SYSTEMS if s in args.systems]
    root = Path(tempfile.mkdtemp(prefix="bench-allreduce-"))
    os.environ.setdefault("SWARMFOLD_CACHE", str(root / "cache"))
    from swarmfold.spec import preset  # noqa: F401  (fail early if the package is not importable)

    cap = float(bench_spec(args.peers).token_cap)
    peers: dict[str, list[Peer]] = {}
    rows: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
    warmup: dict[str, dict[str, Any]] = {}
    t_start = time.time()
    link: EmulatedLink | None = None
    link_stats: dict[str, Any] = {}
    try:
        if args.link:
            link = EmulatedLink(args.link, args.peers * len(systems), root, data=True)
            log.info("every peer behind an emulated link: %s", args.link)
        for k, system in enumerate(systems):
            log.info("starting %d %s peers", args.peers, system)
            peers[system] = start_system(system, args, root,
                                         None if link is None else link.ports[k * args.peers:(k + 1) * args.peers])
        round_idx = 0
        for repeat in range(-1, args.repeats):  # -1: the warm-up
            weights = weights_for(max(repeat, 0), args.peers, cap)
            order = systems if repeat % 2 == 0 else systems[::-1]
            ref = reference_mean(repeat, args.numel, weights) if repeat >= 0 and args.check else None
            for system in order:
                round_idx += 1
                saved = root / f"result-{system}-{repeat}.f32"
                idle = [p for other in systems if other != system for p in peers[other]]
                idle0 = cpu_seconds(idle)
                row = run_repeat(system, peers[system], repeat, weights, round_idx, saved)
                idle1 = cpu_seconds(idle)
                # the other system's processes stay up between its repeats: what their background work
                # (DHT upkeep, averager loops) took from the machine during this repeat
                row["idle_other_system_cpu_seconds"] = round(sum(idle1.values()) - sum(idle0.values()), 3)
                if ref is not None:
                    check_against_reference(row, ref, saved)
                saved.unlink(missing_ok=True)
                if repeat < 0:
                    warmup[system] = row
                else:
                    rows[system].append(row)
                log.info("%s repeat %d: after matchmaking %.3fs (%.1f MB/s), whole call %.3fs, ok=%s, "
                         "identical=%s, error=%s, cpu %s", system, repeat, row["after_matchmaking_seconds"],
                         mbps(args.numel, row["after_matchmaking_seconds"]), row["whole_call_seconds"], row["ok"],
                         row["identical"], row.get("max_abs_error_vs_float64_mean"),
                         {k: round(v, 2) for k, v in row["cpu_seconds"].items()})
                time.sleep(args.pause)
    finally:
        for ps in peers.values():
            for p in ps:
                p.stop()
        if link is not None:
            link_stats = link.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    report = {
        "benchmark": "allreduce",
        "numel": args.numel, "megabytes": args.numel * 4 / 1e6, "peers": args.peers, "repeats": args.repeats,
        "mbps_definition": "numel*4/1e6 divided by the slowest of the peers' seconds in a repeat; median over repeats",
        "after_matchmaking_definition": "swarmfold: timings allreduce + commit (digest vote); hivemind: "
                                        "DecentralizedAverager._aggregate_with_group (group formed -> tensor averaged)",
        "whole_call_definition": "swarmfold: Swarm.average(); hivemind: DecentralizedAverager.step(); "
                                 "all peers told to go at the same moment",
        "settings": {"swarmfold_spec_averaging": bench_spec(args.peers).to_dict()["averaging"],
                     "hivemind": {"target_group_size": args.peers, "min_group_size": args.peers,
                                  "min_matchmaking_time": 5.0, "request_timeout": 3.0,
                                  "part_size_bytes": 2**19, "compression": "none"},
                     "torch_threads_per_peer": 1, "order": "ABBA interleaved, one warm-up repeat each"},
        "link": link_report(args.link, link_stats, systems, args.peers) if args.link else None,
        "summary": summarize(rows, args.numel),
        "warmup": warmup,
        "runs": rows,
        "environment": {"torch": torch.__version__, "python": platform.python_version(), "cores": os.cpu_count(),
                        "hivemind": __import__("hivemind").__version__,
                        "load_average_at_end": list(os.getloadavg()),
                        "seconds": round(time.time() - t_start, 1)},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, out)
    plot(report, out.with_suffix(".png"))
    s = report["summary"]
    for system in systems:
        x = s[system]
        log.info("%-9s after matchmaking %s MB/s, whole call %s MB/s, bit-identical: %s, max error %s", system,
                 f"{x.get('mbps_after_matchmaking', float('nan')):.1f}", f"{x.get('mbps_whole_call', float('nan')):.1f}",
                 x["all_peers_bit_identical_every_repeat"], x["max_abs_error_vs_float64_mean"])
    if "ratio_after_matchmaking" in s:
        log.info("swarmfold/hivemind: %.2fx after matchmaking, %.2fx whole call (target >= 1.5)",
                 s["ratio_after_matchmaking"], s["ratio_whole_call"])
    if "direct_over_libp2p_after_matchmaking" in s:
        log.info("swarmfold direct / through libp2p: %.2fx after matchmaking", s["direct_over_libp2p_after_matchmaking"])
    log.info("wrote %s and %s", out, out.with_suffix(".png"))
    return exit_code(report, systems, args.repeats)


def exit_code(report: dict[str, Any], systems: list[str], repeats: int) -> int:
    """1 if a swarmfold repeat failed, or hivemind never completed an all-reduce (warm-up included): then
    there is nothing to compare. A hivemind repeat that failed is in the JSON and logged, and left out
    of the ratios, but it does not fail the run: hivemind is the baseline, not what is tested here, and
    its averager is known to fail now and then (DESIGN.md; seen here on loaded cores: a 120 s timeout)."""
    s = report["summary"]
    if any(x.startswith("swarmfold") and s[x]["repeats_ok"] != repeats for x in systems):
        return 1
    if "hivemind" in systems and s["hivemind"]["repeats_ok"] != repeats:
        failed = [r["repeat"] for r in report["runs"]["hivemind"] if not r["ok"]]
        logging.getLogger("bench_allreduce").warning("hivemind failed repeat(s) %s (left out of the ratios)",
                                                     failed)
        warm = report["warmup"].get("hivemind", {})
        return 0 if s["hivemind"]["repeats_ok"] or warm.get("ok") else 1
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--numel", type=int, default=10_000_000, help="float32 elements averaged (default 10M = 40 MB)")
    p.add_argument("--peers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5, help="measured repeats per system (plus one warm-up)")
    p.add_argument("--systems", nargs="+", default=list(DEFAULT_SYSTEMS), choices=SYSTEMS,
                   help="swarmfold (direct streams, the default), swarmfold-libp2p (direct_streams = false) and "
                        "hivemind; default: swarmfold hivemind")
    p.add_argument("--pause", type=float, default=1.0, help="seconds between repeats")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip comparing peer 0's result with the float64 mean")
    p.add_argument("--keep", action="store_true", help="keep the workers' directory (logs) in /tmp")
    p.add_argument("--verbose", action="store_true", help="workers log at INFO (default WARNING)")
    p.add_argument("--out", default="results/bench_allreduce.json")
    p.add_argument("--link", default="", help="put every peer behind an emulated link, e.g. rtt=50ms,rate=100mbit "
                   "or rate=20mbit (keys: see swarmfold.devtools.linkemu); default: plain loopback")
    # worker mode (started by the coordinator)
    p.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    p.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--workdir", default="", help=argparse.SUPPRESS)
    p.add_argument("--initial", nargs="*", default=[], help=argparse.SUPPRESS)
    p.add_argument("--host-maddr", default=LOOPBACK, help=argparse.SUPPRESS)
    p.add_argument("--announce-maddr", default="", help=argparse.SUPPRESS)
    p.add_argument("--data-port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--announce-data", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.peers < 2:
        print("bench_allreduce: --peers must be at least 2", file=sys.stderr)
        return 2
    if args.link and not args.worker:
        from swarmfold.devtools.linkemu import LinkSpec

        try:
            LinkSpec.parse(args.link)
        except ValueError as e:
            print(f"bench_allreduce: {e}", file=sys.stderr)
            return 2
    return worker_main(args) if args.worker else coordinator_main(args)


if __name__ == "__main__":
    sys.exit(main())
