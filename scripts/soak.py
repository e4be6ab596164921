"""Churn soak: 4 real peers train for a long time while some of them are SIGKILLed and restarted.

Run (the full soak needs a quiet machine: 4 peers on 2 cores):

    nice -n 10 .venv/bin/python scripts/soak.py                              # 30 minutes, seed 0
    nice -n 10 .venv/bin/python scripts/soak.py --minutes 3 --out /tmp/soak.json   # a short check

It starts `--peers` real `swarmfold run` peers (tiny preset, H = 10, small batches, one thread
each) on 127.0.0.1, each on a fixed port so that a restarted peer comes back at the same
address with the same identity. Peers 0..stable-1 are never touched (the long-lived ones);
every 1 to 3 minutes (`--gap`, seeded by `--seed`) one of the others that is up and has
committed since its last start is SIGKILLed (its whole session: DHT child and libp2p daemon
too) and restarted after 2 to 10 seconds of downtime, resuming from its own workdir. No
peer is killed in the last `--settle` seconds, so the last restart has time to come back.

While it runs it polls state, never logs: every new checkpoint's meta.json (model hash,
round, status, group id) and the RSS of each long-lived peer's process tree. It reports:

  - distinct models per committed group (target 1): for every (round, group id), the model
    hashes of the checkpoints that members wrote from that committed round;
  - peers that never came back (target 0): restarts after which the peer committed no round
    before the end (and for the others, the seconds until their first commit);
  - RSS growth of the long-lived peers (target < 10%): median RSS of the last fifth of the
    run against the median of the first fifth after the peer's first commit;
  - tracebacks in the peers' logs, grouped by their last line (numbers and ids blanked),
    each with its count and the peers it came from.

JSON into `--out` (default results/soak.json); exit code 0 when every target is met.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _swarm_procs import kill_all, log_tail, start_peer, wait_ready  # noqa: E402

logger = logging.getLogger("soak")
POLL = 2.0  # seconds between polls of checkpoints and processes
RSS_EVERY = 10.0


@dataclass
class Peer:
    index: int
    workdir: Path
    port: int
    stable: bool
    peer_id: str = ""  # from its identity.key, created before the first start so the others can dial it
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    committed_since_start: bool = False
    seen: set[str] = field(default_factory=set)  # checkpoint folders already read
    rss: list[tuple[float, int]] = field(default_factory=list)  # (seconds since the soak began, bytes)

    @property
    def host(self) -> str:
        return f"/ip4/127.0.0.1/tcp/{self.port}"

    @property
    def maddr(self) -> str:
        """Its full address (libp2p needs the /p2p/<id> part to dial): the same across restarts."""
        return f"{self.host}/p2p/{self.peer_id}"


def soak_spec(peers: int) -> Any:
    from swarmfold.spec import preset

    return preset("tiny").replace(
        name="soak", data={"seq_len": 64}, inner={"batch_size": 8, "warmup_steps": 5}, round={"inner_steps": 10, "mode": "steps"},
        averaging={"min_group_size": 2, "group_size": peers, "matchmaking_timeout": 5.0, "join_timeout": 3.0,
                   "allreduce_timeout": 10.0, "commit_timeout": 5.0})


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tree_rss(pid: int) -> int | None:
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return None
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


class Soak:
    def __init__(self, args: argparse.Namespace, root: Path):
        from swarmfold.averaging.identity import load_or_create_identity
        from swarmfold.peer.corpus import write_stdlib_shards
        from swarmfold.spec import to_toml

        self.args, self.root = args, root
        self.rng = random.Random(args.seed)
        self.shards = write_stdlib_shards(args.peers, root / "data", max_bytes_per_shard=300_000)
        self.spec_path = root / "spec.toml"
        self.spec_path.write_text(to_toml(soak_spec(args.peers)))
        self.peers = [Peer(i, root / f"peer-{i}", free_port(), i < args.stable) for i in range(args.peers)]
        for peer in self.peers:  # the identity the peer will load from its workdir, restart after restart
            peer.peer_id = load_or_create_identity(peer.workdir / "identity.key").peer_id
        self.t0 = time.monotonic()
        self.checkpoints: list[dict[str, Any]] = []  # one row per checkpoint seen
        self.events: list[dict[str, Any]] = []  # kills, restarts, comebacks, unexpected exits
        self.pending: dict[int, float] = {}  # peer index -> when it was restarted (not yet committed)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def event(self, kind: str, peer: Peer, **extra: Any) -> None:
        row = {"t": round(self.now(), 1), "event": kind, "peer": peer.index, **extra}
        self.events.append(row)
        logger.info("%6.1fs %-13s peer %d %s", row["t"], kind, peer.index,
                    " ".join(f"{k}={v}" for k, v in extra.items()))

    def launch(self, peer: Peer, *, first: bool = False) -> None:
        # fixed ports and ids: valid across restarts. The very first peer has nobody to dial yet (a
        # peer whose initial peers are all down refuses to start); after it, at least the stable
        # peers are always up
        initial = [] if first else [p.maddr for p in self.peers if p is not peer]
        peer.proc = start_peer(peer.workdir, self.spec_path, self.shards[peer.index], 1_000_000, initial,
                               keep=20, host=peer.host)
        peer.started_at, peer.committed_since_start = self.now(), False

    # ---- polling state ------------------------------------------------------------------------
    def poll_checkpoints(self, peer: Peer) -> None:
        for d in sorted((peer.workdir / "checkpoints").glob("round-*")):
            if d.name in peer.seen or not (d / "meta.json").exists():
                continue
            try:
                meta = json.loads((d / "meta.json").read_text())
            except (OSError, json.JSONDecodeError):  # being rotated away by --keep, or half-read
                continue
            peer.seen.add(d.name)
            r = int(d.name[len("round-"):])
            last = meta.get("last_round") or {}
            row = {"peer": peer.index, "checkpoint": r, "model_sha256": meta.get("model_sha256"),
                   "round": last.get("round"), "status": last.get("status"), "group_id": last.get("group_id"),
                   "included": len(last.get("included") or []), "written_at": meta.get("written_at"),
                   "t": round(self.now(), 1)}
            self.checkpoints.append(row)
            # a checkpoint written from the round just trained (state sync keeps an older last_round)
            fresh = row["round"] == r - 1 and row["status"] == "committed"
            if fresh and float(meta.get("written_at", 0.0)) >= time.time() - (self.now() - peer.started_at):
                if not peer.committed_since_start and peer.index in self.pending:
                    self.event("came_back", peer, seconds=round(self.now() - self.pending.pop(peer.index), 1),
                               checkpoint=r)
                peer.committed_since_start = True

    def poll(self, sample_rss: bool) -> None:
        for peer in self.peers:
            if peer.proc is not None and peer.proc.poll() is not None:
                self.event("exited_itself", peer, code=peer.proc.returncode, log=log_tail(peer.workdir, 5))
                self.launch(peer)
                self.pending.setdefault(peer.index, self.now())
            self.poll_checkpoints(peer)
            if sample_rss and peer.stable and peer.proc is not None:
                rss = tree_rss(peer.proc.pid)
                if rss is not None:
                    peer.rss.append((round(self.now(), 1), rss))

    # ---- churn --------------------------------------------------------------------------------
    def churn_once(self) -> None:
        victims = [p for p in self.peers if not p.stable and p.committed_since_start]
        if not victims:
            self.event("kill_postponed", self.peers[-1], why="no churn peer has committed since its start")
            return
        victim = self.rng.choice(victims)
        down = self.rng.uniform(2.0, 10.0)
        assert victim.proc is not None
        kill_all([victim.proc])
        victim.proc = None  # down: not restarted by poll() as an unexpected exit
        self.event("killed", victim, downtime=round(down, 1))
        self.wait(down)
        self.launch(victim)
        self.pending[victim.index] = self.now()
        self.event("restarted", victim)

    def wait(self, seconds: float) -> None:
        end = self.now() + seconds
        last_rss = -RSS_EVERY
        while self.now() < end:
            sample = self.now() - last_rss >= RSS_EVERY
            self.poll(sample)
            if sample:
                last_rss = self.now()
            time.sleep(min(POLL, max(0.0, end - self.now())))

    def run(self) -> None:
        duration = self.args.minutes * 60
        settle = min(self.args.settle, duration / 2)
        lo, hi = self.args.gap
        self.launch(self.peers[0], first=True)
        assert self.peers[0].proc is not None
        wait_ready(self.peers[0].workdir, self.peers[0].proc, timeout=120)
        for peer in self.peers[1:]:
            self.launch(peer)
        self.event("started", self.peers[0], peers=len(self.peers), stable=self.args.stable)
        next_kill = self.rng.uniform(lo, hi)
        while self.now() < duration:
            until = min(next_kill, duration) if next_kill < duration - settle else duration
            self.wait(max(0.0, until - self.now()))
            if self.now() >= duration:
                break
            if self.now() >= next_kill:
                self.churn_once()
                next_kill = self.now() + self.rng.uniform(lo, hi)
        self.poll(True)


# ---- the report --------------------------------------------------------------------------------

def models_per_group(rows: list[dict[str, Any]]) -> dict[str, Any]:
    groups: dict[tuple[int, str], set[str]] = {}
    for r in rows:
        if r["status"] == "committed" and r["round"] == r["checkpoint"] - 1 and r["group_id"]:
            groups.setdefault((r["round"], r["group_id"]), set()).add(r["model_sha256"])
    distinct = [len(v) for v in groups.values()]
    bad = [{"round": k[0], "group_id": k[1], "models": sorted(v)} for k, v in groups.items() if len(v) > 1]
    synced = sum(1 for r in rows if r["round"] is not None and r["round"] != r["checkpoint"] - 1)
    return {"committed_groups": len(groups), "max_distinct_models": max(distinct, default=0),
            "groups_with_more_than_one_model": bad,
            "checkpoints_seen": len(rows),
            "checkpoints_not_from_their_round": synced,
            "note": "checkpoints whose last_round is not the round just before them are left out: those "
                    "written right after a state sync (a restart or a catch-up), whose last_round is the sync "
                    "(status 'synced'), not a round the peer committed"}


def rss_growth(peer: Peer, first_commit_t: float | None, duration: float) -> dict[str, Any]:
    samples = [(t, b) for t, b in peer.rss if first_commit_t is None or t >= first_commit_t]
    if len(samples) < 4:
        return {"samples": len(samples), "growth": None}
    span = samples[-1][0] - samples[0][0]
    head = [b for t, b in samples if t <= samples[0][0] + span / 5]
    tail = [b for t, b in samples if t >= samples[-1][0] - span / 5]
    a, b = statistics.median(head), statistics.median(tail)
    return {"samples": len(samples), "first_fifth_median_mb": round(a / 2**20, 1),
            "last_fifth_median_mb": round(b / 2**20, 1), "growth": round(b / a - 1, 4),
            "max_mb": round(max(x for _, x in samples) / 2**20, 1)}


_BLANK = [(re.compile(r"12D3KooW\w+"), "<peer>"), (re.compile(r"0x[0-9a-f]+"), "<addr>"),
          (re.compile(r"\b[0-9a-f]{12,}\b"), "<hex>"), (re.compile(r"\d+(\.\d+)?"), "<n>")]


def tracebacks(workdirs: list[Path]) -> list[dict[str, Any]]:
    """Every 'Traceback' block in the peers' logs, keyed by its last line with numbers and ids blanked."""
    found: dict[str, dict[str, Any]] = {}
    for i, w in enumerate(workdirs):
        path = w / "peer.log"
        if not path.exists():
            continue
        lines = path.read_text(errors="replace").splitlines()
        for k, line in enumerate(lines):
            if not line.startswith("Traceback (most recent call last)"):
                continue
            j = k + 1
            while j < len(lines) and (lines[j].startswith((" ", "\t")) or not lines[j].strip()):
                j += 1
            last = lines[j] if j < len(lines) else "(cut off)"
            where = next((x.strip() for x in reversed(lines[k + 1:j]) if x.strip().startswith("File ")), "")
            key = last
            for pat, rep in _BLANK:
                key = pat.sub(rep, key)
            entry = found.setdefault(key, {"exception": key, "count": 0, "peers": set(), "example": last,
                                           "innermost_frame": where})
            entry["count"] += 1
            entry["peers"].add(i)
    return [{**e, "peers": sorted(e["peers"])} for e in sorted(found.values(), key=lambda e: -e["count"])]


