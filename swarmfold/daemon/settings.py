"""How much of the machine a peer may use: threads, power, battery, idle-only, API port.

Settings are per machine, not per swarm, so they are not part of the spec and never change
the model's bits (except `threads`, which the determinism contract records). They are read,
in order of precedence, from:

  1. W/settings.toml in the peer's workdir,
  2. $XDG_CONFIG_HOME/swarmfold/settings.toml (default ~/.config/swarmfold/settings.toml),
  3. the defaults below.

A file replaces the defaults key by key; the first file found wins whole (they are not
merged). SIGHUP re-reads it while the peer runs; a bad file on reload is logged and the
settings in force are kept.

Power levels are a duty cycle: the fraction of wall-clock time the peer spends computing.
After a stretch of `w` seconds of training, the peer rests `w * (1 - duty) / duty` seconds
(interruptible by stop/pause), so its long-run CPU use is `duty` times what `full` uses:

  full    duty 1.0   no rest
  medium  duty 0.5   rests as long as it trained
  light   duty 0.25  rests three times as long as it trained

`scripts/measure_power.py` measures process CPU seconds per wall second at each level.
"""

from __future__ import annotations

import logging
import os
import threading
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

POWER_DUTY = {"light": 0.25, "medium": 0.5, "full": 1.0}
DEFAULT_API_PORT = 8470
SETTINGS_FILE = "settings.toml"


class SettingsError(ValueError):
    """A settings file is unreadable or has bad values; the message lists every problem and the fix."""


@dataclass(kw_only=True)
class Settings:
    """One machine's limits. Mutable in place, so a reload (SIGHUP) reaches every holder at once."""

    threads: int | None = None  # None: the --threads option (or its default)
    device: str | None = None  # None: the --device option (or auto); else auto | cpu | cuda | cuda:N | mps
    power: str = "full"  # light | medium | full: the duty cycle above
    pause_on_battery: bool = True  # pause while the OS reports running on battery (no battery: ignored)
    idle_only: bool = False  # train only while other processes leave the CPU idle
    idle_threshold: float = 0.25  # "busy" = other processes use more than this fraction of all CPUs
    idle_resume_after_s: float = 60.0  # resume once the machine has been idle this long
    check_interval_s: float = 5.0  # how often battery and idleness are checked
    api_host: str = "127.0.0.1"
    api_port: int = DEFAULT_API_PORT  # 0 disables the API; a busy port falls back to a free one
    allow_remote_api: bool = False  # required to listen on anything but loopback
    stop_timeout_s: float = 300.0  # how long `swarmfold stop` waits for a clean exit
    source: str = field(default="defaults", compare=False)  # where these values came from
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)

    @property
    def duty_cycle(self) -> float:
        return POWER_DUTY[self.power]

    def rest_seconds(self, work_seconds: float) -> float:
        """How long to rest after `work_seconds` of compute, to keep to the power level's duty cycle."""
        duty = self.duty_cycle
        return max(0.0, work_seconds) * (1.0 - duty) / duty

    def replace_from(self, other: Settings) -> None:
        """Take every value of `other` (a reload), in place."""
        with self._lock:
            for f in fields(self):
                if not f.name.startswith("_"):
                    setattr(self, f.name, getattr(other, f.name))

    def to_dict(self) -> dict[str, Any]:
        with self._lock:
            return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")} | {
                "duty_cycle": self.duty_cycle}


_KEYS: dict[str, tuple[type, ...]] = {
    "threads": (int,), "device": (str,), "power": (str,), "pause_on_battery": (bool,), "idle_only": (bool,),
    "idle_threshold": (int, float), "idle_resume_after_s": (int, float), "check_interval_s": (int, float),
    "api_host": (str,), "api_port": (int,), "allow_remote_api": (bool,), "stop_timeout_s": (int, float),
}


