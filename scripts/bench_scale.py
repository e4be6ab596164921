"""Real peers on loopback: round time, matchmaking, all-reduce, memory per peer and hash agreement.

Run (a few minutes per size on a 2-core machine):

    nice -n 10 .venv/bin/python scripts/bench_scale.py --out results/scale.json            # N = 2, 4, 8, 16
    nice -n 10 .venv/bin/python scripts/bench_scale.py --sizes 2 --rounds 2 --out /tmp/s.json

For each N it starts N real `swarmfold run` processes (each with its hivemind DHT child and
p2pd daemon) on 127.0.0.1 with the tiny model, one stdlib shard each, and
averaging.min_group_size = N up to G (every round waits for all of them) and 2 beyond
(join_timeout 10 s, see bench_spec). The peers launch together (`run --wait-for-peers N`:
none trains round 0 before all N are in the swarm); --staggered starts each one's round 0
as soon as it is up, as volunteers joining one by one would. It samples
the resident memory of every peer's whole process tree (the peer, its DHT process and p2pd)
while they run, and reads each peer's checkpoints afterwards: the model hash of every
round and what happened in it (group, members, timings, bytes).

Reported per N: round wall time (median interval between a peer's checkpoints), median
matchmaking / all-reduce / commit / training seconds, per round the committed group
sizes and how many peers then adopted a larger group's model, memory per peer (peak PSS of its
process tree, which splits pages shared after fork fairly; and peak RSS, which counts
them in every process; and the PSS beyond the model and optimizer state), TCP connections
per peer to other peers (sampled every second: the peak per peer, its median over peers, and the
median over all samples), and whether every member of every group committed the same hash.

With --netns (root, `ip netns` and `tc netem` present) it also runs 4 peers in network
namespaces joined by a bridge, each link with 25 ms one-way delay (50 ms RTT) and
100 Mbit/s. Where that is not possible it says why and skips that part.

The rounds are short on purpose (seq_len 64, batch 8, H = 5): the point is the swarm's
overhead and agreement at N peers on one machine, not the loss.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from swarmfold.peer.corpus import write_stdlib_shards
from swarmfold.spec import preset, to_toml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _swarm_procs import LOOPBACK, kill_all, log_tail, start_peer, wait_ready  # noqa: E402


def bench_spec(n: int, rounds_h: int) -> Any:
    spec = preset("tiny")
    g = spec.averaging.group_size
    # up to G peers: every round waits for all of them. Beyond G, the ready peers are cut into
    # ceil(n/G) near-equal groups, smaller than G unless a multiple of G is ready at once;
    # waiting for full groups then stalls (measured: 16 peers, min 8, 1 round in 3 committed)
    min_group = n if n <= g else 2
    # join_timeout 10 s: a follower waits 2 x join_timeout for its leader's proposal, which must
    # outlast the leader's gathering window (matchmaking_timeout, 15 s). With the default 5 s a
    # follower can give up on a leader that is still gathering, exclude it for the round and,
    # with min_group_size > 1, neither can ever average (seen here; reported to the swarm's owner).
    return spec.replace(data={"seq_len": 64}, inner={"batch_size": 8, "warmup_steps": 5},
                        round={"inner_steps": rounds_h, "mode": "steps"},  # H steps: the same work at every N
                        averaging={"min_group_size": min_group, "join_timeout": 10.0})


class MemorySampler(threading.Thread):
    """Peak resident memory of each peer's process tree (the peer, its DHT child, p2pd), and its TCP
    connections to other peers: established sockets of the tree whose far end is not a socket of the
    same tree (the peer's own processes talk over loopback too), sampled every `conn_every` samples."""

    def __init__(self, pids: list[int], interval: float = 0.5, conn_every: int = 2):
        super().__init__(daemon=True)
        self.pids, self.interval, self.conn_every = pids, interval, conn_every
        self.peak = {pid: 0 for pid in pids}  # sum of RSS (pages shared by forked children counted twice)
        self.peak_pss = {pid: 0 for pid in pids}  # sum of PSS (shared pages split among their users)
        self.conns: dict[int, list[int]] = {pid: [] for pid in pids}  # connection counts, one per sample
        self.stop = threading.Event()

    @staticmethod
    def _external_connections(procs: list[psutil.Process]) -> int:
        socks = [c for p in procs for c in p.net_connections(kind="tcp")]
        own = {c.laddr.port for c in socks if c.laddr}
        return sum(1 for c in socks if c.status == psutil.CONN_ESTABLISHED and c.raddr and c.raddr.port not in own)

    def run(self) -> None:
        k = 0
        while not self.stop.is_set():
            for pid in self.pids:
                try:
                    root = psutil.Process(pid)
                    procs = [root, *root.children(recursive=True)]
                    infos = [p.memory_full_info() for p in procs if p.is_running()]
                    if k % self.conn_every == 0:
                        self.conns[pid].append(self._external_connections(procs))
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                self.peak[pid] = max(self.peak[pid], sum(i.rss for i in infos))
                self.peak_pss[pid] = max(self.peak_pss[pid], sum(getattr(i, "pss", i.rss) for i in infos))
            k += 1
            self.stop.wait(self.interval)










def read_rounds(workdir: Path) -> dict[int, dict[str, Any]]:
    """round r -> {sha256 of θ_r's model file, what happened in round r-1, when the checkpoint was written}."""
    out = {}
    for d in sorted((workdir / "checkpoints").glob("round-*")):
        meta_path, model = d / "meta.json", d / "model.safetensors"
        if not (meta_path.exists() and model.exists()):
            continue
        meta = json.loads(meta_path.read_text())
        out[int(d.name[6:])] = {"sha256": hashlib.sha256(model.read_bytes()).hexdigest(),
                                "last_round": meta.get("last_round", {}), "written_at": meta.get("written_at")}
    return out


_COMMIT = re.compile(r"\] round (\d+) committed \(.*?\): loss .*, model ([0-9a-f]{12})")
_SYNC = re.compile(r"\] synced to round (\d+)")


def read_log(workdir: Path) -> tuple[dict[int, str], list[int]]:
    """From a peer's log: round -> model hash right after it committed that round; rounds it synced to.

    The hash is taken at commit time because a checkpoint can be rewritten later in the
    same round: a peer whose group was smaller adopts a strictly larger group's model.
    """
    text = (workdir / "peer.log").read_text(errors="replace") if (workdir / "peer.log").exists() else ""
    commits = {int(m.group(1)): m.group(2) for m in _COMMIT.finditer(text)}
    return commits, [int(m.group(1)) for m in _SYNC.finditer(text)]


def analyse(workdirs: list[Path], peer_ids: list[str], sampler: MemorySampler, pids: list[int], rounds: int,
            numel: int) -> dict[str, Any]:
    per_peer = [read_rounds(w) for w in workdirs]
    logs = [read_log(w) for w in workdirs]
    agree, statuses = True, []
    disagreements: list[dict[str, Any]] = []
    per_round: list[dict[str, Any]] = []
    timings: dict[str, list[float]] = {"matchmaking": [], "allreduce": [], "commit": [], "train": []}
    intervals: list[float] = []
    bytes_sent: list[int] = []
    for r in range(1, rounds + 1):
        by_group: dict[str, set[str]] = {}
        round_status: list[str] = []
        members_of: dict[str, list[dict[str, Any]]] = {}
        for pid, rounds_of, (commits, _) in zip(peer_ids, per_peer, logs, strict=True):
            info = rounds_of.get(r)
            if info is None:
                agree = False
                continue
            last = info["last_round"]
            statuses.append(last.get("status", "?"))
            round_status.append(last.get("status", "?"))
            if last.get("status") == "committed":
                at_commit = commits.get(r - 1, "missing from the log")
                by_group.setdefault(last["group_id"], set()).add(at_commit)
                members_of.setdefault(last["group_id"], []).append(
                    {"peer": pid[-8:], "sha256_at_commit": at_commit, "last_round": last.get("round"),
                     "members": len(last.get("members", [])), "included": len(last.get("included", []))})
            for k in timings:
                if k in last.get("timings", {}):
                    timings[k].append(float(last["timings"][k]))
            if "bytes_sent" in last:
                bytes_sent.append(int(last["bytes_sent"]))
            prev = rounds_of.get(r - 1)
            if r >= 2 and prev and prev["written_at"] and info["written_at"]:
                intervals.append(info["written_at"] - prev["written_at"])
        # a committed round missing from a member's log counts as a disagreement: nothing unchecked passes
        split = {gid[:12]: members_of[gid] for gid, h in by_group.items()
                 if len(h) > 1 or "missing from the log" in h}
        if split:
            disagreements.append({"round": r - 1, "groups": split})
        agree &= not split
        sizes = sorted((sum(1 for rounds_of in per_peer if (rounds_of.get(r) or {}).get("last_round", {})
                            .get("group_id") == gid) for gid in by_group), reverse=True)
        models = {rounds_of[r]["sha256"] for rounds_of in per_peer if r in rounds_of}
        levels = sorted({len((rounds_of.get(r) or {}).get("last_round", {}).get("tree", [])) for rounds_of in per_peer})
        per_round.append({"round": r - 1, "statuses": {st: round_status.count(st) for st in sorted(set(round_status))},
                          "committed_group_sizes": sizes,
                          # θ_{r+1} as the checkpoints hold it (after any adoption): the target is 1
                          "distinct_models": len(models),
                          "tree_levels_above_the_group": levels,
                          "adopted_a_larger_groups_model": sum(syncs.count(r) for _, syncs in logs)})
    # float32 copies: θ_r, the local weights, their gradients, AdamW's two moments, the int8 residual
    model_state = numel * 4 * 6
    rss_mib = [sampler.peak[p] / 2**20 for p in pids]
    conns = [sampler.conns[p] for p in pids]
    pss_mib = [sampler.peak_pss[p] / 2**20 for p in pids]

    def med(xs: list[float]) -> float | None:
        return round(statistics.median(xs), 3) if xs else None

    return {
        "rounds": rounds,
        "per_round": per_round,
        "statuses": {s: statuses.count(s) for s in sorted(set(statuses))},
        "every_group_committed_the_same_hash": agree,  # over committed groups; rolled-back peers keep θ_r
        "disagreements": disagreements,
        "round_wall_seconds_median": med(intervals),
        "matchmaking_seconds_median": med(timings["matchmaking"]),
        "allreduce_seconds_median": med(timings["allreduce"]),
        "commit_seconds_median": med(timings["commit"]),
        "train_seconds_median": med(timings["train"]),
        "bytes_sent_per_round_median": med([float(b) for b in bytes_sent]),
        # TCP connections to other peers (libp2p multiplexes every stream to one peer over one)
        "connections_per_peer": {"peak_max": max((max(c) for c in conns if c), default=0),
                                 "peak_median": med([float(max(c)) for c in conns if c]),
                                 "median": med([float(x) for c in conns for x in c])},
        "pss_peak_mib_per_peer": {"mean": round(statistics.mean(pss_mib), 1), "max": round(max(pss_mib), 1)},
        "rss_peak_mib_per_peer": {"mean": round(statistics.mean(rss_mib), 1), "max": round(max(rss_mib), 1)},
        "model_and_optimizer_state_mib": round(model_state / 2**20, 1),
        "pss_overhead_beyond_state_mib": round(statistics.mean(pss_mib) - model_state / 2**20, 1),
    }


def run_size(n: int, *, rounds: int, root: Path, h: int, timeout: float, netns: list[str] | None = None,
             hosts: list[str] | None = None, launch: bool = True) -> dict[str, Any]:
    base = root / f"n{n}{'-netns' if netns else ''}"
    shutil.rmtree(base, ignore_errors=True)
    shards = write_stdlib_shards(n, base / "data", max_bytes_per_shard=150_000)
    spec = bench_spec(n, h)
    spec_path = base / "spec.toml"
    spec_path.write_text(to_toml(spec))
    workdirs = [base / f"peer-{i}" for i in range(n)]
    procs: list[subprocess.Popen] = []
    # a coordinated launch: no peer trains round 0 before all n are in the swarm (--wait-for-peers), so
    # that round 0 measures the protocol at n, not n processes importing torch minutes apart on 2 cores
    extra = ["--wait-for-peers", str(n)] if launch else []
    t0 = time.monotonic()
    try:
        host0 = hosts[0] if hosts else LOOPBACK
        procs.append(start_peer(workdirs[0], spec_path, shards[0], rounds, [], keep=100, extra=extra,
                                netns=netns[0] if netns else None, host=host0))
        info0 = wait_ready(workdirs[0], procs[0], 300)
        initial = [a for a in info0["maddrs"] if "/127.0.0.1/" in a or (hosts and hosts[0].split("/")[2] in a)][:1]
        for i in range(1, n):
            procs.append(start_peer(workdirs[i], spec_path, shards[i], rounds, initial, keep=100, extra=extra,
                                    netns=netns[i] if netns else None, host=hosts[i] if hosts else LOOPBACK))
        sampler = MemorySampler([p.pid for p in procs])
        sampler.start()
        peer_ids = [info0["peer_id"]] + [wait_ready(w, p, 600)["peer_id"] for w, p in zip(workdirs[1:], procs[1:],
                                                                                          strict=True)]
        startup = time.monotonic() - t0
        codes: list[int | None] = []
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                codes.append(None)
        stuck = [i for i, c in enumerate(codes) if c is None]
        if stuck:  # stop them gracefully (SIGTERM rolls a round back), then read what they committed
            for i in stuck:
                os.killpg(procs[i].pid, signal.SIGTERM)
            for i in stuck:
                try:
                    procs[i].wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass
        sampler.stop.set()
        sampler.join()
        from swarmfold.peer.model import build_model

        numel = sum(p.numel() for p in build_model(spec, 257, 256).parameters())
        res = analyse(workdirs, peer_ids, sampler, [p.pid for p in procs], rounds, numel)
        if stuck:
            res["unfinished_peers"] = {str(i): log_tail(workdirs[i], 6) for i in stuck}
        res.update(peers=n, exit_codes=codes, startup_seconds=round(startup, 1),
                   total_seconds=round(time.monotonic() - t0, 1), group_size=spec.averaging.group_size,
                   min_group_size=spec.averaging.min_group_size, inner_steps=h, launch_wait=launch)
        return res
    finally:
        kill_all(procs)


# ---- network namespaces ------------------------------------------------------------------

NETNS_BRIDGE = "sfbr0"
NETNS_SUBNET = "10.231.7"  # only inside namespaces this script makes and removes


def netns_available() -> str:
    """'' when namespaces and netem can be used, else why not."""
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    probe = "sfprobe"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode:
        return f"`ip netns add` failed: {r.stderr.strip()}"
    try:
        r = subprocess.run(["ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "lo", "root", "netem",
                            "delay", "1ms"], capture_output=True, text=True)
        if r.returncode:
            return f"`tc qdisc ... netem` failed (sch_netem missing?): {r.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ""


def _sh(*cmd: str) -> None:
    subprocess.run(list(cmd), check=True, capture_output=True, text=True)


def netns_up(n: int, delay_ms: float, rate: str) -> tuple[list[str], list[str]]:
    names, hosts = [], []
    _sh("ip", "link", "add", NETNS_BRIDGE, "type", "bridge")
    _sh("ip", "link", "set", NETNS_BRIDGE, "up")
    for i in range(n):
        ns, a, b = f"sfns{i}", f"sfv{i}a", f"sfv{i}b"
        _sh("ip", "netns", "add", ns)
        _sh("ip", "link", "add", a, "type", "veth", "peer", "name", b)
        _sh("ip", "link", "set", b, "netns", ns)
        _sh("ip", "link", "set", a, "master", NETNS_BRIDGE)
        _sh("ip", "link", "set", a, "up")
        _sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{NETNS_SUBNET}.{10 + i}/24", "dev", b)
        _sh("ip", "netns", "exec", ns, "ip", "link", "set", b, "up")
        _sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        # one-way delay on each peer's egress: A->B crosses A's link, B->A crosses B's: RTT = 2 x delay
        _sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", b, "root", "netem", "delay", f"{delay_ms}ms",
            "rate", rate)
        names.append(ns)
        hosts.append(f"/ip4/{NETNS_SUBNET}.{10 + i}/tcp/0")
    return names, hosts


