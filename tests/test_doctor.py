"""`swarmfold doctor`: a free and a taken API port, a missing bootstrap peer, a live one and a skewed clock."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from conftest import fast_spec, write_spec
from swarm_helpers import connected_swarms

from swarmfold.averaging.identity import load_or_create_identity
from swarmfold.averaging.records import PeerRecord
from swarmfold.cli import main
from swarmfold.daemon.doctor import run_doctor


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _problems(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("PROBLEM")]


def test_all_well_with_a_free_port(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    port = _free_port()
    assert main(["doctor", "--workdir", str(tmp_path), "--api-port", str(port), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert _problems(out) == []
    assert f"ok       api port   127.0.0.1:{port} is free" in out
    for name in ("versions", "device", "disk", "threads"):
        assert f"ok       {name}" in out
    assert "--device auto would use " in out
    assert out.rstrip().endswith("all checks passed: this machine can join")


def test_a_taken_port_is_one_problem_naming_the_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert main(["doctor", "--workdir", str(tmp_path), "--api-port", str(port), "--threads", "1"]) == 1
    problems = _problems(capsys.readouterr().out)
    assert len(problems) == 1
    assert problems[0].startswith(f"PROBLEM  api port   127.0.0.1:{port} is taken")
    assert "fix: stop what holds it" in problems[0] and "--api-port" in problems[0]


def test_a_missing_bootstrap_peer_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dead = f"/ip4/127.0.0.1/tcp/{_free_port()}/p2p/{load_or_create_identity(tmp_path / 'k.key').peer_id}"
    spec = write_spec(fast_spec(network={"bootstrap_peers": [dead]}), tmp_path / "spec.toml")
    assert main(["doctor", "--spec", str(spec), "--workdir", str(tmp_path), "--api-port", "0",
                 "--threads", "1", "--timeout", "2"]) == 1
    problems = _problems(capsys.readouterr().out)
    assert len(problems) == 1
    assert problems[0].startswith(f"PROBLEM  bootstrap  {dead} does not answer (Connection refused)")
    assert "fix: check the address and that the peer runs" in problems[0]


@pytest.mark.slow
def test_a_live_bootstrap_peer_answers_and_a_skewed_clock_is_found(tmp_path: Path) -> None:
    spec = fast_spec()
    with connected_swarms(spec, tmp_path / "keys", ["boot"]) as (boot,):
        boot.publish(PeerRecord(peer_id=boot.peer_id, round=3, model_sha256="0" * 64, outer_sha256="0" * 64,
                                spec_hash=spec.spec_hash, client_mode=False, maddrs=boot.maddrs, state="training"))
        checks = run_doctor(spec=spec, workdir=tmp_path, threads=1, api_port=0, initial_peers=boot.maddrs[:1])
        lines = [c.line() for c in checks]
        assert [c for c in checks if not c.ok] == [], lines
        assert any(line.startswith(f"ok       bootstrap  {boot.maddrs[0]} answers") for line in lines)
        assert any(line.startswith("ok       clock      within") and "of 1 peers' clocks" in line for line in lines)

        ahead = run_doctor(spec=spec, workdir=tmp_path, threads=1, api_port=0, initial_peers=boot.maddrs[:1],
                           clock=lambda: time.time() + 600)
        problems = [c.line() for c in ahead if not c.ok]
        assert len(problems) == 1, problems
        assert problems[0].startswith("PROBLEM  clock      this machine's clock is ahead of the swarm's by at least")
        assert "timedatectl set-ntp true" in problems[0]

        other = fast_spec(round={"inner_steps": 6})  # another swarm's spec: the bootstrap peer refuses it
        wrong = run_doctor(spec=other, workdir=tmp_path, threads=1, api_port=0, initial_peers=boot.maddrs[:1])
        problems = [c.line() for c in wrong if not c.ok]
        assert len(problems) == 1 and "refused by" in problems[0] and "--spec" in problems[0], problems
