"""The device check: the determinism contract on one accelerator, end to end (run by device_check.sh).

Run (on a machine with a GPU; scripts/device_check.sh picks the Python and the time limit):
    .venv/bin/python scripts/device_check.py --device cuda --out results/device_check.json
    .venv/bin/python scripts/device_check.py --device cpu --quick --out /tmp/dc.json   # the dry run on a CPU

Every check runs the real commands as child processes (`swarmfold train`, `swarmfold run`,
`swarmfold simulate`, scripts/bench_inner_loop.py) with `--device DEVICE`:

1. train_twice: two `train` runs of the same spec and data give the same sha256 of every
   checkpoint tensor file (model, inner and outer optimizer);
2. resume: 1 round, then on to 2 in the same workdir, equals 2 rounds straight through;
3. bf16: the same two runs with `inner.precision = "bf16"` agree bit for bit, and differ from fp32;
4. swarm_equals_simulate: two `swarmfold run` peers sharing the device (127.0.0.1, min group 2)
   commit, round by round, the model `swarmfold simulate` computes on the same device;
5. inner_loop_speed: bench_inner_loop.py --quick on the device, fp32 and bf16: the tokens/s
   ratio against a plain PyTorch loop (target >= 0.97; reported, not a pass condition, since
   a ratio on a shared machine is a measurement), with MFU on GPUs.

Writes one JSON (--out) with each check's verdict, figures and seconds, the device's
environment class and the command line; exits 0 if every check passed, 1 otherwise, 2 when
the device is missing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from swarmfold.averaging.identity import load_or_create_identity
from swarmfold.peer.corpus import write_stdlib_shards
from swarmfold.peer.device import DeviceError, device_environment, resolve_device, torch_build
from swarmfold.spec import Spec, preset, to_toml

REPO = Path(__file__).resolve().parent.parent
TENSOR_FILES = ("model.safetensors", "inner_optimizer.safetensors", "outer_optimizer.safetensors")
NET = {"matchmaking_timeout": 20.0, "join_timeout": 10.0, "allreduce_timeout": 30.0, "commit_timeout": 10.0,
       "state_sync_timeout": 60.0, "min_group_size": 2}


def check_spec(device_type: str, precision: str = "fp32") -> Spec:
    """Small, so the whole check fits in minutes; on a GPU wide enough to run real cuBLAS GEMMs."""
    base = preset("tiny")
    if device_type == "cpu":
        shape: dict[str, Any] = {}
        data, inner = {"seq_len": 64}, {"batch_size": 8, "warmup_steps": 5}
    else:
        shape = {"hidden_size": 256, "intermediate_size": 704, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2}
        data, inner = {"seq_len": 128}, {"batch_size": 16, "warmup_steps": 5}
    return base.replace(model=shape, data=data, inner=dict(inner, precision=precision),
                        round={"inner_steps": 5, "mode": "steps"}, averaging=NET)  # H steps: bitwise checks


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ckpt_dir(workdir: Path, round_idx: int) -> Path:
    return workdir / "checkpoints" / f"round-{round_idx:06d}"


def file_hashes(workdir: Path, round_idx: int) -> dict[str, str]:
    return {name: sha256(ckpt_dir(workdir, round_idx) / name) for name in TENSOR_FILES}


def model_hashes(workdir: Path) -> dict[int, str]:
    out = {}
    for d in sorted((workdir / "checkpoints").glob("round-*")):
        meta = json.loads((d / "meta.json").read_text())
        out[int(meta["round"])] = str(meta["model_sha256"])
    return out


def swarmfold(*args: str) -> list[str]:
    return [sys.executable, "-m", "swarmfold", *args]


def run(cmd: list[str], timeout: float, log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:5])} ... exited with {p.returncode}:\n{tail(log)}")


def tail(log: Path, lines: int = 25) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else "(no log)"


def train_cmd(spec: Path, data: Path, workdir: Path, rounds: int, device: str) -> list[str]:
    return swarmfold("train", "--spec", str(spec), "--data", str(data), "--workdir", str(workdir), "--rounds",
                     str(rounds), "--threads", "1", "--device", device, "--keep", "100")


def train_pair(spec: Path, data: Path, a: Path, b: Path, rounds: int, device: str, timeout: float) -> None:
    """Two `train` runs at the same time (the device shared, as two volunteers' runs would not be)."""
    procs = []
    for w in (a, b):
        w.mkdir(parents=True, exist_ok=True)
        log = open(w / "train.log", "ab")
        procs.append((subprocess.Popen(train_cmd(spec, data, w, rounds, device), stdout=log,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL), w))
    for p, w in procs:
        if p.wait(timeout=timeout) != 0:
            raise RuntimeError(f"train in {w} exited with {p.returncode}:\n{tail(w / 'train.log')}")


class Checks:
    def __init__(self, device: str, root: Path, quick: bool, timeout: float):
        self.device, self.root, self.quick, self.timeout = device, root, quick, timeout
        self.kind = resolve_device(device).type
        self.results: dict[str, dict[str, Any]] = {}
        self.shards = write_stdlib_shards(2, root / "data", max_bytes_per_shard=300_000)
        self.specs = {p: self._write(check_spec(self.kind, p), f"spec-{p}.toml") for p in ("fp32", "bf16")}

    def _write(self, spec: Spec, name: str) -> Path:
        path = self.root / name
        path.write_text(to_toml(spec), encoding="utf-8")
        return path

    def run(self, name: str, fn: Callable[[], dict[str, Any]]) -> None:
        print(f"device_check: {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            result = fn()
        except Exception as e:  # a check that cannot run is a failed check, with its reason
            result = {"passed": False, "error": f"{type(e).__name__}: {e}"}
        result["seconds"] = round(time.perf_counter() - t0, 1)
        self.results[name] = result
        verdict = "PASS" if result["passed"] else "FAIL"
        print(f"device_check: {name}: {verdict} ({result['seconds']} s)"
              + (f"\n{result['error']}" if "error" in result else ""), flush=True)

    # ---- the checks ----------------------------------------------------------------------
    def train_twice_and_resume(self) -> None:
        rounds = 2
        a, b, c = (self.root / "fp32" / n for n in "abc")

        def twice() -> dict[str, Any]:
            train_pair(self.specs["fp32"], self.shards[0], a, b, rounds, self.device, self.timeout)
            ha, hb = file_hashes(a, rounds), file_hashes(b, rounds)
            env = json.loads((ckpt_dir(a, rounds) / "meta.json").read_text())["environment"]
            return {"passed": ha == hb and env.get("device") == self.kind, "run_a": ha, "run_b": hb,
                    "checkpoint_environment": env}

        def resume() -> dict[str, Any]:
            run(train_cmd(self.specs["fp32"], self.shards[0], c, 1, self.device), self.timeout, c / "train.log")
            run(train_cmd(self.specs["fp32"], self.shards[0], c, rounds, self.device), self.timeout,
                c / "train.log")
            hc, ha = file_hashes(c, rounds), file_hashes(a, rounds)
            return {"passed": hc == ha, "resumed": hc, "straight": ha}

        self.run("train_twice", twice)
        self.run("resume", resume)

    def bf16(self) -> None:
        rounds = 2
        a, b = self.root / "bf16" / "a", self.root / "bf16" / "b"

        def check() -> dict[str, Any]:
            train_pair(self.specs["bf16"], self.shards[0], a, b, rounds, self.device, self.timeout)
            ha, hb = file_hashes(a, rounds), file_hashes(b, rounds)
            fp32 = self.root / "fp32" / "a"
            differs = (ckpt_dir(fp32, rounds).is_dir()
                       and ha["model.safetensors"] != file_hashes(fp32, rounds)["model.safetensors"])
            return {"passed": ha == hb and differs, "run_a": ha, "run_b": hb, "differs_from_fp32": differs}

        self.run("bf16_deterministic", check)

    def swarm_equals_simulate(self) -> None:
        rounds = 2

        def check() -> dict[str, Any]:
            spec = self.specs["fp32"]
            workdirs = [self.root / "swarm" / f"peer-{i}" for i in range(2)]
            procs: list[subprocess.Popen] = []
            try:
                for i, w in enumerate(workdirs):
                    w.mkdir(parents=True, exist_ok=True)
                    cmd = swarmfold("run", "--spec", str(spec), "--data", str(self.shards[i]), "--workdir", str(w),
                                    "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--rounds", str(rounds), "--threads",
                                    "1", "--keep", "100", "--api-port", "0", "--device", self.device)
                    if i:
                        cmd += ["--initial-peers", *self._wait_ready(workdirs[0], procs[0])["maddrs"][:1]]
                    log = open(w / "peer.log", "ab")
                    procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                  start_new_session=True))
                for p, w in zip(procs, workdirs, strict=True):
                    if p.wait(timeout=self.timeout) != 0:
                        raise RuntimeError(f"peer in {w} exited with {p.returncode}:\n{tail(w / 'peer.log')}")
            finally:
                for p in procs:
                    if p.poll() is None:
                        os.killpg(p.pid, signal.SIGKILL)
                        p.wait(timeout=10)
            ids = [load_or_create_identity(w / "identity.key").peer_id for w in workdirs]
            sim = self.root / "sim"
            run(swarmfold("simulate", "--spec", str(spec), "--data", *map(str, self.shards), "--rounds", str(rounds),
                          "--out", str(sim), "--peer-ids", *ids, "--threads", "1", "--device", self.device),
                self.timeout, self.root / "simulate.log")
            want = model_hashes(sim / "peer-0")
            got = [model_hashes(w) for w in workdirs]
            same = all(r in want and g.get(r) == want[r] for g in got for r in range(1, rounds + 1))
            return {"passed": same, "simulate": want, "peers": got, "peer_ids": ids}

        self.run("swarm_equals_simulate", check)

    def _wait_ready(self, workdir: Path, proc: subprocess.Popen) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"peer in {workdir} exited with {proc.returncode}:\n{tail(workdir / 'peer.log')}")
            try:
                return dict(json.loads((workdir / "peer.json").read_text()))
            except (FileNotFoundError, json.JSONDecodeError):
                time.sleep(0.3)
        raise TimeoutError(f"peer in {workdir} did not come up within {self.timeout:.0f} s")

    def speed(self) -> None:
        def check() -> dict[str, Any]:
            out = self.root / "bench_inner_loop.json"
            steps, repeats = ("6", "1") if self.quick else ("12", "2")
            run([sys.executable, str(REPO / "scripts" / "bench_inner_loop.py"), "--devices", self.device,
                 "--precisions", "fp32", "bf16", "--quick", "--steps", steps, "--repeats", repeats,
                 "--gpu-preset", "small", "--out", str(out)], self.timeout, self.root / "bench.log")
            bench = json.loads(out.read_text())
            configs = [{k: c[k] for k in ("device", "precision", "ratio", "tokens_per_second_lockstep", "mfu",
                                          "same_weights_bitwise")} for c in bench["configs"]]
            return {"passed": bool(bench["same_weights_bitwise"]), "ratio_min": bench["ratio_min"],
                    "meets_target": bench["meets_target"], "configs": configs}

        self.run("inner_loop_speed", check)


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--device", default="cuda", help="the device to check (default cuda)")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "device_check.json")
    ap.add_argument("--quick", action="store_true", help="shortest benchmark (the CPU dry run uses it)")
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds any one command may take")
    ap.add_argument("--workdir", type=Path, default=None, help="where runs go (default: a temporary folder)")
    args = ap.parse_args()
    try:
        device = resolve_device(args.device)
    except DeviceError as e:
        print(f"device_check: error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="device-check-") as tmp:
        root = args.workdir or Path(tmp)
        if root.exists() and any(root.iterdir()):
            print(f"device_check: error: --workdir {root} is not empty; earlier runs would be resumed, not "
                  "repeated; give an empty or new folder", file=sys.stderr)
            return 2
        root.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("SWARMFOLD_CACHE", str(root / "cache"))
        checks = Checks(args.device, root, args.quick, args.timeout)
        checks.train_twice_and_resume()
        checks.bf16()
        checks.swarm_equals_simulate()
        checks.speed()
    passed = all(r["passed"] for r in checks.results.values())
    report = {
        "check": "device_check", "device": str(device), "passed": passed,
        "environment": dict(device_environment(device), torch=torch_build()),
        "checks": checks.results, "seconds": round(time.perf_counter() - t0, 1),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    failed = [n for n, r in checks.results.items() if not r["passed"]]
    print(f"device_check on {device}: {'all checks passed' if passed else 'FAILED: ' + ', '.join(failed)} "
          f"in {report['seconds']:.0f} s; wrote {args.out}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
