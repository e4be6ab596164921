"""Verification inside the live swarm: which members to replay, how to judge a span, deny records.

When the spec sets `verify.fraction > 0`, every reducer replays a random fraction of the
members whose parts it received (the verifier's own randomness, so no member can predict
it) and compares the replay with **the span it is about to aggregate**: exactly the bytes
that would enter the average, so nothing the member says elsewhere matters. A member
whose span fails is left out of that span like any other rejected part (named
`verify_failed`); the rejection reaches every member with the reducer's result, so the
round is redone without the cheater, and the verifier publishes a signed, expiring deny
record that every peer honours in later rounds (at `verify.deny_quorum` issuers).

The replay itself (training the inner steps the member declared) needs peer/, which averaging/ must not import: the
daemon injects it as `SwarmVerifier.replay`. Replay is possible because a verifying
swarm's round depends on public inputs only (peer/local.py `replayable`): θ_r, the round,
the member's peer id and the public data; no AdamW state, carried delta or compression
residual crosses rounds.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from swarmfold.averaging import codec
from swarmfold.averaging.receipt import denied_peers
from swarmfold.averaging.records import decode_record

# What decides bit-exactness of a replay (the rest of the environment is informational): the
# torch build, the CPU threads and capability, and the training device (peer/device.py
# `device_environment`: kind, and for GPUs name, compute capability, CUDA, cuDNN, driver).
ENVIRONMENT_CLASS = ("torch", "threads", "cpu_capability", "device", "device_name", "compute_capability",
                     "cuda", "cudnn", "driver")
# What an environment recorded before devices were recorded means: it trained on the CPU.
ENVIRONMENT_DEFAULTS: dict[str, Any] = {"device": "cpu", "device_name": "", "compute_capability": "", "cuda": "",
                                        "cudnn": "", "driver": ""}


def environment_class(env: Mapping[str, Any]) -> dict[str, Any]:
    """The class keys of an environment record (older CPU-only records get the CPU's device fields)."""
    return {k: env.get(k, ENVIRONMENT_DEFAULTS.get(k)) for k in ENVIRONMENT_CLASS}

# replay(member peer id, round, base model sha256, inner steps it declared) -> that member's Δ as this
# peer replays it
ReplayFn = Callable[[str, int, str, int], torch.Tensor]


@dataclass
class SwarmVerifier:
    """What a Swarm needs to verify its group's contributions (built by the daemon)."""

    replay: ReplayFn
    environment: dict[str, Any]  # this peer's environment class, announced with every part it sends
    fraction: float
    tolerance: float
    weight_for: Callable[[int], float]  # the weight an honest member claims for a round of k inner steps
    rng: random.Random = field(default_factory=random.SystemRandom)


@dataclass
class SpanVerdict:
    passed: bool
    mode: str  # "bitwise" or "tolerance"
    reason: str
    distance: float | None = None


def choose_to_verify(members: Sequence[str], *, self_id: str, fraction: float,
                     rng: random.Random | None = None) -> list[str]:
    """Which of the group's other members to replay this round: each with probability `fraction`.

    The draw uses the verifier's own randomness (SystemRandom by default), so a member
    cannot predict whether it will be checked.
    """
    r = rng or random.SystemRandom()
    return [m for m in sorted(members) if m != self_id and r.random() < fraction]


def claimed_environment(value: Any) -> dict[str, Any] | None:
    """The environment class a part claims, or None if it claims none or a malformed one."""
    if not isinstance(value, dict):
        return None
    out = environment_class(value)
    if not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in out.values()):
        return None
    return out


def same_class(a: Mapping[str, Any] | None, b: Mapping[str, Any]) -> bool:
    return a is not None and environment_class(a) == environment_class(b)


