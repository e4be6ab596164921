"""The daemon's parts in one process: settings, control API, /metrics, swarm summary, resources, lock.

The round loop is driven by hand here (a PeerStatus fed records); the real background
peer is exercised in test_daemon_lifecycle.py and test_dashboard_browser.py.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import fed_status
from prometheus_client.parser import text_string_to_metric_families

from swarmfold.daemon import api as api_mod
from swarmfold.daemon.api import ControlApi, RemoteBindRefused, ensure_token
from swarmfold.daemon.lifecycle import WorkdirLock, WorkdirLocked, follow, running_pid, tail_lines
from swarmfold.daemon.metrics import METRICS
from swarmfold.daemon.options import PeerOptions
from swarmfold.daemon.resources import BatteryReading, DutyCycle, OtherLoad, ResourceWatcher, rest
from swarmfold.daemon.service import run_service
from swarmfold.daemon.settings import Settings, SettingsError, load_settings, reload_settings
from swarmfold.daemon.state import Controls, PeerStatus
from swarmfold.daemon.summary import swarm_summary

# What issue 4 requires /metrics to have, as exposed (counters with _total, histogram via _count).
REQUIRED_SAMPLES = [
    "swarmfold_build_info", "swarmfold_round", "swarmfold_loss", "swarmfold_tokens_per_second",
    "swarmfold_tokens_trained_total", "swarmfold_peers_alive", "swarmfold_averaging_rounds_total",
    "swarmfold_allreduce_duration_seconds_count", "swarmfold_allreduce_duration_seconds_bucket",
    "swarmfold_sent_bytes_total", "swarmfold_received_bytes_total", "swarmfold_contributions_rejected_total",
    "swarmfold_last_checkpoint_timestamp_seconds", "swarmfold_paused",
]


@pytest.fixture(autouse=True)
def _no_user_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep ~/.config/swarmfold/settings.toml of whoever runs the tests out of them."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))


@pytest.fixture
def served(tmp_path: Path):
    status, controls, settings = fed_status(), Controls(), Settings()
    api = ControlApi(status=status, controls=controls, settings=settings, workdir=tmp_path,
                     token=ensure_token(tmp_path), host="127.0.0.1", port=0)
    api.start()
    yield api
    api.stop()


def http(url: str, *, method: str = "GET", token: str | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None,
                                 headers=headers or {})
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# ---- settings -------------------------------------------------------------------------
def test_settings_defaults_workdir_then_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    w = tmp_path / "w"
    w.mkdir()
    assert load_settings(w) == Settings()
    (tmp_path / "xdg" / "swarmfold").mkdir(parents=True)
    (tmp_path / "xdg" / "swarmfold" / "settings.toml").write_text('power = "medium"\n')
    assert load_settings(w).power == "medium"
    (w / "settings.toml").write_text('power = "light"\nthreads = 1\napi_port = 9000\n')
    s = load_settings(w)
    assert (s.power, s.threads, s.api_port, s.duty_cycle) == ("light", 1, 9000, 0.25)


def test_settings_errors_are_listed_together(tmp_path: Path) -> None:
    (tmp_path / "settings.toml").write_text('power = "turbo"\nthreads = true\ncolour = "red"\napi_port = 70000\n')
    with pytest.raises(SettingsError) as e:
        load_settings(tmp_path)
    msg = str(e.value)
    for part in ("power = 'turbo'", "light, medium, full", "threads = True should be int", "unknown key 'colour'",
                 "api_port = 70000"):
        assert part in msg
    (tmp_path / "settings.toml").write_text("power = \n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings(tmp_path)


def test_power_levels_are_duty_cycles() -> None:
    assert Settings(power="full").rest_seconds(2.0) == 0.0
    assert Settings(power="medium").rest_seconds(2.0) == 2.0
    assert Settings(power="light").rest_seconds(2.0) == 6.0
    s, c = Settings(power="light"), Controls()
    t0 = time.monotonic()
    rested = rest(s, c, 0.1)
    assert 0.29 <= rested and 0.29 <= time.monotonic() - t0 < 2.0
    c.request_stop()
    assert rest(s, c, 100.0) < 1.0  # a stop cuts the rest short


@pytest.mark.parametrize(("power", "duty"), [("full", 1.0), ("medium", 0.5), ("light", 0.25)])
def test_duty_cycle_between_inner_steps(power: str, duty: float) -> None:
    """The step hook the round loop calls: training takes `duty` of the wall-clock time."""
    hook, work = DutyCycle(Settings(power=power), Controls()), 0.05
    steps: list[float] = []  # what each stand-in step really took (a loaded machine oversleeps)
    t0 = time.monotonic()
    for step in range(5):
        hook(step)
        s = time.monotonic()
        time.sleep(work)  # a stand-in for one inner step's compute
        steps.append(time.monotonic() - s)
    wall = time.monotonic() - t0
    # a rest after each of the first 4 steps (the last one's rest would fall after the round), in proportion
    # to how long the step took; the rest itself may oversleep as much as a step does
    wanted = sum(steps[:4]) * (1 - duty) / duty
    assert wanted <= hook.rested + 1e-3 and hook.rested <= wanted * max(steps) / work + 0.02
    # so training takes `duty` of the wall-clock time, up to the hook's own few microseconds
    assert sum(steps) / wall == pytest.approx(sum(steps) / (sum(steps) + hook.rested), abs=0.02)
    assert sum(steps) / (sum(steps) + wanted) == pytest.approx(5 / (5 + 4 * (1 - duty) / duty), abs=0.05)


def test_reload_keeps_settings_in_force_on_a_bad_file(tmp_path: Path) -> None:
    s = Settings()
    (tmp_path / "settings.toml").write_text('power = "medium"\n')
    assert reload_settings(s, tmp_path) and s.power == "medium"
    (tmp_path / "settings.toml").write_text('power = "warp"\n')
    assert not reload_settings(s, tmp_path) and s.power == "medium"


# ---- control API ----------------------------------------------------------------------
def test_status_json(served: ControlApi) -> None:
    code, body = http(served.url + "api/status")
    snap = json.loads(body)
    assert code == 200
    assert snap["peer_id"] == "12D3KooWself" and snap["round"] == 2 and snap["loss"] == 4.1
    assert snap["device"] == "cpu" and snap["precision"] == "bf16"
    assert snap["summary"]["peers_alive"] == 2
    assert snap["summary"]["swarm_tokens_per_second"] == 2000.0
    assert snap["summary"]["my_share"] == 0.25
    assert [e["peer_id"] for e in snap["summary"]["leaderboard"]] == ["12D3KooWother", "12D3KooWself"]
    assert snap["summary"]["hash_agreement"] == {"round": 2, "model_sha256": "h1", "agree": 2, "at_round": 2,
                                                 "behind": 0, "ratio": 1.0, "distinct_hashes": 1}
    assert snap["last_checkpoint_age_s"] >= 5 and snap["rounds"] == {"committed": 1, "rolled_back": 1}
    # records at round 2 carry the losses of round 1, the round their peers finished last
    assert snap["swarm_loss_curve"] == [{"round": 1, "loss_mean": pytest.approx(4.2), "peers": 2}]


def test_changes_need_the_token(served: ControlApi, tmp_path: Path) -> None:
    token = (tmp_path / "control.token").read_text().strip()
    assert stat.S_IMODE((tmp_path / "control.token").stat().st_mode) == 0o600
    for bad in (None, "", "wrong-" + token):
        code, body = http(served.url + "api/pause", method="POST", token=bad)
        assert code == 401 and b"control.token" in body
    assert not served.controls.paused
    code, body = http(served.url + "api/pause", method="POST", token=token)
    assert code == 200 and json.loads(body)["paused"] is True and served.controls.paused
    assert json.loads(http(served.url + "api/status")[1])["pause_reasons"] == {"user": "paused by the user"}
    code, body = http(served.url + "api/resume", method="POST", token=token)
    assert code == 200 and not served.controls.paused


def test_user_resume_does_not_lift_a_battery_pause(served: ControlApi, tmp_path: Path) -> None:
    token = (tmp_path / "control.token").read_text().strip()
    served.controls.pause("battery", "on battery (40%)")
    http(served.url + "api/pause", method="POST", token=token)
    body = json.loads(http(served.url + "api/resume", method="POST", token=token)[1])
    assert body == {"paused": True, "pause_reasons": {"battery": "on battery (40%)"}}


def test_foreign_host_header_is_refused(served: ControlApi) -> None:
    """A web page that rebinds its DNS name to 127.0.0.1 still sends its own Host header."""
    code, _ = http(served.url + "api/status", headers={"Host": f"evil.example:{served.port}"})
    assert code == 403
    assert http(served.url + "api/status", headers={"Host": f"localhost:{served.port}"})[0] == 200


def test_metrics_parse_and_have_the_required_families(served: ControlApi) -> None:
    code, body = http(served.url + "metrics")
    assert code == 200
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    samples = {s.name: s for f in families.values() for s in f.samples}
    for name in REQUIRED_SAMPLES:
        assert name in samples, f"{name} missing from /metrics"
    for name in METRICS:
        assert name in samples or f"{name}_total" in samples or f"{name}_count" in samples, name
    assert samples["swarmfold_round"].value == 2
    assert samples["swarmfold_tokens_trained_total"].value == 2000
    assert samples["swarmfold_tokens_counted_total"].value == 1000
    assert samples["swarmfold_tokens_wasted_total"].value == 0
    assert samples["swarmfold_tokens_pending"].value == 1000
    assert samples["swarmfold_tokens_wasted_ratio"].value == 0.0
    assert samples["swarmfold_peers_alive"].value == 2
    assert samples["swarmfold_sent_bytes_total"].value == 2468
    assert samples["swarmfold_allreduce_duration_seconds_count"].value == 2
    rejected = [s for s in families["swarmfold_contributions_rejected"].samples if s.name.endswith("_total")]
    assert {s.labels["reason"]: s.value for s in rejected}["nonfinite"] == 2
    outcomes = {s.labels["outcome"]: s.value for s in families["swarmfold_averaging_rounds"].samples
                if s.name.endswith("_total")}
    assert outcomes["committed"] == 1 and outcomes["rolled_back"] == 1 and outcomes["failed"] == 0
    info = samples["swarmfold_build_info"].labels
    assert info["spec_hash"] == "f" * 64 and info["version"] and info["torch"]
    assert info["device"] == "cpu" and info["precision"] == "bf16"
    for s in samples.values():  # no per-peer labels
        assert not any("peer" in k for k in s.labels), s
    served.controls.pause()
    families = {f.name: f for f in text_string_to_metric_families(http(served.url + "metrics")[1].decode())}
    assert families["swarmfold_paused"].samples[0].value == 1


def test_dashboard_page_is_self_contained(served: ControlApi) -> None:
    code, body = http(served.url)
    page = body.decode()
    assert code == 200 and "<canvas" in page and "/api/status" in page
    for external in ("http://", "https://", "//cdn", "<link", "src="):
        assert external not in page.replace('href="/metrics"', "").replace('href="/api/status"', ""), external


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "::", "example.org"])
def test_non_loopback_bind_is_refused(tmp_path: Path, host: str) -> None:
    with pytest.raises(RemoteBindRefused, match="allow_remote_api"):
        ControlApi(status=PeerStatus(), controls=Controls(), settings=Settings(), workdir=tmp_path,
                   token="t" * 40, host=host, port=0)


def test_non_loopback_bind_when_explicitly_allowed(tmp_path: Path) -> None:
    api = ControlApi(status=fed_status(), controls=Controls(), settings=Settings(), workdir=tmp_path,
                     token="t" * 40, host="0.0.0.0", port=0, allow_remote=True)
    api.start()
    try:
        code, _ = http(f"http://127.0.0.1:{api.port}/api/status", headers={"Host": f"peer1:{api.port}"})
        assert code == 200
    finally:
        api.stop()


def test_taken_port_falls_back_to_a_free_one(served: ControlApi, tmp_path: Path) -> None:
    other = ControlApi(status=PeerStatus(), controls=Controls(), settings=Settings(), workdir=tmp_path,
                       token="t" * 40, port=served.port)
    other.start()
    try:
        assert other.port not in (0, served.port)
        assert http(other.url + "api/status")[0] == 200
    finally:
        other.stop()


def test_token_readable_by_others_is_replaced(tmp_path: Path) -> None:
    first = ensure_token(tmp_path)
    assert ensure_token(tmp_path) == first
    os.chmod(tmp_path / "control.token", 0o644)
    second = ensure_token(tmp_path)
    assert second != first and stat.S_IMODE((tmp_path / "control.token").stat().st_mode) == 0o600


# ---- swarm summary ---------------------------------------------------------------------
def test_hash_agreement_counts_disagreement_and_peers_behind() -> None:
    snap = fed_status().snapshot()
    snap["swarm"].update({
        "12D3KooWodd": {"round": 2, "model_sha256": "hX", "loss": 4.0, "tokens_total": 10, "tokens_per_second": 1},
        "12D3KooWlate": {"round": 1, "model_sha256": "h0", "loss": 4.4, "tokens_total": 5, "tokens_per_second": 1},
    })
    s = swarm_summary(snap)
    assert s["peers_alive"] == 4
    agree = s["hash_agreement"]
    assert (agree["round"], agree["agree"], agree["at_round"], agree["behind"], agree["distinct_hashes"]) == \
        (2, 2, 3, 1, 2)
    assert agree["ratio"] == pytest.approx(2 / 3)
    board = s["leaderboard"]
    # ranked by tokens that reached the model; records of older peers (no credit) read as unknown, last
    assert [e["peer_id"] for e in board] == ["12D3KooWother", snap["peer_id"], "12D3KooWodd", "12D3KooWlate"]
    assert [e["tokens_counted"] for e in board] == [3000, 1000, None, None]
    assert [e["tokens_wasted"] for e in board] == [2500, 0, None, None]
    assert [e["share"] for e in board] == [0.75, 0.25, 0.0, 0.0] and s["swarm_tokens_counted"] == 4000


def test_a_peer_alone_sees_itself() -> None:
    snap = PeerStatus(peer_id="me").snapshot()
    s = swarm_summary(snap)
    assert s["peers_alive"] == 1 and s["my_share"] == 1.0 and s["loss_mean"] is None


def test_status_says_which_tokens_reached_the_swarms_model() -> None:
    from swarmfold.cli.daemon import format_status

    snap = fed_status().snapshot()
    snap["summary"] = swarm_summary(snap)
    assert "  tokens      2,000 trained, 1,000 reached the swarm's model, 0 wasted, 1,000 pending" in \
        format_status(snap).splitlines()
    snap.update(tokens_total=12000, tokens_counted=9000, tokens_wasted=3000, tokens_pending=0)
    assert "tokens      12,000 trained, 9,000 reached the swarm's model, 3,000 wasted" in format_status(snap)
    del snap["tokens_counted"]  # what a peer of an older version answers
    assert "tokens      12,000 trained by this peer" in format_status(snap)


# ---- resources -------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_watcher_pauses_on_battery_and_resumes_on_ac() -> None:
    """No battery here: the reading is injected, the pause/resume logic is the real one."""
    reading: list[BatteryReading | None] = [BatteryReading(80, plugged=True)]
    controls = Controls()
    w = ResourceWatcher(settings=Settings(), controls=controls, battery=lambda: reading[0], other_load=lambda: 0.0)
    w.check()
    assert not controls.paused
    reading[0] = BatteryReading(55, plugged=False)
    w.check()
    assert controls.paused and "on battery (55%)" in controls.pause_reason
    controls.resume("user")  # the user's resume does not override the battery
    assert controls.paused
    reading[0] = BatteryReading(56, plugged=True)
    w.check()
    assert not controls.paused
    reading[0] = None  # no battery reported: never pauses
    w.check()
    assert not controls.paused


def test_watcher_idle_only_pauses_when_busy_and_resumes_after_idle_period() -> None:
    load: list[float | None] = [0.05]
    clock, controls = Clock(), Controls()
    settings = Settings(idle_only=True, idle_threshold=0.3, idle_resume_after_s=60)
    w = ResourceWatcher(settings=settings, controls=controls, battery=lambda: None,
                        other_load=lambda: load[0], clock=clock)
    w.check()
    assert not controls.paused
    load[0] = 0.8
    w.check()
    assert controls.paused and "machine busy" in controls.pause_reason
    load[0], clock.t = 0.1, 10.0
    w.check()
    clock.t = 50.0
    w.check()
    assert controls.paused  # idle for 40 s only
    clock.t = 71.0
    w.check()
    assert not controls.paused
    load[0] = 0.9
    w.check()
    assert controls.paused
    settings.idle_only = False  # a reload turning idle_only off lifts its pause
    w.check()
    assert not controls.paused


@pytest.mark.slow
def test_other_load_sees_a_busy_process() -> None:
    """The real measurement: two spinning processes on this machine register as others' load.

    The meter excludes its own process tree, so it watches from a separate idle process: the
    spinners (children of this test process) are then "other" load, as they would be for a peer."""
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    meter = OtherLoad(pid=idle.pid)
    assert meter.read() is None
    ncpu = os.cpu_count() or 1
    spinners = [idle] + [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(min(ncpu, 2))]
    want = 0.3 * min(ncpu, 2) / ncpu
    load: float | None = None
    try:  # each read measures the interval since the previous one: poll until the spinners show
        deadline = time.monotonic() + 60
        while (load is None or load < want) and time.monotonic() < deadline:
            time.sleep(1.0)  # the measuring interval, not a synchronisation
            load = meter.read()
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    assert load is not None and load >= want


# ---- lock and logs ---------------------------------------------------------------------
def test_workdir_lock_is_exclusive_across_processes(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from swarmfold.daemon.lifecycle import WorkdirLock; "
        f"l = WorkdirLock({str(tmp_path)!r}); l.acquire(); print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert running_pid(tmp_path) == holder.pid
        with pytest.raises(WorkdirLocked, match=f"pid {holder.pid}.*swarmfold stop --workdir"):
            WorkdirLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    assert running_pid(tmp_path) is None  # a stale pid file (after kill -9) blocks nothing
    lock = WorkdirLock(tmp_path)
    lock.acquire()
    assert running_pid(tmp_path) == os.getpid()
    lock.release()


def test_logs_tail_and_follow_across_rotation(tmp_path: Path) -> None:
    log = tmp_path / "swarmfold.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    assert tail_lines(log, 3) == ["line 97", "line 98", "line 99"]
    got: list[str] = []
    stop = threading.Event()
    positioned = threading.Event()
    checks = 0

    def stopped() -> bool:
        # follow() asks before each pass; the second time, it has opened the file and sought its end
        nonlocal checks
        checks += 1
        if checks >= 2:
            positioned.set()
        return stop.is_set()

    def reader() -> None:
        for line in follow(log, poll=0.05, stop=stopped):
            got.append(line)

    def wait_for(line: str) -> None:
        deadline = time.monotonic() + 30
        while line not in got and time.monotonic() < deadline:
            time.sleep(0.02)

    t = threading.Thread(target=reader)
    t.start()
    assert positioned.wait(30), "follow() never opened the log"
    with open(log, "a") as f:
        f.write("after 1\n")
    wait_for("after 1")
    os.replace(log, tmp_path / "swarmfold.log.1")  # what RotatingFileHandler does
    log.write_text("rotated 1\n")
    wait_for("rotated 1")
    stop.set()
    t.join(5)
    assert got == ["after 1", "rotated 1"]


# ---- the service, with a round loop driven by this test -------------------------------
def test_service_lifecycle_in_process(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """run_service: lock, api.json, token-guarded pause, SIGHUP reload, SIGTERM stop, exit file."""
    caplog.set_level(logging.INFO)
    w = tmp_path / "w"
    w.mkdir()
    (w / "settings.toml").write_text("api_port = 0\n")
    seen: dict[str, Any] = {}

    def loop(options: PeerOptions, *, status: PeerStatus, controls: Controls, settings: Settings,
             step_hook: DutyCycle) -> int:
        assert options.api_port == 0 and not (w / "api.json").exists()  # api_port 0: no API
        return 0

    assert run_service(PeerOptions(spec=w / "s.toml", data=[], workdir=w), foreground=True, runner=loop) == 0

    (w / "settings.toml").write_text('power = "full"\n')

    def driven(options: PeerOptions, *, status: PeerStatus, controls: Controls, settings: Settings,
               step_hook: DutyCycle) -> int:
        info = json.loads((w / "api.json").read_text())
        assert info["pid"] == os.getpid() and running_pid(w) == os.getpid()
        with pytest.raises(WorkdirLocked):
            WorkdirLock(w).acquire(attempts=1)
        token = (w / "control.token").read_text().strip()
        assert http(info["url"] + "api/pause", method="POST")[0] == 401
        assert http(info["url"] + "api/pause", method="POST", token=token)[0] == 200
        seen["paused"] = controls.paused
        (w / "settings.toml").write_text('power = "light"\n')
        os.kill(os.getpid(), signal.SIGHUP)
        seen["reloaded"] = controls.reload.wait(5) and settings.power == "light"
        os.kill(os.getpid(), signal.SIGTERM)
        seen["stopped"] = controls.stop.wait(5) and status.state == "stopping"
        status.on_checkpoint(str(w / "checkpoints" / "round-000003"), time.time())
        return 0

    # api_port from settings: the default port, or a free one if it is taken
    assert run_service(PeerOptions(spec=w / "s.toml", data=[], workdir=w), foreground=True, runner=driven) == 0
    assert seen == {"paused": True, "reloaded": True, "stopped": True}
    assert not (w / "api.json").exists() and running_pid(w) is None
    exit_info = json.loads((w / "daemon.exit.json").read_text())
    assert exit_info["code"] == 0 and exit_info["checkpoint"].endswith("round-000003")
    assert "SIGTERM: leaving the round cleanly" in (w / "logs" / "swarmfold.log").read_text()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


def test_forked_children_do_not_inherit_the_signal_handlers(tmp_path: Path) -> None:
    """hivemind's DHT runs in a process forked from the peer: SIGTERM must end it, not ask it to stop a round."""
    from swarmfold.daemon.service import signal_handlers

    with signal_handlers(status=PeerStatus(), controls=Controls(), settings=Settings(), workdir=tmp_path):
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: fork's after-child hooks have run; say so, then wait to be signalled
            os.close(ready_r)
            os.write(ready_w, b"1")
            time.sleep(30)
            os._exit(0)
        os.close(ready_w)
        assert os.read(ready_r, 1) == b"1"  # the child is past fork(), with whatever handlers it kept
        os.close(ready_r)
        os.kill(pid, signal.SIGTERM)
        _, st = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(st) and os.WTERMSIG(st) == signal.SIGTERM


