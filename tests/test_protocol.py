"""The streamed all-reduce's pieces: chunk frames on the wire, header and chunk checks, and that
reducing a span chunk by chunk gives the bits of reducing the whole vector at once."""

from __future__ import annotations

import asyncio
import hashlib

import msgpack
import numpy as np
import pytest
import torch

from swarmfold.averaging import codec, wire
from swarmfold.averaging.aggregate import Contribution, aggregate
from swarmfold.averaging.protocol import (
    CHUNK_ELEMENTS,
    Expectation,
    Rejected,
    check_chunk,
    check_header,
    chunk_bounds,
    encode_span,
    span_payload_size,
)

NUMEL = 2 * CHUNK_ELEMENTS + 3 * codec.BLOCK + 77  # three chunks, the last one short and not block-aligned


def _vec(seed: int, n: int = NUMEL) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 1e-3


def test_chunks_cover_the_span_on_block_boundaries() -> None:
    bounds = chunk_bounds(NUMEL)
    assert bounds[0][0] == 0 and bounds[-1][1] == NUMEL and len(bounds) == 3
    assert all(hi == lo2 for (_, hi), (lo2, _) in zip(bounds, bounds[1:], strict=False))
    assert all(lo % codec.BLOCK == 0 for lo, _ in bounds)
    assert chunk_bounds(0) == []


@pytest.mark.parametrize("name", codec.CODECS)
def test_chunked_encoding_decodes_to_the_whole_vector_bits(name: str) -> None:
    x = _vec(1)
    payload = encode_span(name, x)
    assert len(payload) == span_payload_size(name, NUMEL)
    out = torch.empty(NUMEL)
    pos = 0
    for k, (lo, hi) in enumerate(chunk_bounds(NUMEL)):
        size = codec.encoded_size(name, hi - lo)
        check_chunk({"kind": "chunk", "k": k, "data": payload[pos:pos + size]}, k, name, out[lo:hi])
        pos += size
    assert torch.equal(out, codec.roundtrip(name, x)), "chunking never changes a codec's bits"


def test_decode_into_equals_decode() -> None:
    x = _vec(2)
    for name in codec.CODECS:
        out = torch.empty(NUMEL)
        codec.decode_into(name, codec.encode(name, x), out)
        assert torch.equal(out, codec.decode(name, codec.encode(name, x), NUMEL))
        with pytest.raises(ValueError, match="bytes"):
            codec.decode_into(name, codec.encode(name, x)[:-1], out)


@pytest.mark.parametrize("rule", ["mean", "trimmed_mean", "median"])
def test_reducing_chunk_by_chunk_gives_the_whole_vector_bits(rule: str) -> None:
    """What the live reducer does (one chunk of one span at a time) against what simulate does."""
    parts = {f"peer-{i}": Contribution(_vec(10 + i), float(100 + 7 * i)) for i in range(5)}
    whole = aggregate(parts, rule)
    pieces = []
    for lo, hi in chunk_bounds(NUMEL):
        pieces.append(aggregate({p: Contribution(c.tensor[lo:hi], c.weight) for p, c in parts.items()}, rule))
    assert hashlib.sha256(torch.cat(pieces).numpy().tobytes()).digest() == \
        hashlib.sha256(whole.numpy().tobytes()).digest()


def test_a_chunk_frame_reads_back_as_a_message() -> None:
    async def roundtrip(data: bytes | memoryview) -> tuple[dict, int, int]:
        reader = asyncio.StreamReader()

        class Sink:
            def write(self, b: bytes | memoryview) -> None:
                reader.feed_data(bytes(b))

            async def drain(self) -> None:
                pass

        sent = await wire.send_chunk(Sink(), 7, data)  # type: ignore[arg-type]
        reader.feed_eof()
        msg, received = await wire.recv(reader, 1 << 20)
        return msg, sent, received

    data = np.arange(1000, dtype=np.float32)
    msg, sent, received = asyncio.run(roundtrip(data.data.cast("B")))
    assert msg == {"kind": "chunk", "k": 7, "data": data.tobytes()}
    assert sent == received
    assert msgpack.unpackb(msgpack.packb(msg)) == msg


