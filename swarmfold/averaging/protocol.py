"""The averaging protocol's vocabulary: phases, named rejections, errors, and checks of contributions.

A contribution (one sender's span of its pseudo-gradient, sent to that span's reducer)
is untrusted input. It travels as a header (`check_header`: everything but the numbers)
and then the span in chunks of CHUNK_ELEMENTS (`check_chunk`: size and finiteness), so
that a reducer can aggregate chunk k and send it back while later chunks are still on
the wire. A rejected contribution is left out of the round and never stalls the others.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from swarmfold.averaging import codec
from swarmfold.averaging.wire import WireError, field

if TYPE_CHECKING:
    from swarmfold.averaging.messages import PartHeader

PROTOCOL = "swarmfold/7"  # 2: spans stream in chunks; 3: typed messages (averaging/messages.py);
# 4: state sync streams in chunks (averaging/statesync.py); 5: parts declare their inner steps, which the
# results and the commit digest record (time-boxed rounds); 6: the tree for N > G (matchmaking messages
# carry their level, the final list the next level's delegates; members fetch the top level's aggregate);
# 7: a member whose delegate is gone asks another delegate for the round's top (tree requests name it)
HELLO, PROPOSE, REDUCE, VOTE, STATE, TREE = (f"{PROTOCOL}/{name}" for name in
                                             ("hello", "propose", "reduce", "vote", "state", "tree"))
DATA = f"{PROTOCOL}/data"  # the public data's manifest and files (averaging/datashare.py)
DIRECT = f"{PROTOCOL}/direct"  # an offer of a direct TCP stream for bulk bytes (averaging/direct.py)

DTYPE_OF_CODEC = {"none": "float32", "fp16": "float16", "int8": "int8-absmax",
                  **{name: f"{name}-2bit" for name in codec.CODECS if codec.topk_size(name)}, "sign1": "sign1-mean"}

# Elements per streamed chunk of a span: 512 KiB of float32, 128 KiB of int8 (hivemind streams
# 512 KB parts too). A multiple of codec.BLOCK, so chunking never changes a codec's bits.
CHUNK_ELEMENTS = 128 * codec.BLOCK
CHUNK_FRAME_SLACK = 4096  # a chunk frame's msgpack overhead is far below this


def chunk_bounds(numel: int) -> list[tuple[int, int]]:
    """The chunks of a span of `numel` elements, as (lo, hi) within the span (none for an empty span)."""
    return [(lo, min(lo + CHUNK_ELEMENTS, numel)) for lo in range(0, numel, CHUNK_ELEMENTS)]


def span_payload_size(compression: str, numel: int) -> int:
    """Bytes of a span on the wire: the encodings of its chunks, one after another."""
    return sum(codec.encoded_size(compression, hi - lo) for lo, hi in chunk_bounds(numel))


def encode_span(compression: str, x: torch.Tensor) -> bytes:
    """A span's wire payload: each chunk encoded on its own (for int8, scales then values per chunk)."""
    return b"".join(codec.encode(compression, x[lo:hi].contiguous()) for lo, hi in chunk_bounds(x.numel()))


class Phase(enum.Enum):
    """Where a round is; fault injection in tests names these."""

    MATCHMAKING = "matchmaking"
    SEND = "send"
    REDUCE = "reduce"
    COMMIT = "commit"


class Rejection(enum.Enum):
    """Why a reducer left a contribution out (the names appear in logs and metrics)."""

    NONFINITE = "nonfinite"
    WRONG_SHAPE = "wrong_shape"
    WRONG_DTYPE = "wrong_dtype"
    WRONG_ROUND = "wrong_round"
    WRONG_SPEC = "wrong_spec"
    WRONG_BASE = "wrong_base"
    OVERSIZED = "oversized"
    WEIGHT_ABOVE_CAP = "weight_above_cap"
    WRONG_STEPS = "wrong_steps"  # declares a number of inner steps the round's mode does not allow
    NOT_A_MEMBER = "not_a_member"
    MALFORMED = "malformed"
    TIMEOUT = "timeout"
    DENIED = "denied"  # a deny record (failed replay) names the sender
    VERIFY_FAILED = "verify_failed"  # this reducer replayed the sender's round and the span did not match


class AveragingError(Exception):
    """A network-side failure of one averaging attempt (retried or rolled back, never fatal)."""


class SpecMismatch(Exception):
    """A peer runs a different spec; it is refused and told why."""


class StateSyncError(Exception):
    """Downloading θ_r and the outer state from a peer failed or did not match the published hash."""


class Rejected(Exception):
    def __init__(self, kind: Rejection, detail: str):
        super().__init__(f"{kind.value}: {detail}")
        self.kind = kind
        self.detail = detail

    @property
    def label(self) -> str:
        return f"{self.kind.value}: {self.detail}"


