"""Smoke runs of the swarm benchmarks (scripts/bench_allreduce.py, scripts/bench_round.py) with tiny sizes.

Both start real peers (separate processes with their own DHT and libp2p daemon), so they
are marked slow. They check what the numbers must obey, never how fast anything was.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def _run(args: list[str], cwd: Path, timeout: float = 240) -> None:
    proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def test_bench_allreduce_smoke(tmp_path: Path) -> None:
    """4 swarmfold peers and 4 hivemind peers average 64k floats, one measured repeat each."""
    out = tmp_path / "allreduce.json"
    _run([str(REPO / "scripts" / "bench_allreduce.py"), "--numel", "65536", "--repeats", "1", "--pause", "0",
          "--out", str(out)], tmp_path)
    report = json.loads(out.read_text())
    summary = report["summary"]
    sf, hm = summary["swarmfold"], summary["hivemind"]
    assert sf["repeats_ok"] == 1
    # every swarmfold peer holds the same bits, and they are the weighted mean of the inputs
    assert sf["all_peers_bit_identical_every_repeat"] is True
    assert sf["distinct_results_per_repeat"] == [1]
    assert sf["max_abs_error_vs_float64_mean"] < 1e-6
    row = report["runs"]["swarmfold"][0]
    assert all(p["status"] == "committed" and p["included"] == 4 and p["group_size"] == 4 for p in row["peers"])
    # each sent its spans to the 3 other reducers on direct streams, none through libp2p
    assert all(p["direct_streams_opened"] >= 3 and p["direct_streams_fell_back"] == 0 for p in row["peers"])
    for p in row["peers"]:  # the phases lie inside the call they were measured in
        assert 0 < p["timings"]["allreduce"] and sum(p["timings"].values()) <= p["seconds"]
    assert sf["mbps_after_matchmaking"] >= sf["mbps_whole_call"] > 0
    # hivemind is the baseline: its averager may fail a repeat on loaded cores (a 120 s timeout was seen
    # at load 8), which the script reports and leaves out of the ratios; its plumbing must still have
    # completed one all-reduce of 4 peers, the warm-up or the repeat
    hm_runs = [r for r in (report["warmup"]["hivemind"], report["runs"]["hivemind"][0]) if r["ok"]]
    assert hm_runs and all(p["group_size"] == 4 for p in hm_runs[0]["peers"])
    if hm["repeats_ok"] == 1:
        assert hm["max_abs_error_vs_float64_mean"] < 1e-5  # hivemind averages too (its bits may differ by peer)
        assert hm["mbps_after_matchmaking"] >= hm["mbps_whole_call"] > 0
        assert summary["ratio_after_matchmaking"] == pytest.approx(
            sf["mbps_after_matchmaking"] / hm["mbps_after_matchmaking"])
    else:
        assert summary["hivemind"]["failed_repeats"] and "ratio_after_matchmaking" not in summary
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_bench_round_smoke(tmp_path: Path) -> None:
    """2 real `swarmfold run` peers, 2 short rounds: the split adds up to the wall time."""
    out = tmp_path / "round.json"
    _run([str(REPO / "scripts" / "bench_round.py"), "--smoke", "--out", str(out)], tmp_path)
    report = json.loads(out.read_text())
    rows = report["rounds"]
    assert sorted((r["round"], r["peer"]) for r in rows) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert report["agreement"] == {"every_round_committed_by_all": True, "same_model_every_round": True}
    for r in rows:
        phases = r["train"] + r["matchmaking"] + r["allreduce"] + r["commit"]
        assert r["train"] > 0 and r["allreduce"] > 0 and 0 < phases <= r["wall"]
        assert r["between"] == pytest.approx(r["wall"] - phases)
        assert 0 <= r["checkpoint_write"] <= r["between"]
        assert r["utilization"] == pytest.approx(r["train"] / r["wall"])
    steady = report["steady_state"]
    assert steady["rounds_counted"] == 2
    assert sum(steady["share_of_wall"].values()) == pytest.approx(1.0)
    assert steady["utilization"] == pytest.approx(steady["share_of_wall"]["train"])
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_bench_hetero_smoke(tmp_path: Path) -> None:
    """4 real peers, the last at power = light, 2 steps rounds then time rounds: the report adds up."""
    out = tmp_path / "hetero.json"
    _run([str(REPO / "scripts" / "bench_hetero.py"), "--smoke", "--out", str(out)], tmp_path, timeout=400)
    report = json.loads(out.read_text())
    assert report["setup"]["slow_duty_cycle"] == 0.25
    for name in ("steps", "time"):
        arm = report["arms"][name]
        assert arm["spec_round"]["mode"] == name
        assert arm["rounds_committed_by_peer0"] >= 1, arm  # peer 0 averaged with someone in both modes
        peers = arm["peers"]
        assert [p["peer"] for p in peers] == [0, 1, 2, 3]
        assert [p["power"] for p in peers] == ["full", "full", "full", "light"]
        for p in peers:
            assert p["tokens_trained"] > 0
            assert p["tokens_counted"] + p["tokens_pending"] + p["tokens_wasted"] == p["tokens_trained"]
            assert 0.0 <= p["share_counted"] <= p["share_reached"] <= 1.0
            assert all(1 <= s <= report["setup"]["h"] for s in p["steps_per_round"])
            for r in p["rounds"]:
                assert r["idle"] == pytest.approx(r["wall"] - r["train"], abs=1e-2)
        assert arm["tokens_trained_total"] == sum(p["tokens_trained"] for p in peers)
        tokens = [pt["tokens"] for pt in arm["curve"]]
        assert tokens == sorted(tokens) and tokens[-1] == arm["tokens_trained_total"]
        assert all(math.isfinite(pt["val_loss"]) for pt in arm["curve"])
    # steps mode: every peer trains H steps in every round it logs
    assert all(s == report["setup"]["h"] for p in report["arms"]["steps"]["peers"] for s in p["steps_per_round"])
    c = report["comparison"]
    assert c["token_budget"] == report["arms"]["steps"]["tokens_trained_total"]
    assert set(c["val_loss_at_budget"]) == {"steps", "time"}
    assert out.with_suffix(".png").stat().st_size > 10_000
