"""Service files: systemd unit, Dockerfile, docker-compose, Prometheus and Grafana configs.

Docker and systemd cannot run here, so these files are parsed and checked against the
code they drive: their command lines parse with swarmfold's own parser, their ports and
paths agree with each other, and every metric the Grafana dashboard queries is served.
"""

from __future__ import annotations

import configparser
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO
from daemon_helpers import fed_status
from prometheus_client.parser import text_string_to_metric_families

from swarmfold.cli import build_parser
from swarmfold.daemon.api import ControlApi, write_api_file
from swarmfold.daemon.metrics import METRICS, make_registry, render
from swarmfold.daemon.settings import DEFAULT_API_PORT, Settings
from swarmfold.daemon.state import Controls
from swarmfold.errors import ExitCode

DEPLOY = REPO / "deploy"
METRIC_NAME = re.compile(r"\bswarmfold_[a-z0-9_]+\b")


def parse_cli(argv: list[str]) -> Any:
    """Parse a command line the way `swarmfold` would (argparse exits on an error)."""
    return build_parser().parse_args(argv)


def served_sample_names() -> set[str]:
    status, controls = fed_status(), Controls()
    text = render(make_registry(lambda: _metrics_snapshot(status, controls))).decode()
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def _metrics_snapshot(status: Any, controls: Controls) -> dict[str, Any]:
    from swarmfold.daemon.api import live_snapshot

    snap = live_snapshot(status, controls)
    snap["allreduce_seconds"] = status.allreduce_observations()
    return snap


# ---- docker-compose + prometheus ---------------------------------------------------------
# the tests here share a module- or session-scoped fixture: one xdist worker runs them all (built once)
pytestmark = pytest.mark.xdist_group("test_deploy")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def peer_args(compose: dict[str, Any], name: str) -> Any:
    return parse_cli(list(compose["services"][name]["command"]))


def test_compose_has_three_peers_prometheus_and_grafana(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"peer1", "peer2", "peer3", "prometheus", "grafana"} <= set(services)
    shards, specs = set(), set()
    for name in ("peer1", "peer2", "peer3"):
        svc = services[name]
        args = peer_args(compose, name)
        assert args.command == "run" and args.handler.__name__ == "cmd_run"
        assert args.allow_remote_api and args.api_host == "0.0.0.0" and args.api_port == DEFAULT_API_PORT
        assert args.workdir == Path("/var/lib/swarmfold/work")
        assert any(v.endswith(":/var/lib/swarmfold") for v in svc["volumes"])  # state survives restarts
        assert svc["stop_grace_period"] == "5m" and svc["restart"] == "on-failure"
        shards.add(args.data[0])
        specs.add(str(args.spec))
        if name != "peer1":
            assert args.initial_peers_from == [f"http://peer1:{DEFAULT_API_PORT}"]
    assert len(shards) == 3 and len(specs) == 1
    init = " ".join(services["init"]["command"])
    assert "--out /shared/spec.toml" in init and "--shards 3 --out /shared/data" in init
    for port in (p for s in services.values() for p in s.get("ports", [])):
        assert port.startswith("127.0.0.1:"), f"{port} would publish on every interface of the host"


def test_prometheus_scrapes_every_peer_at_its_api_port(compose: dict[str, Any]) -> None:
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    targets = {t for sc in jobs["swarmfold"]["static_configs"] for t in sc["targets"]}
    assert jobs["swarmfold"]["metrics_path"] == "/metrics"
    assert targets == {f"{n}:{peer_args(compose, n).api_port}" for n in ("peer1", "peer2", "peer3")}
    mounts = compose["services"]["prometheus"]["volumes"] + compose["services"]["grafana"]["volumes"]
    for mount in mounts:
        src = mount.split(":")[0]
        if src.startswith("./"):
            assert (DEPLOY / src).exists(), f"{mount}: {src} is not in deploy/"


# ---- grafana -------------------------------------------------------------------------------
def dashboard() -> dict[str, Any]:
    return json.loads((DEPLOY / "grafana" / "dashboards" / "swarmfold.json").read_text())