@dataclass(frozen=True)
class Expectation:
    """What a reducer expects of every part for its span."""

    spec_hash: str
    round: int
    group_id: str
    base_sha256: str
    members: frozenset[str]
    compression: str
    numel: int  # elements of this span
    span_index: int
    weight_cap: float
    min_steps: int  # the inner steps a part may declare: [min_steps, max_steps] (both H in steps mode)
    max_steps: int
    max_payload_bytes: int = 1 << 62  # averaging.max_message_bytes


def check_header(msg: dict[str, Any] | PartHeader, sender: str, exp: Expectation) -> float:
    """Validate a contribution's header (everything but the numbers); returns its weight or raises Rejected.
    A map from the wire is first parsed as a `messages.PartHeader` (a malformed one is `malformed`)."""
    from swarmfold.averaging.messages import PartHeader

    if sender not in exp.members:
        raise Rejected(Rejection.NOT_A_MEMBER, f"{sender} is not in group {exp.group_id[:8]}")
    h = msg if isinstance(msg, PartHeader) else PartHeader.from_wire(msg)
    if h.spec_hash != exp.spec_hash:
        raise Rejected(Rejection.WRONG_SPEC, f"spec {h.spec_hash[:12]} is not ours ({exp.spec_hash[:12]})")
    if h.round != exp.round:
        raise Rejected(Rejection.WRONG_ROUND, f"round {h.round}, expected {exp.round}")
    if h.base_sha256 != exp.base_sha256:
        raise Rejected(Rejection.WRONG_BASE, f"trained from {h.base_sha256[:12]}, the group's base is "
                       f"{exp.base_sha256[:12]}")
    if h.dtype != DTYPE_OF_CODEC[exp.compression]:
        raise Rejected(Rejection.WRONG_DTYPE, f"dtype {h.dtype!r}, expected {DTYPE_OF_CODEC[exp.compression]!r}")
    if h.span != exp.span_index or h.numel != exp.numel:
        raise Rejected(Rejection.WRONG_SHAPE, f"span {h.span} of {h.numel} elements, expected span "
                       f"{exp.span_index} of {exp.numel}")
    if h.payload_bytes > exp.max_payload_bytes:
        raise Rejected(Rejection.OVERSIZED, f"a payload of {h.payload_bytes} bytes exceeds the limit of "
                       f"{exp.max_payload_bytes} bytes")
    if h.payload_bytes != span_payload_size(exp.compression, exp.numel):
        raise Rejected(Rejection.WRONG_SHAPE, f"payload of {h.payload_bytes} bytes, expected "
                       f"{span_payload_size(exp.compression, exp.numel)}")
    if h.chunk != CHUNK_ELEMENTS:
        raise Rejected(Rejection.MALFORMED, f"chunks of {h.chunk} elements, expected {CHUNK_ELEMENTS}")
    if h.weight <= 0:
        raise Rejected(Rejection.MALFORMED, f"weight {h.weight} must be a positive number")
    if h.weight > exp.weight_cap:
        raise Rejected(Rejection.WEIGHT_ABOVE_CAP, f"weight {h.weight} exceeds the cap {exp.weight_cap}")
    if not exp.min_steps <= h.steps <= exp.max_steps:
        allowed = (f"exactly {exp.max_steps}" if exp.min_steps == exp.max_steps
                   else f"{exp.min_steps} to {exp.max_steps}")
        raise Rejected(Rejection.WRONG_STEPS, f"declares {h.steps} inner steps; this round allows {allowed}")
    return h.weight


def check_chunk(msg: dict[str, Any], index: int, compression: str, out: torch.Tensor) -> None:
    """Validate chunk `index` of a contribution and decode it into `out` (its place in the part); raises Rejected."""
    try:
        if field(msg, "kind", str) != "chunk" or field(msg, "k", int) != index:
            raise Rejected(Rejection.MALFORMED, f"expected chunk {index}, got {msg.get('kind')!r} {msg.get('k')!r}")
        data = field(msg, "data", bytes)
        if len(data) != codec.encoded_size(compression, out.numel()):
            raise Rejected(Rejection.WRONG_SHAPE, f"chunk {index} of {len(data)} bytes, expected "
                           f"{codec.encoded_size(compression, out.numel())}")
        codec.decode_into(compression, data, out)
        if not bool(np.isfinite(out.numpy()).all()):  # numpy: ~50x faster than torch.isfinite on 1 thread
            raise Rejected(Rejection.NONFINITE, f"chunk {index} of the contribution holds NaN or Inf")
    except WireError as e:
        raise Rejected(Rejection.MALFORMED, str(e)) from e
    except ValueError as e:
        raise Rejected(Rejection.MALFORMED, str(e)) from e