def test_service_refuses_a_held_workdir(tmp_path: Path) -> None:
    lock = WorkdirLock(tmp_path)
    lock.acquire()
    try:
        code = run_service(PeerOptions(spec=tmp_path / "s.toml", data=[], workdir=tmp_path), foreground=True,
                           runner=lambda *a, **k: pytest.fail("must not run"))
        assert code == 3
    finally:
        lock.release()


def test_service_reports_bad_settings(tmp_path: Path) -> None:
    (tmp_path / "settings.toml").write_text('power = "max"\n')
    code = run_service(PeerOptions(spec=tmp_path / "s.toml", data=[], workdir=tmp_path), foreground=True,
                       runner=lambda *a, **k: pytest.fail("must not run"))
    assert code == 2
    assert "power = 'max'" in (tmp_path / "logs" / "swarmfold.log").read_text()


def test_api_module_has_no_global_registry_side_effects() -> None:
    from prometheus_client import REGISTRY

    assert not any(n.startswith("swarmfold_") for n in REGISTRY._names_to_collectors)  # noqa: SLF001
    assert api_mod.is_loopback("127.0.0.2") and api_mod.is_loopback("::1") and not api_mod.is_loopback("10.0.0.1")


def test_wait_for_peers_goes_through_start_and_a_bad_count_is_refused(tmp_path: Path) -> None:
    """`start` hands --wait-for-peers on to the background peer; a negative count is an error naming it."""
    import argparse

    from swarmfold.daemon.options import add_peer_arguments, options_from_args, options_to_argv

    parser = argparse.ArgumentParser()
    add_peer_arguments(parser)
    argv = options_to_argv(PeerOptions(spec=Path("s.toml"), data=["d"], workdir=tmp_path, wait_for_peers=5))
    assert options_from_args(parser.parse_args(argv)).wait_for_peers == 5
    assert options_from_args(parser.parse_args(options_to_argv(
        PeerOptions(spec=Path("s.toml"), data=["d"], workdir=tmp_path)))).wait_for_peers == 0
    out = subprocess.run([sys.executable, "-m", "swarmfold", "run", "--spec", "s.toml", "--workdir", str(tmp_path),
                          "--wait-for-peers", "-1"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--wait-for-peers: must be at least 0 (0: do not wait), got -1" in out.stderr


def test_direct_stream_options_go_through_start_and_bad_ones_are_refused(tmp_path: Path) -> None:
    """`start` hands --data-port and --announce-data on to the background peer; a port or address that is
    not one is a usage error naming what is wrong."""
    import argparse

    from swarmfold.daemon.options import add_peer_arguments, options_from_args, options_to_argv

    parser = argparse.ArgumentParser()
    add_peer_arguments(parser)
    o = PeerOptions(spec=Path("s.toml"), data=["d"], workdir=tmp_path, data_port=31338,
                    announce_data=["203.0.113.5:31338"])
    back = options_from_args(parser.parse_args(options_to_argv(o)))
    assert (back.data_port, back.announce_data) == (31338, ["203.0.113.5:31338"])
    assert options_from_args(parser.parse_args(["--spec", "s", "--workdir", "w"])).data_port is None
    for flag, value, says in (("--data-port", "70000", "is not a TCP port"),
                              ("--announce-data", "example.org:80", "must be an IP address")):
        out = subprocess.run([sys.executable, "-m", "swarmfold", "run", "--spec", "s.toml", "--workdir",
                              str(tmp_path), flag, value], capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and says in out.stderr, out.stderr
