"""The public data of a verifying swarm: a content-addressed manifest that any peer can fetch from peers.

A verifying swarm (spec `verify.fraction > 0`) trains on one public shard, named in the
spec by its manifest hash (`verify.public_data`; swarmfold/manifest.py defines the hash).
A peer that holds it serves it (`DataServer`):

- it answers, on the `DATA` protocol, with the manifest (each file's name, sha256 and
  size, and the tokenizer's ident) when asked for its hash, and with a file's bytes when
  asked for its sha256 and an offset, in frames of at most `CHUNK` bytes read one at a
  time from disk. It serves only the files its manifest lists, looked up by sha256, so a
  request cannot name a path;
- it announces itself in the DHT under `{swarm}.data.{manifest hash}` with its
  addresses, signed under its own subkey and expiring after `averaging.record_ttl`,
  refreshed three times per lifetime (like the peer records).

A peer without it calls `fetch_public_data`, which finds the providers in the DHT and
tries them one after another, in random order. Nothing a provider sends is trusted:

- its manifest must hash to the wanted hash. Names and sha256s are then authentic, but
  sizes are not (the hash does not cover them), so a provider's sizes only bound what it
  may send;
- names must be safe relative paths and must lay out as a folder that a shard reads in
  the same order with the same names (no absolute paths, '..', hidden parts, NUL,
  backslash or control characters; at most MAX_NAME_CHARS characters, MAX_FILES files).
  The total must fit under `max_total_bytes` (MAX_TOTAL_BYTES unless the caller sets
  another) and on the disk;
- each file is written to a hidden temporary name, checked against its sha256, fsynced
  and renamed into place. A file already present with the right sha256 is not fetched
  again. A provider that cannot be reached, stalls or drops the stream is passed over (and
  tried again until `wait` runs out), and the next one resumes at the offset reached; one
  that sends a wrong manifest, more than it announced, a malformed message or bytes that do
  not hash right is refused by name for good, and the file is fetched again from the start;
- on failure no temporary file is left, and a refused manifest writes nothing at all.
  After success the folder holds exactly the manifest's files (a shard over it has the
  wanted manifest hash) and a hidden `.manifest.json`, so that a restart needs no peer.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from hivemind.utils import get_dht_time

from swarmfold.averaging import wire
from swarmfold.averaging.protocol import DATA
from swarmfold.averaging.records import (
    decode_record,
    encode_record,
    entries,
    owned_subkey,
    owner_peer_id,
)
from swarmfold.averaging.timeouts import HANDOFF_MARGIN
from swarmfold.averaging.transport import DHT_ERRORS
from swarmfold.errors import UserError
from swarmfold.fsutil import fsync_dir, write_atomic
from swarmfold.hashing import file_sha256
from swarmfold.manifest import (
    DEFAULT_TEXT_FIELD,
    SKIP_DIRS,
    folder_files,
    layout_key,
    manifest_hash,
)

if TYPE_CHECKING:
    from swarmfold.averaging.swarm import Swarm

logger = logging.getLogger(__name__)

T = TypeVar("T")
CHUNK = 1 << 20  # bytes of file data per frame
MAX_FILES = 50_000
MAX_NAME_CHARS = 512
MAX_PART_BYTES = 255  # one path component, in UTF-8 (the usual file-system limit)
MAX_MANIFEST_BYTES = 16 << 20  # the manifest message
MAX_TOTAL_BYTES = 16 << 30  # the public data as a whole, unless fetch_public_data is given another limit
MAX_TOKENIZER_CHARS = 256
REQUEST_BYTES = 4096
DISK_MARGIN = 64 << 20  # free space to leave on the disk after the download
SERVE_SLOTS = 4  # files served at once; further requests wait their turn
MANIFEST_FILE = ".manifest.json"  # hidden: a shard over the folder leaves it out
_SHA256 = re.compile(r"[0-9a-f]{64}")


class PublicDataFetchError(UserError):
    """The public data could not be fetched from any peer; the message says why and what to do."""


class _Refused(Exception):
    """A provider failed (`retry`: unreachable, stalled, closed; tried again later) or misbehaved (left for good)."""

    def __init__(self, reason: str, *, retry: bool = False):
        super().__init__(reason)
        self.retry = retry


class _NetError(Exception):
    """A network failure talking to a provider (stall, closed stream, unreachable)."""


def providers_key(swarm_id: str, manifest_hash: str) -> str:
    return f"swarmfold.{swarm_id}.data.{manifest_hash}"


# ---- the manifest --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ManifestFile:
    name: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Manifest:
    """A shard's files in shard order, its tokenizer and its text field (the JSONL field / Parquet
    and Arrow column that holds the text): what its manifest hash covers (plus sizes). The text
    field travels with the manifest so that a peer that fetches the data reads the same documents
    (and gets the same manifest hash) as the peers that serve it."""

    files: tuple[ManifestFile, ...]
    tokenizer: str
    text_field: str = DEFAULT_TEXT_FIELD

    @property
    def hash(self) -> str:
        return manifest_hash(((f.name, f.sha256) for f in self.files), self.tokenizer, self.text_field)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_dict(self) -> dict[str, Any]:
        extra = {} if self.text_field == DEFAULT_TEXT_FIELD else {"text_field": self.text_field}
        return {"files": [[f.name, f.sha256, f.size] for f in self.files], "tokenizer": self.tokenizer, **extra}

    @classmethod
    def from_dict(cls, msg: Any) -> Manifest:
        """Parse an untrusted manifest (types only; `layout_problem` and `size_problem` check the rest)."""
        if not isinstance(msg, dict):
            raise ValueError("the manifest is not a map")
        files, tok = msg.get("files"), msg.get("tokenizer")
        if not isinstance(files, list) or not isinstance(tok, str) or len(tok) > MAX_TOKENIZER_CHARS:
            raise ValueError("the manifest needs a list 'files' and a short string 'tokenizer'")
        text_field = msg.get("text_field", DEFAULT_TEXT_FIELD)
        if not isinstance(text_field, str) or not 0 < len(text_field) <= MAX_TOKENIZER_CHARS:
            raise ValueError("the manifest's 'text_field' must be a short, non-empty string")
        if not 0 < len(files) <= MAX_FILES:
            raise ValueError(f"the manifest lists {len(files)} files; between 1 and {MAX_FILES} are allowed")
        out = []
        for item in files:
            if (not isinstance(item, list) or len(item) != 3 or not isinstance(item[0], str)
                    or not isinstance(item[1], str) or not isinstance(item[2], int) or isinstance(item[2], bool)):
                raise ValueError(f"malformed manifest entry {str(item)[:80]!r}; expected [name, sha256, size]")
            out.append(ManifestFile(item[0], item[1], item[2]))
        return cls(tuple(out), tok, text_field)


def name_problem(name: str) -> str | None:
    """Why `name` cannot be written under a folder as the same file name, or None if it can."""
    if not name or len(name) > MAX_NAME_CHARS:
        return f"has {len(name)} characters (1 to {MAX_NAME_CHARS} allowed)"
    if any(ord(c) < 32 or ord(c) == 127 or c == "\\" for c in name):
        return "holds a control character, NUL or backslash"
    if name.startswith("/"):
        return "is an absolute path"
    for part in name.split("/"):
        if part in ("", ".", ".."):
            return "has an empty, '.' or '..' part"
        if part.startswith(".") or part in SKIP_DIRS:
            return f"has the part {part!r}, which a shard read from a folder leaves out"
        if len(part.encode("utf-8", "surrogatepass")) > MAX_PART_BYTES:
            return f"has a part longer than {MAX_PART_BYTES} bytes"
    return None


def layout_problem(m: Manifest) -> str | None:
    """Why `m`'s files cannot be laid out as a folder whose shard has the same manifest, or None."""
    names = [f.name for f in m.files]
    for name in names:
        problem = name_problem(name)
        if problem is not None:
            return f"the file name {name[:80]!r} {problem}"
    keys = [layout_key(n) for n in names]
    for a, b in zip(keys, keys[1:], strict=False):
        if b[:len(a)] == a:
            return f"{'/'.join(a)!r} is listed twice, or as both a file and a folder"
        if b < a:
            return (f"{'/'.join(b)!r} comes after {'/'.join(a)!r}, but a shard read from a folder orders files "
                    "by path; make the public shard a folder (swarmfold data ... --out) and hash that")
    return None


