"""Progress: a bar in place on a terminal, periodic log lines otherwise, and the callback for averaging/."""

from __future__ import annotations

import io
import logging

import pytest

from swarmfold.progress import Progress, mode


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_not_a_terminal_gets_log_lines(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SWARMFOLD_PROGRESS", raising=False)
    stream = io.StringIO()
    assert mode(stream) == "log"
    caplog.set_level(logging.INFO, logger="swarmfold.progress")
    with Progress("tokenizing", total=4, unit="file", interval=0.0, stream=stream) as bar:
        for _ in range(4):
            bar.update(1, tokens=1000)
    assert stream.getvalue() == ""  # nothing drawn
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("tokenizing: 1.00 file of 4.00 file (25%)")
    assert "tokens" in lines[0] and "/s" in lines[0]
    assert lines[3].startswith("tokenizing: 4.00 file of 4.00 file (100%)")


def test_a_terminal_gets_a_bar_that_updates_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SWARMFOLD_PROGRESS", raising=False)
    stream = _Tty()
    assert mode(stream) == "bar"
    bar = Progress("download", total=3 << 20, unit="B", stream=stream)
    on_progress = bar.callback()  # absolute counts, as averaging/ reports them
    for done in (1 << 20, 2 << 20, 3 << 20):
        on_progress(done, 3 << 20)
    bar.close()
    out = stream.getvalue()
    assert "\r" in out and "download" in out and "100%" in out and "3.00M" in out
    assert bar.n == 3 << 20


def test_the_environment_forces_a_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWARMFOLD_PROGRESS", "off")
    assert mode(_Tty()) == "off"
    monkeypatch.setenv("SWARMFOLD_PROGRESS", "bar")
    assert mode(io.StringIO()) == "bar"
