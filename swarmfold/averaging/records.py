"""DHT records: what peers publish about themselves, signed and expiring.

Keys live under the swarm id, so swarms with different specs never see each other's
records. Every record's subkey carries the owner's public key (hivemind's
RSASignatureValidator signs on store and checks on every read and replication), and
we also check that the key belongs to the peer id the record claims: no peer can
speak for another.

  {swarm}.peers              one record per peer: round, model/outer hashes, metrics, addresses
  {swarm}.mm.{round}.{try}   matchmaking declarations: "ready for this round, from this base"
  {swarm}.mm.{round}.wait    the same, of peers waiting for a group of min_group_size
  {swarm}.deny               deny records: peers excluded after failed verification
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any

import msgpack
from cryptography.hazmat.primitives import serialization
from hivemind.dht.crypto import RSASignatureValidator

from swarmfold.averaging.hivemind_adapter import signature_validator
from swarmfold.averaging.identity import Identity, peer_id_from_public_key

logger = logging.getLogger(__name__)

_OWNER_RE = re.compile(rb"\[owner:(.+?)\]")
MAX_RECORD_BYTES = 16 * 1024


def peers_key(swarm_id: str) -> str:
    return f"swarmfold.{swarm_id}.peers"


def matchmaking_key(swarm_id: str, round_idx: int, attempt: int, level: int = 1) -> str:
    """Where a round's attempt declares; the tree's levels above 1 (groups of delegates) have their own."""
    where = f"{round_idx}.{attempt}" if level <= 1 else f"{round_idx}.L{level}.{attempt}"
    return f"swarmfold.{swarm_id}.mm.{where}"


def waiting_key(swarm_id: str, round_idx: int) -> str:
    """Where every peer waiting for a group of min_group_size at this round declares, whatever its attempt."""
    return f"swarmfold.{swarm_id}.mm.{round_idx}.wait"


def deny_key(swarm_id: str) -> str:
    return f"swarmfold.{swarm_id}.deny"


def make_validator(identity: Identity) -> RSASignatureValidator:
    """hivemind's signature validator, signing with this peer's identity key."""
    return signature_validator(identity.private_key)


def owned_subkey(validator: RSASignatureValidator, peer_id: str) -> bytes:
    return peer_id.encode() + validator.local_public_key


def owner_peer_id(subkey: Any) -> str | None:
    """The peer id that the owner key in a subkey belongs to (None if absent or unreadable)."""
    if not isinstance(subkey, bytes):
        return None
    m = _OWNER_RE.search(subkey)
    if not m:
        return None
    try:
        key = serialization.load_ssh_public_key(m.group(1))
        der = key.public_bytes(encoding=serialization.Encoding.DER,
                               format=serialization.PublicFormat.SubjectPublicKeyInfo)
    except (ValueError, TypeError):
        return None
    return peer_id_from_public_key(der)


def encode_record(record: dict[str, Any]) -> bytes:
    return msgpack.packb(record, use_bin_type=True)


def decode_record(value: Any) -> dict[str, Any] | None:
    if not isinstance(value, bytes) or len(value) > MAX_RECORD_BYTES:
        return None
    try:
        rec = msgpack.unpackb(value, raw=False, strict_map_key=True, max_ext_len=0)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        return None
    return rec if isinstance(rec, dict) else None


@dataclass
class PeerRecord:
    peer_id: str
    round: int
    model_sha256: str
    outer_sha256: str
    spec_hash: str
    client_mode: bool
    maddrs: list[str]
    state: str
    # loss, tokens_total, tokens_counted, tokens_wasted (peer/credit.py), tokens_per_second, timings
    metrics: dict[str, Any] = field(default_factory=dict)
    time: float = 0.0
    expiration: float = 0.0

    def to_value(self) -> bytes:
        return encode_record({"v": 1, "peer_id": self.peer_id, "round": self.round,
                              "model_sha256": self.model_sha256, "outer_sha256": self.outer_sha256,
                              "spec_hash": self.spec_hash, "client_mode": self.client_mode,
                              "maddrs": self.maddrs, "state": self.state, "metrics": self.metrics,
                              "time": self.time})

    @classmethod
    def parse(cls, subkey: Any, value: Any, expiration: float) -> PeerRecord | None:
        rec = decode_record(value)
        if rec is None:
            return None
        try:
            r = cls(peer_id=str(rec["peer_id"]), round=int(rec["round"]), model_sha256=str(rec["model_sha256"]),
                    outer_sha256=str(rec["outer_sha256"]), spec_hash=str(rec["spec_hash"]),
                    client_mode=bool(rec["client_mode"]), maddrs=[str(a) for a in rec["maddrs"]][:16],
                    state=str(rec["state"]), metrics=dict(rec.get("metrics") or {}), time=float(rec["time"]),
                    expiration=float(expiration))
        except (KeyError, TypeError, ValueError):
            return None
        if owner_peer_id(subkey) != r.peer_id or r.round < 0 or not math.isfinite(r.time):
            return None  # unsigned, or signed by a key that is not this peer id's
        return r


@dataclass
class Declaration:
    """'I am ready to average round r (attempt a), starting from this base.'"""

    peer_id: str
    model_sha256: str
    client_mode: bool
    maddrs: list[str]

    def to_value(self) -> bytes:
        return encode_record({"v": 1, "peer_id": self.peer_id, "model_sha256": self.model_sha256,
                              "client_mode": self.client_mode, "maddrs": self.maddrs})

    @classmethod
    def parse(cls, subkey: Any, value: Any) -> Declaration | None:
        rec = decode_record(value)
        if rec is None:
            return None
        try:
            d = cls(peer_id=str(rec["peer_id"]), model_sha256=str(rec["model_sha256"]),
                    client_mode=bool(rec["client_mode"]), maddrs=[str(a) for a in rec["maddrs"]][:16])
        except (KeyError, TypeError, ValueError):
            return None
        return d if owner_peer_id(subkey) == d.peer_id else None


def entries(result: Any) -> list[tuple[Any, Any, float]]:
    """(subkey, value, expiration) of a hivemind `dht.get` result for a dictionary key."""
    if result is None:
        return []
    value = getattr(result, "value", None)
    if not isinstance(value, dict):
        return []
    out = []
    for subkey, item in value.items():
        v = getattr(item, "value", None)
        exp = getattr(item, "expiration_time", 0.0)
        out.append((subkey, v, float(exp)))
    return out