def settings_from_dict(raw: dict[str, Any], source: str = "settings") -> Settings:
    """Validate a parsed TOML table; SettingsError lists every problem at once."""
    errors: list[str] = []
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in _KEYS:
            errors.append(f"unknown key {key!r}; known keys: {', '.join(sorted(_KEYS))}")
            continue
        types = _KEYS[key]
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            errors.append(f"{key} = {value!r} should be {' or '.join(t.__name__ for t in types)}")
            continue
        values[key] = value
    s = Settings(**values, source=source)
    if s.device is not None and not _device_syntax_ok(s.device):
        errors.append(f"device = {s.device!r}; use auto, cpu, cuda, cuda:N or mps, or leave it out")
    if s.power not in POWER_DUTY:
        errors.append(f"power = {s.power!r}; use one of {', '.join(POWER_DUTY)}")
    if s.threads is not None and not 1 <= s.threads <= (os.cpu_count() or 1) * 4:
        errors.append(f"threads = {s.threads}; use 1..{(os.cpu_count() or 1) * 4} or leave it out")
    if not 0.0 < s.idle_threshold <= 1.0:
        errors.append(f"idle_threshold = {s.idle_threshold}; a fraction of all CPUs in (0, 1], e.g. 0.25")
    if not 0 <= s.api_port <= 65535:
        errors.append(f"api_port = {s.api_port}; use 1..65535, or 0 to disable the API")
    for key in ("idle_resume_after_s", "check_interval_s", "stop_timeout_s"):
        if getattr(s, key) <= 0:
            errors.append(f"{key} = {getattr(s, key)}; must be > 0 seconds")
    if errors:
        raise SettingsError(f"{source}: " + "; ".join(errors))
    return s


def _device_syntax_ok(text: str) -> bool:
    """Whether `text` names a device kind (whether this machine has it is checked when the peer starts)."""
    t = text.strip().lower()
    return t in ("auto", "cpu", "cuda", "mps") or (t.startswith("cuda:") and t[5:].isdigit())


def settings_paths(workdir: Path) -> list[Path]:
    xdg = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return [Path(workdir) / SETTINGS_FILE, Path(xdg) / "swarmfold" / SETTINGS_FILE]


def load_settings(workdir: Path) -> Settings:
    """The settings that apply to the peer in `workdir` (see the module docstring for the order)."""
    for path in settings_paths(workdir):
        if not path.is_file():
            continue
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise SettingsError(f"{path}: not valid TOML ({e}); fix the file or delete it for the defaults") from e
        return settings_from_dict(raw, str(path))
    return Settings()


def reload_settings(current: Settings, workdir: Path) -> bool:
    """Re-read the settings into `current`; on a bad file keep what is in force. True if reloaded."""
    try:
        fresh = load_settings(workdir)
    except SettingsError as e:
        logger.error("settings not reloaded, keeping the ones in force: %s", e)
        return False
    current.replace_from(fresh)
    logger.info("settings reloaded from %s: %s", fresh.source, fresh.to_dict())
    return True


def example_settings() -> str:
    """A commented settings.toml with every key at its default."""
    return """\
# swarmfold settings for this machine (W/settings.toml or ~/.config/swarmfold/settings.toml).
# Send SIGHUP to a running peer (or `systemctl reload swarmfold`) to apply changes.

# threads = 2            # CPU threads for training; default: the --threads option
# device = "auto"        # training device: auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps;
#                        # default: the --device option; takes effect at the next start, not on SIGHUP
power = "full"           # light (25% duty cycle), medium (50%), full (100%)
pause_on_battery = true  # pause while the laptop runs on battery
idle_only = false        # train only while other programs leave the CPU idle
idle_threshold = 0.25    # "busy" = other programs use more than this fraction of all CPUs
idle_resume_after_s = 60.0
check_interval_s = 5.0
api_host = "127.0.0.1"   # the dashboard / control API address
api_port = 8470          # 0 disables it; if taken, a free port is used (see W/api.json)
allow_remote_api = false # must be true to listen on anything but loopback
stop_timeout_s = 300.0   # how long `swarmfold stop` waits for the peer to checkpoint and exit
"""
