"""Prometheus metrics of one peer, read from its live state at scrape time.

Naming follows Prometheus practice: a `swarmfold_` prefix, base units (seconds, bytes),
`_total` for counters, one `_info` metric for versions and the spec hash, and no per-peer
labels (every peer is its own scrape target; swarm-wide values are plain gauges computed
from the DHT records). `METRICS` lists every family, for docs and the Grafana test.
"""

from __future__ import annotations

import bisect
import platform
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from swarmfold.averaging.protocol import Rejection
from swarmfold.daemon.state import STATES
from swarmfold.daemon.summary import swarm_summary

ALLREDUCE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ROUND_OUTCOMES = ("committed", "alone", "rolled_back", "failed")
PHASES = ("train", "matchmaking", "allreduce", "commit")
REJECTIONS = tuple(r.value for r in Rejection)

# family name (as exposed, before _total/_bucket suffixes) -> help text
METRICS: dict[str, str] = {
    "swarmfold_build_info": "swarmfold, torch, hivemind and python versions, spec hash, swarm id, "
                            "training device and precision",
    "swarmfold_round": "the round this peer is at (the next round it will train)",
    "swarmfold_loss": "mean training loss of this peer's last finished round",
    "swarmfold_tokens_per_second": "this peer's training throughput in its last round",
    "swarmfold_tokens_trained_total": "tokens this peer trained on since its first round",
    "swarmfold_tokens_counted_total": "of the tokens trained, those in a committed swarm model this peer "
                                      "then trained on (reached the swarm's model)",
    "swarmfold_tokens_wasted_total": "of the tokens trained, those dropped: synced away, left out of a "
                                     "commit, or a carried delta dropped",
    "swarmfold_tokens_pending": "of the tokens trained, those only in this peer's own weights so far",
    "swarmfold_tokens_wasted_ratio": "wasted tokens / tokens trained (0 before the first round)",
    "swarmfold_peers_alive": "peers with a live metrics record in the DHT, this one included",
    "swarmfold_swarm_tokens_per_second": "sum of tokens/s over the live peers' records",
    "swarmfold_swarm_loss": "mean of the live peers' published losses",
    "swarmfold_swarm_model_hash_agreement_ratio": "share of peers at the newest round holding its most common model hash",
    "swarmfold_averaging_rounds_total": "finished rounds by outcome (committed, alone, rolled_back, failed)",
    "swarmfold_allreduce_duration_seconds": "wall time of this peer's all-reduces",
    "swarmfold_round_phase_duration_seconds": "duration of each phase of the last finished round",
    "swarmfold_sent_bytes_total": "bytes this peer sent in all-reduces",
    "swarmfold_received_bytes_total": "bytes this peer received in all-reduces",
    "swarmfold_contributions_rejected_total": "contributions this peer rejected, by named error",
    "swarmfold_last_checkpoint_timestamp_seconds": "unix time of the newest checkpoint written",
    "swarmfold_paused": "1 while the peer is paused (by the user, on battery or while the machine is busy)",
    "swarmfold_state": "1 for the state the peer is in, 0 for the others",
    "swarmfold_uptime_seconds": "seconds since the peer started",
}


def _versions() -> dict[str, str]:
    import swarmfold

    out = {"version": swarmfold.__version__, "python": platform.python_version()}
    for mod in ("torch", "hivemind"):
        try:
            out[mod] = str(__import__(mod).__version__)
        except ImportError:
            out[mod] = "absent"
    return out


def _histogram(values: list[float], buckets: tuple[float, ...]) -> list[tuple[str, float]]:
    ordered = sorted(values)
    out = [(floatToGoString(b), float(bisect.bisect_right(ordered, b))) for b in buckets]
    return out + [("+Inf", float(len(ordered)))]


