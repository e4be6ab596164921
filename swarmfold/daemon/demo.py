"""`swarmfold demo`: a real swarm on this machine, measured against training alone and data-parallel.

It writes N stdlib shards, starts N real peers (`swarmfold run`, separate processes on
127.0.0.1, each with its own DHT node and libp2p daemon), shows their rounds as they
train, and trains the two references on exactly the batches the peers use:
  - each peer alone on its shard for the same tokens;
  - the data-parallel equivalent: one model with batch N·B for the same steps.
The peers' identities are made first, so their ids (which seed their batches) are known
before they start, and the references train in worker processes (one thread each, one per
core, `nice` 10) while the swarm runs: they take the CPU the peers leave idle (start-up,
matchmaking, all-reduce) and all of it once the peers are done. Progress of the references
is shown with the rounds, then as a bar.
It prints validation loss on every shard for all of them, the bytes each peer sent next
to what per-step gradient all-reduce would have sent, and writes DIR/result.json.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import IO, Any

from swarmfold.averaging.base import allreduce_fp32_bytes_per_step
from swarmfold.averaging.identity import load_or_create_identity
from swarmfold.errors import UserError
from swarmfold.fsutil import write_json_atomic
from swarmfold.peer.checkpoint import list_checkpoints, load_checkpoint_dir
from swarmfold.peer.corpus import write_stdlib_shards
from swarmfold.peer.credit import Credit
from swarmfold.peer.local import evaluate_model, model_from_checkpoint
from swarmfold.peer.reference import load_shards, train_data_parallel, train_isolated
from swarmfold.peer.trainer import set_threads
from swarmfold.progress import Progress
from swarmfold.spec import Spec, preset, to_toml

logger = logging.getLogger(__name__)

DEFAULT_ROUNDS = 12  # 300 inner steps per peer with the tiny preset's H = 25
EVAL_WINDOWS = 128  # validation windows per shard (the same for every model)
REFERENCE_NICE = 10  # the references yield the CPU to the peers while the swarm runs

_progress_queue: Any = None  # in a reference worker: where it reports finished batches


def _init_reference_worker(queue: Any, niceness: int) -> None:
    global _progress_queue
    _progress_queue = queue
    if niceness:
        os.nice(niceness)
    set_threads(1)


def _reference_job(spec: Spec, shard_paths: list[Path], ids: list[str], kind: str, index: int,
                   rounds: int) -> dict[str, float]:
    """Train one reference (kind 'alone' for peer `index`, or 'data-parallel') and evaluate it on every shard."""
    shards = load_shards(spec, shard_paths)
    h = spec.round.inner_steps
    per_round = h * (len(ids) if kind == "data-parallel" else 1)  # batches of B

    def report(_round: int) -> None:
        _progress_queue.put(per_round)

    if kind == "data-parallel":
        model = train_data_parallel(spec, shards, ids, rounds=rounds, on_round=report)
    else:
        model = train_isolated(spec, shards[index], ids[index], rounds=rounds, threads=1, on_round=report).model
    return {p.name: evaluate_model(model, s, spec.inner.batch_size, EVAL_WINDOWS)
            for p, s in zip(shard_paths, shards, strict=True)}


class _References:
    """The references, trained in worker processes from the start of the swarm (see the module docstring)."""

    def __init__(self, spec: Spec, shard_paths: list[Path], ids: list[str], rounds: int):
        ctx = multiprocessing.get_context("spawn")
        self.queue = ctx.Queue()
        workers = max(1, min(os.cpu_count() or 1, len(ids) + 1))
        self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_reference_worker,
                                        initargs=(self.queue, REFERENCE_NICE))
        self.total = 2 * rounds * spec.round.inner_steps * len(ids)  # batches of B: N alone + data-parallel
        self.done = 0
        self.jobs: dict[str, Future] = {"data-parallel": self.pool.submit(  # the longest first
            _reference_job, spec, shard_paths, ids, "data-parallel", 0, rounds)}
        for i in range(len(ids)):
            self.jobs[f"alone-{i}"] = self.pool.submit(_reference_job, spec, shard_paths, ids, "alone", i, rounds)

    def poll(self) -> int:
        """Batches finished since the last poll."""
        new = 0
        while True:
            try:
                new += int(self.queue.get_nowait())
            except Exception:  # queue.Empty
                break
        self.done += new
        return new

    def percent(self) -> str:
        self.poll()
        return f"references {100 * self.done / self.total:.0f}%"

    def results(self) -> dict[str, dict[str, float]]:
        """Wait for every reference, showing progress; the per-shard losses of each."""
        with Progress("training the references", total=self.total, unit="batch", interval=15.0) as bar:
            bar.update(self.done)
            while not all(f.done() for f in self.jobs.values()):
                time.sleep(0.5)
                new = self.poll()
                if new:
                    bar.update(new)
            bar.update(self.poll())
        out = {name: f.result() for name, f in self.jobs.items()}
        self.pool.shutdown()
        return out

    def cancel(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        for proc in list(getattr(self.pool, "_processes", {}).values()):  # a running job is not cancelled
            proc.kill()


def demo_spec(peers: int) -> Spec:
    """The tiny preset, with every peer required in every group so the demo averages all of them; in
    steps mode (the presets run time mode), because the references train on exactly the swarm's
    batches: H steps per peer and round."""
    return preset("tiny").replace(name="swarmfold-demo", round={"mode": "steps"},
                                  averaging={"group_size": max(8, peers), "min_group_size": peers,
                                             "matchmaking_timeout": 30.0, "join_timeout": 10.0,
                                             "allreduce_timeout": 60.0, "commit_timeout": 20.0})


def _start(i: int, out: Path, spec_path: Path, shard: Path, rounds: int, threads: int,
           initial: list[str]) -> subprocess.Popen:
    workdir = out / f"peer-{i}"
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "swarmfold", "run", "--spec", str(spec_path), "--data", str(shard),
           "--workdir", str(workdir), "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--rounds", str(rounds),
           "--threads", str(threads)]
    if i > 0:
        cmd += ["--api-port", "0", "--initial-peers", *initial]
    log = open(workdir / "peer.log", "ab")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)


def _wait_json(path: Path, procs: list[subprocess.Popen], timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() not in (None, 0) for p in procs):
            raise RuntimeError(f"a peer exited early; see {path.parent}/peer.log")
        try:
            return dict(json.loads(path.read_text()))
        except (FileNotFoundError, json.JSONDecodeError):
            time.sleep(0.3)
    raise TimeoutError(f"{path} did not appear within {timeout:.0f}s; see {path.parent}/peer.log")


def _newest_meta(workdir: Path) -> dict[str, Any] | None:
    for path in list_checkpoints(workdir):
        try:
            return dict(json.loads((path / "meta.json").read_text()))
        except (FileNotFoundError, json.JSONDecodeError):
            continue
    return None


def _watch(procs: list[subprocess.Popen], workdirs: list[Path], rounds: int, stdout: IO[str],
           extra: Any = lambda: "") -> None:
    shown = 0
    while True:
        metas = [_newest_meta(w) for w in workdirs]
        done = min((m["round"] if m else 0) for m in metas)
        while shown < done:
            shown += 1
            row = [m for m in metas if m]
            losses = "  ".join(f"{(m.get('last_round') or {}).get('status', '?'):>9}" for m in row)
            hashes = {m["model_sha256"] for m in row if m["round"] == done}
            agree = "all peers hold the same model" if len(hashes) == 1 else f"{len(hashes)} different models"
            print(f"  round {shown:3d}/{rounds}  [{losses}]  {agree}  {extra()}", file=stdout, flush=True)
        if all(p.poll() is not None for p in procs):
            bad = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode != 0]
            if bad:
                raise RuntimeError(f"peer(s) {bad} failed; see {workdirs[bad[0][0]]}/peer.log")
            return
        time.sleep(1.0)


def _row(name: str, per_shard: dict[str, float]) -> str:
    cells = "  ".join(f"{v:8.4f}" for v in per_shard.values())
    return f"  {name:<28}{cells}  {sum(per_shard.values()) / len(per_shard):8.4f}"


def run_demo(*, peers: int = 3, rounds: int | None = None, out: Path = Path("runs/demo"), threads: int = 1,
             stdout: IO[str] = sys.stdout) -> int:
    if peers < 2:
        raise UserError("--peers must be at least 2: a swarm of one has no one to average with")
    rounds = rounds or DEFAULT_ROUNDS
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec = demo_spec(peers)
    spec_path = out / "spec.toml"
    spec_path.write_text(to_toml(spec))
    print(f"swarmfold demo: {peers} peers, {rounds} rounds of {spec.round.inner_steps} steps, tiny preset "
          f"(swarm id {spec.swarm_id})", file=stdout, flush=True)
    shard_paths = write_stdlib_shards(peers, out / "data", max_bytes_per_shard=1_000_000)
    print(f"  data: {peers} shards of this Python's standard library in {out / 'data'}", file=stdout, flush=True)

    procs: list[subprocess.Popen] = []
    workdirs = [out / f"peer-{i}" for i in range(peers)]
    for w in workdirs:  # a fresh run each time
        for stale in ("peer.json", "api.json"):
            (w / stale).unlink(missing_ok=True)
        if (w / "checkpoints").exists():
            import shutil

            shutil.rmtree(w / "checkpoints")
    # the peers' ids seed their batches: made now, the references can train while the swarm does
    ids = [load_or_create_identity(w / "identity.key").peer_id for w in workdirs]
    refs = _References(spec, shard_paths, ids, rounds)
    t_start = time.monotonic()
    try:
        procs.append(_start(0, out, spec_path, shard_paths[0], rounds, threads, []))
        first = _wait_json(workdirs[0] / "peer.json", procs)
        for i in range(1, peers):
            procs.append(_start(i, out, spec_path, shard_paths[i], rounds, threads, first["maddrs"][:1]))
        api = workdirs[0] / "api.json"
        for _ in range(20):
            if api.exists():
                url = json.loads(api.read_text()).get("url")
                print(f"  dashboard of peer 0: {url}", file=stdout, flush=True)
                break
            time.sleep(0.25)
        print(f"  started {peers} peers (logs in {out}/peer-*/peer.log); training:", file=stdout, flush=True)
        t0 = time.monotonic()
        _watch(procs, workdirs, rounds, stdout, refs.percent)
        swarm_seconds = time.monotonic() - t0
    except BaseException:
        refs.cancel()
        raise
    finally:
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                    p.wait(timeout=30)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    os.killpg(p.pid, signal.SIGKILL)

    print(f"  swarm finished in {swarm_seconds:.0f}s; the references (trained alongside, on the same batches) "
          f"are {refs.percent().split()[-1]} done...", file=stdout, flush=True)
    try:
        references = refs.results()
    except BaseException:
        refs.cancel()
        raise
    reference_wait = time.monotonic() - t0 - swarm_seconds
    return _report(spec, shard_paths, workdirs, rounds, out, stdout, references,
                   {"swarm_s": swarm_seconds, "references_after_swarm_s": reference_wait,
                    "total_s": time.monotonic() - t_start}, ids)


def _report(spec: Spec, shard_paths: list[Path], workdirs: list[Path], rounds: int, out: Path,
            stdout: IO[str], references: dict[str, dict[str, float]], timings: dict[str, float],
            trained_for: list[str]) -> int:
    set_threads(max(1, os.cpu_count() or 1))  # the peers have finished: the evaluation may use every core
    shards = load_shards(spec, shard_paths)
    names = [p.name for p in shard_paths]
    metas = [json.loads((list_checkpoints(w)[0] / "meta.json").read_text()) for w in workdirs]
    ids = [m["peer_id"] for m in metas]
    if ids != trained_for:
        raise RuntimeError(f"the references were trained for peers {trained_for}, but the peers are {ids}")

    def per_shard(model: Any) -> dict[str, float]:
        return {n: evaluate_model(model, s, spec.inner.batch_size, EVAL_WINDOWS) for n, s in zip(names, shards,
                                                                                                  strict=True)}

    _, swarm_model = model_from_checkpoint(load_checkpoint_dir(list_checkpoints(workdirs[0])[0]))
    swarm = per_shard(swarm_model)
    isolated: list[dict[str, Any]] = [{"peer_id": pid, "shard": name, "val_loss_per_shard": references[f"alone-{i}"]}
                                      for i, (pid, name) in enumerate(zip(ids, names, strict=True))]
    data_parallel = references["data-parallel"]

    numel = sum(p.numel() for p in swarm_model.parameters())
    ddp_bytes = rounds * spec.round.inner_steps * allreduce_fp32_bytes_per_step(numel, len(ids))
    peers_out = [{"peer_id": m["peer_id"], "shard": n, "rounds_committed": m.get("counters", {}).get("committed", 0),
                  "final_model_sha256": m["model_sha256"], "bytes_sent": m.get("counters", {}).get("bytes_sent", 0),
                  "tokens": m.get("tokens_total", 0), **Credit.from_meta(m).view()} for m, n in zip(metas, names, strict=True)]
    result = {
        "peers": peers_out,
        "swarm": {"val_loss_mean": _mean(swarm), "val_loss_per_shard": swarm},
        "data_parallel": {"val_loss_mean": _mean(data_parallel), "val_loss_per_shard": data_parallel},
        "isolated": [dict(r, val_loss_mean=_mean(r["val_loss_per_shard"])) for r in isolated],
        "ddp_bytes_per_peer": ddp_bytes,
        "rounds": rounds, "inner_steps": spec.round.inner_steps, "spec_hash": spec.spec_hash,
        "eval_windows_per_shard": EVAL_WINDOWS, "seconds": timings,
    }
    write_json_atomic(out / "result.json", result)

    print("\nvalidation loss (lower is better), every model on every shard:", file=stdout)
    print(f"  {'model':<28}" + "  ".join(f"{n:>8}" for n in names) + f"  {'mean':>8}", file=stdout)
    print(_row("swarm (averaged)", swarm), file=stdout)
    for r in isolated:
        print(_row(f"alone on {r['shard']}", r["val_loss_per_shard"]), file=stdout)
    print(_row("data-parallel equivalent", data_parallel), file=stdout)
    print("\nbytes sent per peer:", file=stdout)
    for p in peers_out:
        print(f"  {p['peer_id'][-8:]}  {p['bytes_sent'] / 1e6:8.1f} MB   (per-step all-reduce: "
              f"{ddp_bytes / 1e6:,.0f} MB, {ddp_bytes / max(1, p['bytes_sent']):.0f}x more)", file=stdout)
    alone_means = [_mean(r["val_loss_per_shard"]) for r in isolated]
    beats = all(_mean(swarm) < m for m in alone_means)
    print(f"\nswarm mean {_mean(swarm):.4f} vs best peer alone {min(alone_means):.4f} vs data-parallel "
          f"{_mean(data_parallel):.4f}: the swarm {'beats' if beats else 'does NOT beat'} every peer alone.",
          file=stdout)
    print(f"wall time: swarm {timings['swarm_s']:.0f} s, then {timings['references_after_swarm_s']:.0f} s more "
          f"for the references; {timings['total_s']:.0f} s in all", file=stdout)
    print(f"wrote {out / 'result.json'}", file=stdout)
    from swarmfold.peer.inference import generate

    sample = generate(load_checkpoint_dir(list_checkpoints(workdirs[0])[0]), "def ", tokens=120, temperature=0.5)
    print("\na sample from the swarm model:\n" + "def " + sample, file=stdout)
    return 0 if beats else 1


def _mean(d: dict[str, float]) -> float:
    return sum(d.values()) / len(d)