def judge_span(received: torch.Tensor, replay_span: torch.Tensor, *, compression: str, bitwise: bool,
               tolerance: float) -> SpanVerdict:
    """Compare a member's decoded span with the same span of our replay.

    Same environment class: the member's decoded bits must equal our replay sent through
    the same codec (the codecs are deterministic). Otherwise the member's Δ' may differ
    from ours by up to `tolerance` (relative), and its codec may round Δ' into a
    neighbouring cell; so each element may be off by the codec's rounding half-width
    (`_cell_halfwidth`) plus its share of that drift. The distance is the norm of what is
    left beyond the half-width, relative to ||replay||, and must be at most `tolerance`:
    an honest member's excess is at most |Δ' − Δ| per element, so it always passes.
    """
    ref = float(replay_span.to(torch.float64).norm())
    if bitwise:
        ours = codec.roundtrip(compression, replay_span.contiguous())
        same = torch.equal(received, ours)
        diff = float((received.to(torch.float64) - ours.to(torch.float64)).norm())
        distance = diff / ref if ref > 0 else (0.0 if diff == 0 else math.inf)
        return SpanVerdict(same, "bitwise", "replayed bits match" if same else
                           f"replay differs (relative distance {distance:.3g}) in the same environment class, "
                           "where bits must match", distance)
    gap = (received.to(torch.float64) - replay_span.to(torch.float64)).abs()
    excess = float((gap - _cell_halfwidth(compression, received, replay_span)).clamp(min=0).norm())
    distance = excess / ref if ref > 0 else (0.0 if excess == 0 else math.inf)
    ok = distance <= tolerance
    return SpanVerdict(ok, "tolerance", f"relative distance beyond the codec's rounding {distance:.3g} "
                       f"{'<=' if ok else '>'} tolerance {tolerance:g} (another environment class)", distance)


def _cell_halfwidth(compression: str, received: torch.Tensor, replay: torch.Tensor) -> torch.Tensor:
    """Per element, the most the codec's rounding can move a value (float64)."""
    if compression == "none":
        return torch.zeros(replay.numel(), dtype=torch.float64)
    if compression == "fp16":  # half a unit in the last place of fp16, subnormals included
        mag = torch.maximum(received.abs(), replay.abs()).to(torch.float64)
        return mag * 2.0**-11 + 2.0**-25
    if codec.topk_size(compression):
        return _topk_halfwidth(compression, replay)
    # int8: half the block's scale; the larger of the two scales, since an honest Δ' has its own absmax
    n = replay.numel()
    nb = codec.num_blocks(n)

    def scales(x: torch.Tensor) -> torch.Tensor:
        padded = torch.zeros(nb * codec.BLOCK, dtype=torch.float64)
        padded[:n] = x.to(torch.float64)
        return padded.view(nb, codec.BLOCK).abs().amax(dim=1) / 127.0

    half = torch.maximum(scales(received), scales(replay)) / 2
    return half.repeat_interleave(codec.BLOCK)[:n]


def _topk_halfwidth(compression: str, replay: torch.Tensor) -> torch.Tensor:
    """topk: an honest Δ' may swap the elements at the selection's edge (a sent value of lo
    where the replay dropped one, or 0 where it kept one of magnitude lo), and rounds a kept
    value to lo or hi: per block max(lo, (hi − lo) / 2) of the replay's own levels, plus
    1e-3 of hi for a drifted Δ'. From the replay alone, so a sender cannot widen it."""
    k = codec.topk_size(compression)
    n = replay.numel()
    nb = codec.num_blocks(n)
    padded = torch.zeros(nb * codec.BLOCK, dtype=torch.float64)
    padded[:n] = replay.to(torch.float64).abs()
    top = padded.view(nb, codec.BLOCK).topk(k, dim=1).values  # values only, so the order of ties is moot
    lo, hi = top[:, -1], top[:, 0]
    return (torch.maximum(lo, (hi - lo) / 2) + hi * 1e-3).repeat_interleave(codec.BLOCK)[:n]


def denied_from_values(values: Iterable[Any], *, swarm_id: str, max_ttl: float, quorum: int,
                       now: float | None = None) -> dict[str, list[str]]:
    """Denied peer -> issuers, from raw DHT values (msgpack-encoded signed deny records).

    Unreadable, unsigned, expired or foreign records are skipped (receipt.denied_peers).
    """
    records = [r for r in (decode_record(v) for v in values) if r is not None]
    return {peer: [r.issuer for r in recs]
            for peer, recs in denied_peers(records, swarm_id=swarm_id, max_ttl=max_ttl, quorum=quorum,
                                           now=now).items()}
