"""Agent protocol framing: layout, round trips, incremental decoding, and hostile input."""

from __future__ import annotations

import asyncio
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ccpu.agent.wire import (
    HEADER_LENGTH,
    MAX_PAYLOAD,
    Decoder,
    Frame,
    Kind,
    ProtocolError,
    decode_control,
    encode,
    encode_close,
    encode_control,
    encode_data,
    read_frame,
)

channels = st.integers(1, 0xFFFFFFFF)
valid_frames = st.one_of(
    st.builds(Frame, st.just(0), st.just(Kind.CONTROL), st.binary(max_size=200)),
    st.builds(Frame, channels, st.just(Kind.DATA), st.binary(max_size=200)),
    st.builds(Frame, channels, st.just(Kind.CLOSE), st.just(b"")),
)


def test_header_layout() -> None:
    assert HEADER_LENGTH == 9 and MAX_PAYLOAD == 1 << 20
    assert encode(Frame(7, Kind.DATA, b"hi")) == b"\x00\x00\x00\x02" b"\x00\x00\x00\x07" b"\x02" b"hi"
    assert encode_close(3) == b"\x00\x00\x00\x00\x00\x00\x00\x03\x03"
    raw = encode_control({"id": 1, "op": "hello"})
    assert raw[4:9] == b"\x00\x00\x00\x00\x01"
    (frame,) = Decoder().feed(raw)
    assert decode_control(frame) == {"id": 1, "op": "hello"}


@pytest.mark.parametrize(
    "frame",
    [
        Frame(1, Kind.CONTROL, b"{}"),  # control off channel 0
        Frame(0, Kind.DATA, b"x"),  # data on the control channel
        Frame(0, Kind.CLOSE),
        Frame(5, Kind.CLOSE, b"x"),  # close with payload
        Frame(5, Kind.DATA, b"x" * (MAX_PAYLOAD + 1)),
    ],
)
def test_encoder_refuses_what_the_decoder_refuses(frame: Frame) -> None:
    with pytest.raises(ProtocolError):
        encode(frame)
    raw = struct.pack(">IIB", len(frame.payload), frame.channel, frame.kind) + frame.payload
    with pytest.raises(ProtocolError):
        Decoder().feed(raw)


def test_unknown_kind_and_oversize_header_rejected_before_payload() -> None:
    with pytest.raises(ProtocolError, match="kind"):
        Decoder().feed(struct.pack(">IIB", 0, 1, 9))
    # a header announcing 2 MiB is refused at once, without waiting for (or buffering) the payload
    with pytest.raises(ProtocolError, match="exceeds"):
        Decoder().feed(struct.pack(">IIB", 2 << 20, 1, 2))


def test_max_payload_is_allowed_and_large_data_is_split() -> None:
    raw = encode_data(9, b"a" * (MAX_PAYLOAD * 2 + 5))
    frames = Decoder().feed(raw)
    assert [len(f.payload) for f in frames] == [MAX_PAYLOAD, MAX_PAYLOAD, 5]
    assert encode_data(9, b"") == b""


@pytest.mark.parametrize("payload", [b"\xff", b"[1, 2]", b"nope", b""])
def test_decode_control_needs_a_json_object(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_control(Frame(0, Kind.CONTROL, payload))


@given(st.lists(valid_frames, max_size=20), st.data())
def test_round_trip_in_arbitrary_chunks(frames: list[Frame], data: st.DataObject) -> None:
    raw = b"".join(encode(f) for f in frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=10)))
    dec = Decoder()
    out: list[Frame] = []
    prev = 0
    for cut in cuts + [len(raw)]:
        out += dec.feed(raw[prev:cut])
        prev = cut
    assert out == frames
    assert dec.pending == 0


@given(st.lists(valid_frames, min_size=1, max_size=5), st.data())
def test_truncated_input_waits(frames: list[Frame], data: st.DataObject) -> None:
    raw = b"".join(encode(f) for f in frames)
    cut = data.draw(st.integers(0, len(raw) - 1))
    dec = Decoder()
    got = dec.feed(raw[:cut])
    assert len(got) < len(frames)
    assert got == frames[: len(got)]
    assert dec.feed(raw[cut:]) == frames[len(got) :]


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_random_bytes_only_ever_raise_protocol_error(raw: bytes) -> None:
    dec = Decoder()
    try:
        for f in dec.feed(raw):
            if f.kind is Kind.CONTROL:
                decode_control(f)
    except ProtocolError:
        pass


def _read_all(raw: bytes) -> list[Frame | None]:
    async def main() -> list[Frame | None]:
        reader = asyncio.StreamReader()
        reader.feed_data(raw)
        reader.feed_eof()
        frames: list[Frame | None] = []
        while True:
            f = await read_frame(reader)
            frames.append(f)
            if f is None:
                return frames

    return asyncio.run(main())


def test_async_reader_clean_eof_and_truncation() -> None:
    raw = encode_data(1, b"abc") + encode_close(1)
    assert _read_all(raw) == [Frame(1, Kind.DATA, b"abc"), Frame(1, Kind.CLOSE), None]
    with pytest.raises(ProtocolError, match="header"):
        _read_all(raw[:4])
    with pytest.raises(ProtocolError, match="payload"):
        _read_all(raw[:11])


def test_window_frames() -> None:
    from ccpu.agent.wire import decode_window, encode_window

    (f,) = Decoder().feed(encode_window(5, 65536))
    assert f.kind is Kind.WINDOW and f.channel == 5 and decode_window(f) == 65536
    with pytest.raises(ProtocolError, match="grants 0"):
        decode_window(Frame(5, Kind.WINDOW, b"\0\0\0\0"))
    for bad in (struct.pack(">IIB", 3, 5, 4) + b"abc", struct.pack(">IIB", 4, 0, 4) + b"\0\0\0\1"):
        with pytest.raises(ProtocolError):
            Decoder().feed(bad)
    with pytest.raises(ValueError):
        encode_window(5, 0)
