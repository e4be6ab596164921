"""The swarm as one peer sees it: totals, loss, hash agreement and the contribution leaderboard
(ranked by tokens that reached a committed swarm model, peer/credit.py).

Computed from the signed, expiring records peers publish to the DHT (PeerStatus.swarm),
with this peer's own entry taken from its live state. The dashboard, `swarmfold status`
and /metrics all use this one function, so they always agree.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any


def _num(value: Any, default: float = 0.0) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else default


def flat_record(rec: dict[str, Any]) -> dict[str, Any]:
    """A published record with its `metrics` table (loss, tokens, timings) lifted to the top level."""
    metrics = rec.get("metrics")
    out = dict(metrics) if isinstance(metrics, dict) else {}
    out.update({k: v for k, v in rec.items() if k != "metrics"})
    return out


def peer_records(snap: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every known peer's record, this peer's replaced by its live values."""
    records = {pid: flat_record(rec) for pid, rec in snap.get("swarm", {}).items() if isinstance(rec, dict)}
    me = snap.get("peer_id")
    if me:
        records[me] = dict(records.get(me, {}), round=snap.get("round", 0), loss=snap.get("loss"),
                           tokens_total=snap.get("tokens_total", 0), tokens_counted=snap.get("tokens_counted", 0),
                           tokens_wasted=snap.get("tokens_wasted", 0),
                           tokens_per_second=snap.get("tokens_per_second", 0.0),
                           model_sha256=snap.get("model_sha256", ""), time=time.time())
    return records


def _credit(rec: dict[str, Any]) -> dict[str, int | None]:
    """A record's counted and wasted tokens; None for a record published before credit was kept."""
    out: dict[str, int | None] = {}
    for key in ("tokens_counted", "tokens_wasted"):
        value = rec.get(key)
        out[key] = int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
    return out


def hash_agreement(records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """How many peers at the newest round hold the most common model hash.

    Peers behind the newest round are counted apart: they differ by round, not by bits.
    """
    rounds = [int(_num(r.get("round"))) for r in records.values()]
    if not rounds:
        return {"round": None, "model_sha256": "", "agree": 0, "at_round": 0, "behind": 0, "ratio": 1.0}
    newest = max(rounds)
    hashes = Counter(str(r.get("model_sha256", "")) for r in records.values()
                     if int(_num(r.get("round"))) == newest)
    top, agree = hashes.most_common(1)[0]
    at_round = sum(hashes.values())
    return {"round": newest, "model_sha256": top, "agree": agree, "at_round": at_round,
            "behind": len(records) - at_round, "ratio": agree / at_round, "distinct_hashes": len(hashes)}


def swarm_summary(snap: dict[str, Any]) -> dict[str, Any]:
    """Totals over the swarm from one PeerStatus snapshot."""
    records = peer_records(snap)
    me = snap.get("peer_id", "")
    swarm_tps = sum(_num(r.get("tokens_per_second")) for r in records.values())
    my_tps = _num(snap.get("tokens_per_second"))
    losses = [_num(r["loss"]) for r in records.values() if isinstance(r.get("loss"), int | float)]
    total_tokens = sum(int(_num(r.get("tokens_total"))) for r in records.values())
    board = sorted(({"peer_id": pid, "tokens_total": int(_num(r.get("tokens_total"))),
                     **_credit(r), "tokens_per_second": _num(r.get("tokens_per_second")),
                     "round": int(_num(r.get("round"))), "loss": r.get("loss"),
                     "model_sha256": str(r.get("model_sha256", "")), "is_self": pid == me}
                    for pid, r in records.items()),
                   key=lambda e: (-(e["tokens_counted"] or 0), -e["tokens_total"], e["peer_id"]))
    total_counted = sum(e["tokens_counted"] or 0 for e in board)
    for entry in board:  # the share of the swarm's model's tokens that came from this peer
        entry["share"] = (entry["tokens_counted"] or 0) / total_counted if total_counted else 0.0
    return {
        "peers_alive": len(records),
        "swarm_tokens_per_second": swarm_tps,
        "my_tokens_per_second": my_tps,
        "my_share": my_tps / swarm_tps if swarm_tps > 0 else (1.0 if len(records) <= 1 else 0.0),
        "swarm_tokens_total": total_tokens,
        "swarm_tokens_counted": total_counted,
        "loss_mean": sum(losses) / len(losses) if losses else None,
        "hash_agreement": hash_agreement(records),
        "leaderboard": board,
    }
