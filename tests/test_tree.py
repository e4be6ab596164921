"""The averaging trees, pure, in-process, no network: the live delegate tree's reference
(inprocess.reduce_tree) and cost model (treecost.py), and the span-partial alternative (tree.py)."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch

from swarmfold.averaging import codec
from swarmfold.averaging.aggregate import Contribution, weighted_mean
from swarmfold.averaging.base import (
    AverageRequest,
    butterfly_bytes,
    delegates_of,
    group_id_for,
    partition_groups,
    tree_depth,
)
from swarmfold.averaging.inprocess import reduce_in_process, reduce_tree
from swarmfold.averaging.tree import (
    build_tree,
    cost_model,
    peer_costs,
    plan,
    reduce_tree_in_process,
    run_tree,
    tree_mean,
)
from swarmfold.averaging.treecost import (
    DOWNLOADS,
    delegate_costs,
    delegate_costs_of,
    delegate_levels,
    tree_records,
)
from swarmfold.cli import build_parser
from swarmfold.peer.simulate import simulate
from tests.conftest import REPO, fast_spec

NUMEL = 4096 + 1000  # five blocks, the last one partial


def _deltas(n: int, seed: int = 0, numel: int = NUMEL) -> dict[str, tuple[torch.Tensor, float]]:
    g = torch.Generator().manual_seed(seed)
    ids = [f"peer-{i:04d}" for i in range(n)]
    return {pid: (torch.randn(numel, generator=g) * 1e-3, float(1000 + 37 * ((i * 7919) % 13)))
            for i, pid in enumerate(ids)}


def _requests(deltas: dict[str, tuple[torch.Tensor, float]]) -> dict[str, AverageRequest]:
    return {p: AverageRequest(round=3, delta=d, weight=w, model_sha256="x", steps=1) for p, (d, w) in deltas.items()}


def _contribs(deltas: dict[str, tuple[torch.Tensor, float]]) -> dict[str, Contribution]:
    return {p: Contribution(d, w) for p, (d, w) in deltas.items()}


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_one_group_is_todays_weighted_mean_bit_for_bit(n: int) -> None:
    deltas = _deltas(n, seed=n)
    for g in (n, 8, 100):
        tree = build_tree(list(deltas), g, swarm_id="s", round_idx=3)
        assert tree.depth == 1
        assert torch.equal(tree_mean(tree, _contribs(deltas)), weighted_mean(_contribs(deltas)))
    for compression in ("none", "int8"):
        ours = reduce_tree_in_process(_requests(deltas), swarm_id="s", compression=compression, group_size=8)
        today = reduce_in_process(_requests(deltas), swarm_id="s", compression=compression, rule="mean",
                                  trim_fraction=0.0)
        for p in deltas:
            assert torch.equal(ours[p].aggregate, today[p].aggregate)  # type: ignore[arg-type]
            assert ours[p].bytes_sent == today[p].bytes_sent
        if n > 1:  # the span-by-span run is today's butterfly too: same bits, same bytes
            tree = build_tree(list(deltas), 8, swarm_id="s", round_idx=3)
            run = run_tree(tree, deltas, compression)
            costs = peer_costs(tree, run.messages)
            for i, p in enumerate(sorted(deltas)):
                assert torch.equal(run.aggregate[p], today[p].aggregate)  # type: ignore[arg-type]
                assert costs[p].bytes_sent == butterfly_bytes(NUMEL, n, i, compression)


def _group_sum(deltas: dict[str, tuple[torch.Tensor, float]], ps: list[str]) -> tuple[torch.Tensor, float]:
    """A group's float64 weighted sum and weight, in the given (sorted) member order."""
    s = torch.zeros(NUMEL, dtype=torch.float64)
    w = 0.0
    for p in ps:
        s.add_(deltas[p][0].to(torch.float64), alpha=deltas[p][1])
        w += deltas[p][1]
    return s, w


