"""ttrpc message framing: the 10-byte header and the frames it delimits.

Why a module of its own: framing is the one part of ttrpc that must be bit-exact with the Go
implementation (containerd/ttrpc channel.go) and the part most exposed to hostile or broken
peers, so it is kept pure (no protobuf, no sockets) and testable byte by byte.

Wire layout (big-endian)::

    uint32 data length | uint32 stream id | uint8 message type | uint8 flags | data

Oversized frames (data length > 4 MiB) mirror channel.go ``recv``: the data is read and
dropped, and the caller gets :class:`OversizedFrameError` carrying the stream id, so that a
server can answer ResourceExhausted on that stream and keep the connection.  Framing itself has
no other failure mode: any 10 bytes are a syntactically valid header.
"""

from __future__ import annotations

import asyncio
import enum
import struct
from dataclasses import dataclass

HEADER_LENGTH = 10
MAX_DATA_LENGTH = 4 << 20  # messageLengthMax in channel.go
MAX_STREAM_ID = 0xFFFFFFFF

_HEADER = struct.Struct(">IIBB")
assert _HEADER.size == HEADER_LENGTH

# Chunk size used when discarding an oversized frame: bounded memory however large it claims.
_DISCARD_CHUNK = 64 << 10


class MessageType(enum.IntEnum):
    """Frame types (PROTOCOL.md "Message Types"); other values are kept as plain ints."""

    REQUEST = 0x1
    RESPONSE = 0x2
    DATA = 0x3


class Flags(enum.IntFlag):
    """Frame flags; their meaning depends on the message type (PROTOCOL.md)."""

    NONE = 0x0
    REMOTE_CLOSED = 0x1
    REMOTE_OPEN = 0x2
    NO_DATA = 0x4


class ProtocolError(Exception):
    """Base of every error the framing layer raises about the bytes it was given."""


class OversizedFrameError(ProtocolError):
    """A frame announced more than :data:`MAX_DATA_LENGTH` bytes of data.

    Raised only after the data has been consumed (discarded), so the byte stream is in sync
    again and the connection can continue; ``stream_id`` says which stream to answer.
    """

    def __init__(self, stream_id: int, length: int, msg_type: int, flags: int) -> None:
        super().__init__(
            f"message length {length} exceeds maximum message size of {MAX_DATA_LENGTH}"
        )
        self.stream_id = stream_id
        self.length = length
        self.msg_type = msg_type
        self.flags = flags


class TruncatedFrameError(ProtocolError):
    """The byte stream ended in the middle of a frame (EOF inside header or data)."""


@dataclass(frozen=True, slots=True)
class Header:
    """A decoded frame header; ``msg_type`` is an int so unknown types survive decoding."""

    length: int
    stream_id: int
    msg_type: int
    flags: int


@dataclass(frozen=True, slots=True)
class Frame:
    """One complete frame: where it belongs (stream id), what it is (type, flags), its data."""

    stream_id: int
    msg_type: int
    flags: int
    data: bytes


def encode_header(length: int, stream_id: int, msg_type: int, flags: int) -> bytes:
    """Pack a header, refusing field values the wire format cannot carry."""
    if not 0 <= length <= MAX_DATA_LENGTH:
        raise ValueError(f"data length {length} outside 0..{MAX_DATA_LENGTH}")
    if not 0 <= stream_id <= MAX_STREAM_ID:
        raise ValueError(f"stream id {stream_id} outside 0..{MAX_STREAM_ID}")
    if not 0 <= msg_type <= 0xFF or not 0 <= flags <= 0xFF:
        raise ValueError(f"message type {msg_type} / flags {flags} must fit one byte each")
    return _HEADER.pack(length, stream_id, msg_type, flags)


def decode_header(raw: bytes) -> Header:
    """Unpack exactly :data:`HEADER_LENGTH` bytes; never fails on content, only on size."""
    if len(raw) != HEADER_LENGTH:
        raise ValueError(f"a header is {HEADER_LENGTH} bytes, got {len(raw)}")
    length, stream_id, msg_type, flags = _HEADER.unpack(raw)
    return Header(length, stream_id, msg_type, flags)


def encode_frame(stream_id: int, msg_type: int, flags: int, data: bytes) -> bytes:
    """Header + data as one buffer, so a single transport write never interleaves frames."""
    if len(data) > MAX_DATA_LENGTH:
        raise OversizedFrameError(stream_id, len(data), msg_type, flags)
    return encode_header(len(data), stream_id, msg_type, flags) + bytes(data)


