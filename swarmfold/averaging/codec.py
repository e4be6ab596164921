"""Wire formats for pseudo-gradients and aggregates: none (fp32), fp16, int8 absmax, top-k sparse, sign.

Every codec works on blocks of BLOCK elements, and the all-reduce cuts the flat vector
into spans whose boundaries are multiples of BLOCK. So encoding a span gives exactly the
bytes of that part of the whole-vector encoding, and the live swarm, `simulate` and
`merge` see the same bits. All codecs are deterministic functions of their input, built
from correctly rounded IEEE operations (max, division, round-half-even, multiplication),
so they give the same bits on every machine.

int8 layout: one float32 absmax/127 scale per block (all scales first), then one int8 per
element: numel + 4 * ceil(numel / BLOCK) bytes, 3.98x fewer than float32. `decode` checks
sizes only; callers check that what they decoded is finite (protocol.check_chunk, swarm).

topk<K> layout (SparseLoCo-style; K of every BLOCK elements, K in TOPK_SIZES): per block, in
block order, a fixed 8 + 1.5 K bytes, so a span's encoding is the matching slice of the
whole vector's and every size is known before a byte is read:
  - float32 lo, float32 hi: the smallest and largest magnitude among the K kept elements;
  - K in-block offsets, 10 bits each (little-endian bit order), strictly increasing;
  - K 2-bit codes: bit 0 the sign (1 = negative), bit 1 the magnitude (0 = lo, 1 = hi).
The K kept elements are the K largest magnitudes, ties broken by the lower offset (a rule,
not torch.topk's order). The two magnitude levels are the block's extremes, so the largest
element of every block arrives exact and a block sparser than K keeps its zeros exact; what
is not sent (the other elements, the rounding to lo/hi) stays in the sender's error-feedback
residual. The aggregate goes back in the same format (the reducer re-selects the top K of
the weighted mean): a fixed size, and the coordinates that most members push the same way
are the ones kept; what it drops goes back into the members' residuals (LocalPeer.finish_round,
docs/results.md section 11). topk32 is 56 bytes per 1024 elements (18x fewer than int8), topk16 32.
`decode` rejects non-finite or disordered levels and offsets that repeat, go backwards or
point past the vector's end, naming the block.

sign1 layout (dense, EF-signSGD style): per block a float32 scale, the block's mean
magnitude (summed exactly in integers), then one sign bit per element (1 = negative):
132 bytes per 1024 elements, every element sent as ±scale. The aggregate goes back the
same way; what it loses there is not fed back. `decode` rejects a non-finite or negative scale.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch

from swarmfold.spec import COMPRESSIONS, TOPK_SIZES

BLOCK = 1024
CODECS = COMPRESSIONS
_OFFSET_BITS = 10  # in-block offsets: BLOCK = 2**10
_TOPK_GROUP = 256  # blocks a topk or sign1 encoder works on at once
_SIGN_BLOCK_BYTES = 4 + BLOCK // 8  # sign1: a float32 scale and one bit per element
_FIXED = 2.0**40  # sign1's exact mean: magnitudes as 40-bit fractions of the block's absmax


def encoded_size(codec: str, numel: int) -> int:
    if codec == "none":
        return 4 * numel
    if codec == "fp16":
        return 2 * numel
    if codec == "int8":
        return numel + 4 * num_blocks(numel)
    if codec == "sign1":
        return num_blocks(numel) * _SIGN_BLOCK_BYTES
    k = topk_size(codec)
    if k:
        return num_blocks(numel) * topk_block_bytes(k)
    raise ValueError(f"unknown codec {codec!r}; use one of {', '.join(CODECS)}")


def num_blocks(numel: int) -> int:
    return (numel + BLOCK - 1) // BLOCK


def topk_size(codec: str) -> int:
    """K of a topk<K> codec; 0 for any other name."""
    if codec.startswith("topk") and codec[4:].isdigit() and int(codec[4:]) in TOPK_SIZES:
        return int(codec[4:])
    return 0


def topk_block_bytes(k: int) -> int:
    """Bytes of one topk<k> block: two float32 levels, k 10-bit offsets, k 2-bit codes (k is a multiple of 4)."""
    return 8 + k * (_OFFSET_BITS + 2) // 8


def encode(codec: str, x: torch.Tensor) -> bytes:
    """Encode a flat float32 tensor."""
    if x.dtype != torch.float32 or x.dim() != 1:
        raise ValueError(f"encode: expected a flat float32 tensor, got {x.dtype} with shape {tuple(x.shape)}")
    x = x.contiguous()
    if codec == "none":
        return x.numpy().tobytes()
    if codec == "fp16":
        return x.to(torch.float16).numpy().tobytes()
    if codec == "int8":
        n = x.numel()
        nb = num_blocks(n)
        padded = torch.zeros(nb * BLOCK, dtype=torch.float32)
        padded[:n] = x
        blocks = padded.view(nb, BLOCK)
        scale = blocks.abs().amax(dim=1) / 127.0
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(blocks / safe[:, None]).clamp_(-127, 127).to(torch.int8)
        return scale.numpy().tobytes() + q.reshape(-1)[:n].numpy().tobytes()
    if codec == "sign1":
        return _encode_grouped(codec, x.numpy(), _encode_sign_blocks)
    k = topk_size(codec)
    if k:
        return _encode_grouped(codec, x.numpy(), functools.partial(_encode_topk_blocks, k))
    raise ValueError(f"unknown codec {codec!r}; use one of {', '.join(CODECS)}")


def decode(codec: str, data: bytes, numel: int) -> torch.Tensor:
    """Decode to a flat float32 tensor; raises ValueError on a size mismatch (hostile input)."""
    expected = encoded_size(codec, numel)
    if len(data) != expected:
        raise ValueError(f"decode: {codec} payload of {numel} elements must be {expected} bytes, got {len(data)}")
    if codec == "none":
        return torch.from_numpy(np.frombuffer(data, dtype=np.float32).copy())
    if codec == "fp16":
        return torch.from_numpy(np.frombuffer(data, dtype=np.float16).copy()).to(torch.float32)
    if codec == "sign1":
        return torch.from_numpy(_decode_sign(data, numel))
    k = topk_size(codec)
    if k:
        return torch.from_numpy(_decode_topk(codec, k, data, numel))
    nb = num_blocks(numel)
    scale = torch.from_numpy(np.frombuffer(data, dtype=np.float32, count=nb).copy())
    q = torch.from_numpy(np.frombuffer(data, dtype=np.int8, offset=4 * nb).copy())
    padded = torch.zeros(nb * BLOCK, dtype=torch.float32)
    padded[:numel] = q.to(torch.float32)
    return (padded.view(nb, BLOCK) * scale[:, None]).reshape(-1)[:numel].contiguous()


def decode_into(codec: str, data: bytes, out: torch.Tensor) -> None:
    """`out[:] = decode(codec, data, out.numel())` with a single copy (out: a contiguous flat float32 tensor)."""
    expected = encoded_size(codec, out.numel())
    if len(data) != expected:
        raise ValueError(f"decode: {codec} payload of {out.numel()} elements must be {expected} bytes, got {len(data)}")
    if codec == "none":
        out.numpy()[:] = np.frombuffer(data, dtype=np.float32)
    elif codec == "fp16":  # float16 -> float32 is exact, in numpy as in torch
        out.numpy()[:] = np.frombuffer(data, dtype=np.float16)
    else:
        out.copy_(decode(codec, data, out.numel()))


def _padded_blocks(x: np.ndarray, fill: float) -> np.ndarray:
    nb = num_blocks(x.size)
    padded = np.full(nb * BLOCK, fill, dtype=np.float32)
    padded[: x.size] = x
    return padded.reshape(nb, BLOCK)


def _select_topk(mag: np.ndarray, k: int) -> np.ndarray:
    """Per row, the offsets (ascending) of the k largest values, ties to the lower offset.

    The k-th largest value of a row is unique whatever the algorithm; every value above it
    is kept, and the lowest offsets among those equal to it fill the row up to k."""
    kth = -np.partition(-mag, k - 1, axis=1)[:, k - 1 : k]
    above = mag > kth
    tied = mag == kth
    room = k - above.sum(axis=1, keepdims=True)
    keep = above | tied
    crowded = np.nonzero(tied.sum(axis=1) > room[:, 0])[0]  # rows with more ties than room: rare but real
    if crowded.size:
        keep[crowded] = above[crowded] | (tied[crowded] & (np.cumsum(tied[crowded], axis=1) <= room[crowded]))
    return np.nonzero(keep)[1].reshape(-1, k)  # row-major: each row's offsets ascending


def _pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """(rows, k) small non-negative integers -> (rows, k * bits / 8) bytes, little-endian bit order."""
    planes = (values[:, :, None] >> np.arange(bits)) & 1
    return np.packbits(planes.astype(np.uint8).reshape(values.shape[0], -1), axis=1, bitorder="little")


def _unpack_bits(packed: np.ndarray, k: int, bits: int) -> np.ndarray:
    planes = np.unpackbits(packed, axis=1, bitorder="little").reshape(packed.shape[0], k, bits)
    return (planes.astype(np.int64) << np.arange(bits)).sum(axis=2)


def _encode_grouped(codec: str, x: np.ndarray, encode_blocks: Callable[[np.ndarray], bytes]) -> bytes:
    if not bool(np.isfinite(x).all()):
        raise ValueError(f"encode: {codec} needs finite values; the vector holds NaN or Inf")
    # a few hundred blocks at a time: the temporaries stay small for any model size
    step = _TOPK_GROUP * BLOCK
    return b"".join(encode_blocks(x[lo:lo + step]) for lo in range(0, x.size, step))


def _encode_topk_blocks(k: int, x: np.ndarray) -> bytes:
    blocks = _padded_blocks(x, 0.0)
    # padding sorts below every real magnitude, so it is chosen only when the last block is shorter than k
    mag = _padded_blocks(np.abs(x), -1.0)
    offsets = _select_topk(mag, k)
    values = np.take_along_axis(blocks, offsets, axis=1)
    kept = np.abs(values)
    lo, hi = kept.min(axis=1), kept.max(axis=1)
    big = (kept - lo[:, None]) > (hi[:, None] - kept)  # the nearer level; a tie goes to lo
    codes = (values < 0).astype(np.int64) | (big.astype(np.int64) << 1)
    levels = np.stack([lo, hi], axis=1).astype("<f4").view(np.uint8)
    out = np.concatenate([levels, _pack_bits(offsets, _OFFSET_BITS), _pack_bits(codes, 2)], axis=1)
    return out.tobytes()


def _decode_topk(codec: str, k: int, data: bytes, numel: int) -> np.ndarray:
    """Decode a topk<k> payload whose size was checked; raises ValueError naming the first bad block."""
    nb = num_blocks(numel)
    if nb == 0:
        return np.zeros(0, dtype=np.float32)
    raw = np.frombuffer(data, dtype=np.uint8).reshape(nb, topk_block_bytes(k))
    levels = np.ascontiguousarray(raw[:, :8]).view("<f4").astype(np.float32)
    lo, hi = levels[:, 0], levels[:, 1]
    bad = ~(np.isfinite(lo) & np.isfinite(hi) & (lo >= 0) & (hi >= lo))
    if bad.any():
        b = int(np.argmax(bad))
        raise ValueError(f"decode: {codec} block {b} has levels lo={lo[b]!r}, hi={hi[b]!r}; "
                         "they must be finite with 0 <= lo <= hi")
    cut = 8 + k * _OFFSET_BITS // 8
    offsets = _unpack_bits(np.ascontiguousarray(raw[:, 8:cut]), k, _OFFSET_BITS)
    disordered = (np.diff(offsets, axis=1) <= 0).any(axis=1)
    if disordered.any():
        b = int(np.argmax(disordered))
        raise ValueError(f"decode: {codec} block {b} has offsets that repeat or are not increasing")
    last = numel - (nb - 1) * BLOCK  # padding offsets are legal only where the last block is shorter than k
    if int(offsets[-1, -1]) >= max(last, k):
        raise ValueError(f"decode: {codec} block {nb - 1} has offset {int(offsets[-1, -1])} past the vector's "
                         f"end ({last} elements in that block)")
    codes = _unpack_bits(np.ascontiguousarray(raw[:, cut:]), k, 2)
    values = np.where(codes & 2, hi[:, None], lo[:, None]).astype(np.float32)
    values = np.where(codes & 1, -values, values)
    out = np.zeros((nb, BLOCK), dtype=np.float32)
    np.put_along_axis(out, offsets, values, axis=1)
    return out.reshape(-1)[:numel].copy()


def _encode_sign_blocks(x: np.ndarray) -> bytes:
    """sign1: per block the mean magnitude (float32), then one sign bit per element.

    The mean is summed exactly, in integers (each magnitude as a 40-bit fraction of the block's
    absmax, a correctly rounded division and a floor), so its bits do not depend on the order
    of a float sum, which differs between CPUs' vector units."""
    blocks = _padded_blocks(x, 0.0)
    mag = np.abs(blocks).astype(np.float64)
    top = mag.max(axis=1)
    safe = np.where(top > 0, top, 1.0)
    fixed = np.floor(mag / safe[:, None] * _FIXED).astype(np.int64).sum(axis=1)
    count = np.full(blocks.shape[0], float(BLOCK))
    count[-1] = x.size - (blocks.shape[0] - 1) * BLOCK
    scale = (fixed.astype(np.float64) * top / _FIXED / count).astype("<f4")
    signs = np.packbits((blocks < 0).astype(np.uint8), axis=1, bitorder="little")
    return np.concatenate([scale.view(np.uint8).reshape(-1, 4), signs], axis=1).tobytes()


