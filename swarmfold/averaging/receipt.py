"""Signed records: contribution receipts and deny records.

A record is JSON: `{"format", "version", "body", "public_key", "signature"}`. The
signature is RSA-PSS over a domain tag plus the canonical JSON of `body` (sorted keys, no
whitespace), made with the peer's identity key, the same key that gives it its libp2p
peer id. Opening a record checks the signature *and* that the public key belongs to the
peer id the body claims, so a record cannot be re-signed under someone else's name.

Receipts travel beside a contribution's delta (a safetensors file) and commit to it by
sha256; `load_contribution` refuses a receipt or delta that was changed after signing,
naming the file and what does not match.

Deny records say "peer X's contribution to round r failed replay, by me, until T". They
are pure data here: building, validating and counting them is done by these functions,
and the swarm decides where to store them (the DHT) and whom to refuse.

No pickle: everything is JSON and safetensors.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from swarmfold.averaging.identity import Identity, peer_id_from_public_key, verify_signature
from swarmfold.errors import UserError
from swarmfold.hashing import file_sha256

RECEIPT_FORMAT = "swarmfold-receipt"
DENY_FORMAT = "swarmfold-deny"
RECORD_VERSION = 1
MAX_RECEIPT_BYTES = 16 * 2**20
DELTA_SUFFIX = ".safetensors"
RECEIPT_SUFFIX = ".receipt.json"


class RecordError(UserError):
    """A signed record is malformed, tampered with, expired or signed by someone else."""


class ContributionError(RecordError):
    """A contribution (receipt + delta) cannot be trusted as it is; the message names the file."""


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _signed_bytes(fmt: str, body: Mapping[str, Any]) -> bytes:
    # The domain tag keeps a signature over one kind of record from being valid for another.
    return f"{fmt}/v{RECORD_VERSION}\n".encode() + canonical_json(body)


def sign_record(fmt: str, body: Mapping[str, Any], identity: Identity) -> dict[str, Any]:
    return {
        "format": fmt,
        "version": RECORD_VERSION,
        "body": dict(body),
        "public_key": base64.b64encode(identity.public_key_der).decode(),
        "signature": identity.sign(_signed_bytes(fmt, body)),
    }


def open_record(record: Any, fmt: str, signer_field: str, source: str) -> tuple[dict[str, Any], str]:
    """Check a record's shape and signature; return (body, signer peer id).

    `signer_field` names the body field that must equal the peer id of the embedded key.
    """
    if not isinstance(record, dict):
        raise RecordError(f"{source}: not a signed record (expected a JSON object)")
    if record.get("format") != fmt:
        raise RecordError(f"{source}: format is {record.get('format')!r}, expected {fmt!r}")
    if record.get("version") != RECORD_VERSION:
        raise RecordError(f"{source}: record version {record.get('version')!r} is not {RECORD_VERSION}; "
                          "use the swarmfold version that wrote it")
    body, key_b64, sig = record.get("body"), record.get("public_key"), record.get("signature")
    if not isinstance(body, dict) or not isinstance(key_b64, str) or not isinstance(sig, str):
        raise RecordError(f"{source}: missing body, public_key or signature")
    try:
        der = base64.b64decode(key_b64, validate=True)
        signer = peer_id_from_public_key(der)
    except (binascii.Error, ValueError) as e:
        raise RecordError(f"{source}: public_key is not a base64 RSA key ({e})") from e
    try:
        blob = _signed_bytes(fmt, body)
    except (TypeError, ValueError) as e:
        raise RecordError(f"{source}: body is not plain JSON ({e})") from e
    if not verify_signature(der, blob, sig):
        raise RecordError(f"{source}: signature does not verify; the record was changed after it was signed "
                          "(or signed with another key); ask the signer for an unmodified copy")
    claimed = body.get(signer_field)
    if claimed != signer:
        raise RecordError(f"{source}: signed by peer {signer}, but its {signer_field} says {claimed!r}; "
                          "a record must be signed by the key of the peer it names")
    return body, signer


# ---- contributions -------------------------------------------------------------------

def contribution_paths(target: str | Path) -> tuple[Path, Path]:
    """(delta, receipt) for a contribution named by its delta file, its receipt, or their common stem."""
    s = str(target)
    if s.endswith(RECEIPT_SUFFIX):
        stem = s[: -len(RECEIPT_SUFFIX)]
    elif s.endswith(DELTA_SUFFIX):
        stem = s[: -len(DELTA_SUFFIX)]
    else:
        stem = s
    return Path(stem + DELTA_SUFFIX), Path(stem + RECEIPT_SUFFIX)



# Field -> type the receipt body must carry (nested dicts checked one level down).
_RECEIPT_FIELDS: dict[str, type | tuple[type, ...]] = {
    "kind": str, "spec_hash": str, "peer_id": str, "base": dict, "seed_inputs": dict, "data": dict,
    "steps": int, "tokens": int, "weight": (int, float), "losses": list, "inner_start": dict,
    "environment": dict, "delta": dict, "snapshots": dict,
}
_NESTED_FIELDS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "base": {"round": int, "model_sha256": str},
    "seed_inputs": {"genesis_seed": int, "round": int, "peer_id": str},
    "data": {"manifest_hash": str, "files": list},
    "inner_start": {"source": str, "sha256": str, "step": int},
    "delta": {"file": str, "file_sha256": str, "sha256": str, "norm": (int, float)},
    "snapshots": {"interval": int, "files": list},
}


def check_receipt_body(body: Mapping[str, Any], source: str) -> None:
    """Every field a receipt must have, with its type; lists all problems at once."""
    problems = []
    for name, typ in _RECEIPT_FIELDS.items():
        if not isinstance(body.get(name), typ) or isinstance(body.get(name), bool):
            problems.append(f"{name} is {body.get(name)!r}")
    for section, spec in _NESTED_FIELDS.items():
        sub = body.get(section)
        if isinstance(sub, dict):
            for name, typ in spec.items():
                if not isinstance(sub.get(name), typ) or isinstance(sub.get(name), bool):
                    problems.append(f"{section}.{name} is {sub.get(name)!r}")
    if not problems and body["kind"] != "contribution":
        problems.append(f"kind is {body['kind']!r}, expected 'contribution'")
    if not problems and not all(isinstance(x, float) and math.isfinite(x) for x in body["losses"]):
        problems.append("losses must be finite numbers")
    if problems:
        raise ContributionError(f"{source}: not a valid receipt: {'; '.join(problems)}")


@dataclass(frozen=True)
class SignedContribution:
    """A contribution whose receipt signature and delta hash have been checked."""

    delta_path: Path
    receipt_path: Path
    body: dict[str, Any]
    receipt_sha256: str

    @property
    def peer_id(self) -> str:
        return str(self.body["peer_id"])

    @property
    def key(self) -> str:
        """Canonical-order key: peer id, then delta hash (one peer may hand in several)."""
        return f"{self.peer_id}/{self.body['delta']['sha256']}"

    @property
    def weight(self) -> float:
        return float(self.body["weight"])

    @property
    def base_round(self) -> int:
        return int(self.body["base"]["round"])

    @property
    def base_model_sha256(self) -> str:
        return str(self.body["base"]["model_sha256"])

    @property
    def spec_hash(self) -> str:
        return str(self.body["spec_hash"])

    @property
    def delta_sha256(self) -> str:
        return str(self.body["delta"]["sha256"])

    def snapshot_path(self, file_name: str) -> Path:
        return self.receipt_path.parent / Path(file_name).name


def load_contribution(target: str | Path, *, check_delta: bool = True) -> SignedContribution:
    """Open a contribution: parse and check the receipt, its signature, and the delta's sha256.

    Raises ContributionError naming the file and what is wrong.
    """
    delta_path, receipt_path = contribution_paths(target)
    if not receipt_path.is_file():
        raise ContributionError(f"{receipt_path}: no receipt; a contribution is {delta_path.name} plus "
                                f"{receipt_path.name}, written together by `swarmfold contribute`")
    if receipt_path.stat().st_size > MAX_RECEIPT_BYTES:
        raise ContributionError(f"{receipt_path}: larger than {MAX_RECEIPT_BYTES} bytes; not a receipt")
    raw = receipt_path.read_bytes()
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ContributionError(f"{receipt_path}: not valid JSON ({e}); the receipt is damaged") from e
    try:
        body, _ = open_record(record, RECEIPT_FORMAT, "peer_id", str(receipt_path))
    except ContributionError:
        raise
    except RecordError as e:
        raise ContributionError(str(e)) from e
    check_receipt_body(body, str(receipt_path))
    if body["delta"]["file"] != delta_path.name:
        raise ContributionError(f"{receipt_path}: signed for delta file {body['delta']['file']!r}, "
                                f"not {delta_path.name!r}; keep the names `swarmfold contribute` wrote")
    if check_delta:
        if not delta_path.is_file():
            raise ContributionError(f"{delta_path}: missing; the receipt {receipt_path.name} needs its delta beside it")
        actual = file_sha256(delta_path)
        if actual != body["delta"]["file_sha256"]:
            raise ContributionError(
                f"{delta_path}: sha256 {actual[:12]}… does not match the signed receipt "
                f"({body['delta']['file_sha256'][:12]}…); the delta was changed or damaged after signing")
    return SignedContribution(delta_path=delta_path, receipt_path=receipt_path, body=body,
                              receipt_sha256=hashlib.sha256(raw).hexdigest())


# ---- deny records ----------------------------------------------------------------------

@dataclass(frozen=True)
class DenyRecord:
    issuer: str
    denied: str
    swarm_id: str
    round: int
    reason: str
    evidence: dict[str, Any]
    issued_at: float
    expires_at: float


def build_deny_record(identity: Identity, *, swarm_id: str, denied: str, round_idx: int, reason: str,
                      evidence: Mapping[str, Any], ttl: float, now: float | None = None) -> dict[str, Any]:
    """A signed record denying `denied` for `ttl` seconds; `evidence` says what failed replay.

    evidence should carry what lets others re-check the claim: the round, the delta's
    sha256, the measured distance and the tolerance.
    """
    if ttl <= 0:
        raise ValueError(f"deny record ttl must be positive, got {ttl}")
    if denied == identity.peer_id:
        raise ValueError("a peer cannot deny itself")
    issued = float(time.time() if now is None else now)
    body = {"kind": "deny", "swarm_id": swarm_id, "issuer": identity.peer_id, "denied": denied,
            "round": int(round_idx), "reason": reason, "evidence": dict(evidence),
            "issued_at": issued, "expires_at": issued + float(ttl)}
    return sign_record(DENY_FORMAT, body, identity)


def validate_deny_record(record: Any, *, swarm_id: str, max_ttl: float, now: float | None = None,
                         max_clock_skew: float = 300.0) -> DenyRecord:
    """Check a deny record from the network: signature, issuer, swarm, not expired, bounded lifetime.

    Raises RecordError. `max_ttl` is the spec's verify.deny_ttl: a record may not ask to live longer.
    """
    source = "deny record"
    body, issuer = open_record(record, DENY_FORMAT, "issuer", source)
    now = float(time.time() if now is None else now)
    try:
        rec = DenyRecord(issuer=issuer, denied=str(body["denied"]), swarm_id=str(body["swarm_id"]),
                         round=int(body["round"]), reason=str(body["reason"]), evidence=dict(body["evidence"]),
                         issued_at=float(body["issued_at"]), expires_at=float(body["expires_at"]))
    except (KeyError, TypeError, ValueError) as e:
        raise RecordError(f"{source}: missing or mistyped field ({e})") from e
    if body.get("kind") != "deny":
        raise RecordError(f"{source}: kind is {body.get('kind')!r}, expected 'deny'")
    if rec.swarm_id != swarm_id:
        raise RecordError(f"{source}: for swarm {rec.swarm_id}, not this swarm {swarm_id}")
    if rec.denied == rec.issuer:
        raise RecordError(f"{source}: issuer denies itself")
    if rec.issued_at > now + max_clock_skew:
        raise RecordError(f"{source}: issued {rec.issued_at - now:.0f} s in the future; the issuer's clock is wrong")
    if rec.expires_at <= now:
        raise RecordError(f"{source}: expired {now - rec.expires_at:.0f} s ago")
    if rec.expires_at - rec.issued_at > max_ttl + 1e-6:
        raise RecordError(f"{source}: asks to live {rec.expires_at - rec.issued_at:.0f} s, more than the "
                          f"spec's verify.deny_ttl ({max_ttl:.0f} s)")
    return rec


def denied_peers(records: Iterable[Any], *, swarm_id: str, max_ttl: float, quorum: int,
                 now: float | None = None) -> dict[str, list[DenyRecord]]:
    """Peers denied by at least `quorum` distinct issuers among the valid records (invalid ones are skipped)."""
    by_peer: dict[str, dict[str, DenyRecord]] = {}
    for record in records:
        try:
            rec = validate_deny_record(record, swarm_id=swarm_id, max_ttl=max_ttl, now=now)
        except RecordError:
            continue
        by_peer.setdefault(rec.denied, {})[rec.issuer] = rec
    return {peer: sorted(recs.values(), key=lambda r: r.issuer)
            for peer, recs in by_peer.items() if len(recs) >= quorum}
