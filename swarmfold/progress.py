"""Progress of long work: a bar that updates in place on a terminal, periodic log lines otherwise.

    with Progress("tokenizing", total=len(files), unit="file") as bar:
        for f in files:
            ...
            bar.update(1, tokens=n)          # extra counters are shown with their rate

On a terminal (stderr is a TTY) this is a tqdm bar. Anywhere else (a detached daemon's log
file, a pipe, CI) it writes one log line every `interval` seconds and one when done, so a
log gets a few lines instead of thousands of carriage returns. SWARMFOLD_PROGRESS=bar or
=log forces either; =off shows nothing.

Layers that must not depend on this module (averaging/) take a plain callback instead,
`on_progress(done, total)`; `Progress.callback` adapts one to it.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import IO, Any

from tqdm import tqdm

logger = logging.getLogger(__name__)


def _size(value: float, unit: str) -> str:
    if unit == "B":
        return tqdm.format_sizeof(value, "B", 1024)
    return tqdm.format_sizeof(value) + (f" {unit}" if unit else "")


def mode(stream: IO[str] | None = None) -> str:
    """'bar', 'log' or 'off': how progress is shown on `stream` (default stderr)."""
    forced = os.environ.get("SWARMFOLD_PROGRESS", "").strip().lower()
    if forced in ("bar", "log", "off"):
        return forced
    stream = stream or sys.stderr
    try:
        return "bar" if stream.isatty() else "log"
    except (AttributeError, ValueError):
        return "log"


class Progress:
    """One long job's progress; see the module docstring."""

    def __init__(self, desc: str, *, total: float | None = None, unit: str = "it", interval: float = 10.0,
                 log: logging.Logger | None = None, stream: IO[str] | None = None) -> None:
        self.desc, self.total, self.unit, self.interval = desc, total, unit, interval
        self.log = log or logger
        self.n = 0.0
        self.counters: dict[str, float] = {}
        self.t0 = self._last = time.monotonic()
        self.mode = mode(stream)
        self._bar: tqdm | None = None
        if self.mode == "bar":
            self._bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=True, file=stream or sys.stderr,
                             unit_divisor=1024 if unit == "B" else 1000, dynamic_ncols=True, leave=True)

    def update(self, n: float = 1, **counters: float) -> None:
        self.n += n
        for key, value in counters.items():
            self.counters[key] = self.counters.get(key, 0.0) + value
        if self._bar is not None:
            if counters:
                self._bar.set_postfix_str(self._counters_text(), refresh=False)
            self._bar.update(n)
        elif self.mode == "log" and time.monotonic() - self._last >= self.interval:
            self._last = time.monotonic()
            self.log.info("%s", self.line())

    def set_total(self, total: float) -> None:
        self.total = total
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def callback(self) -> Callable[[int, int], None]:
        """An `on_progress(done, total)` callback (absolute counts) that drives this progress."""

        def on_progress(done: int, total: int) -> None:
            if total and total != self.total:
                self.set_total(total)
            if done > self.n:
                self.update(done - self.n)

        return on_progress

    def _counters_text(self) -> str:
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        return ", ".join(f"{_size(v, k)} ({_size(v / elapsed, k)}/s)" for k, v in self.counters.items())

    def line(self) -> str:
        """One plain line: done/total, rate, and the extra counters with their rates."""
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        done = _size(self.n, self.unit) + (f" of {_size(self.total, self.unit)}" if self.total else "")
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        extra = self._counters_text()
        return (f"{self.desc}: {done}{pct}, {_size(self.n / elapsed, self.unit)}/s, {elapsed:.0f}s"
                + (f"; {extra}" if extra else ""))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.mode == "log" and time.monotonic() - self.t0 >= min(self.interval, 2.0):
            self.log.info("%s (done)", self.line())
        self.mode = "closed" if self.mode != "off" else "off"

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:  # a bar left open must not be redrawn by tqdm's monitor
        bar: Any = getattr(self, "_bar", None)
        if bar is not None:
            bar.close()
