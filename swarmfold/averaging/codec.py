"""Wire formats for pseudo-gradients and aggregates: none (fp32), fp16, int8 blockwise absmax.

Every codec works on blocks of BLOCK elements, and the all-reduce cuts the flat vector
into spans whose boundaries are multiples of BLOCK. So encoding a span gives exactly the
bytes of that part of the whole-vector encoding, and the live swarm, `simulate` and
`merge` see the same bits. All codecs are deterministic functions of their input, built
from correctly rounded IEEE operations (max, division, round-half-even, multiplication),
so they give the same bits on every machine.

int8 layout: one float32 absmax/127 scale per block (all scales first), then one int8 per
element: numel + 4 * ceil(numel / BLOCK) bytes, 3.98x fewer than float32. `decode` checks
sizes only; callers check that what they decoded is finite (protocol.check_chunk, swarm).
"""

from __future__ import annotations

import numpy as np
import torch

BLOCK = 1024
CODECS = ("none", "fp16", "int8")


def encoded_size(codec: str, numel: int) -> int:
    if codec == "none":
        return 4 * numel
    if codec == "fp16":
        return 2 * numel
    if codec == "int8":
        return numel + 4 * num_blocks(numel)
    raise ValueError(f"unknown codec {codec!r}; use one of {', '.join(CODECS)}")


def num_blocks(numel: int) -> int:
    return (numel + BLOCK - 1) // BLOCK


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
