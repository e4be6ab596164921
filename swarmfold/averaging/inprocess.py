"""An in-process group: the reference reduction that the live swarm must equal bit for bit.

It runs the same steps as the butterfly all-reduce, on whole vectors instead of spans:
decode what a sender would put on the wire, aggregate in canonical order in float64,
encode the aggregate once and hand every member the decoded form of those bytes.
"""

from __future__ import annotations

from swarmfold.averaging import codec
from swarmfold.averaging.aggregate import Contribution, aggregate
from swarmfold.averaging.base import AverageRequest, AverageResult, butterfly_bytes, group_id_for


def reduce_in_process(requests: dict[str, AverageRequest], *, swarm_id: str, compression: str, rule: str,
                      trim_fraction: float) -> dict[str, AverageResult]:
    members = sorted(requests)
    if len(members) == 1:
        (pid,) = members
        return {pid: AverageResult(status="alone", aggregate=requests[pid].delta, members=members,
                                   included=members, steps={pid: int(requests[pid].steps)},
                                   reason="group of one")}
    contributions = {pid: Contribution(codec.roundtrip(compression, r.delta), r.weight)
                     for pid, r in requests.items()}
    agg = codec.roundtrip(compression, aggregate(contributions, rule, trim_fraction=trim_fraction))
    round_idx = requests[members[0]].round
    gid = group_id_for(swarm_id, round_idx, 0, members)
    numel = agg.numel()
    n = len(members)
    out = {}
    for i, pid in enumerate(members):
        sent = butterfly_bytes(numel, n, i, compression)
        out[pid] = AverageResult(status="committed", aggregate=agg, group_id=gid, members=members,
                                 included=members, weights={p: float(requests[p].weight) for p in members},
                                 steps={p: int(requests[p].steps) for p in members},
                                 confirmed=[p for p in members if p != pid],
                                 bytes_sent=sent, bytes_received=sent,
                                 compressed=compression != "none")
    return out