def _reference_5_2(deltas: dict[str, tuple[torch.Tensor, float]]) -> torch.Tensor:
    """N = 5, G = 2 written out by hand from the documented order: groups [a] [b c] [d e];
    level 2: {g0} {g1 g2}; level 3 (root): {n0 n1}. Float64 sums, one division, one cast."""
    a, b, c, d, e = sorted(deltas)

    (s0, w0), (s1, w1), (s2, w2) = (_group_sum(deltas, ps) for ps in ([a], [b, c], [d, e]))
    n0, v0 = s0, w0  # a node with one child passes it through
    n1, v1 = s1 + s2, w1 + w2
    return ((n0 + n1) / (v0 + v1)).to(torch.float32)


def test_five_peers_in_groups_of_two_equal_the_written_out_order() -> None:
    deltas = _deltas(5, seed=11)
    tree = build_tree(list(deltas), 2, swarm_id="s", round_idx=3)
    ids = sorted(deltas)
    assert tree.groups == ((ids[0],), (ids[1], ids[2]), (ids[3], ids[4]))
    assert tree.upper == (((0,), (1, 2)), ((0, 1),))
    expected = _reference_5_2(deltas)
    assert torch.equal(tree_mean(tree, _contribs(deltas)), expected)
    # not the flat sorted sum over all five: the tree's order is the definition
    out = reduce_tree_in_process(_requests(deltas), swarm_id="s", compression="none", group_size=2)
    assert {r.status for r in out.values()} == {"committed"}
    for r in out.values():
        assert torch.equal(r.aggregate, expected)  # type: ignore[arg-type]
        assert r.members == ids and r.included == ids
    assert len({r.group_id for r in out.values()}) == 1  # one round id for the whole tree
    # span by span, as the peers would run it: the same bits on every peer
    run = run_tree(tree, deltas, "none")
    for p in ids:
        assert torch.equal(run.aggregate[p], expected)


@pytest.mark.parametrize(("n", "g", "compression"), [(5, 2, "int8"), (20, 3, "none"), (20, 3, "int8"),
                                                     (70, 4, "fp16"), (7, 3, "topk32")])
def test_span_cutting_and_input_order_do_not_change_the_bits(n: int, g: int, compression: str) -> None:
    deltas = _deltas(n, seed=n * g)
    whole = reduce_tree_in_process(_requests(deltas), swarm_id="s", compression=compression, group_size=g)
    agg = whole[min(deltas)].aggregate
    assert agg is not None
    tree = build_tree(list(deltas), g, swarm_id="s", round_idx=3)
    run = run_tree(tree, deltas, compression)
    for p in deltas:
        assert torch.equal(whole[p].aggregate, agg)  # type: ignore[arg-type]
        assert torch.equal(run.aggregate[p], agg)
    # arbitrary cuts of the canonical sum (no codec): elementwise, so pieces give the same bits
    c = _contribs(deltas)
    full = tree_mean(tree, c)
    cuts = [0, 1, 777, 2048, 4095, NUMEL]
    pieces = torch.cat([tree_mean(tree, c, lo, hi) for lo, hi in zip(cuts, cuts[1:], strict=False)])
    assert torch.equal(pieces, full)
    # the order the peers are given in does not matter
    order = list(deltas)
    random.Random(n).shuffle(order)
    shuffled = {p: deltas[p] for p in order}
    again = reduce_tree_in_process(_requests(shuffled), swarm_id="s", compression=compression, group_size=g)
    assert torch.equal(again[order[0]].aggregate, agg)  # type: ignore[arg-type]
    assert build_tree(order, g, swarm_id="s", round_idx=3) == tree
    # the planned messages are the ones the run sent
    key = lambda m: (m.span, m.level, m.direction, m.sender, m.receiver)  # noqa: E731
    assert sorted(plan(tree, NUMEL, compression), key=key) == sorted(run.messages, key=key)