def size_problem(m: Manifest, max_total_bytes: int) -> str | None:
    """Why `m`'s sha256s or sizes are malformed or too large, or None."""
    for f in m.files:
        if not _SHA256.fullmatch(f.sha256):
            return f"the sha256 of {f.name[:80]!r} is not 64 lowercase hex digits"
        if not 0 <= f.size <= max_total_bytes:
            return f"{f.name[:80]!r} has size {f.size}"
    if m.total_bytes > max_total_bytes:
        return f"it lists {m.total_bytes:,} bytes, above the limit of {max_total_bytes:,}"
    return None


# ---- the DHT announcement ------------------------------------------------------------------------
@dataclass(frozen=True)
class Provider:
    peer_id: str
    maddrs: list[str]


def parse_provider(subkey: Any, value: Any, wanted: str) -> Provider | None:
    rec = decode_record(value)
    if rec is None:
        return None
    peer, maddrs = rec.get("peer_id"), rec.get("maddrs")
    if (not isinstance(peer, str) or rec.get("manifest_hash") != wanted or not isinstance(maddrs, list)
            or owner_peer_id(subkey) != peer):
        return None  # unsigned, signed by another key, or for other data
    return Provider(peer, [str(a) for a in maddrs][:16])


def find_providers(swarm: Swarm, wanted: str) -> list[Provider]:
    """The live, correctly signed providers of the data with manifest hash `wanted` (not us)."""
    async def get() -> Any:
        assert swarm.dht is not None
        return await asyncio.wait_for(swarm.dht.get(providers_key(swarm.swarm_id, wanted), latest=True,
                                                    return_future=True), swarm.spec.network.dht_timeout)

    now = get_dht_time()
    out = []
    for subkey, value, exp in entries(swarm.run_coroutine(get(), timeout=swarm.timeouts.dht_call)):
        p = parse_provider(subkey, value, wanted)
        if p is not None and exp > now and p.peer_id != swarm.peer_id:
            out.append(p)
    return sorted(out, key=lambda p: p.peer_id)


