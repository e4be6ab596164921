"""Shared fixtures: small stdlib shards, a fast tiny spec, an isolated token cache, child-process cleanup."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from swarmfold.peer.corpus import write_stdlib_shards
from swarmfold.spec import Spec, SpecError, preset, spec_from_dict, to_toml

REPO = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules with multi-peer tests first (a stable sort: file order otherwise, and each module's tests
    stay together, so that a module-scoped fixture is built once). `make test` runs the suite on two
    xdist workers; started first, the long tests overlap each other and the short ones fill the end,
    instead of one long test running alone while the other worker idles."""
    slow_modules = {item.module.__name__ for item in items if item.get_closest_marker("slow") is not None}
    items.sort(key=lambda item: item.module.__name__ not in slow_modules)


@pytest.fixture(scope="session", autouse=True)
def _token_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["SWARMFOLD_CACHE"] = str(tmp_path_factory.mktemp("token-cache"))
    # one intra-op thread in the test process: the suite also runs peer processes side by side,
    # and oversubscribed cores make 2-thread steps ~10x slower on a 2-core machine
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Four small, non-overlapping stdlib shards (about 300 kB each)."""
    return write_stdlib_shards(4, tmp_path_factory.mktemp("data"), max_bytes_per_shard=300_000)


def fast_spec(**overrides: dict) -> Spec:
    """The tiny preset, cut down so a round takes well under a second on one core; in steps mode (every
    peer trains exactly H steps), so that rounds are deterministic and the swarm equals `simulate` bit
    for bit. A time-mode test passes round={"mode": "time", "seconds": ...}."""
    base = {"data": {"seq_len": 64}, "inner": {"batch_size": 8, "warmup_steps": 5},
            "round": {"inner_steps": 5, "mode": "steps"}}
    for k, v in overrides.items():
        base.setdefault(k, {}).update(v)
    return preset("tiny").replace(**base)


def inner_spec_errors(fields: dict[str, object]) -> list[str]:
    """The validation errors of the tiny preset with `fields` set in [inner] (it must have some)."""
    d = preset("tiny").to_dict()
    d["inner"].update(fields)
    with pytest.raises(SpecError) as exc:
        spec_from_dict(d)
    return list(exc.value.errors)


@pytest.fixture
def tiny_spec() -> Spec:
    return fast_spec()


def write_spec(spec: Spec, path: Path) -> Path:
    path.write_text(to_toml(spec), encoding="utf-8")
    return path


def swarmfold_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "swarmfold", *args]


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen]]:
    """Child processes started by a test; all are killed (with their process groups) afterwards."""
    started: list[subprocess.Popen] = []
    yield started
    for p in started:  # the whole group: a peer's DHT process and libp2p daemon outlive a killed parent
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            if p.poll() is None:
                p.kill()
    for p in started:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
