"""The agent's first `hello` answered before asyncio loads (ccpu/agent/hello.py): a valid one is
answered with the server's own answer and the bytes past it are kept; anything else is left, byte
for byte, to the asyncio server -- and the real agent process behaves as it did before."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ccpu.agent import hello, protocol, wire

ROOT = Path(__file__).resolve().parents[2]
HELLO = protocol.request(1, "hello", {"version": protocol.PROTOCOL_VERSION})


def _answer(sent: bytes, *, nonblocking: bool = False) -> tuple[hello.Greeted | hello.Unanswered, bytes]:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(sent)
        a.shutdown(socket.SHUT_WR)  # EOF after what was sent: a wrong answer_first cannot hang
        b.setblocking(not nonblocking)
        got = hello.answer_first(b.fileno(), hello.features(True, False, False))
        b.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := a.recv(65536):
            reply += chunk
    return got, reply


def _frames(raw: bytes) -> list[dict[str, Any]]:
    return [wire.decode_control(f) for f in wire.Decoder().feed(raw)]


@pytest.mark.parametrize("nonblocking", [False, True])
def test_a_valid_hello_is_answered_and_what_follows_is_kept(nonblocking: bool) -> None:
    after = wire.encode_control(protocol.request(2, "state", {"container": "c"})) + wire.encode_data(3, b"in")
    got, reply = _answer(wire.encode_control(HELLO) + after + b"\0\0", nonblocking=nonblocking)
    assert isinstance(got, hello.Greeted)
    assert got.window is None and got.rest == after + b"\0\0"  # a part of the next header, too
    (answer,) = _frames(reply)
    assert answer["id"] == 1 and answer["ok"]
    assert answer["result"]["features"] == [*hello.FEATURES, "nic"]
    assert answer["result"]["agent_pid"] == os.getpid()


def test_a_window_is_flow_control() -> None:
    got, reply = _answer(wire.encode_control(protocol.request(7, "hello", {"version": 1, "window": 65536})))
    assert isinstance(got, hello.Greeted) and got.window == 65536
    (answer,) = _frames(reply)
    assert answer["result"]["window"] == 65536 and "flow" in answer["result"]["features"]


@pytest.mark.parametrize("first", [
    wire.encode_control(protocol.request(1, "state", {"container": "c"})),  # not hello
    wire.encode_control(protocol.request(1, "hello", {"version": 2})),  # refused version
    wire.encode_control(protocol.request(1, "hello", {"version": 1, "window": 1})),  # bad window
    wire.encode_control({"id": 0, "op": "hello", "args": {"version": 1}}),  # bad id
    wire.encode_control({"id": True, "op": "hello", "args": {"version": 1}}),
    wire.encode_control({"id": 1, "op": "hello", "args": []}),
    wire.encode_data(1, b"x"),  # not a control frame
    wire.encode(wire.Frame(0, wire.Kind.CONTROL, b"not json")),
    b"\xff\xff\xff\xff\0\0\0\0\0",  # a header the wire refuses (oversize)
    b"\0\0",  # EOF inside a header
    b"",  # EOF at once
])
def test_anything_else_is_left_unanswered_for_the_server(first: bytes) -> None:
    got, reply = _answer(first)
    assert got == hello.Unanswered(first)
    assert reply == b""


def test_a_first_frame_that_never_ends_is_not_buffered_without_bound() -> None:
    header = wire.HEADER.pack(wire.MAX_PAYLOAD, 0, wire.Kind.CONTROL)
    got, reply = _answer(header + b"x" * (hello.FIRST_READ_MAX + 10))
    assert isinstance(got, hello.Unanswered) and len(got.raw) == hello.FIRST_READ_MAX and reply == b""


def _agent(tmp_path: Path, sent: bytes) -> list[dict[str, Any]]:
    """The real agent on a socketpair: ``sent`` in one write, then the stream's end; its answers."""
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ccpu.agent", "--fd", str(theirs.fileno()), "--runc-root", str(tmp_path / "runc"),
         "--runc", sys.executable, "--bundle-root", str(tmp_path)],
        pass_fds=(theirs.fileno(),), env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE)
    theirs.close()
    try:
        ours.sendall(sent)
        ours.settimeout(60)
        decoder, out = wire.Decoder(), []
        while len(out) < sent.count(b'"op"'):
            chunk = ours.recv(65536)
            if not chunk:
                break
            out += [wire.decode_control(f) for f in decoder.feed(chunk)]
        ours.shutdown(socket.SHUT_WR)
        assert proc.wait(timeout=60) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        ours.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return out


def test_the_agent_serves_what_came_with_the_first_hello(tmp_path: Path) -> None:
    """hello and a request in one write: the request (read by the blocking first read) is served
    by the event loop afterwards."""
    out = _agent(tmp_path, wire.encode_control(HELLO)
                 + wire.encode_control(protocol.request(2, "state", {"container": "nope"})))
    assert [m["id"] for m in out] == [1, 2]
    assert out[0]["ok"] and out[0]["result"]["version"] == protocol.PROTOCOL_VERSION
    assert out[1]["error"]["code"] == "NotFound" and "nope" in out[1]["error"]["message"]


def test_the_agent_still_refuses_a_first_request_that_is_not_hello(tmp_path: Path) -> None:
    out = _agent(tmp_path, wire.encode_control(protocol.request(1, "state", {"container": "c"})))
    assert out[0]["error"]["code"] == "FailedPrecondition" and "hello" in out[0]["error"]["message"]
