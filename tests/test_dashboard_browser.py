"""The dashboard in a real headless Chromium, on a running 2-peer swarm of background peers.

Chromium is Debian's `chromium` (`make browser` installs it). The screenshot is kept in the
test's tmp dir; with SWARMFOLD_SAVE_SCREENSHOT=1 it is also copied to results/dashboard.png (a
test run must not change a tracked file: `make test` left the work tree dirty every time).
"""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, fast_spec, write_spec
from daemon_helpers import NET, daemons, start, swarmfold, wait_status  # noqa: F401

pytestmark = pytest.mark.slow

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--window-size=1400,1300"]


def chromium_binary() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no Chromium found: install it with `make browser` (apt-get install chromium)")


def chromium(url: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Load `url`, let its scripts run for 8 s of virtual time (fetches pause the clock), then act."""
    cmd = [chromium_binary(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=8000",
           *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def element_text(dom: str, element_id: str) -> str:
    m = re.search(rf'id="{element_id}"[^>]*>([^<]*)<', dom)
    assert m, f"#{element_id} not in the rendered page"
    return html.unescape(m.group(1)).strip()


def test_dashboard_of_a_two_peer_swarm(tmp_path: Path, shards: list[Path], monkeypatch: pytest.MonkeyPatch,
                                       daemons: list[Path]) -> None:  # noqa: F811
    chromium_binary()
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    spec = write_spec(fast_spec(averaging=NET), tmp_path / "spec.toml")
    a, b = tmp_path / "a", tmp_path / "b"
    daemons.extend([a, b])
    assert start(a, spec, shards[0]).returncode == 0
    maddrs = wait_status(a, "addresses", lambda s: bool(s["visible_maddrs"]))["visible_maddrs"]
    assert start(b, spec, shards[1], "--initial-peers", *maddrs).returncode == 0
    snap = wait_status(a, "a committed round and both peers' records",
                       lambda s: s["rounds"].get("committed", 0) >= 2 and s["summary"]["peers_alive"] == 2)
    url = snap["api"]["url"]

    dom = chromium(url, tmp_path / "profile-dom", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert element_text(dom.stdout, "peers-alive") == "2"
    loss = float(element_text(dom.stdout, "loss").replace(",", ""))
    assert 0.0 < loss < 10.0
    assert element_text(dom.stdout, "conn").startswith("live")
    assert element_text(dom.stdout, "state") in ("training", "averaging", "waiting", "syncing")
    assert dom.stdout.count('class="you"') == 2  # "you" in the hash table and the leaderboard
    board = re.search(r'<tbody id="leaderboard">(.*?)</tbody>', dom.stdout, re.S)
    assert board and board.group(1).count("<tr>") == 2
    # two committed rounds: the second trained on the first's model, so its tokens reached the model
    assert float(element_text(dom.stdout, "tokens-counted").replace(",", "")) > 0

    shot = tmp_path / "dashboard.png"
    taken = chromium(url, tmp_path / "profile-shot", f"--screenshot={shot}")
    assert taken.returncode == 0, taken.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    if os.environ.get("SWARMFOLD_SAVE_SCREENSHOT") == "1":
        shutil.copyfile(shot, REPO / "results" / "dashboard.png")

    for w in (a, b):
        assert swarmfold("stop", "--workdir", str(w), "--timeout", "120").returncode == 0