@pytest.mark.parametrize("n", [9, 64, 65, 500, 1024])
def test_fan_out_is_bounded_by_the_group_size_not_n(n: int) -> None:
    g = 8
    tree = build_tree([f"p{i:05d}" for i in range(n)], g, swarm_id="s", round_idx=0)
    costs = peer_costs(tree, plan(tree, 64 * 1024, "none"))
    assert all(vars(c) == vars(d) for c, d in zip(costs.values(), cost_model(n, g, 64 * 1024, "none").values(),
                                                     strict=True))
    assert max(c.fan_out for c in costs.values()) <= 2 * g
    assert max(c.fan_in for c in costs.values()) <= 2 * g
    # bytes: its Δ once, the aggregate of its span to its group and to at most G - 1 children,
    # and at most two float64 partials up: bounded by the vector size and G, not by N
    numel = 64 * 1024
    span = max(hi - lo for lo, hi in tree.spans(numel))
    bound = 4 * numel + 2 * (g - 1) * 4 * span + 2 * (8 * span + 8)
    assert max(c.bytes_sent for c in costs.values()) <= bound
    assert max(c.messages_sent for c in costs.values()) <= 2 * g + 2 * len(tree.spans(numel))


def test_a_failed_group_is_excluded_and_the_rest_commit_one_model() -> None:
    deltas = _deltas(7, seed=5)
    ids = sorted(deltas)
    tree = build_tree(ids, 3, swarm_id="s", round_idx=3)
    assert tree.groups == (tuple(ids[0:2]), tuple(ids[2:4]), tuple(ids[4:7]))
    dead = ids[3]  # a member of group 1 dies
    out = reduce_tree_in_process(_requests(deltas), swarm_id="s", compression="none", group_size=3, dead=[dead])
    assert dead not in out
    assert out[ids[2]].status == "rolled_back" and out[ids[2]].aggregate is None
    survivors = ids[0:2] + ids[4:7]
    assert {out[p].status for p in survivors} == {"committed"}

    (s0, w0), (s2, w2) = _group_sum(deltas, ids[0:2]), _group_sum(deltas, ids[4:7])
    expected = ((s0 + s2) / (w0 + w2)).to(torch.float32)
    for p in survivors:
        assert torch.equal(out[p].aggregate, expected)  # type: ignore[arg-type]
        assert out[p].included == survivors
    assert out[ids[0]].group_id == tree.without([1]).round_id != tree.round_id
    # every group failing leaves nothing to commit: everyone alive rolls back
    everyone = reduce_tree_in_process(_requests(deltas), swarm_id="s", compression="none", group_size=3,
                                      dead=[ids[0], ids[2], ids[4]])
    assert {r.status for r in everyone.values()} == {"rolled_back"}


def test_simulate_joins_more_groups_than_one_into_one_model(shards: list) -> None:
    """The live tree's reference (inprocess.reduce_tree): N > G gives one model a round, with a record
    of the level above each group; a group of one (G = 2, N = 3: groups of 1 and 2) carries its Δ up."""
    spec = fast_spec(averaging={"group_size": 2}, round={"inner_steps": 1})
    ids = ["a", "b", "c"]
    peers, result = simulate(spec, [[s] for s in shards[:3]], rounds=1, threads=1, save_checkpoints=False,
                             peer_ids=ids)
    assert len({v["model_sha256"] for v in result.per_round[0].values()}) == 1
    assert {v["status"] for v in result.per_round[0].values()} == {"committed"}
    for p in peers:
        (level,) = p.last_round["tree"]
        assert level["level"] == 2 and level["included"] == ["a", "b"]  # the delegates of [a] and [b, c]
    assert peers[0].last_round["included"] == ["a"] and peers[1].last_round["included"] == ["b", "c"]
    args = build_parser().parse_args(["simulate", "--spec", "s.toml", "--data", "a", "b", "--rounds", "1",
                                      "--out", "o"])
    assert not hasattr(args, "tree")


