"""Staying out of the way: pause on battery, train only while the machine is idle, keep a duty cycle.

The watcher thread checks, every `check_interval_s`:
  - battery: `psutil.sensors_battery()`; where the OS reports one and it is discharging,
    the peer pauses ("on battery") if `pause_on_battery` is set, and resumes on AC power;
  - idleness (with `idle_only`): the CPU time used by *other* processes (the whole machine's
    busy time minus this peer's process tree) as a fraction of all CPUs. Above
    `idle_threshold` the peer pauses ("machine busy"); it resumes after the machine has
    stayed below it for `idle_resume_after_s`.

A pause from the watcher has its own source, so it neither lifts nor is lifted by the
user's `swarmfold pause/resume`. The duty cycle of the power setting is kept by `rest()`,
which the round loop calls after each stretch of training.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil

from swarmfold.daemon.settings import Settings
from swarmfold.daemon.state import Controls

logger = logging.getLogger(__name__)


def rest(settings: Settings, controls: Controls, work_seconds: float) -> float:
    """Rest after `work_seconds` of compute to keep to the power level's duty cycle.

    Returns at once on stop. Returns the seconds actually rested.
    """
    wanted = settings.rest_seconds(work_seconds)
    if wanted <= 0:
        return 0.0
    t0 = time.monotonic()
    controls.stop.wait(wanted)
    return time.monotonic() - t0


class DutyCycle:
    """The power level, kept between inner steps: the round loop's `step_hook`.

    Called before inner step i of a round; from the second step on it rests in proportion to
    how long the previous step took (`Settings.rest_seconds`), so training uses `duty` of the
    wall-clock time. Matchmaking and all-reduce are not throttled (the group waits on them).
    It reads the settings at every step, so a SIGHUP reload applies within a step.
    """

    def __init__(self, settings: Settings, controls: Controls):
        self.settings, self.controls = settings, controls
        self._step_started: float | None = None
        self.rested = 0.0  # seconds, in total

    def __call__(self, step: int) -> None:
        now = time.monotonic()
        if step > 0 and self._step_started is not None:
            self.rested += rest(self.settings, self.controls, now - self._step_started)
        self._step_started = time.monotonic()


@dataclass
class BatteryReading:
    percent: float
    plugged: bool


def read_battery() -> BatteryReading | None:
    """The battery, or None where the OS reports none (desktops, servers, containers)."""
    try:
        b = psutil.sensors_battery()
    except (AttributeError, NotImplementedError, OSError):
        return None
    if b is None:
        return None
    return BatteryReading(percent=float(b.percent), plugged=bool(b.power_plugged))


class OtherLoad:
    """CPU use of every process except this one and its children, as a fraction of all CPUs."""

    def __init__(self, pid: int | None = None):
        self._proc = psutil.Process(pid or os.getpid())
        self._ncpu = psutil.cpu_count() or 1
        self._last: tuple[float, float, float] | None = None

    def _own_cpu(self) -> float:
        total = 0.0
        for p in [self._proc, *self._proc.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return total

    def _sample(self) -> tuple[float, float, float]:
        t = psutil.cpu_times()
        busy = t.user + t.system + getattr(t, "nice", 0.0) + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
        return time.monotonic(), busy, self._own_cpu()

    def read(self) -> float | None:
        """The fraction since the previous call (None on the first call)."""
        now = self._sample()
        last, self._last = self._last, now
        if last is None:
            return None
        wall = now[0] - last[0]
        if wall <= 0:
            return None
        # children that exited between samples take their CPU time with them, so clamp at 0
        others = max(0.0, (now[1] - last[1]) - max(0.0, now[2] - last[2]))
        return min(1.0, others / (wall * self._ncpu))


class ResourceWatcher(threading.Thread):
    """Pauses and resumes the peer for battery and idleness; see the module docstring."""

    def __init__(self, *, settings: Settings, controls: Controls,
                 battery: Callable[[], BatteryReading | None] = read_battery,
                 other_load: Callable[[], float | None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__(name="swarmfold-resources", daemon=True)
        self.settings, self.controls = settings, controls
        self._battery = battery
        self._other_load = other_load or OtherLoad().read
        self._clock = clock
        self._idle_since: float | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        self._other_load()  # prime the CPU counters
        while not self._halt.wait(self.settings.check_interval_s) and not self.controls.stop.is_set():
            try:
                self.check()
            except Exception:  # a sensor failing must never take the peer down
                logger.exception("resource check failed; will retry")

    def halt(self) -> None:
        self._halt.set()

    def check(self) -> None:
        self._check_battery()
        self._check_idle()

    def _check_battery(self) -> None:
        reading = self._battery() if self.settings.pause_on_battery else None
        on_battery = reading is not None and not reading.plugged
        held = "battery" in self.controls.pause_reasons()
        if on_battery and not held and reading is not None:
            self.controls.pause("battery", f"on battery ({reading.percent:.0f}%); resumes on AC power")
            logger.info("pausing: running on battery (%.0f%%)", reading.percent)
        elif not on_battery and held:
            self.controls.resume("battery")
            logger.info("resuming: back on AC power (or pause_on_battery turned off)")

    def _check_idle(self) -> None:
        load = self._other_load()
        held = "busy" in self.controls.pause_reasons()
        if not self.settings.idle_only:
            if held:
                self.controls.resume("busy")
                logger.info("resuming: idle_only turned off")
            self._idle_since = None
            return
        if load is None:
            return
        now = self._clock()
        threshold = self.settings.idle_threshold
        if load > threshold:
            self._idle_since = None
            if not held:
                self.controls.pause("busy", f"machine busy: other programs use {load:.0%} of the CPUs "
                                            f"(idle_only, threshold {threshold:.0%})")
                logger.info("pausing: other programs use %.0f%% of the CPUs (idle_only)", load * 100)
            return
        if self._idle_since is None:
            self._idle_since = now
        if held and now - self._idle_since >= self.settings.idle_resume_after_s:
            self.controls.resume("busy")
            logger.info("resuming: the machine has been idle for %.0f s", now - self._idle_since)