def netns_down(n: int) -> None:
    for i in range(n):
        subprocess.run(["ip", "netns", "del", f"sfns{i}"], capture_output=True)
        subprocess.run(["ip", "link", "del", f"sfv{i}a"], capture_output=True)
    subprocess.run(["ip", "link", "del", NETNS_BRIDGE], capture_output=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--inner-steps", type=int, default=5)
    ap.add_argument("--netns", action="store_true", help="also run 4 peers with 50 ms RTT, 100 Mbit/s links")
    ap.add_argument("--timeout", type=float, default=600.0,
                    help="seconds a size may take after its peers joined; stragglers are stopped and reported")
    ap.add_argument("--staggered", action="store_true",
                    help="no coordinated launch: each peer starts round 0 as soon as it is up (without "
                         "--wait-for-peers), as a swarm that volunteers join one by one does")
    ap.add_argument("--out", type=Path, default=Path("results/scale.json"))
    args = ap.parse_args()

    def stop(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")  # so that `finally` stops every peer started

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)  # also when started in the background, where SIGINT is ignored
    root = Path(tempfile.mkdtemp(prefix="swarmfold-scale-"))
    os.environ.setdefault("SWARMFOLD_CACHE", str(root / "cache"))
    report: dict[str, Any] = {"setup": {"sizes": args.sizes, "rounds": args.rounds, "inner_steps": args.inner_steps,
                                        "cores": os.cpu_count(), "threads_per_peer": 1,
                                        "launch_wait": not args.staggered}, "loopback": {}}
    try:
        for n in args.sizes:
            print(f"N = {n} ...", flush=True)
            res = run_size(n, rounds=args.rounds, root=root, h=args.inner_steps, timeout=args.timeout,
                           launch=not args.staggered)
            report["loopback"][str(n)] = res
            print(json.dumps(res), flush=True)
        if args.netns:
            why = netns_available()
            if why:
                print(f"skipping the network-namespace run: {why}", flush=True)
                report["netns"] = {"skipped": why}
            else:
                try:
                    names, hosts = netns_up(4, 25, "100mbit")
                    res = run_size(4, rounds=args.rounds, root=root, h=args.inner_steps, timeout=args.timeout,
                                   netns=names, hosts=hosts, launch=not args.staggered)
                    report["netns"] = {"rtt_ms": 50, "rate": "100mbit", **res}
                    print(json.dumps(res), flush=True)
                finally:
                    netns_down(4)
    finally:
        report["setup"]["load_average_at_end"] = list(os.getloadavg())
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
        if all(r.get("every_group_committed_the_same_hash", True) for r in report["loopback"].values()):
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"kept the peers' workdirs in {root} for inspection", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