def test_every_metric_in_the_grafana_dashboard_is_served() -> None:
    exprs = [t["expr"] for p in dashboard()["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in METRIC_NAME.findall(e)}
    served = served_sample_names()
    assert used, "no swarmfold metric in the dashboard"
    missing = sorted(used - served)
    assert not missing, f"the dashboard queries metrics /metrics does not have: {missing}"
    # and the dashboard covers every family the peer exposes
    uncovered = [f for f in METRICS if not any(u == f or u.startswith(f + "_") for u in used)]
    assert not uncovered, f"no panel shows {uncovered}"


def test_grafana_dashboard_is_well_formed() -> None:
    d = dashboard()
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = ds["datasources"][0]["uid"]
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/swarmfold.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)) and d["uid"] == "swarmfold"
    for p in d["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        assert p["datasource"]["uid"] == uid and p["targets"], p["title"]
        for t in p["targets"]:
            assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]
            assert "peer_id" not in t["expr"]  # no per-peer labels: instances are the peers


# ---- systemd ------------------------------------------------------------------------------
def test_systemd_unit() -> None:
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    unit.read_string((DEPLOY / "swarmfold.service").read_text())
    assert set(unit.sections()) == {"Unit", "Service", "Install"}
    svc = unit["Service"]
    assert svc["User"] not in ("", "root") and svc["Group"] not in ("", "root")
    assert svc["Restart"] == "on-failure"
    assert float(svc["TimeoutStopSec"]) >= Settings().stop_timeout_s
    assert svc["KillSignal"] == "SIGTERM" and "-HUP $MAINPID" in svc["ExecReload"]
    assert set(svc["RestartPreventExitStatus"].split()) == {str(int(ExitCode.BAD_INPUT)), str(int(ExitCode.LOCKED))}
    state = svc["StateDirectory"]
    argv = shlex.split(svc["ExecStart"])
    assert argv[0].endswith("/swarmfold")
    args = parse_cli(argv[1:])
    assert args.command == "run"
    assert str(args.workdir).startswith(f"/var/lib/{state}/")  # the state lives in StateDirectory
    envs = [line.split("=", 1)[1] for line in (DEPLOY / "swarmfold.service").read_text().splitlines()
            if line.startswith("Environment=")]  # configparser keeps only the last of repeated keys
    assert "PYTHONUNBUFFERED=1" in envs and f"HOME=/var/lib/{state}" in envs
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    assert "network-online.target" in unit["Unit"]["After"]


# ---- Dockerfile ------------------------------------------------------------------------------
def dockerfile() -> list[tuple[str, str]]:
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip()) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_dockerfile_non_root_unbuffered_with_healthcheck(compose: dict[str, Any]) -> None:
    instr = dockerfile()
    users = [v for k, v in instr if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    env = " ".join(v for k, v in instr if k == "ENV")
    assert "PYTHONUNBUFFERED=1" in env
    health = [v for k, v in instr if k == "HEALTHCHECK"]
    assert len(health) == 1
    argv = json.loads(health[0].split("CMD", 1)[1].strip())
    args = parse_cli(argv[1:])
    assert argv[0] == "swarmfold" and args.command == "status" and args.check
    assert args.workdir == peer_args(compose, "peer1").workdir  # it checks the workdir the peers use
    assert str(DEFAULT_API_PORT) in [v for k, v in instr if k == "EXPOSE"][0].split()
    for k, v in instr:
        if k == "COPY":
            for src in v.split()[:-1]:
                assert (REPO / src).exists(), f"Dockerfile copies {src}, which is not in the repository"
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored and "swarmfold" not in ignored


@pytest.mark.slow
def test_healthcheck_command_asks_the_api(tmp_path: Path) -> None:
    """`swarmfold status --check` (the HEALTHCHECK) exits 0 only while the peer's API answers."""
    check = [sys.executable, "-m", "swarmfold", "status", "--workdir", str(tmp_path), "--check"]
    assert subprocess.run(check, capture_output=True, timeout=60).returncode == 1
    api = ControlApi(status=fed_status(), controls=Controls(), settings=Settings(), workdir=tmp_path,
                     token="t" * 40, port=0)
    api.start()
    try:
        write_api_file(tmp_path, api)
        done = subprocess.run(check, capture_output=True, timeout=60)
        assert done.returncode == 0 and done.stdout == b"", done.stderr
    finally:
        api.stop()
    assert subprocess.run(check, capture_output=True, timeout=60).returncode == 1