class FrameDecoder:
    """Incremental, sans-IO frame decoder: :meth:`feed` bytes, then drain :meth:`next_frame`.

    It buffers at most one header plus one in-limit frame; the data of an oversized frame is
    counted and dropped as it arrives, never stored.  The only exception it raises is
    :class:`OversizedFrameError` (after the whole oversized frame was consumed), after which
    decoding continues normally.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._header: Header | None = None
        self._discard_left = 0  # bytes of an oversized frame still to drop

    def feed(self, data: bytes) -> None:
        """Append received bytes; the bytes of an oversized frame are dropped at once."""
        self._buf += data
        self._drop_discarded()

    def next_frame(self) -> Frame | None:
        """Return the next complete frame, or None when more bytes are needed."""
        if self._header is None:
            if len(self._buf) < HEADER_LENGTH:
                return None
            self._header = decode_header(bytes(self._buf[:HEADER_LENGTH]))
            del self._buf[:HEADER_LENGTH]
            if self._header.length > MAX_DATA_LENGTH:
                self._discard_left = self._header.length
                self._drop_discarded()
        header = self._header
        if header.length > MAX_DATA_LENGTH:
            if self._discard_left:
                return None
            self._header = None
            raise OversizedFrameError(
                header.stream_id, header.length, header.msg_type, header.flags
            )
        if len(self._buf) < header.length:
            return None
        data = bytes(self._buf[: header.length])
        del self._buf[: header.length]
        self._header = None
        return Frame(header.stream_id, header.msg_type, header.flags, data)

    def frames(self) -> list[Frame]:
        """All frames completed so far (stops at, and propagates, an oversized-frame error)."""
        out: list[Frame] = []
        while (frame := self.next_frame()) is not None:
            out.append(frame)
        return out

    @property
    def pending_bytes(self) -> int:
        """Bytes received so far of the frame in progress (0 between frames).

        For an oversized frame this counts discarded bytes too, although none are kept.
        """
        header = self._header
        if header is None:
            return len(self._buf)
        if header.length > MAX_DATA_LENGTH:
            return HEADER_LENGTH + header.length - self._discard_left + len(self._buf)
        return HEADER_LENGTH + len(self._buf)

    @property
    def at_boundary(self) -> bool:
        """True when no partial frame is pending: EOF here is a clean end of stream."""
        return self._header is None and not self._buf

    def _drop_discarded(self) -> None:
        if self._discard_left and self._buf:
            n = min(self._discard_left, len(self._buf))
            del self._buf[:n]
            self._discard_left -= n


async def read_frame(reader: asyncio.StreamReader) -> Frame | None:
    """Read one frame; None on a clean EOF between frames.

    Raises :class:`TruncatedFrameError` on EOF inside a frame and :class:`OversizedFrameError`
    after discarding an oversized frame's data (the stream is then back in sync).
    """
    try:
        raw = await reader.readexactly(HEADER_LENGTH)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise TruncatedFrameError(
            f"EOF after {len(exc.partial)} of {HEADER_LENGTH} header bytes"
        ) from None
    header = decode_header(raw)
    if header.length > MAX_DATA_LENGTH:
        left = header.length
        while left:
            chunk = await reader.read(min(left, _DISCARD_CHUNK))
            if not chunk:
                raise TruncatedFrameError(
                    f"EOF while discarding oversized message ({header.length - left} of "
                    f"{header.length} bytes)"
                )
            left -= len(chunk)
        raise OversizedFrameError(header.stream_id, header.length, header.msg_type, header.flags)
    try:
        data = await reader.readexactly(header.length) if header.length else b""
    except asyncio.IncompleteReadError as exc:
        raise TruncatedFrameError(
            f"EOF after {len(exc.partial)} of {header.length} data bytes"
        ) from None
    return Frame(header.stream_id, header.msg_type, header.flags, data)


async def write_frame(
    writer: asyncio.StreamWriter, stream_id: int, msg_type: int, flags: int, data: bytes
) -> None:
    """Write one frame in a single transport write and wait for the buffer to drain.

    Raises :class:`OversizedFrameError` without writing anything when ``data`` is too large
    (channel.go ``send`` refuses the same way).
    """
    writer.write(encode_frame(stream_id, msg_type, flags, data))
    await writer.drain()
