"""Pseudo-gradient compression: determinism, span/whole equality, error feedback, hostile input, byte counts."""

from __future__ import annotations

import hashlib
import struct

import pytest
import torch
from conftest import fast_spec

from swarmfold.averaging import codec
from swarmfold.averaging.base import AverageRequest, butterfly_bytes
from swarmfold.averaging.inprocess import reduce_in_process
from swarmfold.peer.local import LocalPeer
from swarmfold.peer.model import flat_params
from swarmfold.peer.simulate import simulate

NUMEL = 5 * codec.BLOCK + 333  # not a multiple of the block: the last block is padded


def _vec(seed: int, n: int = NUMEL, scale: float = 1e-3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * scale
    x[7] = 40 * scale  # an outlier in the first block, as pseudo-gradients have
    return x


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.mark.parametrize("name", codec.CODECS)
def test_same_input_gives_same_bytes(name: str) -> None:
    x = _vec(1)
    first = codec.encode(name, x)
    assert _sha(codec.encode(name, x.clone())) == _sha(first)
    assert len(first) == codec.encoded_size(name, NUMEL)
    assert torch.equal(codec.decode(name, first, NUMEL), codec.roundtrip(name, x))
    # re-encoding what a receiver decoded is a fixed point: every member can re-send it bit for bit
    decoded = codec.decode(name, first, NUMEL)
    assert _sha(codec.encode(name, decoded)) == _sha(first)


@pytest.mark.parametrize("parts", [1, 2, 3, 4, 7, 9])
def test_int8_spans_equal_the_whole_vector_encoding(parts: int) -> None:
    x = _vec(2)
    whole = codec.encode("int8", x)
    nb = codec.num_blocks(NUMEL)
    whole_scales, whole_q = whole[: 4 * nb], whole[4 * nb :]
    decoded_whole = codec.decode("int8", whole, NUMEL)
    pieces = []
    for lo, hi in codec.spans(NUMEL, parts):
        assert lo % codec.BLOCK == 0
        part = codec.encode("int8", x[lo:hi])
        pb = codec.num_blocks(hi - lo)
        b0 = lo // codec.BLOCK
        assert part[: 4 * pb] == whole_scales[4 * b0 : 4 * (b0 + pb)]
        assert part[4 * pb :] == whole_q[lo:hi]
        pieces.append(codec.decode("int8", part, hi - lo))
    assert torch.equal(torch.cat(pieces), decoded_whole)


def test_int8_error_is_at_most_half_a_step_per_block() -> None:
    x = _vec(3)
    x[codec.BLOCK : 2 * codec.BLOCK] = 0.0  # an all-zero block must survive as zeros
    y = codec.roundtrip("int8", x)
    padded = torch.zeros(codec.num_blocks(NUMEL) * codec.BLOCK)
    padded[:NUMEL] = x
    step = (padded.view(-1, codec.BLOCK).abs().amax(dim=1) / 127.0).repeat_interleave(codec.BLOCK)[:NUMEL]
    assert bool(((x - y).abs() <= step / 2 + 1e-12).all())
    assert torch.equal(y[codec.BLOCK : 2 * codec.BLOCK], torch.zeros(codec.BLOCK))


def _send_repeatedly(name: str, delta: torch.Tensor, rounds: int) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """`delta` sent `rounds` times through codec `name`: the sum of what arrived without feedback, with
    error feedback (the residual added to the next send), and the residual's peak after each send."""
    sent_plain, sent_ef, residual = torch.zeros_like(delta), torch.zeros_like(delta), torch.zeros_like(delta)
    peaks = []
    for _ in range(rounds):
        sent_plain += codec.roundtrip(name, delta)
        with_residual = delta + residual
        transmitted = codec.roundtrip(name, with_residual)
        residual = with_residual - transmitted
        sent_ef += transmitted
        peaks.append(float(residual.abs().max()))
    return sent_plain, sent_ef, peaks


def test_error_feedback_keeps_the_accumulated_error_bounded() -> None:
    """Small coordinates next to an outlier round to zero every time; only error feedback sends them."""
    n = codec.BLOCK
    delta = torch.full((n,), 0.003)
    delta[0] = 1.0  # step = 1/127 = 0.0079, so 0.003 rounds to 0 without feedback
    rounds = 50
    sent_plain, sent_ef, _ = _send_repeatedly("int8", delta, rounds)
    truth = delta * rounds
    err_plain = float((sent_plain - truth)[1:].abs().max())
    err_ef = float((sent_ef - truth)[1:].abs().max())
    assert err_plain == pytest.approx(0.003 * rounds, rel=1e-4)  # everything small was lost
    assert err_ef <= 1.0 / 127 / 2 + 1e-6  # at most half a step, however many rounds


def _one_compressed_round(shards: list, compression: str) -> tuple[list[LocalPeer], dict, dict]:
    """Two peers train one 2-step round and reduce it in process with `compression`: (peers, their train
    phases, their averaging results), before either applies its result."""
    spec = fast_spec(averaging={"compression": compression}, round={"inner_steps": 2})
    peers = [LocalPeer(spec, [s], peer_id=f"p{i}", threads=1) for i, s in enumerate(shards[:2])]
    phases = {p.peer_id: p.train_phase() for p in peers}
    results = reduce_in_process({p.peer_id: p.request(phases[p.peer_id]) for p in peers}, swarm_id=spec.swarm_id,
                                compression=compression, rule="mean", trim_fraction=0.2)
    return peers, phases, results


def test_local_peer_carries_the_compression_residual(shards: list) -> None:
    """The round code keeps Δ − C(Δ) after a compressed round and adds it to the next Δ."""
    peers, phases, results = _one_compressed_round(shards, "int8")
    for p in peers:
        assert results[p.peer_id].compressed
        p.finish_round(phases[p.peer_id], results[p.peer_id])
        expected = phases[p.peer_id].delta - codec.roundtrip("int8", phases[p.peer_id].delta)
        assert p.residual is not None and torch.equal(p.residual, expected)
        assert float(p.residual.abs().max()) > 0
    p = peers[0]
    residual = p.residual
    assert residual is not None
    phase = p.train_phase()
    assert torch.equal(phase.delta, (p.theta - flat_params(p.model)) + residual)


@pytest.mark.parametrize("name", codec.CODECS)
def test_decode_rejects_wrong_sizes(name: str) -> None:
    data = codec.encode(name, _vec(4))
    for bad in (data[:-1], data + b"\x00", b"", data[: len(data) // 2]):
        with pytest.raises(ValueError, match="must be"):
            codec.decode(name, bad, NUMEL)
    with pytest.raises(ValueError, match="must be"):
        codec.decode(name, data, NUMEL + codec.BLOCK)  # topk sizes go by blocks: one more block


def test_encode_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="flat float32"):
        codec.encode("int8", torch.zeros(2, 2))
    with pytest.raises(ValueError, match="flat float32"):
        codec.encode("int8", torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown codec"):
        codec.encode("int4", torch.zeros(3))
    assert codec.encode("int8", torch.zeros(0)) == b""  # empty spans (more members than blocks) are fine


@pytest.mark.parametrize("name", codec.CODECS)
@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_counted_bytes_are_the_encoded_payloads(name: str, n: int) -> None:
    x = _vec(6)
    spans = codec.spans(NUMEL, n)
    for i, (lo, hi) in enumerate(spans):
        sent_parts = sum(len(codec.encode(name, x[a:b])) for j, (a, b) in enumerate(spans) if j != i)
        sent_reduced = (n - 1) * len(codec.encode(name, x[lo:hi]))
        assert butterfly_bytes(NUMEL, n, i, name) == sent_parts + sent_reduced
    if name == "none":  # together the members send what a ring all-reduce sends
        total = sum(butterfly_bytes(NUMEL, n, i, name) for i in range(n))
        assert total == 2 * (n - 1) * NUMEL * 4


def test_in_process_group_reports_bytes_and_compression() -> None:
    reqs = {f"p{i}": AverageRequest(round=0, delta=_vec(10 + i), weight=1.0, model_sha256="x", steps=1) for i in range(3)}
    out = reduce_in_process(reqs, swarm_id="s", compression="int8", rule="mean", trim_fraction=0.2)
    for i, pid in enumerate(sorted(reqs)):
        assert out[pid].compressed
        assert out[pid].bytes_sent == butterfly_bytes(NUMEL, 3, i, "int8") > 0
    agg = out["p0"].aggregate
    assert agg is not None
    assert all(torch.equal(agg, r.aggregate) for r in out.values() if r.aggregate is not None)
    # the aggregate is what a decoder of the reducer's int8 bytes sees
    assert torch.equal(agg, codec.roundtrip("int8", agg))


def test_int8_simulation_is_deterministic_and_counts_bytes(shards: list) -> None:
    spec = fast_spec(averaging={"compression": "int8"}, round={"inner_steps": 2})
    runs = []
    for _ in range(2):
        peers, result = simulate(spec, [[s] for s in shards[:2]], rounds=2, threads=1, save_checkpoints=False)
        for rnd in result.per_round:
            assert len({v["model_sha256"] for v in rnd.values()}) == 1  # every member holds the same bits
            assert all(int(v["bytes_sent"]) > 0 for v in rnd.values())  # type: ignore[call-overload]
        runs.append([p.theta_sha256 for p in peers] + [hashlib.sha256(p.residual.numpy().tobytes()).hexdigest()
                                                        for p in peers if p.residual is not None])
    assert runs[0] == runs[1]
    assert len(runs[0]) == 4  # every peer carries a residual


# ---- topk<K>: sparse, 2-bit values, 10-bit offsets ---------------------------------------------------

TOPK = [c for c in codec.CODECS if codec.topk_size(c)]


def _blocks(y: torch.Tensor) -> torch.Tensor:
    padded = torch.zeros(codec.num_blocks(y.numel()) * codec.BLOCK)
    padded[: y.numel()] = y
    return padded.view(-1, codec.BLOCK)


@pytest.mark.parametrize("name", TOPK)
def test_topk_sizes_are_fixed_per_block(name: str) -> None:
    k = codec.topk_size(name)
    per_block = {8: 20, 16: 32, 32: 56, 64: 104}[k]  # two float32 levels + 10-bit offsets + 2-bit codes
    assert codec.topk_block_bytes(k) == per_block
    for n in (0, 1, k - 1, codec.BLOCK, NUMEL):  # torch.randn, not _vec: it sets element 7
        assert codec.encoded_size(name, n) == codec.num_blocks(n) * per_block == len(codec.encode(name, torch.randn(n)))
    assert codec.encoded_size("topk32", codec.BLOCK) * 18 < codec.encoded_size("int8", codec.BLOCK)


@pytest.mark.parametrize("parts", [1, 2, 3, 4, 7, 9])
def test_topk_spans_are_slices_of_the_whole_vector_encoding(parts: int) -> None:
    x = _vec(2)
    whole = codec.encode("topk32", x)
    per_block = codec.topk_block_bytes(32)
    pieces = []
    for lo, hi in codec.spans(NUMEL, parts):
        part = codec.encode("topk32", x[lo:hi].contiguous())
        assert part == whole[lo // codec.BLOCK * per_block : (lo // codec.BLOCK + codec.num_blocks(hi - lo)) * per_block]
        pieces.append(codec.decode("topk32", part, hi - lo))
    assert torch.equal(torch.cat(pieces), codec.decode("topk32", whole, NUMEL))


@pytest.mark.parametrize("name", TOPK)
def test_topk_keeps_the_k_largest_with_two_exact_levels(name: str) -> None:
    k = codec.topk_size(name)
    x = _vec(3)
    x[codec.BLOCK : 2 * codec.BLOCK] = 0.0  # an all-zero block stays zeros
    y = codec.roundtrip(name, x)
    xb, yb = _blocks(x), _blocks(y)
    assert torch.equal(yb[1], torch.zeros(codec.BLOCK))
    for b in (0, 2, 3, 4, 5):
        kept = yb[b] != 0
        assert int(kept.sum()) == k
        assert float(xb[b][kept].abs().min()) >= float(xb[b][~kept].abs().max())  # the largest magnitudes
        assert torch.equal(yb[b].abs().max(), xb[b].abs().max())  # the block's largest element is exact
        lo = xb[b][kept].abs().min()
        assert set(yb[b][kept].abs().unique().tolist()) <= {float(lo), float(xb[b].abs().max())}
        assert torch.equal(torch.sign(yb[b][kept]), torch.sign(xb[b][kept]))


def test_topk_ties_go_to_the_lower_offset() -> None:
    x = torch.full((codec.BLOCK,), 0.5)
    x[100] = x[900] = 1.0  # above the tie
    x[3] = -0.5  # same magnitude as the tied rest
    y = codec.roundtrip("topk16", x)
    kept = torch.nonzero(y).flatten().tolist()
    assert kept == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 100, 900]
    assert float(y[3]) == -0.5 and float(y[100]) == 1.0
    x[13] = 0.4999  # one of the tied below the tie: the next offset takes its place
    assert torch.nonzero(codec.roundtrip("topk16", x)).flatten().tolist()[12:14] == [12, 14]


def test_topk_short_last_block_and_sparse_blocks() -> None:
    x = torch.tensor([1.0, -2.0, 3.0])  # fewer elements than K: all are kept
    y = codec.roundtrip("topk16", x)
    assert torch.equal(y, torch.tensor([0.0, -3.0, 3.0]))  # the levels are 0 (padding) and 3: 1 rounds to 0
    z = torch.zeros(2 * codec.BLOCK)
    z[5], z[1500] = 0.25, -0.75  # a block sparser than K keeps its zeros and its one value exactly
    assert torch.equal(codec.roundtrip("topk32", z), z)


def _hostile(name: str, block: int, at: int, value: bytes, x: torch.Tensor | None = None) -> bytes:
    data = bytearray(codec.encode(name, _vec(7) if x is None else x))
    start = block * codec.topk_block_bytes(codec.topk_size(name)) + at
    data[start : start + len(value)] = value
    return bytes(data)


def test_topk_decode_rejects_hostile_payloads_by_name() -> None:
    nan, inf = struct.pack("<f", float("nan")), struct.pack("<f", float("inf"))
    for bad, what in ((_hostile("topk32", 2, 0, nan), "block 2 has levels"),
                      (_hostile("topk32", 3, 4, inf), "block 3 has levels"),
                      (_hostile("topk32", 1, 0, struct.pack("<f", -1.0)), "block 1 has levels"),
                      (_hostile("topk32", 0, 0, struct.pack("<ff", 2.0, 1.0)), "0 <= lo <= hi"),
                      (_hostile("topk32", 4, 8, b"\x00\x00\x00"), "block 4 has offsets that repeat"),
                      (_hostile("topk32", 0, 8, b"\xff\x03"), "block 0 has offsets that repeat or are not increasing")):
        with pytest.raises(ValueError, match=what):
            codec.decode("topk32", bad, NUMEL)
    # the last block holds 333 elements: an offset past them points outside the vector
    last = codec.num_blocks(NUMEL) - 1
    top = _hostile("topk32", last, 8 + 40 - 2, b"\xff\xff")  # the last offset's top bits: 1020+
    with pytest.raises(ValueError, match=f"block {last} has offset 10.. past the vector's end"):
        codec.decode("topk32", top, NUMEL)


def test_topk_encode_rejects_non_finite() -> None:
    x = _vec(8)
    x[5000] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        codec.encode("topk32", x)


def test_topk_error_feedback_sends_everything_eventually() -> None:
    """Top-k alone never sends the small coordinates; with the residual every one arrives."""
    n = codec.BLOCK
    delta = torch.linspace(0.001, 0.002, n)
    delta[0] = 1.0
    rounds = 200
    sent_plain, sent_ef, peaks = _send_repeatedly("topk32", delta, rounds)
    assert int((sent_plain == 0).sum()) == n - 32  # without feedback, 992 coordinates never move
    assert bool((sent_ef > 0).all())
    # the residual (what is owed) stays bounded while the truth grows: 31 slots a round drain the
    # inflow sum(delta[1:]), so nothing waits for more than about sum / 31 before it is sent
    drain = float(delta[1:].sum()) / 31
    assert max(peaks[100:]) <= 1.5 * drain
    assert bool((sent_ef[1:] >= 0.5 * delta[1:] * rounds).all())  # even the smallest got most of its due
    assert max(peaks[150:]) <= max(peaks[50:100]) * 1.05


@pytest.mark.parametrize("name", TOPK)
def test_topk_aggregate_is_re_sparsified_and_the_same_for_every_member(name: str) -> None:
    reqs = {f"p{i}": AverageRequest(round=0, delta=_vec(10 + i), weight=1.0 + i, model_sha256="x", steps=1)
            for i in range(4)}
    out = reduce_in_process(reqs, swarm_id="s", compression=name, rule="mean", trim_fraction=0.2)
    agg = out["p0"].aggregate
    assert agg is not None
    assert all(r.aggregate is not None and torch.equal(r.aggregate, agg) for r in out.values())
    assert torch.equal(agg, codec.roundtrip(name, agg))  # what a decoder of the reducer's bytes sees
    assert int((_blocks(agg) != 0).sum(dim=1).max()) <= codec.topk_size(name)
    for i, pid in enumerate(sorted(reqs)):
        assert out[pid].bytes_sent == butterfly_bytes(NUMEL, 4, i, name)


def test_topk_residual_keeps_what_the_aggregate_dropped(shards: list) -> None:
    """topk: Δ − C(Δ) on the coordinates the group applied, all of Δ on those its aggregate dropped."""
    peers, phases, results = _one_compressed_round(shards, "topk16")
    for p in peers:
        p.finish_round(phases[p.peer_id], results[p.peer_id])
        delta, agg = phases[p.peer_id].delta, results[p.peer_id].aggregate
        assert agg is not None and p.residual is not None
        sent = codec.roundtrip("topk16", delta)
        applied = agg != 0
        assert torch.equal(p.residual[applied], (delta - sent)[applied])
        assert torch.equal(p.residual[~applied], delta[~applied])
        dropped = (sent != 0) & ~applied  # sent by this member, dropped by the group's top 16
        assert int(dropped.sum()) > 0 and torch.equal(p.residual[dropped], delta[dropped])


def test_topk_simulation_is_deterministic_and_carries_residuals(shards: list) -> None:
    spec = fast_spec(averaging={"compression": "topk32"}, round={"inner_steps": 2})
    runs = []
    for _ in range(2):
        peers, result = simulate(spec, [[s] for s in shards[:2]], rounds=2, threads=1, save_checkpoints=False)
        for rnd in result.per_round:
            assert len({v["model_sha256"] for v in rnd.values()}) == 1
        runs.append([p.theta_sha256 for p in peers] + [hashlib.sha256(p.residual.numpy().tobytes()).hexdigest()
                                                        for p in peers if p.residual is not None])
    assert runs[0] == runs[1]
    assert len(runs[0]) == 4


# ---- sign1: one bit per element and the block's mean magnitude ----------------------------------------

def test_sign1_sends_signs_and_the_exact_mean_magnitude() -> None:
    x = _vec(3)
    x[codec.BLOCK : 2 * codec.BLOCK] = 0.0  # an all-zero block stays zeros
    y = codec.roundtrip("sign1", x)
    assert len(codec.encode("sign1", x)) == codec.encoded_size("sign1", NUMEL) == 6 * 132
    assert torch.equal(y[codec.BLOCK : 2 * codec.BLOCK], torch.zeros(codec.BLOCK))
    for b, (lo, hi) in enumerate(codec.spans(NUMEL, codec.num_blocks(NUMEL))):
        if b == 1:
            continue
        mean = float(x[lo:hi].double().abs().sum() / (hi - lo))  # the last block's mean is over its 333
        assert set(y[lo:hi].abs().unique().tolist()) == {float(torch.tensor(mean, dtype=torch.float32))}
        assert torch.equal(y[lo:hi] < 0, x[lo:hi] < 0)
    # spans are byte slices of the whole encoding
    whole = codec.encode("sign1", x)
    for lo, hi in codec.spans(NUMEL, 4):
        b0, nb = lo // codec.BLOCK, codec.num_blocks(hi - lo)
        assert codec.encode("sign1", x[lo:hi].contiguous()) == whole[132 * b0 : 132 * (b0 + nb)]


def test_sign1_decode_rejects_a_bad_scale_by_block() -> None:
    data = bytearray(codec.encode("sign1", _vec(7)))
    for value in (float("nan"), float("inf"), -1.0):
        data[3 * 132 : 3 * 132 + 4] = struct.pack("<f", value)
        with pytest.raises(ValueError, match="sign1 block 3 has scale"):
            codec.decode("sign1", bytes(data), NUMEL)