@pytest.mark.parametrize("compression", ["none", "int8"])
def test_reduce_tree_is_one_group_for_n_up_to_g_and_levels_of_groups_above(compression: str) -> None:
    deltas = _deltas(7, seed=5)
    reqs = _requests(deltas)
    opts = dict(swarm_id="s", compression=compression, rule="mean", trim_fraction=0.0)
    small = {p: reqs[p] for p in sorted(reqs)[:3]}
    plain = reduce_in_process(small, **opts)
    for p, r in reduce_tree(small, group_size=3, **opts).items():
        assert torch.equal(r.aggregate, plain[p].aggregate) and not r.tree
    alone = reduce_tree(reqs, group_size=1, **opts)  # G = 1: every peer alone, no level above
    assert all(r.status == "alone" and not r.tree and torch.equal(r.aggregate, reqs[p].delta) for p, r in alone.items())
    out = reduce_tree(reqs, group_size=2, **opts)  # 7 peers, G = 2: 4 groups, 2 groups of delegates, a root
    tops = {tuple(r.aggregate.tolist()) for r in out.values()}
    assert len(tops) == 1 and {r.status for r in out.values()} == {"committed"}
    assert all([lv["level"] for lv in r.tree] == [2, 3] for r in out.values())
    # by hand: each level is reduce_in_process over the groups' delegates, weighted by what they carry
    ids = sorted(reqs)
    groups = partition_groups(ids, 2)
    lvl1 = {}
    for g in groups:
        lvl1.update(reduce_in_process({p: reqs[p] for p in g}, **opts))
    up = {}
    for g in groups:
        r = lvl1[g[0]]
        w = sum(reqs[p].weight for p in g)
        up[g[0]] = AverageRequest(round=3, delta=r.aggregate, weight=w, model_sha256="m",
                                  steps=sum(reqs[p].steps for p in g), level=2)
    lvl2 = {}
    for g in partition_groups(sorted(up), 2):
        lvl2.update(reduce_in_process({p: up[p] for p in g}, level=2, **opts))
    top_up = {}
    for g in partition_groups(sorted(up), 2):
        r = lvl2[g[0]]
        top_up[g[0]] = AverageRequest(round=3, delta=r.aggregate, weight=sum(up[p].weight for p in g),
                                      model_sha256="m", steps=sum(up[p].steps for p in g), level=3)
    root = reduce_in_process(top_up, level=3, **opts)
    expected = next(iter(root.values())).aggregate
    assert all(torch.equal(r.aggregate, expected) for r in out.values())


def test_codec_spans_of_the_smallest_group_are_shared() -> None:
    tree = build_tree([f"p{i}" for i in range(17)], 8, swarm_id="s", round_idx=0)
    assert [len(g) for g in tree.groups] == [5, 6, 6]
    assert tree.spans(NUMEL) == codec.spans(NUMEL, 5)


