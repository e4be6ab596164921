"""Real background peers: start / status / pause / resume / stop, and kill -9 then start.

Every peer here is a `swarmfold start` process with the real round loop on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import fast_spec, write_spec
from daemon_helpers import NET, api_status, daemons, finished_rounds, start, swarmfold, wait_status  # noqa: F401

from swarmfold.daemon.lifecycle import CHILDREN_FILE, running_pid
from swarmfold.peer.checkpoint import list_checkpoints, load_checkpoint_dir
from swarmfold.peer.device import resolve_device

pytestmark = pytest.mark.slow


def alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.Error:
            pass
    return out


def wait_gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not alive(pids)


ORPHAN_PROBE = """
import json, os, signal, sys
import psutil
from swarmfold.averaging.transport import OrphanSafeDHT
dht = OrphanSafeDHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
children = [p.pid for p in psutil.Process().children(recursive=True)]
with open(sys.argv[1], "w") as f:
    json.dump(children, f)
os.kill(os.getpid(), signal.SIGKILL)  # the main process only, as a user's kill -9 would
"""


def test_the_dht_process_and_its_daemon_end_when_the_main_process_is_killed(
        tmp_path: Path, procs: list[subprocess.Popen]) -> None:
    """Without OrphanSafeDHT both kept running (705 s, until ended by hand), with the peer's identity,
    port and connections (docs/swarm.md, "A restarted peer and the survivors")."""
    out = tmp_path / "children.json"
    p = subprocess.Popen([sys.executable, "-c", ORPHAN_PROBE, str(out)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    procs.append(p)
    assert p.wait(timeout=120) == -signal.SIGKILL
    children = json.loads(out.read_text())
    assert len(children) >= 2, children  # the DHT process and its p2pd (and maybe torch's shm manager)
    assert wait_gone(children, timeout=30), f"still running: {alive(children)}"


@pytest.fixture
def spec_path(tmp_path: Path) -> Path:
    return write_spec(fast_spec(averaging=NET), tmp_path / "spec.toml")


@pytest.fixture
def solo_spec_path(tmp_path: Path) -> Path:
    """One peer alone: a short matchmaking timeout, so it steps alone soon."""
    return write_spec(fast_spec(averaging=dict(NET, matchmaking_timeout=1.0)), tmp_path / "solo.toml")


@pytest.fixture(autouse=True)
def _isolated_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))


def test_start_status_pause_resume_stop_then_start_resumes(tmp_path: Path, shards: list[Path],
                                                         solo_spec_path: Path,
                                                         daemons: list[Path]) -> None:  # noqa: F811
    w, spec_path = tmp_path / "peer", solo_spec_path
    daemons.append(w)
    out = start(w, spec_path, shards[0])
    assert out.returncode == 0, out.stderr
    assert "dashboard: http://127.0.0.1:" in out.stdout and "join with: --initial-peers /ip4/127.0.0.1/" in out.stdout

    again = start(w, spec_path, shards[0])
    assert again.returncode == 3
    assert "already running in" in again.stderr and "swarmfold stop --workdir" in again.stderr

    first = wait_status(w, "a finished round", lambda s: finished_rounds(s) >= 1 and s["loss"] is not None)
    assert first["device"].startswith(resolve_device("auto").type) and first["precision"] == "fp32"
    text = swarmfold("status", "--workdir", str(w), check=True).stdout
    for label in ("state", "device", "round", "peers seen", "loss", "tokens/s", "checkpoint", "dashboard"):
        assert f"  {label}" in text, text
    assert "reached the swarm's model" in text, text

    assert "paused" in swarmfold("pause", "--workdir", str(w), check=True).stdout
    paused = wait_status(w, "the pause", lambda s: s["state"] == "paused")
    time.sleep(4)  # more than two rounds' worth: a paused peer skips rounds
    still = api_status(w)
    assert still is not None and still["state"] == "paused" and finished_rounds(still) == finished_rounds(paused)
    assert "paused (paused by the user)" in swarmfold("status", "--workdir", str(w), check=True).stdout

    assert "resumed" in swarmfold("resume", "--workdir", str(w), check=True).stdout
    wait_status(w, "a round after resuming", lambda s: finished_rounds(s) > finished_rounds(paused))

    stopped = swarmfold("stop", "--workdir", str(w), "--timeout", "120")
    assert stopped.returncode == 0 and "cleanly" in stopped.stdout, stopped.stderr
    assert running_pid(w) is None
    exit_info = json.loads((w / "daemon.exit.json").read_text())
    assert exit_info["code"] == 0
    newest = list_checkpoints(w)[0]
    assert exit_info["checkpoint"] == str(newest)
    ckpt = load_checkpoint_dir(newest)  # sound: every file matches its hash
    k, tokens_before = ckpt.round, int(ckpt.meta["tokens_total"])
    offline = swarmfold("status", "--workdir", str(w))
    assert offline.returncode == 1 and "not running" in offline.stdout and f"round {k}," in offline.stdout

    assert start(w, spec_path, shards[0]).returncode == 0
    assert (api_status(w) or {}).get("round", -1) >= k  # shown from the start, not only after a round
    snap = wait_status(w, "a round after the restart", lambda s: len(s["history"]) >= 1)
    assert snap["history"][0]["round"] == k  # it went on with the round after the last one it finished
    # the lifetime token count goes on from the checkpoint's
    assert snap["tokens_total"] == tokens_before + sum(h["tokens"] for h in snap["history"])
    # and so does its credit: a peer alone keeps its tokens pending (docs/daemon.md, "Credit")
    assert ckpt.meta["credit"]["local"] + ckpt.meta["credit"]["carried"] == tokens_before
    assert snap["tokens_pending"] == snap["tokens_total"] and snap["tokens_counted"] == snap["tokens_wasted"] == 0
    log = (w / "logs" / "swarmfold.log").read_text()
    assert f"resumed from {newest} (round {k}," in log
    assert len(swarmfold("logs", "--workdir", str(w), "-n", "5", check=True).stdout.splitlines()) == 5
    assert swarmfold("stop", "--workdir", str(w), "--timeout", "120").returncode == 0


def test_kill9_then_start_resumes_from_newest_valid_checkpoint_and_rejoins(
        tmp_path: Path, shards: list[Path], spec_path: Path, daemons: list[Path]) -> None:  # noqa: F811
    a, b = tmp_path / "a", tmp_path / "b"
    daemons.extend([a, b])
    assert start(a, spec_path, shards[0]).returncode == 0
    maddrs = wait_status(a, "addresses", lambda s: bool(s["visible_maddrs"]))["visible_maddrs"]
    assert start(b, spec_path, shards[1], "--initial-peers", *maddrs).returncode == 0
    wait_status(b, "a committed round", lambda s: s["rounds"].get("committed", 0) >= 1)

    wait_status(b, "training", lambda s: s["state"] == "training", timeout=60)
    pid = running_pid(b)
    assert pid and pid > 0
    os.kill(pid, signal.SIGKILL)  # the main process only, as a user's kill -9 would
    deadline = time.monotonic() + 10
    while running_pid(b) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert running_pid(b) is None
    # its DHT process and libp2p daemon end by themselves, once they see the main process gone
    children = [pid for pid, _ in json.loads((b / CHILDREN_FILE).read_text())["children"]]
    assert children
    assert wait_gone(children, timeout=30), f"left running after the main process died: {alive(children)}"

    ckpts = list_checkpoints(b)
    damaged, valid = ckpts[0], ckpts[1]
    with open(damaged / "model.safetensors", "r+b") as f:  # as if the disk lost the end of the write
        f.truncate(100)
    valid_round = load_checkpoint_dir(valid).round

    assert start(b, spec_path, shards[1], "--initial-peers", *maddrs).returncode == 0
    wait_status(b, "the resume", lambda s: s["state"] not in ("starting",))
    log = (b / "logs" / "swarmfold.log").read_text()
    assert f"skipping damaged checkpoint: {damaged / 'model.safetensors'}" in log
    assert f"resumed from {valid} (round {valid_round}," in log

    def rejoined(s: dict) -> bool:
        agree = s["summary"]["hash_agreement"]
        return (s["rounds"].get("committed", 0) >= 1 and s["summary"]["peers_alive"] == 2
                and agree["at_round"] == 2 and agree["agree"] == 2)

    snap = wait_status(b, "a committed round with the other peer, on the same model", rejoined, also=(a,))
    assert snap["round"] > valid_round
    restarted = (b / "logs" / "swarmfold.log").read_text().rsplit("swarmfold peer starting in", 1)[1]
    assert "SIGTERM" not in restarted
    for w in (a, b):
        assert swarmfold("stop", "--workdir", str(w), "--timeout", "120").returncode == 0


def test_start_reports_a_peer_that_fails_to_start(tmp_path: Path, solo_spec_path: Path,
                                                  daemons: list[Path]) -> None:  # noqa: F811
    w = tmp_path / "peer"
    daemons.append(w)
    out = start(w, solo_spec_path, tmp_path / "no-such-shard")
    assert out.returncode == 2, out.stdout + out.stderr
    assert "exited with code 2 while starting" in out.stderr and "no such file or folder" in out.stderr
    assert running_pid(w) is None
    (w / "settings.toml").write_text('power = "turbo"\n')  # refused before anything starts
    out = start(w, solo_spec_path, tmp_path / "no-such-shard")
    assert out.returncode == 2 and "power = 'turbo'" in out.stderr
