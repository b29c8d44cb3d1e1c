"""ttrpc framing: header layout, incremental decoding, oversized frames, truncation."""

from __future__ import annotations

import asyncio
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ccpu.ttrpc.framing import (
    HEADER_LENGTH,
    MAX_DATA_LENGTH,
    Flags,
    Frame,
    FrameDecoder,
    MessageType,
    OversizedFrameError,
    ProtocolError,
    TruncatedFrameError,
    decode_header,
    encode_frame,
    encode_header,
    read_frame,
    write_frame,
)

U32 = st.integers(0, 0xFFFFFFFF)
U8 = st.integers(0, 0xFF)
small_frames = st.builds(
    Frame, stream_id=U32, msg_type=U8, flags=U8, data=st.binary(max_size=300)
)


def test_constants_match_channel_go() -> None:
    assert HEADER_LENGTH == 10
    assert MAX_DATA_LENGTH == 4 * 1024 * 1024
    assert (MessageType.REQUEST, MessageType.RESPONSE, MessageType.DATA) == (1, 2, 3)
    assert (Flags.REMOTE_CLOSED, Flags.REMOTE_OPEN, Flags.NO_DATA) == (1, 2, 4)


def test_header_is_big_endian_length_stream_type_flags() -> None:
    raw = encode_frame(0x01020304, MessageType.RESPONSE, Flags.REMOTE_CLOSED, b"hello")
    assert raw == b"\x00\x00\x00\x05" b"\x01\x02\x03\x04" b"\x02" b"\x01" b"hello"


@pytest.mark.parametrize(
    ("length", "stream_id", "msg_type", "flags"),
    [
        (0, 0, 0, 0),
        (MAX_DATA_LENGTH, 0xFFFFFFFF, 0xFF, 0xFF),
        (1, 1, MessageType.REQUEST, 0),
        (MAX_DATA_LENGTH - 1, 0x80000000, MessageType.DATA, Flags.NO_DATA),
    ],
)
def test_header_round_trip_at_field_boundaries(
    length: int, stream_id: int, msg_type: int, flags: int
) -> None:
    h = decode_header(encode_header(length, stream_id, msg_type, flags))
    assert (h.length, h.stream_id, h.msg_type, h.flags) == (length, stream_id, msg_type, flags)


@pytest.mark.parametrize(
    "fields",
    [
        (MAX_DATA_LENGTH + 1, 1, 1, 0),
        (-1, 1, 1, 0),
        (0, 0x1_0000_0000, 1, 0),
        (0, -1, 1, 0),
        (0, 1, 0x100, 0),
        (0, 1, 1, 0x100),
    ],
)
def test_encode_header_rejects_unrepresentable_fields(fields: tuple[int, int, int, int]) -> None:
    with pytest.raises(ValueError):
        encode_header(*fields)


def test_decode_header_needs_exactly_ten_bytes() -> None:
    with pytest.raises(ValueError):
        decode_header(b"\x00" * 9)


def test_encode_frame_refuses_oversized_data() -> None:
    with pytest.raises(OversizedFrameError) as ei:
        encode_frame(7, MessageType.REQUEST, 0, bytes(MAX_DATA_LENGTH + 1))
    assert ei.value.stream_id == 7
    assert ei.value.length == MAX_DATA_LENGTH + 1


def test_frame_of_exactly_max_length_is_accepted() -> None:
    data = b"\xab" * MAX_DATA_LENGTH
    dec = FrameDecoder()
    dec.feed(encode_frame(3, MessageType.REQUEST, 0, data))
    assert dec.frames() == [Frame(3, MessageType.REQUEST, 0, data)]
    assert dec.at_boundary


@settings(max_examples=200)
@given(frames=st.lists(small_frames, max_size=8), cuts=st.lists(st.integers(0, 3000), max_size=10))
def test_frames_survive_arbitrary_chunking(frames: list[Frame], cuts: list[int]) -> None:
    stream = b"".join(encode_frame(f.stream_id, f.msg_type, f.flags, f.data) for f in frames)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    dec = FrameDecoder()
    out: list[Frame] = []
    for a, b in zip(points, points[1:]):
        dec.feed(stream[a:b])
        out.extend(dec.frames())
    assert out == frames
    assert dec.at_boundary and dec.pending_bytes == 0


@settings(max_examples=300)
@given(chunks=st.lists(st.binary(max_size=64), max_size=20))
def test_random_bytes_raise_only_protocol_errors_and_account_for_every_byte(
    chunks: list[bytes],
) -> None:
    dec = FrameDecoder()
    consumed = 0
    for chunk in chunks:
        dec.feed(chunk)
        while True:
            try:
                frame = dec.next_frame()
            except OversizedFrameError as exc:  # the only ProtocolError framing can produce
                assert exc.length > MAX_DATA_LENGTH
                consumed += HEADER_LENGTH + exc.length
                continue
            if frame is None:
                break
            assert len(frame.data) <= MAX_DATA_LENGTH
            consumed += HEADER_LENGTH + len(frame.data)
    assert consumed + dec.pending_bytes == sum(map(len, chunks))


@given(frame=small_frames, keep=st.integers(0, 10_000))
def test_truncated_frame_waits_for_the_rest(frame: Frame, keep: int) -> None:
    raw = encode_frame(frame.stream_id, frame.msg_type, frame.flags, frame.data)
    keep %= len(raw)  # strictly fewer bytes than the frame
    dec = FrameDecoder()
    dec.feed(raw[:keep])
    assert dec.next_frame() is None
    assert dec.pending_bytes == keep
    assert dec.at_boundary == (keep == 0)
    dec.feed(raw[keep:])
    assert dec.next_frame() == frame
    assert dec.next_frame() is None