def test_bench_tree_counts_and_checks_in_process(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench_tree", REPO / "scripts" / "bench_tree.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "tree.json"
    assert bench.main(["--sizes", "8", "20", "--group-size", "4", "--out", str(out), "--no-plot"]) == 0
    rows = {r["n"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows[8]["tree"]["models"] == 1 and rows[8]["today"]["models"] == 2
    assert rows[20]["today"]["fraction_reaching_model"] == 4 / 20
    assert rows[20]["tree"]["bit_identical_to_reference"] and rows[20]["tree"]["messages_match_cost_model"]
    live = rows[20]["live"]  # 20 peers, G = 4: 5 groups of 4, delegates in groups of 2 and 3, then a top of 2
    assert live["groups_per_level"] == [5, 2, 1] and live["depth"] == 3 and live["models"] == 1
    assert live["one_identical_aggregate"] and live["levels_match_reduce_tree"]
    assert live["butterfly_bytes_match_reduce_tree"] and "downloads" in live["by_level"]
    # 8 peers, G = 4: two groups whose delegates meet in a group of two (fan-out 3 + 1)
    assert rows[8]["live"]["groups_per_level"] == [2, 1] and rows[8]["live"]["fan_out"]["max"] == 4


# ---- the live delegate tree's cost model (averaging/treecost.py) ------------------------


@pytest.mark.parametrize(("n", "g", "compression"), [(5, 3, "none"), (9, 3, "int8"), (20, 4, "none"),
                                                     (20, 3, "fp16"), (7, 2, "none"),
                                                     (5, 2, "int8")])
def test_delegate_cost_model_matches_reduce_tree(n: int, g: int, compression: str) -> None:
    deltas = _deltas(n, seed=100 + n * g)
    reqs = _requests(deltas)
    out = reduce_tree(reqs, swarm_id="s", compression=compression, rule="mean", trim_fraction=0.0, group_size=g)
    # one model: every peer holds the same aggregate, committed
    agg = out[min(out)].aggregate
    assert agg is not None and {r.status for r in out.values()} == {"committed"}
    assert all(torch.equal(r.aggregate, agg) for r in out.values())  # type: ignore[arg-type]
    levels = delegate_levels(list(deltas), g)
    assert len(levels) == 1 + tree_depth(len(delegates_of(sorted(deltas), g)), g)
    # the model's groups above each peer's own are the levels reduce_tree records, with their group ids
    records = tree_records(levels)
    for p, r in out.items():
        assert [(lv["level"], lv["included"]) for lv in r.tree] == records[p]
        assert [lv["group_id"] for lv in r.tree] == [group_id_for("s", 3, 0, ms, level=lv) for lv, ms in records[p]]
    # the butterfly bytes are the ones reduce_tree counts (it counts no downloads)
    costs = delegate_costs_of(list(deltas), g, NUMEL, compression)
    for p, c in costs.items():
        butterflies = sum(v["bytes_sent"] for k, v in c.by_level.items() if k != DOWNLOADS)
        assert butterflies == out[p].bytes_sent
        received = sum(v["bytes_received"] for k, v in c.by_level.items() if k != DOWNLOADS)
        assert received == out[p].bytes_received
    # every peer outside the top group downloads F once (raw float32); the top group's members none
    top = set(levels[-1][0])
    for p, c in costs.items():
        got = c.by_level.get(DOWNLOADS, {}).get("bytes_received", 0)
        assert got == (0 if p in top else 4 * NUMEL)


def test_delegate_costs_count_each_level_and_the_downloads() -> None:
    n, g, numel = 1024, 8, 16 * 1024
    costs = delegate_costs(n, g, numel, "none")
    levels = delegate_levels(sorted(costs), g)
    assert [len(lv) for lv in levels] == [128, 16, 2, 1]
    first = costs[min(costs)]  # the delegate at every level: 7 + 7 + 7 + 1 peers
    assert first.fan_out == 22 and first.fan_in == 22
    expected = 3 * butterfly_bytes(numel, 8, 0, "none") + butterfly_bytes(numel, 2, 0, "none") + 21 * 4 * numel
    assert first.bytes_sent == expected
    assert first.messages_sent == 3 * 14 + 2 + 21
    last = costs[max(costs)]  # a plain member of a group of 8: today's butterfly and one download
    assert last.fan_out == 7 and last.messages_sent == 14
    assert last.bytes_sent == butterfly_bytes(numel, 8, 7, "none") and last.bytes_received == last.bytes_sent + 4 * numel
    # N <= G: today's one group, no downloads
    one = delegate_costs(5, 8, numel, "int8")
    assert all(c.bytes_sent == butterfly_bytes(numel, 5, i, "int8") and DOWNLOADS not in c.by_level
               for i, c in enumerate(one.values()))
    assert delegate_costs(1, 8, numel, "none")[f"p{0:06d}"].messages_sent == 0