class PeerCollector(Collector):
    """Builds every family from one snapshot per scrape, so the values are consistent."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]):
        self._snapshot = snapshot
        self._versions = _versions()

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        summary = swarm_summary(snap)
        yield InfoMetricFamily("swarmfold_build", METRICS["swarmfold_build_info"],
                               value=dict(self._versions, spec_hash=snap.get("spec_hash", ""),
                                          swarm_id=snap.get("swarm_id", ""), device=snap.get("device", ""),
                                          precision=snap.get("precision", "")))
        yield from self._peer(snap)
        yield from self._swarm(summary)
        yield from self._rounds(snap)

    def _gauge(self, name: str, value: float) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, METRICS[name], value=value)

    def _peer(self, snap: dict[str, Any]) -> Iterator[Metric]:
        yield self._gauge("swarmfold_round", snap["round"])
        yield self._gauge("swarmfold_loss", float("nan") if snap["loss"] is None else snap["loss"])
        yield self._gauge("swarmfold_tokens_per_second", snap["tokens_per_second"])
        yield CounterMetricFamily("swarmfold_tokens_trained", METRICS["swarmfold_tokens_trained_total"],
                                  value=snap["tokens_total"])
        yield CounterMetricFamily("swarmfold_tokens_counted", METRICS["swarmfold_tokens_counted_total"],
                                  value=snap.get("tokens_counted", 0))
        yield CounterMetricFamily("swarmfold_tokens_wasted", METRICS["swarmfold_tokens_wasted_total"],
                                  value=snap.get("tokens_wasted", 0))
        yield self._gauge("swarmfold_tokens_pending", snap.get("tokens_pending", 0))
        trained = snap["tokens_total"]
        yield self._gauge("swarmfold_tokens_wasted_ratio", snap.get("tokens_wasted", 0) / trained if trained else 0.0)
        ckpt = snap["last_checkpoint_time"]
        yield self._gauge("swarmfold_last_checkpoint_timestamp_seconds", float("nan") if ckpt is None else ckpt)
        yield self._gauge("swarmfold_paused", 1.0 if snap["paused"] else 0.0)
        state = GaugeMetricFamily("swarmfold_state", METRICS["swarmfold_state"], labels=["state"])
        for s in STATES:
            state.add_metric([s], 1.0 if snap["state"] == s else 0.0)
        yield state
        yield self._gauge("swarmfold_uptime_seconds", snap["uptime_s"])

    def _swarm(self, summary: dict[str, Any]) -> Iterator[Metric]:
        yield self._gauge("swarmfold_peers_alive", summary["peers_alive"])
        yield self._gauge("swarmfold_swarm_tokens_per_second", summary["swarm_tokens_per_second"])
        loss = summary["loss_mean"]
        yield self._gauge("swarmfold_swarm_loss", float("nan") if loss is None else loss)
        yield self._gauge("swarmfold_swarm_model_hash_agreement_ratio", summary["hash_agreement"]["ratio"])

    def _rounds(self, snap: dict[str, Any]) -> Iterator[Metric]:
        outcomes = CounterMetricFamily("swarmfold_averaging_rounds", METRICS["swarmfold_averaging_rounds_total"],
                                       labels=["outcome"])
        for outcome in sorted(set(ROUND_OUTCOMES) | set(snap["rounds"])):
            outcomes.add_metric([outcome], snap["rounds"].get(outcome, 0))
        yield outcomes
        seconds = [float(x) for x in snap.get("allreduce_seconds", [])]
        yield HistogramMetricFamily("swarmfold_allreduce_duration_seconds",
                                    METRICS["swarmfold_allreduce_duration_seconds"],
                                    buckets=_histogram(seconds, ALLREDUCE_BUCKETS), sum_value=sum(seconds))
        phases = GaugeMetricFamily("swarmfold_round_phase_duration_seconds",
                                   METRICS["swarmfold_round_phase_duration_seconds"], labels=["phase"])
        last = snap["history"][-1]["timings"] if snap["history"] else {}
        for phase in PHASES:
            phases.add_metric([phase], float(last.get(phase, 0.0)))
        yield phases
        yield CounterMetricFamily("swarmfold_sent_bytes", METRICS["swarmfold_sent_bytes_total"],
                                  value=snap["bytes_sent"])
        yield CounterMetricFamily("swarmfold_received_bytes", METRICS["swarmfold_received_bytes_total"],
                                  value=snap["bytes_received"])
        rejected = CounterMetricFamily("swarmfold_contributions_rejected",
                                       METRICS["swarmfold_contributions_rejected_total"], labels=["reason"])
        counts = dict.fromkeys(REJECTIONS, 0) | dict(snap["rejected"])  # every named error, even at 0
        for reason, count in sorted(counts.items()):
            rejected.add_metric([reason], count)
        yield rejected


def make_registry(snapshot: Callable[[], dict[str, Any]]) -> CollectorRegistry:
    """A registry of its own (not the global one), with this peer's metrics and process metrics."""
    from prometheus_client import ProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(PeerCollector(snapshot))
    ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