# ---- serving -------------------------------------------------------------------------------------
@dataclass
class _Served:
    manifest: Manifest
    paths: dict[str, Path]  # sha256 -> a file with those bytes
    sizes: dict[str, int] = field(default_factory=dict)  # sha256 -> size

    def __post_init__(self) -> None:
        self.sizes = {f.sha256: f.size for f in self.manifest.files}


class DataServer:
    """Serves public data on `swarm`'s P2P and announces it in the DHT. `serve()` after `swarm.start()`."""

    def __init__(self, swarm: Swarm):
        self.swarm = swarm
        self._served: dict[str, _Served] = {}
        self._slots = asyncio.Semaphore(SERVE_SLOTS)
        self._registered = False
        self._refresh: asyncio.Task | None = None

    def serve(self, manifest: Manifest, paths: Mapping[str, Path]) -> str:
        """Serve `manifest`'s files (`paths`: sha256 -> file) and announce them; returns the manifest hash."""
        missing = [f.name for f in manifest.files if f.sha256 not in paths]
        if missing:
            raise ValueError(f"no file given for {missing[:3]}")
        h = manifest.hash
        problem = layout_problem(manifest)
        if problem is not None:
            logger.warning("[%s] serving data %s… that peers cannot lay out as a folder (%s); they will refuse "
                           "to fetch it", self.swarm.peer_id[-8:], h[:12], problem)
        self._served[h] = _Served(manifest, {s: Path(p) for s, p in paths.items()})
        if not self._registered:
            self.swarm.add_handler(DATA, self._handle)
            self._registered = True
        if self._refresh is None:
            self.swarm.run_coroutine(self._start(), timeout=self.swarm.timeouts.local_call)
        try:
            self.swarm.run_coroutine(self._announce(h), timeout=self.swarm.timeouts.dht_call)
        except DHT_ERRORS as e:  # the refresh loop tries again
            logger.warning("[%s] could not announce data %s… yet: %s", self.swarm.peer_id[-8:], h[:12], e)
        logger.info("[%s] serving public data %s… (%d files, %s bytes)", self.swarm.peer_id[-8:], h[:12],
                    len(manifest.files), f"{manifest.total_bytes:,}")
        return h

    def manifest_for(self, h: str) -> Manifest | None:
        served = self._served.get(h)
        return served.manifest if served else None

    def stop(self) -> None:
        """Stop refreshing the announcements (they expire) and answering (the handler refuses)."""
        self._served.clear()
        if self._refresh is not None:
            self.swarm.run_coroutine(self._cancel(), timeout=self.swarm.timeouts.local_call)

    async def _start(self) -> None:
        self._refresh = asyncio.ensure_future(self._refresh_loop())

    async def _cancel(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
            self._refresh = None

    async def _announce(self, h: str) -> None:
        swarm = self.swarm
        assert swarm.dht is not None
        served = self._served.get(h)
        if served is None:
            return
        value = encode_record({"v": 1, "peer_id": swarm.peer_id, "manifest_hash": h, "maddrs": list(swarm.maddrs),
                               "files": len(served.manifest.files), "bytes": served.manifest.total_bytes,
                               "time": time.time()})
        await asyncio.wait_for(swarm.dht.store(
            providers_key(swarm.swarm_id, h), value, get_dht_time() + swarm.spec.averaging.record_ttl,
            subkey=owned_subkey(swarm.validator, swarm.peer_id), return_future=True), swarm.spec.network.dht_timeout)

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.swarm.spec.averaging.record_ttl / 3)
            for h in list(self._served):
                try:
                    await self._announce(h)
                except DHT_ERRORS as e:  # retried at the next beat
                    logger.info("announcing data %s… failed: %s", h[:12], e)
                except Exception:  # not a DHT hiccup: a bug worth seeing; the next beat still runs
                    logger.warning("announcing data %s… failed unexpectedly", h[:12], exc_info=True)

    async def _handle(self, info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            msg, _ = await wire.recv(reader, REQUEST_BYTES)
            op = wire.field(msg, "op", str)
            h = wire.field(msg, "manifest_hash", str)
            served, manifest = self._served.get(h), self.manifest_for(h)
            if served is None or manifest is None:
                await wire.send(writer, {"ok": False, "reason": "this peer does not serve that data"})
            elif op == "manifest":
                await wire.send(writer, {"ok": True, **manifest.to_dict()})
            elif op == "file":
                await self._send_file(served, wire.field(msg, "sha256", str), wire.field(msg, "offset", int), writer)
            else:
                await wire.send(writer, {"ok": False, "reason": f"unknown request {op[:40]!r}"})
        except (wire.WireError, ConnectionError, OSError) as e:
            logger.debug("data request from %s failed: %s", info.peer_id, e)
        finally:
            await wire.finish(reader, writer, self.swarm.spec.network.fetch_timeout)

    async def _send_file(self, served: _Served, sha: str, offset: int, writer: asyncio.StreamWriter) -> None:
        path, size = served.paths.get(sha), served.sizes.get(sha)
        if path is None or size is None:
            await wire.send(writer, {"ok": False, "reason": "no such file in this data"})
            return
        if not 0 <= offset <= size:
            await wire.send(writer, {"ok": False, "reason": f"offset {offset} is outside 0..{size}"})
            return
        loop = asyncio.get_running_loop()
        async with self._slots:
            if path.stat().st_size != size:
                await wire.send(writer, {"ok": False, "reason": "the file changed on this peer's disk"})
                return
            await wire.send(writer, {"ok": True, "size": size})
            with open(path, "rb") as f:
                f.seek(offset)
                while offset < size:
                    data = await loop.run_in_executor(None, f.read, min(CHUNK, size - offset))
                    if not data:
                        return  # the file shrank; the client sees the stream end
                    await asyncio.wait_for(wire.send(writer, {"data": data}),
                                           2 * self.swarm.spec.network.fetch_timeout)
                    offset += len(data)


def serve_public_data(swarm: Swarm, manifest: Manifest, paths: Mapping[str, Path]) -> DataServer:
    """Serve one data set from `swarm` (started); keep the returned server for as long as it should serve."""
    server = DataServer(swarm)
    server.serve(manifest, paths)
    return server


# ---- fetching ------------------------------------------------------------------------------------
@dataclass
class FetchReport:
    manifest_hash: str
    dest: Path
    files: int
    total_bytes: int
    text_field: str = DEFAULT_TEXT_FIELD  # the manifest's: read the fetched files with it
    downloaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already present with the right sha256
    bytes_downloaded: int = 0
    providers: list[str] = field(default_factory=list)  # whose bytes we kept
    refused: dict[str, str] = field(default_factory=dict)  # provider -> why it was left


@dataclass
class _Part:
    """The file being downloaded: a hidden temporary next to its final name."""

    name: str
    path: Path
    hasher: Any
    offset: int = 0
    sources: set[str] = field(default_factory=set)


def fetch_public_data(swarm: Swarm, manifest_hash: str, dest_dir: Path, *, tokenizer_ident: str | None = None,
                      max_total_bytes: int = MAX_TOTAL_BYTES, timeout: float = 30.0, wait: float = 60.0,
                      rng: random.Random | None = None,
                      on_progress: Callable[[int, int], None] | None = None) -> FetchReport:
    """Fetch the data with `manifest_hash` from the swarm's providers into `dest_dir`; see the module doc.

    `on_progress(bytes_downloaded, total_bytes)` is called after each chunk (progress display).

    `timeout` bounds each answer of a provider (a stall); `wait` is how long to look for
    providers in the DHT when none has answered yet. `tokenizer_ident`, when given, must be
    the manifest's (this peer's tokenizer). `rng` orders the providers (tests fix it).
    Raises PublicDataFetchError naming every provider tried and why it was left.
    """
    if not _SHA256.fullmatch(manifest_hash):
        raise PublicDataFetchError(f"verify.public_data {manifest_hash[:80]!r} is not a manifest hash "
                                   "(64 lowercase hex digits); fix the spec")
    fetcher = _Fetcher(swarm, manifest_hash, Path(dest_dir), tokenizer_ident=tokenizer_ident,
                       max_total_bytes=max_total_bytes, timeout=timeout, on_progress=on_progress)
    local = fetcher.local_copy()
    if local is not None:
        logger.info("public data %s… is complete in %s (%d files)", manifest_hash[:12], dest_dir, local.files)
        return local
    fetcher.remove_stale_parts()
    order = rng or random.SystemRandom()
    deadline = time.monotonic() + wait
    bad: set[str] = set()  # providers that misbehaved; those that only failed are tried again on the next pass
    try:
        while True:
            try:
                found = [p for p in find_providers(swarm, manifest_hash) if p.peer_id not in bad]
            except DHT_ERRORS as e:  # a DHT hiccup: look again until the deadline
                logger.info("could not read the providers of %s…: %s", manifest_hash[:12], e)
                found = []
            order.shuffle(found)
            for provider in found:
                try:
                    report = fetcher.fetch_from(provider)
                    report.refused.pop(provider.peer_id, None)  # it failed earlier, but not for cause
                    logger.info("fetched public data %s… into %s: %d files downloaded (%s bytes), %d already "
                                "present, from %s", manifest_hash[:12], dest_dir, len(report.downloaded),
                                f"{report.bytes_downloaded:,}", len(report.skipped),
                                ", ".join(p[-8:] for p in report.providers) or "no one")
                    return report
                except _Refused as e:
                    fetcher.report.refused[provider.peer_id] = str(e)
                    if not e.retry:
                        bad.add(provider.peer_id)
                    logger.warning("public data: %s provider %s: %s", "will retry" if e.retry else "left",
                                   provider.peer_id, e)
            if time.monotonic() >= deadline:
                break
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    finally:
        fetcher.discard_part()
    tried = "; ".join(f"{p}: {why}" for p, why in fetcher.report.refused.items())
    raise PublicDataFetchError(
        f"could not fetch the public data (manifest {manifest_hash[:12]}…) from any peer: "
        + (f"every provider failed ({tried})" if tried else f"no peer announced it within {wait:.0f} s")
        + ". Pass --data with the public shard's files, or check --initial-peers (a peer that holds the "
        "public shard must be running)")


class _Fetcher:
    def __init__(self, swarm: Swarm, wanted: str, dest: Path, *, tokenizer_ident: str | None,
                 max_total_bytes: int, timeout: float, on_progress: Callable[[int, int], None] | None = None):
        self.swarm, self.wanted, self.dest = swarm, wanted, dest
        self.on_progress = on_progress
        self.tokenizer_ident = tokenizer_ident
        self.max_total_bytes, self.timeout = max_total_bytes, timeout
        self.report = FetchReport(manifest_hash=wanted, dest=dest, files=0, total_bytes=0)
        self.part: _Part | None = None
        self._present: dict[str, tuple[int, int, str]] = {}  # name -> (size, mtime_ns, sha256) we hashed

    # ---- local state -------------------------------------------------------------------
    def local_copy(self) -> FetchReport | None:
        """A report if dest already holds the complete, checked data (from an earlier fetch)."""
        path = self.dest / MANIFEST_FILE
        try:
            if not path.is_file() or path.stat().st_size > MAX_MANIFEST_BYTES:
                return None
            m = Manifest.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, UnicodeDecodeError):
            return None
        if m.hash != self.wanted or layout_problem(m) or not self._complete(m):
            return None
        self._check_tokenizer(m, "the copy in " + str(self.dest))
        return FetchReport(manifest_hash=self.wanted, dest=self.dest, files=len(m.files), total_bytes=m.total_bytes,
                           text_field=m.text_field, skipped=[f.name for f in m.files])

    def _complete(self, m: Manifest) -> bool:
        return (all(self._has(f) for f in m.files)
                and [n for n, _ in folder_files(self.dest)] == [f.name for f in m.files])

    def _has(self, f: ManifestFile) -> bool:
        """True if dest already holds `f` with its sha256 (hashed once per fetch unless it changed)."""
        path = self.dest / f.name
        try:
            if path.is_symlink() or not path.is_file():
                return False
            st = path.stat()
            known = self._present.get(f.name)
            if known is None or known[:2] != (st.st_size, st.st_mtime_ns):
                known = (st.st_size, st.st_mtime_ns, file_sha256(path))
                self._present[f.name] = known
            return known[2] == f.sha256
        except OSError:
            return False

    def remove_stale_parts(self) -> None:
        """Temporaries of a fetch that was killed (their bytes are unchecked; start those files again)."""
        if self.dest.is_dir():
            for p in self.dest.rglob(".*.part"):
                p.unlink(missing_ok=True)

    def discard_part(self) -> None:
        if self.part is not None:
            self.part.path.unlink(missing_ok=True)
            self.part = None

    def _check_tokenizer(self, m: Manifest, where: str) -> None:
        if self.tokenizer_ident is not None and m.tokenizer != self.tokenizer_ident:
            raise PublicDataFetchError(
                f"the public data (manifest {self.wanted[:12]}…, from {where}) was hashed with tokenizer "
                f"{m.tokenizer!r}, but this spec's tokenizer is {self.tokenizer_ident!r}; the spec's "
                "verify.public_data and tokenizer do not belong together")

    # ---- talking to a provider ------------------------------------------------------------
    def _net(self, coro: Awaitable[T]) -> T:
        """Run a network step on the swarm's loop, bounded by the stall timeout."""
        async def bounded() -> T:
            return await asyncio.wait_for(coro, self.timeout)
        try:
            return self.swarm.run_coroutine(bounded(), timeout=self.timeout + HANDOFF_MARGIN)
        except TimeoutError as e:
            raise _NetError(f"no answer within {self.timeout:g} s") from e
        except wire.WireError as e:
            if isinstance(e.__cause__, asyncio.IncompleteReadError):
                raise _NetError(str(e)) from e  # the stream closed
            raise  # an oversized or malformed message: the provider misbehaved
        except DHT_ERRORS as e:  # the network boundary: unreachable, reset
            raise _NetError(str(e) or type(e).__name__) from e
        except Exception as e:  # not a network failure: a bug worth seeing; this provider is left
            logger.warning("data request failed unexpectedly", exc_info=True)
            raise _NetError(str(e) or type(e).__name__) from e

    def _close(self, writer: asyncio.StreamWriter) -> None:
        async def close() -> None:
            wire.close(writer)
        try:
            self.swarm.run_coroutine(close(), timeout=self.swarm.timeouts.local_call)
        except DHT_ERRORS as e:  # the stream is gone either way
            logger.debug("closing a data stream: %s", e)

    def _ask(self, provider: Provider, msg: dict[str, Any], max_reply: int
             ) -> tuple[dict[str, Any], asyncio.StreamReader, asyncio.StreamWriter]:
        async def exchange() -> tuple[dict[str, Any], asyncio.StreamReader, asyncio.StreamWriter]:
            reader, writer = await self.swarm.open_stream(provider.peer_id, DATA, provider.maddrs)
            try:
                await wire.send(writer, msg)
                reply, _ = await wire.recv(reader, max_reply)
            except BaseException:
                wire.close(writer)
                raise
            return reply, reader, writer

        reply, reader, writer = self._net(exchange())
        if reply.get("ok") is not True:
            self._close(writer)
            raise _NetError(f"it answered: {str(reply.get('reason'))[:200]}")
        return reply, reader, writer

    # ---- one provider ---------------------------------------------------------------------
    def fetch_from(self, provider: Provider) -> FetchReport:
        try:
            reply, _, writer = self._ask(provider, {"op": "manifest", "manifest_hash": self.wanted},
                                         MAX_MANIFEST_BYTES)
        except _NetError as e:
            raise _Refused(f"no manifest: {e}", retry=True) from e
        except wire.WireError as e:
            raise _Refused(f"a bad answer to the manifest request: {e}") from e
        self._close(writer)
        try:
            m = Manifest.from_dict(reply)
        except ValueError as e:
            raise _Refused(f"malformed manifest: {e}") from e
        if m.hash != self.wanted:
            raise _Refused(f"its manifest hashes to {m.hash[:12]}…, not the wanted {self.wanted[:12]}…")
        problem = layout_problem(m)
        if problem is not None:  # the hash matches, so every provider would serve these names
            raise PublicDataFetchError(
                f"the public data (manifest {self.wanted[:12]}…, as served by {provider.peer_id}) cannot be written "
                f"as a folder: {problem}. Peers must get it with --data instead")
        problem = size_problem(m, self.max_total_bytes)
        if problem is not None:
            raise _Refused(f"unacceptable manifest: {problem}")
        self._check_tokenizer(m, provider.peer_id)
        self.report.files, self.report.total_bytes, self.report.text_field = len(m.files), m.total_bytes, m.text_field
        todo = {f.name for f in m.files if not self._has(f)}
        self._check_disk([f for f in m.files if f.name in todo])
        for f in m.files:
            if f.name in todo:
                self._download(provider, f)
                if provider.peer_id not in self.report.providers:
                    self.report.providers.append(provider.peer_id)
            elif f.name not in self.report.downloaded and f.name not in self.report.skipped:
                self.report.skipped.append(f.name)
        names = [n for n, _ in folder_files(self.dest)]
        if names != [f.name for f in m.files]:
            extra = sorted(set(names) - {f.name for f in m.files})
            raise PublicDataFetchError(f"{self.dest} holds files that are not part of the public data: {extra[:5]}; "
                                       "remove them (the folder must hold the public data only) and start again")
        write_atomic(self.dest / MANIFEST_FILE, json.dumps({"manifest_hash": self.wanted, **m.to_dict()}).encode())
        return self.report

    def _check_disk(self, todo: list[ManifestFile]) -> None:
        need = sum(f.size for f in todo) - (self.part.offset if self.part else 0)
        if not todo:
            return
        self.dest.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.dest).free
        if free < need + DISK_MARGIN:
            raise PublicDataFetchError(f"the public data needs {need:,} more bytes in {self.dest}, but the disk has "
                                       f"{free:,} free; free some space or pass --data with the public shard's files")

    def _target(self, f: ManifestFile) -> Path:
        folder = self.dest
        for part in f.name.split("/")[:-1]:  # never through a symbolic link, so nothing lands outside dest
            folder = folder / part
            if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
                raise PublicDataFetchError(f"{folder} is in the way of the public data's {f.name!r} (a symbolic link "
                                           "or a file); remove it")
            folder.mkdir(exist_ok=True)
        target = self.dest / f.name
        root = os.path.realpath(self.dest)
        if os.path.commonpath([root, os.path.realpath(target.parent)]) != root:
            raise PublicDataFetchError(f"{target.parent} leads outside {self.dest} (a symbolic link?); remove it")
        if target.is_symlink() or (target.exists() and not target.is_file()):
            raise PublicDataFetchError(f"{target} exists and is not a regular file; remove it")
        return target

    def _download(self, provider: Provider, f: ManifestFile, *, again: bool = False) -> None:
        target = self._target(f)
        part = self.part
        if part is not None and (part.name != f.name or part.offset > f.size):
            self.discard_part()
            part = None
        if part is None:
            part = self.part = _Part(f.name, target.with_name(f".{target.name}.part"), hashlib.sha256())
            part.path.write_bytes(b"")
        try:
            reply, reader, writer = self._ask(provider, {"op": "file", "manifest_hash": self.wanted,
                                                         "sha256": f.sha256, "offset": part.offset}, REQUEST_BYTES)
        except _NetError as e:
            raise _Refused(f"no bytes of {f.name!r} from offset {part.offset}: {e}", retry=True) from e
        except wire.WireError as e:
            raise _Refused(f"a bad answer to the request for {f.name!r}: {e}") from e
        part.sources.add(provider.peer_id)
        try:
            if reply.get("size") != f.size:
                self.discard_part()
                raise _Refused(f"it announces {f.name!r} as {reply.get('size')!r} bytes, its manifest as {f.size}")
            with open(part.path, "ab") as out:
                while part.offset < f.size:
                    try:
                        msg, _ = self._net(wire.recv(reader, CHUNK + 1024))
                        data = wire.field(msg, "data", bytes)
                    except _NetError as e:
                        raise _Refused(f"stopped after {part.offset:,} of {f.size:,} bytes of {f.name!r}: {e}",
                                       retry=True) from e
                    except wire.WireError as e:
                        self.discard_part()
                        raise _Refused(f"a bad message at offset {part.offset:,} of {f.name!r}: {e}") from e
                    if not data or len(data) > f.size - part.offset:
                        self.discard_part()
                        raise _Refused(f"sent {len(data)} bytes at offset {part.offset:,} of {f.name!r}, which has "
                                       f"{f.size:,} (oversized or empty)")
                    out.write(data)
                    part.hasher.update(data)
                    part.offset += len(data)
                    self.report.bytes_downloaded += len(data)
                    if self.on_progress is not None:
                        self.on_progress(self.report.bytes_downloaded, self.report.total_bytes)
                out.flush()
                os.fsync(out.fileno())
        finally:
            self._close(writer)
        got = part.hasher.hexdigest()
        if got != f.sha256:
            others = part.sources - {provider.peer_id}
            self.discard_part()
            if others and not again:  # earlier providers' bytes are in it too: start over with this one alone
                logger.warning("public data: %s did not hash right with bytes from %s too; fetching it again",
                               f.name, ", ".join(sorted(others)))
                self._download(provider, f, again=True)
                return
            raise _Refused(f"served bytes of {f.name!r} that do not hash to its sha256 "
                           f"(got {got[:12]}…, want {f.sha256[:12]}…)")
        os.replace(part.path, target)
        fsync_dir(target.parent)
        self.part = None
        self._present.pop(f.name, None)
        self.report.downloaded.append(f.name)
