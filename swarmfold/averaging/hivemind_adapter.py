"""Every use of a hivemind (or asyncio) private attribute, in one place.

hivemind 1.1.12 has no public API for three things swarmfold needs. Each is wrapped
here, and tests/test_hivemind_adapter.py fails loudly (naming the attribute) when an
upgrade removes or renames one:

- `P2P._client.connect(peer, maddrs)`: dial a peer at the addresses it declared, when
  the DHT has no route to it yet (a fresh peer, a restart on a new port);
- `RSAPrivateKey._private_key`: hivemind's record signer wraps a `cryptography` key;
  we hand it this peer's identity key instead of letting it create another;
- `asyncio.StreamReader._limit`: hivemind creates the readers of our streams with
  asyncio's 64 KiB limit; bulk tensor streams read faster with a larger one (only
  speed depends on it: without it, nothing breaks).
"""

from __future__ import annotations

import asyncio

from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import P2P, PeerID
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.multiaddr import Multiaddr

P2P_CLIENT = "_client"
RSA_INNER_KEY = "_private_key"
READER_LIMIT = "_limit"


async def connect(p2p: P2P, peer: PeerID, maddrs: list[str]) -> None:
    """Make the daemon connect to `peer` at `maddrs` (full multiaddrs; the /p2p/<id> part is dropped,
    the daemon takes the peer id separately)."""
    client = getattr(p2p, P2P_CLIENT)
    await client.connect(peer, [Multiaddr(a.split("/p2p/")[0]) for a in maddrs])


def signature_validator(private_key: rsa.RSAPrivateKey) -> RSASignatureValidator:
    """hivemind's record signature validator, signing with `private_key` (this peer's identity)."""
    key = RSAPrivateKey.__new__(RSAPrivateKey)
    setattr(key, RSA_INNER_KEY, private_key)
    return RSASignatureValidator(key)


def widen_reader(reader: asyncio.StreamReader, limit: int) -> bool:
    """Raise a stream reader's buffer limit to at least `limit` bytes; False if asyncio has no such
    attribute any more (the stream then works at the default speed)."""
    current = getattr(reader, READER_LIMIT, None)
    if not isinstance(current, int):
        return False
    setattr(reader, READER_LIMIT, max(current, limit))
    return True
