"""The round's messages, one frozen dataclass per kind, each validated on arrival.

`Kind.from_wire(msg)` checks a received msgpack map against the kind's fields: the
`kind` tag, every required field present with its type, no field it does not know.
Anything else raises `Rejected(Rejection.MALFORMED, ...)` naming the field, so that a
handler answers a bad message by name and never reads a half-checked one.
`to_wire()` is the inverse. Semantic checks (is this our round, our spec, a member?)
stay with the phase that owns the state: protocol.check_header for contributions, the
matchmaking and commit modules for the rest. Chunk frames, most of a round's bytes,
have their own zero-copy path (wire.send_chunk, protocol.check_chunk).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from swarmfold.averaging.protocol import Rejected, Rejection

M = TypeVar("M", bound="Message")
MAX_REASON = 500  # characters of a peer's free-text reason we keep


def _check(name: str, value: Any, typ: Any) -> Any:
    """`value` as type `typ` (str, int, float, bool, bytes, tuple[str, ...], dict[str, X], X | None)."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        return None if value is None else _check(name, value, args[0])
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise Rejected(Rejection.MALFORMED, f"field {name!r} must be a list of strings")
        return tuple(value)
    if origin is dict:
        _, vt = typing.get_args(typ)
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise Rejected(Rejection.MALFORMED, f"field {name!r} must be a map with string keys")
        return {k: _check(f"{name}.{k}", v, vt) for k, v in value.items()}
    if typ is Any:
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise Rejected(Rejection.MALFORMED, f"field {name!r} must be a finite number")
        return float(value)
    if typ is int and isinstance(value, bool):
        raise Rejected(Rejection.MALFORMED, f"field {name!r} must be an integer")
    if not isinstance(value, typ):
        raise Rejected(Rejection.MALFORMED, f"field {name!r} has type {type(value).__name__}, "
                       f"expected {typ.__name__}")
    if typ is str and name in ("reason",):
        return value[:MAX_REASON]
    return value


class Message:
    """Base of every message kind: `KIND` is the wire tag."""

    KIND: ClassVar[str]

    @classmethod
    def from_wire(cls: type[M], msg: Any) -> M:
        if not isinstance(msg, dict):
            raise Rejected(Rejection.MALFORMED, f"a {cls.KIND} message must be a map")
        if msg.get("kind") != cls.KIND:
            raise Rejected(Rejection.MALFORMED, f"expected a {cls.KIND!r} message, got kind {msg.get('kind')!r}")
        hints = typing.get_type_hints(cls)
        known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(str(k) for k in msg if k != "kind" and k not in known)
        if unknown:
            raise Rejected(Rejection.MALFORMED, f"unknown field(s) {', '.join(map(repr, unknown))} in a {cls.KIND} "
                           "message")
        kwargs = {}
        for name, f in known.items():
            if name not in msg:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise Rejected(Rejection.MALFORMED, f"missing field {name!r} in a {cls.KIND} message")
                continue
            kwargs[name] = _check(name, msg[name], hints[name])
        return cls(**kwargs)

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.KIND}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is None:
                continue
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


# ---- hello: refuse peers of another spec -------------------------------------------------------
@dataclass(frozen=True)
class Hello(Message):
    KIND: ClassVar[str] = "hello"
    spec_hash: str
    name: str


@dataclass(frozen=True)
class DirectRequest(Message):
    """'May I stream `proto` to you directly?' (averaging/direct.py)"""

    KIND: ClassVar[str] = "direct_request"
    proto: str


@dataclass(frozen=True)
class DirectOffer(Message):
    """Where to connect, with a one-time ticket and the stream's session key; no addresses: use libp2p."""

    KIND: ClassVar[str] = "direct_offer"
    addrs: tuple[str, ...]
    ticket: bytes
    key: bytes


@dataclass(frozen=True)
class HelloReply(Message):
    KIND: ClassVar[str] = "hello_reply"
    ok: bool
    spec_hash: str
    name: str


# ---- matchmaking -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Propose(Message):
    """A leader's proposal: these members (sorted; the leader is the smallest) average round `round`."""

    KIND: ClassVar[str] = "propose"
    round: int
    attempt: int
    waiting: bool  # formed in the waiting room of min_group_size (not under an attempt's key)
    base: str  # sha256 of θ_r the members start from
    members: tuple[str, ...]
    clients: tuple[str, ...]
    spec_hash: str
    level: int = 1  # the tree (N > G): 1 = peers; above, their groups' delegates


@dataclass(frozen=True)
class Final(Message):
    """The leader's final member list: those that accepted; `group_id` names the group."""

    KIND: ClassVar[str] = "final"
    round: int
    attempt: int
    waiting: bool
    members: tuple[str, ...]
    clients: tuple[str, ...]
    group_id: str
    level: int = 1
    delegates: tuple[str, ...] = ()  # the next tree level's expected members (empty: this group is the top)


CANCEL_REASONS = ("dropped", "too_small")


@dataclass(frozen=True)
class Cancel(Message):
    """The leader releases a member: it answered too late ("dropped") or the group is below
    min_group_size ("too_small": keep waiting)."""

    KIND: ClassVar[str] = "cancel"
    round: int
    attempt: int
    waiting: bool
    group_id: str
    reason: str
    level: int = 1

    @classmethod
    def from_wire(cls, msg: Any) -> Cancel:
        out = super().from_wire(msg)
        if out.reason not in CANCEL_REASONS:
            raise Rejected(Rejection.MALFORMED, f"cancel reason {out.reason!r} is not one of {CANCEL_REASONS}")
        return out


