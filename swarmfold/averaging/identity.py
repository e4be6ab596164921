"""The peer identity: an RSA key in libp2p's protobuf format, kept in the workdir (mode 0600).

The same file is handed to hivemind's p2p daemon (`identity_path`), so the libp2p peer id
that other peers see is the id that signs this peer's records and receipts, and it stays
the same across restarts. The key never leaves the workdir and is never committed.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2

from swarmfold.errors import UserError
from swarmfold.fsutil import write_atomic

_PADDING = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)


class IdentityError(UserError):
    """The identity key file is unreadable or not a libp2p RSA key."""


@dataclass
class Identity:
    path: Path
    private_key: rsa.RSAPrivateKey

    @property
    def public_key_der(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            encoding=serialization.Encoding.DER, format=serialization.PublicFormat.SubjectPublicKeyInfo)

    @property
    def peer_id(self) -> str:
        return peer_id_from_public_key(self.public_key_der)

    def sign(self, data: bytes) -> str:
        """Base64 RSA-PSS/SHA-256 signature of `data`."""
        return base64.b64encode(self.private_key.sign(data, _PADDING, hashes.SHA256())).decode()


def peer_id_from_public_key(public_key_der: bytes) -> str:
    """The libp2p peer id (base58) that belongs to an RSA public key (DER SubjectPublicKeyInfo)."""
    import hashlib

    from multihash import coerce_code, encode

    proto = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=public_key_der).SerializeToString()
    return PeerID(encode(hashlib.sha256(proto).digest(), coerce_code("sha2-256"))).to_base58()


def verify_signature(public_key_der: bytes, data: bytes, signature_b64: str) -> bool:
    try:
        key = serialization.load_der_public_key(public_key_der)
        if not isinstance(key, rsa.RSAPublicKey):
            return False
        key.verify(base64.b64decode(signature_b64, validate=True), data, _PADDING, hashes.SHA256())
        return True
    except (InvalidSignature, ValueError, TypeError):
        return False


def load_identity(path: Path) -> Identity:
    try:
        raw = Path(path).read_bytes()
        key_data = crypto_pb2.PrivateKey.FromString(raw).data
        key = serialization.load_der_private_key(key_data, password=None)
    except FileNotFoundError:
        raise
    except Exception as e:  # protobuf and cryptography raise many types for garbage input
        raise IdentityError(f"{path}: not a libp2p RSA identity key ({type(e).__name__}); "
                            "move it away to generate a new identity (the peer id will change)") from e
    if not isinstance(key, rsa.RSAPrivateKey):
        raise IdentityError(f"{path}: holds a {type(key).__name__}, expected an RSA key")
    return Identity(path=Path(path), private_key=key)


def load_or_create_identity(path: Path) -> Identity:
    """Load the key at `path`, or create it (mode 0600, written atomically) on first start."""
    path = Path(path)
    if path.exists():
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            os.chmod(path, 0o600)
        return load_identity(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    der = key.private_bytes(encoding=serialization.Encoding.DER, format=serialization.PrivateFormat.TraditionalOpenSSL,
                            encryption_algorithm=serialization.NoEncryption())
    blob = crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.RSA, data=der).SerializeToString()
    write_atomic(path, blob, mode=0o600)
    return Identity(path=path, private_key=key)