def report(soak: Soak, seconds: float) -> dict[str, Any]:
    first_commit: dict[int, float] = {}
    for r in soak.checkpoints:
        if r["status"] == "committed":
            first_commit.setdefault(r["peer"], r["t"])
    restarts = [e for e in soak.events if e["event"] == "restarted"]
    came_back = [e for e in soak.events if e["event"] == "came_back"]
    never = [{"peer": i, "restarted_at": t} for i, t in soak.pending.items()]
    groups = models_per_group(soak.checkpoints)
    rss = {str(p.index): rss_growth(p, first_commit.get(p.index), seconds) for p in soak.peers if p.stable}
    growths = [v["growth"] for v in rss.values() if v["growth"] is not None]
    tbs = tracebacks([p.workdir for p in soak.peers])
    targets = {"distinct_models_per_committed_group": groups["max_distinct_models"] <= 1,
               "peers_that_never_came_back": not never,
               "rss_growth_below_10pct": bool(growths) and max(growths) < 0.10,
               "committed_groups_seen": groups["committed_groups"] > 0}
    return {
        "benchmark": "soak",
        "setup": {"peers": soak.args.peers, "stable": soak.args.stable, "minutes": soak.args.minutes,
                  "gap_seconds": soak.args.gap, "settle_seconds": soak.args.settle, "seed": soak.args.seed,
                  "spec": soak_spec(soak.args.peers).to_dict()["averaging"], "inner_steps": 10,
                  "threads_per_peer": 1},
        "targets_met": targets,
        "distinct_models_per_committed_group": groups,
        "restarts": len(restarts),
        "came_back": [{"peer": e["peer"], "seconds": e["seconds"]} for e in came_back],
        "peers_that_never_came_back": never,
        "rss_of_long_lived_peers": rss,
        "tracebacks": tbs,
        "events": soak.events,
        "checkpoints_per_peer": {str(p.index): sum(1 for r in soak.checkpoints if r["peer"] == p.index)
                                 for p in soak.peers},
        "environment": {"python": platform.python_version(), "cores": os.cpu_count(),
                        "load_average_at_end": list(os.getloadavg()), "seconds": round(seconds, 1)},
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--peers", type=int, default=4)
    p.add_argument("--stable", type=int, default=2, help="peers never killed (the long-lived ones; default 2)")
    p.add_argument("--gap", type=float, nargs=2, default=[60.0, 180.0], metavar=("MIN", "MAX"),
                   help="seconds between kills, drawn uniformly (default 60 180)")
    p.add_argument("--settle", type=float, default=60.0, help="no kill in the last this many seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep the peers' workdirs (printed at the start)")
    p.add_argument("--out", type=Path, default=Path("results/soak.json"))
    args = p.parse_args(argv)
    if not 1 <= args.stable < args.peers or args.peers < 2:
        p.error("needs --peers >= 2 and 1 <= --stable < --peers")
    if not 0 < args.gap[0] <= args.gap[1]:
        p.error("--gap MIN MAX: 0 < MIN <= MAX")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    root = Path(tempfile.mkdtemp(prefix="soak-"))
    os.environ.setdefault("SWARMFOLD_CACHE", str(root / "cache"))
    logger.info("soak: %d peers (%d never killed) for %.1f min, seed %d, in %s", args.peers, args.stable,
                args.minutes, args.seed, root)
    soak = Soak(args, root)
    t0 = time.monotonic()
    try:
        soak.run()
    finally:
        kill_all([p.proc for p in soak.peers if p.proc is not None])
    out = report(soak, time.monotonic() - t0)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(out, indent=1))
    os.replace(tmp, args.out)
    g = out["distinct_models_per_committed_group"]
    logger.info("committed groups %d, max distinct models in one %d (target 1); restarts %d, never came back %d "
                "(target 0); RSS growth %s (target < 10%%); %d kinds of traceback", g["committed_groups"],
                g["max_distinct_models"], out["restarts"], len(out["peers_that_never_came_back"]),
                {k: v["growth"] for k, v in out["rss_of_long_lived_peers"].items()}, len(out["tracebacks"]))
    for tb in out["tracebacks"]:
        logger.info("  %4d x %s (peers %s)", tb["count"], tb["exception"][:160], tb["peers"])
    logger.info("wrote %s", args.out)
    return 0 if all(out["targets_met"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