@dataclass(frozen=True)
class Answer(Message):
    """The reply to a proposal, final list, cancel or vote."""

    KIND: ClassVar[str] = "answer"
    ok: bool
    reason: str = ""


def parse_matchmaking(msg: Any) -> Propose | Final | Cancel:
    """A message to the propose handler, whichever of its three kinds."""
    kind = msg.get("kind") if isinstance(msg, dict) else None
    for cls in (Propose, Final, Cancel):
        if kind == cls.KIND:
            return cls.from_wire(msg)
    raise Rejected(Rejection.MALFORMED, f"unknown matchmaking message kind {kind!r}")


# ---- all-reduce --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PartHeader(Message):
    """What precedes a contribution's chunks: everything but the numbers (protocol.check_header judges it)."""

    KIND: ClassVar[str] = "part"
    group_id: str
    spec_hash: str
    round: int
    base_sha256: str
    span: int
    numel: int
    dtype: str
    weight: float
    steps: int  # inner steps trained for this Δ (round.mode "time": what fit; "steps": H)
    payload_bytes: int
    chunk: int
    environment: dict[str, Any] | None = None  # the sender's environment class (verification)


@dataclass(frozen=True)
class SpanResult(Message):
    """The trailer of a reducer's stream: whom the span's aggregate includes, with what weight,
    whom it rejected and why, and whether every chunk was sent (a late rejection cuts it off)."""

    KIND: ClassVar[str] = "result"
    group_id: str
    span: int
    included: tuple[str, ...]
    complete: bool
    rejected: dict[str, str]
    weights: dict[str, float]
    steps: dict[str, int]


@dataclass(frozen=True)
class ReduceError(Message):
    """A reducer refuses the exchange (unknown group, duplicate, oversized header, its own failure)."""

    KIND: ClassVar[str] = "error"
    reason: str


# ---- commit ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Vote(Message):
    """A member's digest of the assembled aggregate (ok False: it failed, `reason` says why)."""

    KIND: ClassVar[str] = "vote"
    group_id: str
    ok: bool
    digest: str
    reason: str = ""


# ---- the tree: a group's members fetch the top level's aggregate from their delegate -------------------
@dataclass(frozen=True)
class TreeRequest(Message):
    """A member asks its group's delegate for what the levels above made of the group's aggregate; or,
    when that delegate is gone, another delegate of the same round for the top that its group reached
    (the round and θ_r's hash name which round's top)."""

    KIND: ClassVar[str] = "tree_request"
    group_id: str  # the member's (level-1) group
    round: int
    base: str  # θ_r's sha256, the base every group of the round averaged from


TREE_STATUSES = ("committed", "fallback")
MAX_TREE_LEVELS = 8  # G = 2 and 256 peers; any real swarm has fewer levels


@dataclass(frozen=True)
class TreeResult(Message):
    """The delegate's answer: "fallback" (the levels above failed: apply the group's own aggregate), or
    "committed", followed by the top level's aggregate as float32 bytes in chunk frames
    (protocol.CHUNK_ELEMENTS elements each; `sha256` of all of them), with one entry per level above
    the group (base.tree_level)."""

    KIND: ClassVar[str] = "tree_result"
    group_id: str
    status: str
    numel: int
    sha256: str
    levels: Any = ()  # TreeLevel maps, lowest level first (checked by from_wire)

    @classmethod
    def from_wire(cls, msg: Any) -> TreeResult:
        out = super().from_wire(msg)
        if out.status not in TREE_STATUSES:
            raise Rejected(Rejection.MALFORMED, f"tree status {out.status!r} is not one of {TREE_STATUSES}")
        if not isinstance(out.levels, (list, tuple)) or len(out.levels) > MAX_TREE_LEVELS:
            raise Rejected(Rejection.MALFORMED, f"field 'levels' must be a list of at most {MAX_TREE_LEVELS} levels")
        return dataclasses.replace(out, levels=tuple(TreeLevel.from_wire(v) for v in out.levels))

    def to_wire(self) -> dict[str, Any]:
        out = super().to_wire()
        out["levels"] = [lv.to_wire() for lv in self.levels]
        return out


@dataclass(frozen=True)
class TreeLevel(Message):
    """One level above the member's group (base.tree_level's fields)."""

    KIND: ClassVar[str] = "tree_level"
    level: int
    group_id: str
    included: tuple[str, ...]
    weights: dict[str, float]
    steps: dict[str, int]
    digest: str

    def as_record(self) -> dict[str, Any]:
        return {"level": self.level, "group_id": self.group_id, "included": sorted(self.included),
                "weights": dict(self.weights), "steps": dict(self.steps), "digest": self.digest}


# ---- state sync ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class StateRequest(Message):
    KIND: ClassVar[str] = "state_request"
    spec_hash: str


@dataclass(frozen=True)
class StateRefusal(Message):
    KIND: ClassVar[str] = "state_refusal"
    reason: str


@dataclass(frozen=True)
class StateHeader(Message):
    """The head of a state-sync answer. θ_r and then each outer tensor (in `outer_names` order, which
    is sorted) follow as float32 bytes in chunk frames of `chunk_bytes` (statesync.state_chunks), each
    tensor `numel` elements; the hashes are the ones the server published in its record."""

    KIND: ClassVar[str] = "state"
    round: int
    model_sha256: str
    outer_sha256: str
    numel: int
    outer_names: tuple[str, ...]
    chunk_bytes: int