def _oversized(stream_id: int, extra: int) -> bytes:
    length = MAX_DATA_LENGTH + extra
    return struct.pack(">IIBB", length, stream_id, MessageType.REQUEST, 0) + bytes(length)


@settings(max_examples=10, suppress_health_check=[HealthCheck.too_slow])
@given(
    extra=st.integers(1, 5000),
    chunk=st.sampled_from([1 << 10, 64 << 10, 1 << 20, 8 << 20]),
    before=small_frames,
    after=small_frames,
)
def test_oversized_frame_is_discarded_then_decoding_resumes(
    extra: int, chunk: int, before: Frame, after: Frame
) -> None:
    stream = (
        encode_frame(before.stream_id, before.msg_type, before.flags, before.data)
        + _oversized(9, extra)
        + encode_frame(after.stream_id, after.msg_type, after.flags, after.data)
    )
    dec = FrameDecoder()
    events: list[object] = []
    for i in range(0, len(stream), chunk):
        dec.feed(stream[i : i + chunk])
        # Discarded data is never kept: the buffer holds at most one chunk plus a header.
        assert len(dec._buf) <= chunk + HEADER_LENGTH + 300
        while True:
            try:
                frame = dec.next_frame()
            except OversizedFrameError as exc:
                events.append(("oversized", exc.stream_id, exc.length))
                continue
            if frame is None:
                break
            events.append(frame)
    assert events == [before, ("oversized", 9, MAX_DATA_LENGTH + extra), after]


def test_garbage_header_with_reserved_byte_set_is_oversized() -> None:
    # A first byte != 0 means >= 16 MiB: always rejected as oversized, never as data.
    dec = FrameDecoder()
    dec.feed(b"\xff" * HEADER_LENGTH + b"\x00" * 100)
    assert dec.next_frame() is None  # still discarding
    assert dec.pending_bytes == HEADER_LENGTH + 100
    assert not dec.at_boundary


# -- asyncio StreamReader / StreamWriter helpers ------------------------------------------


def _read_all(data: bytes) -> list[object]:
    """Run read_frame over ``data`` until EOF, recording frames and errors."""

    async def go() -> list[object]:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        out: list[object] = []
        while True:
            try:
                frame = await read_frame(reader)
            except OversizedFrameError as exc:
                out.append(("oversized", exc.stream_id, exc.length))
                continue
            except TruncatedFrameError:
                out.append("truncated")
                return out
            if frame is None:
                return out
            out.append(frame)

    return asyncio.run(go())


def test_read_frame_clean_eof_returns_none() -> None:
    f = Frame(1, MessageType.REQUEST, 0, b"x")
    assert _read_all(encode_frame(1, MessageType.REQUEST, 0, b"x")) == [f]
    assert _read_all(b"") == []


@pytest.mark.parametrize("cut", [1, 5, 9, 10, 12])
def test_read_frame_truncated_raises(cut: int) -> None:
    raw = encode_frame(1, MessageType.REQUEST, 0, b"abcdef")
    assert _read_all(raw[:cut]) == ["truncated"]


def test_read_frame_discards_oversized_and_continues() -> None:
    after = Frame(11, MessageType.REQUEST, 0, b"next")
    data = _oversized(5, 1) + encode_frame(11, MessageType.REQUEST, 0, b"next")
    assert _read_all(data) == [("oversized", 5, MAX_DATA_LENGTH + 1), after]


def test_read_frame_eof_while_discarding_is_truncation() -> None:
    assert _read_all(_oversized(5, 10)[:-1]) == ["truncated"]


@settings(max_examples=100)
@given(
    items=st.lists(
        st.one_of(small_frames, st.binary(max_size=40)),  # valid frames mixed with garbage
        max_size=6,
    )
)
def test_read_frame_agrees_with_frame_decoder(items: list[object]) -> None:
    stream = b"".join(
        encode_frame(i.stream_id, i.msg_type, i.flags, i.data) if isinstance(i, Frame) else i
        for i in items
    )
    expected: list[object] = []
    dec = FrameDecoder()
    dec.feed(stream)
    while True:
        try:
            frame = dec.next_frame()
        except ProtocolError as exc:
            assert isinstance(exc, OversizedFrameError)
            expected.append(("oversized", exc.stream_id, exc.length))
            continue
        if frame is None:
            break
        expected.append(frame)
    if not dec.at_boundary:
        expected.append("truncated")
    assert _read_all(stream) == expected


def test_write_frame_writes_one_frame_and_refuses_oversized() -> None:
    async def go() -> bytes:
        received = bytearray()
        done = asyncio.Event()

        async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            received.extend(await r.read())
            done.set()
            w.close()

        srv = await asyncio.start_server(on_conn, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        with pytest.raises(OversizedFrameError):
            await write_frame(writer, 3, MessageType.REQUEST, 0, bytes(MAX_DATA_LENGTH + 1))
        await write_frame(writer, 3, MessageType.REQUEST, 0, b"payload")
        writer.close()
        await done.wait()
        srv.close()
        return bytes(received)

    assert asyncio.run(go()) == encode_frame(3, MessageType.REQUEST, 0, b"payload")