def _decode_sign(data: bytes, numel: int) -> np.ndarray:
    nb = num_blocks(numel)
    if nb == 0:
        return np.zeros(0, dtype=np.float32)
    raw = np.frombuffer(data, dtype=np.uint8).reshape(nb, _SIGN_BLOCK_BYTES)
    scale = np.ascontiguousarray(raw[:, :4]).view("<f4").astype(np.float32)[:, 0]
    bad = ~(np.isfinite(scale) & (scale >= 0))
    if bad.any():
        b = int(np.argmax(bad))
        raise ValueError(f"decode: sign1 block {b} has scale {scale[b]!r}; it must be finite and >= 0")
    negative = np.unpackbits(np.ascontiguousarray(raw[:, 4:]), axis=1, bitorder="little").astype(bool)
    out = np.where(negative, -scale[:, None], scale[:, None]).astype(np.float32)
    return out.reshape(-1)[:numel].copy()


def roundtrip(codec: str, x: torch.Tensor) -> torch.Tensor:
    """What a receiver sees of `x`: decode(encode(x))."""
    if codec == "none":
        return x
    return decode(codec, encode(codec, x), x.numel())


def spans(numel: int, parts: int) -> list[tuple[int, int]]:
    """Cut [0, numel) into `parts` contiguous spans with BLOCK-aligned boundaries, as evenly as possible."""
    if parts < 1:
        raise ValueError("spans: need at least one part")
    nb = num_blocks(numel)
    out = []
    for i in range(parts):
        lo = min(numel, (nb * i // parts) * BLOCK)
        hi = min(numel, (nb * (i + 1) // parts) * BLOCK)
        out.append((lo, hi))
    return out
