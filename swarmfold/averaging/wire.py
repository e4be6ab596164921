"""Messages between peers: msgpack maps in length-prefixed frames over hivemind P2P streams.

Every frame is an 8-byte big-endian length and a msgpack map. The length is checked
against a limit *before* anything is read, and msgpack is unpacked with size limits
and no extension types, so a hostile peer cannot make us allocate or execute anything.
Tensor payloads travel as msgpack `bin` fields, encoded by averaging/codec.py.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import msgpack

from swarmfold.averaging.hivemind_adapter import widen_reader

HEADER_LEN = 8
PROGRESS_PIECE = 1 << 20  # a recv with on_progress reads and reports a large message this many bytes at a time


class WireError(Exception):
    """A malformed, oversized or unexpected message from a peer."""


class MessageTooLarge(WireError):
    pass


def _frame(msg: dict[str, Any]) -> tuple[bytes, bytes]:
    """A message's frame as (length header, msgpack body)."""
    body = msgpack.packb(msg, use_bin_type=True)
    return len(body).to_bytes(HEADER_LEN, "big"), body


def pack(msg: dict[str, Any]) -> bytes:
    header, body = _frame(msg)
    return header + body


def unpack(body: bytes | bytearray, max_bytes: int) -> dict[str, Any]:
    try:
        msg = msgpack.unpackb(body, raw=False, strict_map_key=True, max_bin_len=max_bytes,
                              max_str_len=1 << 20, max_array_len=1 << 16, max_map_len=1 << 12,
                              max_ext_len=0)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError, TypeError) as e:
        raise WireError(f"malformed message ({type(e).__name__}: {e})") from e
    if not isinstance(msg, dict):
        raise WireError(f"malformed message: expected a map, got {type(msg).__name__}")
    return msg


async def send(writer: asyncio.StreamWriter, msg: dict[str, Any]) -> int:
    """Send one framed message; returns the bytes written. The length and the body are written
    apart, so a large message (a state-sync reply) is not copied once more into one frame."""
    header, body = _frame(msg)
    writer.write(header)
    writer.write(body)
    await writer.drain()
    return len(header) + len(body)


# {"kind": "chunk", "k": <k>, "data": <bin 32>}: the msgpack map of a chunk frame, up to its data
_CHUNK_HEAD = b"\x83" + msgpack.packb("kind") + msgpack.packb("chunk") + msgpack.packb("k")
_CHUNK_DATA = msgpack.packb("data") + b"\xc6"


def _chunk_head(index: int, size: int) -> bytes:
    return _CHUNK_HEAD + msgpack.packb(index) + _CHUNK_DATA + size.to_bytes(4, "big")


def chunk_frame_size(index: int, size: int) -> int:
    """The bytes on the wire of chunk frame `index` carrying `size` bytes of data (as send_chunk returns)."""
    return HEADER_LEN + len(_chunk_head(index, size)) + size


async def send_chunk(writer: asyncio.StreamWriter, index: int, data: bytes | memoryview) -> int:
    """Send the message {"kind": "chunk", "k": index, "data": data} without copying `data` into a frame
    (tensor chunks are most of the bytes of a round); `recv` reads it like any other message."""
    head = _chunk_head(index, len(data))
    writer.write((len(head) + len(data)).to_bytes(HEADER_LEN, "big") + head)
    writer.write(data)
    await writer.drain()
    return HEADER_LEN + len(head) + len(data)


async def recv(reader: asyncio.StreamReader, max_bytes: int,
               on_progress: Callable[[int, int], None] | None = None) -> tuple[dict[str, Any], int]:
    """Read one framed message of at most `max_bytes`; returns (message, bytes read).

    With `on_progress`, the body is read PROGRESS_PIECE bytes at a time and `on_progress(bytes read,
    frame bytes)` is called once the header is in and after each piece, ending at the frame's size."""
    try:
        header = await reader.readexactly(HEADER_LEN)
    except asyncio.IncompleteReadError as e:
        raise WireError("the peer closed the stream") from e
    length = int.from_bytes(header, "big")
    if length > max_bytes:
        raise MessageTooLarge(f"message of {length} bytes exceeds the limit of {max_bytes} bytes")
    body: bytes | bytearray
    try:
        if on_progress is None:
            body = await reader.readexactly(length)
        else:
            on_progress(HEADER_LEN, HEADER_LEN + length)
            body = bytearray(length)
            done = 0
            while done < length:
                piece = await reader.readexactly(min(PROGRESS_PIECE, length - done))
                body[done:done + len(piece)] = piece
                done += len(piece)
                on_progress(HEADER_LEN + done, HEADER_LEN + length)
    except asyncio.IncompleteReadError as e:
        raise WireError("the peer closed the stream mid-message") from e
    return unpack(body, max_bytes), HEADER_LEN + length


def widen(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, limit: int = 4 << 20) -> None:
    """Let a bulk stream (tensor chunks) move `limit` bytes between wake-ups, instead of asyncio's
    64 KiB defaults: fewer pause/resume round trips, epoll updates and task switches per chunk.

    The socket buffers and the writer's limits have public setters. The reader's does not:
    asyncio's StreamReader pauses reading once 2 x its limit (64 KiB) is buffered and hivemind
    creates our readers, hence the attribute; were it gone, nothing breaks, it is only slower.
    """
    widen_reader(reader, limit)
    writer.transport.set_write_buffer_limits(high=limit)
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, limit)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, limit)
        except OSError:  # the kernel may cap or refuse it; the defaults still work
            pass


def field(msg: dict[str, Any], name: str, typ: type | tuple[type, ...]) -> Any:
    """A required, typed field of a message, or WireError naming it."""
    if name not in msg:
        raise WireError(f"malformed message: missing field {name!r}")
    value = msg[name]
    if isinstance(value, bool) and typ in (int, float, (int, float)):
        raise WireError(f"malformed message: field {name!r} must be a number")
    if not isinstance(value, typ):
        raise WireError(f"malformed message: field {name!r} has type {type(value).__name__}")
    return value


def close(writer: asyncio.StreamWriter) -> None:
    try:
        writer.close()
    except Exception:  # the transport may already be gone; nothing to clean up then
        pass


async def finish(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float) -> None:
    """End a stream on which we answered: wait until the caller has closed its end (it does once it has
    read our last message), at most `timeout` seconds, reading and discarding whatever it still sends,
    then close ours.

    Closing first can lose the end of our answer. hivemind's libp2p daemon copies each stream between
    its unix socket and the libp2p stream (go-libp2p-daemon's doStreamPipe) and *resets* the stream
    when a copy fails. Closing our socket while the caller's bytes are still unread in it (a part we
    stopped reading, a refused upload) makes the daemon's read fail with ECONNRESET; more rarely,
    its two copies race on yamux's CloseRead/CloseWrite. A reset discards what the caller's daemon
    has received but not yet handed on, so the caller sees "the peer closed the stream mid-message"
    or a connection reset. Once the caller has closed, nothing is in flight towards it any more.
    docs/swarm.md ("Streams cut off mid-message") has the evidence."""
    async def until_eof() -> None:
        while await reader.read(1 << 16):  # the caller sends nothing more; discard anything it does
            pass
    try:
        await asyncio.wait_for(until_eof(), timeout)
    except (TimeoutError, ConnectionError, OSError):  # it did not close in time, or its end is gone
        pass
    finally:
        close(writer)
