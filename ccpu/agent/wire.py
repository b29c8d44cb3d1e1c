"""Framing of the agent protocol: 9-byte header + payload (see docs/agent-protocol.md).

Why a module of its own: the framing is the one part both ends (agent and shim) share verbatim,
and it must be pure so it can be property-tested -- any byte sequence either yields frames,
waits for more bytes, or raises `ProtocolError`; nothing else.

Header: uint32 length (<= 1 MiB) | uint32 channel | uint8 kind, all big-endian.

Everything a peer sends is bounded here before it is used: the payload length is checked from
the header before a byte of the payload is buffered, control messages are UTF-8 JSON objects
nested at most `jsonbound.MAX_DEPTH` deep without NaN/Infinity, window updates carry exactly one uint32.
"""

from __future__ import annotations

import enum
import json
import struct
from collections import namedtuple

from . import jsonbound

TYPE_CHECKING = False  # typing only for checkers: it is not on the guest agent's boot path (hello.py)
if TYPE_CHECKING:  # asyncio: imported where used, the first `hello` is answered without it (hello.py)
    import asyncio
    from typing import Any

HEADER = struct.Struct(">IIB")
HEADER_LENGTH = HEADER.size  # 9
MAX_PAYLOAD = 1 << 20
CONTROL_CHANNEL = 0
MAX_CHANNEL = 0xFFFFFFFF
WINDOW_PAYLOAD = struct.Struct(">I")


class Kind(enum.IntEnum):
    CONTROL = 1
    DATA = 2
    CLOSE = 3
    WINDOW = 4  # flow control (negotiated in hello): the receiver grants more bytes on a channel


class ProtocolError(Exception):
    """The peer broke the framing; the connection cannot continue."""


class Frame(namedtuple("Frame", ("channel", "kind", "payload"), defaults=(b"",))):
    """One frame: ``channel`` (int), ``kind`` (Kind), ``payload`` (bytes, default empty).  A
    named tuple, not a dataclass (dataclasses imports inspect and ast) nor typing.NamedTuple
    (typing imports re, contextlib, warnings): the agent's boot under TCG would pay for them
    before its first `hello`."""

    __slots__ = ()
    channel: int
    kind: Kind
    payload: bytes


def _check(channel: int, kind: int, length: int) -> Kind:
    """Header rules shared by encoder and decoder, so neither side can produce what the other refuses."""
    if length > MAX_PAYLOAD:
        raise ProtocolError(f"frame payload of {length} bytes exceeds {MAX_PAYLOAD}")
    try:
        k = Kind(kind)
    except ValueError:
        raise ProtocolError(f"unknown frame kind {kind}") from None
    if not 0 <= channel <= MAX_CHANNEL:
        raise ProtocolError(f"channel {channel} out of range")
    if k is Kind.CONTROL and channel != CONTROL_CHANNEL:
        raise ProtocolError(f"control frame on channel {channel}")
    if k is not Kind.CONTROL and channel == CONTROL_CHANNEL:
        raise ProtocolError(f"{k.name.lower()} frame on the control channel")
    if k is Kind.CLOSE and length:
        raise ProtocolError("close frame with a payload")
    if k is Kind.WINDOW and length != WINDOW_PAYLOAD.size:
        raise ProtocolError(f"window frame with a payload of {length} bytes (want {WINDOW_PAYLOAD.size})")
    return k


def encode(frame: Frame) -> bytes:
    _check(frame.channel, frame.kind, len(frame.payload))
    return HEADER.pack(len(frame.payload), frame.channel, frame.kind) + frame.payload


def encode_control(message: dict[str, Any]) -> bytes:
    payload = json.dumps(message, separators=(",", ":")).encode()
    return encode(Frame(CONTROL_CHANNEL, Kind.CONTROL, payload))


def encode_data(channel: int, data: bytes) -> bytes:
    """Data frames for `data`, split at MAX_PAYLOAD so callers need not care about the limit."""
    if not data:
        return b""
    return b"".join(
        encode(Frame(channel, Kind.DATA, data[i : i + MAX_PAYLOAD]))
        for i in range(0, len(data), MAX_PAYLOAD)
    )


def encode_close(channel: int) -> bytes:
    return encode(Frame(channel, Kind.CLOSE))


def encode_window(channel: int, increment: int) -> bytes:
    """Grant the peer `increment` more bytes of data on `channel` (1..2**32-1)."""
    if not 0 < increment <= 0xFFFFFFFF:
        raise ValueError(f"window increment {increment} out of range")
    return encode(Frame(channel, Kind.WINDOW, WINDOW_PAYLOAD.pack(increment)))


def decode_window(frame: Frame) -> int:
    """The increment of a window frame (0 is a protocol error: it would grant nothing)."""
    (increment,) = WINDOW_PAYLOAD.unpack(frame.payload)
    if increment == 0:
        raise ProtocolError(f"window frame for channel {frame.channel} grants 0 bytes")
    return increment


def decode_control(frame: Frame) -> dict[str, Any]:
    """The JSON object of a control frame (anything else is a protocol error)."""
    try:
        message = jsonbound.loads(frame.payload.decode("utf-8"))  # nesting bounded, no NaN
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError(f"control frame is not UTF-8 JSON: {str(e)[:200]}") from None
    if not isinstance(message, dict):
        raise ProtocolError("control message is not a JSON object")
    return message


class Decoder:
    """Incremental decoder: feed bytes as they arrive, get whole frames back."""

    def __init__(self) -> None:
        self._buf = bytearray()

    @property
    def pending(self) -> int:
        """Bytes held back waiting for the rest of a frame."""
        return len(self._buf)

    def take_pending(self) -> bytes:
        """The bytes held back (part of a frame), handed to another reader of the stream."""
        out, self._buf = bytes(self._buf), bytearray()
        return out

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        frames: list[Frame] = []
        while len(self._buf) >= HEADER_LENGTH:
            length, channel, kind = HEADER.unpack_from(self._buf)
            k = _check(channel, kind, length)  # refuse oversize before buffering it
            end = HEADER_LENGTH + length
            if len(self._buf) < end:
                break
            frames.append(Frame(channel, k, bytes(self._buf[HEADER_LENGTH:end])))
            del self._buf[:end]
        return frames


async def read_frame(reader: asyncio.StreamReader) -> Frame | None:
    """Next frame from a stream; None on EOF between frames, ProtocolError on EOF inside one."""
    import asyncio

    try:
        header = await reader.readexactly(HEADER_LENGTH)
    except asyncio.IncompleteReadError as e:
        if e.partial:
            raise ProtocolError("connection closed inside a frame header") from None
        return None
    length, channel, kind = HEADER.unpack(header)
    k = _check(channel, kind, length)
    try:
        payload = await reader.readexactly(length) if length else b""
    except asyncio.IncompleteReadError:
        raise ProtocolError("connection closed inside a frame payload") from None
    return Frame(channel, k, payload)


async def write_frame(writer: asyncio.StreamWriter, frame: Frame) -> None:
    writer.write(encode(frame))
    await writer.drain()