def _exp(**kw: object) -> Expectation:
    base = dict(spec_hash="s" * 64, round=3, group_id="g", base_sha256="b" * 64, members=frozenset({"a", "b"}),
                compression="int8", numel=NUMEL, span_index=1, weight_cap=1000.0, min_steps=5, max_steps=5,
                max_payload_bytes=1 << 20)
    base.update(kw)
    return Expectation(**base)  # type: ignore[arg-type]


def _header(**kw: object) -> dict:
    h = {"kind": "part", "group_id": "g", "spec_hash": "s" * 64, "round": 3, "base_sha256": "b" * 64, "span": 1,
         "numel": NUMEL, "dtype": "int8-absmax", "weight": 500.0, "steps": 5, "chunk": CHUNK_ELEMENTS,
         "payload_bytes": span_payload_size("int8", NUMEL)}
    h.update(kw)
    return h


@pytest.mark.parametrize("change, sender, label", [
    ({}, "c", "not_a_member"),
    ({"spec_hash": "x" * 64}, "a", "wrong_spec"),
    ({"round": 4}, "a", "wrong_round"),
    ({"base_sha256": "c" * 64}, "a", "wrong_base"),
    ({"dtype": "float32"}, "a", "wrong_dtype"),
    ({"numel": NUMEL + 1}, "a", "wrong_shape"),
    ({"payload_bytes": 1 << 21}, "a", "oversized"),
    ({"payload_bytes": 12}, "a", "wrong_shape"),
    ({"chunk": 1024}, "a", "malformed"),
    ({"weight": 1e6}, "a", "weight_above_cap"),
    ({"weight": float("nan")}, "a", "malformed"),
    ({"weight": True}, "a", "malformed"),
    ({"round": "3"}, "a", "malformed"),
    ({"steps": 4}, "a", "wrong_steps"),  # steps mode: exactly H
    ({"steps": 0}, "a", "wrong_steps"),
    ({"steps": 2.5}, "a", "malformed"),
])
def test_bad_headers_are_rejected_by_name(change: dict, sender: str, label: str) -> None:
    with pytest.raises(Rejected) as e:
        check_header(_header(**change), sender, _exp())
    assert e.value.kind.value == label
    assert check_header(_header(), "a", _exp()) == 500.0


def test_time_mode_headers_declare_steps_within_the_rounds_bounds() -> None:
    exp = _exp(min_steps=2, max_steps=5)  # round.mode "time": 2 to 5 steps
    for k in (2, 3, 5):
        assert check_header(_header(steps=k), "a", exp) == 500.0
    for k in (1, 6, 10**9):
        with pytest.raises(Rejected) as e:
            check_header(_header(steps=k), "a", exp)
        assert e.value.kind.value == "wrong_steps" and "2 to 5" in e.value.detail


def test_bad_chunks_are_rejected_by_name() -> None:
    lo, hi = chunk_bounds(NUMEL)[0]
    out = torch.empty(hi - lo)
    good = codec.encode("int8", _vec(3)[lo:hi])
    for msg, label in [
        ({"kind": "chunk", "k": 1, "data": good}, "malformed"),  # out of order
        ({"kind": "chunk", "k": 0, "data": good[:-1]}, "wrong_shape"),
        ({"kind": "chunk", "k": 0}, "malformed"),
        ({"kind": "chunk", "k": 0, "data": b"\x00\x00\xc0\x7f" + good[4:]}, "nonfinite"),  # a NaN block scale
    ]:
        with pytest.raises(Rejected) as e:
            check_chunk(msg, 0, "int8", out)
        assert e.value.kind.value == label, msg.keys()
