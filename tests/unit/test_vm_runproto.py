"""vm run's in-band stream ends and exit code (pure)."""

from __future__ import annotations

import base64

import pytest

from ccpu.vm import runproto
from ccpu.vm.runproto import Control, StreamEnd


def test_request_carries_marker_and_shell_joined_command() -> None:
    req = runproto.request(b"m" * 32, ["sh", "-c", "echo 'a b'; exit 7"])
    marker, cmd64, rest = req.split(b"\n")
    assert marker == b"m" * 32 and rest == b""
    assert base64.b64decode(cmd64).decode() == "sh -c 'echo '\"'\"'a b'\"'\"'; exit 7'"
    with pytest.raises(ValueError):
        runproto.request(b"m", [])


@pytest.mark.parametrize("chunk", [1, 2, 5, 31, 32, 33, 1000])
def test_stream_end_forwards_everything_before_the_marker_in_any_chunking(chunk: int) -> None:
    marker = runproto.new_marker()
    payload = b"hello\n" + marker[:10] + b"not yet\x00\xff" + marker[:31] + b"!"
    stream = payload + marker + b"garbage after"
    end = StreamEnd(marker)
    out = b"".join(end.feed(stream[i:i + chunk]) for i in range(0, len(stream), chunk))
    assert out == payload and end.done
    assert end.feed(b"more") == b""


def test_stream_end_flush_returns_held_back_bytes() -> None:
    end = StreamEnd(b"abcdef")
    assert end.feed(b"xxabc") == b"xx"
    assert end.flush() == b"abc" and not end.done


def test_control_parses_exit_line_in_pieces() -> None:
    c = Control()
    assert c.feed(b"EX") is None
    assert c.feed(b"IT 4") is None
    assert c.feed(b"2\n") == 42
    with pytest.raises(ValueError):
        Control().feed(b"EXIT x\n")


def test_release_shows_a_held_key_at_once_and_the_marker_still_ends_the_stream() -> None:
    """A TTY echo that is the marker's first digit must not wait for the next key (vm run -t)."""
    end = StreamEnd(b"abcdef")
    assert end.feed(b"xa") == b"x" and end.pending()
    assert end.release() == b"a" and not end.pending()
    assert end.feed(b"z") == b"z"  # not the marker after all: nothing shown twice
    assert end.feed(b"ab") == b"" and end.release() == b"ab"
    assert end.feed(b"cdef+after") == b"" and end.done  # the marker completes what was released
    end = StreamEnd(b"abcdef")
    assert end.feed(b"a") == b"" and end.release() == b"a"
    assert end.feed(b"a") == b"" and end.pending()  # "aa": the first a was shown, the second is held
    assert end.release() == b"a"
    assert end.feed(b"bcdef") == b"" and end.done
