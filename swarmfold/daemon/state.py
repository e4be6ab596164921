"""The live state of a running peer, shared by the round loop, the control API, metrics and `status`.

The round loop (daemon/runner.py) is the only writer; readers take a JSON-able snapshot.
Everything is guarded by one lock, so a snapshot is always consistent.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

SWARM_LOSS_ROUNDS = 500  # rounds of the swarm's loss curve kept in memory
STATES = ("starting", "syncing", "training", "averaging", "paused", "waiting", "stopping", "stopped")


@dataclass
class RoundRecord:
    round: int
    status: str  # committed | alone | rolled_back
    train_loss: float
    tokens: int
    tokens_per_second: float
    group_size: int
    model_sha256: str
    timings: dict[str, float]  # train, matchmaking, allreduce, commit (seconds)
    finished_at: float
    val_loss: float | None = None
    steps: int = 0  # inner steps trained (round.mode "time": what fit in round.seconds)


@dataclass
class PeerStatus:
    peer_id: str = ""
    swarm_id: str = ""
    spec_hash: str = ""
    device: str = ""  # the training device in words, e.g. "cpu" or "cuda:0 (NVIDIA H200, sm 9.0)"
    precision: str = ""  # the spec's inner.precision: fp32 or bf16
    state: str = "starting"
    reason: str = ""
    round: int = 0
    loss: float | None = None
    tokens_per_second: float = 0.0
    tokens_total: int = 0  # trained
    # of those: in a confirmed committed swarm model, only in this peer's weights, dropped (peer/credit.py)
    tokens_counted: int = 0
    tokens_pending: int = 0
    tokens_wasted: int = 0
    model_sha256: str = ""
    last_checkpoint_time: float | None = None
    last_checkpoint_path: str = ""
    visible_maddrs: list[str] = field(default_factory=list)
    data: str = ""  # the shard's summary line (peer/data.py Shard.summary)
    rounds: Counter = field(default_factory=Counter)  # committed / alone / rolled_back / failed
    bytes_sent: int = 0
    bytes_received: int = 0
    rejected: Counter = field(default_factory=Counter)  # named error -> count
    allreduce_seconds: list[float] = field(default_factory=list)  # every observation, for histograms
    history: deque = field(default_factory=lambda: deque(maxlen=500))
    swarm: dict[str, dict[str, Any]] = field(default_factory=dict)  # peer id -> its published record
    # finished round -> {peer id -> the loss it published for it}, kept for the swarm's loss curve
    swarm_losses: dict[int, dict[str, float]] = field(default_factory=dict)
    paused: bool = False
    started_at: float = field(default_factory=time.time)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    def set_state(self, state: str, reason: str = "") -> None:
        if state not in STATES:
            raise ValueError(f"unknown peer state {state!r}")
        with self._lock:
            self.state, self.reason = state, reason

    def update(self, **fields: Any) -> None:
        with self._lock:
            for k, v in fields.items():
                if not hasattr(self, k) or k.startswith("_"):
                    raise AttributeError(f"PeerStatus has no field {k!r}")
                setattr(self, k, v)

    def on_round(self, record: RoundRecord, *, bytes_sent: int, bytes_received: int,
                 rejected: dict[str, str], allreduce_seconds: float | None) -> None:
        with self._lock:
            self.history.append(record)
            self.round = record.round + 1
            self.loss = record.train_loss
            self.tokens_per_second = record.tokens_per_second
            self.tokens_total += record.tokens
            self.model_sha256 = record.model_sha256
            self.rounds[record.status] += 1
            self.bytes_sent += bytes_sent
            self.bytes_received += bytes_received
            for reason in rejected.values():
                self.rejected[reason.split(":", 1)[0]] += 1
            if allreduce_seconds is not None:
                self.allreduce_seconds.append(allreduce_seconds)

    def on_failure(self, kind: str = "failed") -> None:
        with self._lock:
            self.rounds[kind] += 1

    def on_checkpoint(self, path: str, when: float) -> None:
        with self._lock:
            self.last_checkpoint_path, self.last_checkpoint_time = path, when

    def allreduce_observations(self) -> list[float]:
        with self._lock:
            return list(self.allreduce_seconds)

    def set_swarm(self, records: dict[str, dict[str, Any]]) -> None:
        with self._lock:
            self.swarm = dict(records)
            for pid, rec in records.items():
                metrics = rec.get("metrics")
                metrics = metrics if isinstance(metrics, dict) else {}
                loss, rnd = rec.get("loss", metrics.get("loss")), rec.get("round")
                # a record at round R carries the loss of the round its peer finished last, R - 1
                if isinstance(loss, int | float) and isinstance(rnd, int) and rnd >= 1 and math.isfinite(loss):
                    self.swarm_losses.setdefault(rnd - 1, {})[pid] = float(loss)
            for old in sorted(self.swarm_losses)[:-SWARM_LOSS_ROUNDS]:
                del self.swarm_losses[old]

    def swarm_loss_curve(self) -> list[dict[str, Any]]:
        """Mean published loss per round, over the peers that published one for that round."""
        with self._lock:
            return [{"round": r, "loss_mean": sum(v.values()) / len(v), "peers": len(v)}
                    for r, v in sorted(self.swarm_losses.items()) if v]

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            now = time.time()
            return {
                "peer_id": self.peer_id, "swarm_id": self.swarm_id, "spec_hash": self.spec_hash,
                "device": self.device, "precision": self.precision, "state": self.state, "reason": self.reason, "round": self.round, "loss": self.loss,
                "tokens_per_second": self.tokens_per_second, "tokens_total": self.tokens_total,
                "tokens_counted": self.tokens_counted, "tokens_pending": self.tokens_pending,
                "tokens_wasted": self.tokens_wasted,
                "model_sha256": self.model_sha256,
                "last_checkpoint_time": self.last_checkpoint_time,
                "last_checkpoint_age_s": None if self.last_checkpoint_time is None
                else now - self.last_checkpoint_time,
                "last_checkpoint_path": self.last_checkpoint_path,
                "visible_maddrs": list(self.visible_maddrs), "data": self.data,
                "rounds": dict(self.rounds), "bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received,
                "rejected": dict(self.rejected), "paused": self.paused,
                "uptime_s": now - self.started_at,
                "peers_seen": len(self.swarm),
                "swarm": {pid: dict(rec) for pid, rec in self.swarm.items()},
                "history": [vars(r) for r in self.history],
                "swarm_loss_curve": self.swarm_loss_curve(),
            }


class Controls:
    """Requests from signals, the control API and the resource watcher to the round loop.

    A pause has a source ("user", "battery", "busy", ...) and a reason; the peer stays paused
    while any source holds a pause, so `resume` from the user does not override a battery pause.
    """

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.resume_event = threading.Event()
        self.resume_event.set()
        self.reload = threading.Event()  # SIGHUP: re-read settings
        self._pauses: dict[str, str] = {}
        self._lock = threading.Lock()

    @property
    def paused(self) -> bool:
        return not self.resume_event.is_set()

    def pause(self, source: str = "user", reason: str = "paused by the user") -> None:
        with self._lock:
            self._pauses[source] = reason
            if not self.stop.is_set():
                self.resume_event.clear()

    def resume(self, source: str = "user") -> None:
        with self._lock:
            self._pauses.pop(source, None)
            if not self._pauses:
                self.resume_event.set()

    def pause_reasons(self) -> dict[str, str]:
        """Source -> reason of every pause in force."""
        with self._lock:
            return dict(self._pauses)

    @property
    def pause_reason(self) -> str:
        return "; ".join(self.pause_reasons().values())

    def request_stop(self) -> None:
        self.stop.set()
        self.resume_event.set()  # wake a paused loop so it can exit
