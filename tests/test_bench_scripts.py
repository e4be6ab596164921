"""Smoke tests of the benchmark scripts: a seconds-long run of each, checked for what the numbers must obey."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _run(script: str, tmp_path: Path, out: Path) -> None:
    cmd = [sys.executable, str(REPO / "scripts" / script), "--smoke", "--out", str(out), "--data",
           str(tmp_path / "data")]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.mark.slow
def test_bench_quality_smoke(tmp_path: Path) -> None:
    out = tmp_path / "quality.json"
    _run("bench_quality.py", tmp_path, out)
    report = json.loads(out.read_text())
    arms = report["arms"]
    assert {"data_parallel", "sequential", "isolated", "one_shot_merge", "swarm_default", "swarm_plain",
            "swarm_int8", "swarm_uncompressed"} <= set(arms)
    budget = report["setup"]["tokens_total"]
    h = report["setup"]["spec"]["round"]["inner_steps"]
    for name, arm in arms.items():
        if "same_as" in arm:
            assert arm["same_as"] in arms and "same_as" not in arms[arm["same_as"]]
            continue
        assert arm["curve"][-1][0] == budget, f"{name} did not train on the same token budget"
        assert all(a[0] < b[0] for a, b in zip(arm["curve"], arm["curve"][1:], strict=False))
        assert set(arm["val_loss"]) == {"shard-0", "shard-1", "shard-2", "shard-3"}
    assert arms["sequential"]["steps"] == 4 * arms["data_parallel"]["steps"]
    # butterfly members together send what a per-step fp32 all-reduce sends: H times fewer bytes uncompressed
    plain = arms["swarm_plain"]
    assert plain["compression"] == "none" and plain["bytes_reduction_vs_allreduce"] == h
    swarm = arms[arms["swarm_default"].get("same_as", "swarm_default")]
    if swarm["compression"] == "int8":
        assert 3.9 * h < swarm["bytes_reduction_vs_allreduce"] < 4 * h
    int8 = arms[arms["swarm_int8"].get("same_as", "swarm_int8")]
    assert 3.9 < report["checks"]["int8_bytes_reduction_vs_uncompressed"] < 4.0
    assert int8["compression"] == "int8"
    assert report["checks"]["swarm_hashes_agree_every_round"] is True
    matrix = arms["isolated"]["matrix_peer_by_shard"]
    assert len(matrix) == 4 and all(len(row) == 4 for row in matrix.values())
    assert out.with_suffix(".png").stat().st_size > 10_000


@pytest.mark.slow
def test_bench_frontier_smoke(tmp_path: Path) -> None:
    out = tmp_path / "frontier.json"
    _run("bench_frontier.py", tmp_path, out)
    report = json.loads(out.read_text())
    configs = report["configs"]
    assert {"H1-avg-none", "H2-avg-int8", "H4-avg-none", "H2-nest0.7m0.9-none"} <= set(configs)
    assert configs["H1-avg-none"]["bytes_reduction_vs_allreduce"] == 1.0
    assert configs["H4-avg-none"]["bytes_reduction_vs_allreduce"] == 4.0
    assert 3.9 * 2 < configs["H2-avg-int8"]["bytes_reduction_vs_allreduce"] < 4.0 * 2
    front = report["summary"]["pareto_front"]
    assert front, "the Pareto front is never empty"
    for a, b in zip(front, front[1:], strict=False):
        assert a["bytes_sent_per_peer"] < b["bytes_sent_per_peer"] and a["mean_val_loss"] > b["mean_val_loss"]
    cheapest = min(configs.values(), key=lambda r: (r["bytes_sent_per_peer"], r["mean_val_loss"]))
    assert front[0]["name"] == cheapest["config"]["name"]
    # resuming with the same settings re-uses every finished config instead of training again
    before = out.read_text()
    _run("bench_frontier.py", tmp_path, out)
    assert json.loads(out.read_text())["configs"] == json.loads(before)["configs"]
    assert out.with_suffix(".png").stat().st_size > 10_000


@pytest.mark.slow
def test_bench_scale_smoke(tmp_path: Path) -> None:
    """Two real peers on loopback, one round: the script reads back agreement, timings and memory."""
    out = tmp_path / "scale.json"
    cmd = [sys.executable, str(REPO / "scripts" / "bench_scale.py"), "--sizes", "2", "--rounds", "1",
           "--inner-steps", "2", "--timeout", "240", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    res = json.loads(out.read_text())["loopback"]["2"]
    assert res["exit_codes"] == [0, 0]
    assert res["statuses"] == {"committed": 2}
    assert res["per_round"] == [{"round": 0, "statuses": {"committed": 2}, "committed_group_sizes": [2],
                                 "distinct_models": 1, "tree_levels_above_the_group": [0],
                                 "adopted_a_larger_groups_model": 0}]
    assert res["every_group_committed_the_same_hash"] is True
    assert res["pss_peak_mib_per_peer"]["mean"] > res["model_and_optimizer_state_mib"] > 0
    assert res["allreduce_seconds_median"] is not None and res["allreduce_seconds_median"] > 0
    assert res["launch_wait"] is True  # --wait-for-peers 2
    assert set(res["connections_per_peer"]) == {"peak_max", "peak_median", "median"}  # sampled, 1-round run


@pytest.mark.slow
def test_bench_quality_options_smoke(tmp_path: Path) -> None:
    """--non-iid, --rounds, per-arm lr, a decaying schedule, --curve-every and an --arms subset."""
    out = tmp_path / "q.json"
    cmd = [sys.executable, str(REPO / "scripts" / "bench_quality.py"), "--smoke", "--out", str(out), "--data",
           str(tmp_path / "data"), "--non-iid", "--rounds", "3", "--swarm-lr", "4e-3", "--dp-lr", "3e-3",
           "--lr-schedule", "wsd", "--curve-every", "1", "--arms", "data_parallel,swarm_default"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert set(report["arms"]) == {"data_parallel", "swarm_default"}
    setup = report["setup"]
    assert setup["non_iid"] and setup["rounds"] == 3 and setup["inner_steps_per_peer"] == 6
    assert setup["inner_per_arm"]["swarm"] == {"lr": 4e-3, "lr_schedule": "wsd", "decay_steps": 6,
                                               "min_lr_ratio": 0.1, "wsd_decay_fraction": 0.2}
    assert setup["inner_per_arm"]["data_parallel"]["lr"] == 3e-3
    dp, swarm = report["arms"]["data_parallel"], report["arms"]["swarm_default"]
    assert set(dp["val_loss"]) == {"family-python", "family-c", "family-prose", "family-numeric"}
    assert len(dp["curve"]) == 6 and len(swarm["curve"]) == 3  # every step; every round's end
    assert report["checks"]["swarm_default_over_data_parallel_loss"] == swarm["over_data_parallel"]
    assert dp["over_data_parallel"] == 1.0


@pytest.mark.slow
def test_sweep_quality_smoke_resumes(tmp_path: Path) -> None:
    """One inner lr for both arms, then a second: the finished cells are kept, not trained again (the
    suite's budget: each cell is a training run)."""
    out = tmp_path / "sweep.json"

    def sweep(lrs: str) -> dict:
        cmd = [sys.executable, str(REPO / "scripts" / "sweep_quality.py"), "--grid", "inner-lr", "--lrs", lrs,
               "--out", str(out), "--", "--smoke", "--data", str(tmp_path / "data")]
        proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        return json.loads(out.read_text())

    first = sweep("1e-3")
    assert set(first["cells"]) == {"data_parallel lr=0.001 constant", "swarm lr=0.001 constant"}
    second = sweep("1e-3,4e-3")
    assert len(second["cells"]) == 4
    assert all(second["cells"][k] == v for k, v in first["cells"].items())  # kept as they were
    pairs = second["summary"]["pairs"]
    assert len(pairs) == 2 and all(p["swarm_over_data_parallel"] > 0 for p in pairs)
    assert out.with_suffix(".md").read_text().count("\n| swarm lr=") == 2


@pytest.mark.slow
def test_sweep_quality_muon_grid_runs_both_arms_with_muon(tmp_path: Path) -> None:
    """--grid muon-lr: data-parallel and the swarm both train with Muon at the cell's Muon lr (a fair
    ratio), AdamW (embeddings, head, norms) at --swarm-lr / --dp-lr."""
    out = tmp_path / "sweep.json"
    cmd = [sys.executable, str(REPO / "scripts" / "sweep_quality.py"), "--grid", "muon-lr", "--muon-lrs", "0.01",
           "--swarm-lr", "3e-3", "--jobs", "1", "--out", str(out), "--", "--smoke", "--data", str(tmp_path / "data")]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    cells = json.loads(out.read_text())["cells"]
    assert set(cells) == {"data_parallel muon_lr=0.01 adamw_lr=0.002 constant",
                          "swarm muon_lr=0.01 adamw_lr=0.003 constant"}
    for c in cells.values():
        assert c["inner"]["optimizer"] == "muon" and c["inner"]["muon_lr"] == 0.01
    assert {c["inner"]["lr"] for c in cells.values()} == {2e-3, 3e-3}
    assert json.loads(out.read_text())["summary"]["pairs"][0]["swarm_over_data_parallel"] > 0
