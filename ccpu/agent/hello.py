"""`hello`: the agent's answer, and the first one given before asyncio is imported.

Why a module of its own: a guest's agent is ready when it has answered `hello` (the shim and the
pool wait for nothing else), and under TCG importing asyncio alone takes ~1.6 s of the ~2.5 s between
the init's ``exec agent`` and that answer (docs/vm.md "The agent's imports").  So on a connection
handed over as an fd (a guest's virtio-serial port, a host-mode child's socketpair) the agent reads
the first frame with plain blocking reads (:func:`answer_first`), answers a well-formed `hello`
itself, and only then imports asyncio; the event loop takes the connection over already greeted
(``Server.serve(greeted=...)``), with any bytes read past the `hello` frame handed back first.
Anything else as the first frame (another op, a bad id, a wrong version, a frame the wire refuses)
is not answered here: its bytes go to the asyncio server, which answers exactly as it always has.
The answer itself (:func:`respond`) is the one the asyncio server gives to every later client.

Standard library only, no asyncio, logging, dataclasses (inspect, ast) or typing: this is the guest's boot path
(tests/unit/test_import_graph.py pins it).
"""

from __future__ import annotations

import os
import select
from collections import namedtuple
from collections.abc import Mapping

from . import protocol, wire

TYPE_CHECKING = False  # typing (re, contextlib, warnings) only for checkers: not on the boot path
if TYPE_CHECKING:
    from typing import Any

FEATURES = ["terminal", "exec", "pause", "stats", "update", "rootfs:layers", "rootfs:mounts", "rootfs:none",
            "layers:live", "oom", "scratch"]

#: the per-channel window a client may ask for in `hello` (bytes)
MIN_WINDOW = 4096
MAX_WINDOW = 1 << 30

#: bytes read while waiting for the first frame before giving it to the asyncio server unread
#: (a `hello` is a few hundred bytes; the wire's own frame bound still applies there)
FIRST_READ_MAX = 1 << 16


def features(nics: bool, repo: bool, attest: bool) -> list[str]:
    """What this agent offers: ``nics`` a guest's agent (the `nic` op), ``repo`` a machine's own
    layer repo (remote mode), ``attest`` a guest with a TPM and tpm2-tools."""
    out = list(FEATURES)
    if nics:
        out.append("nic")
    if repo:
        out.append("layers:pull")
    if attest:
        out.append("attest")
    return out


def attest_available() -> bool:
    """Whether this guest can attest: a TPM and tpm2-tools (the tpm module's heavier imports wait
    for the op itself)."""
    from . import tpm

    return tpm.available()


def window(args: Mapping[str, Any]) -> int | None:
    """The client's per-channel window (None: no flow control, an older client)."""
    w = args.get("window")
    if w is None:
        return None
    if isinstance(w, bool) or not isinstance(w, int) or not MIN_WINDOW <= w <= MAX_WINDOW:
        raise protocol.InvalidArgument(f"window must be an integer in {MIN_WINDOW}..{MAX_WINDOW}")
    return w


def respond(args: Mapping[str, Any], offered: list[str], repo_root: str | None) -> tuple[dict[str, Any], int | None]:
    """`hello`'s result and the connection's window; AgentError when it is refused."""
    version = args.get("version")
    if version != protocol.PROTOCOL_VERSION:
        raise protocol.FailedPrecondition(f"unsupported protocol version {version!r} (agent speaks 1)")
    w = window(args)
    result: dict[str, Any] = {
        "version": protocol.PROTOCOL_VERSION,
        "agent_pid": os.getpid(),
        "features": offered,
        "kernel": os.uname().release,
        **({"repo": repo_root} if repo_root is not None else {}),
    }
    if w is not None:
        result = {**result, "features": [*offered, "flow"], "window": w}
    return result, w


class Greeted(namedtuple("Greeted", ("window", "rest"))):
    """The first `hello` was answered: the connection's window (int or None) and the bytes
    read past it (a collections.namedtuple: typing is not on the boot path)."""

    __slots__ = ()
    window: int | None
    rest: bytes


class Unanswered(namedtuple("Unanswered", ("raw",))):
    """Not a `hello` this module answers (or the stream ended): every byte read, for the server."""

    __slots__ = ()
    raw: bytes


def answer_first(fd: int, offered: list[str]) -> Greeted | Unanswered:
    """Read the first frame on ``fd`` (blocking; a non-blocking fd is waited for with poll) and
    answer it if it is a valid `hello`."""
    decoder = wire.Decoder()
    raw = bytearray()
    frames: list[wire.Frame] = []
    while not frames:
        if len(raw) >= FIRST_READ_MAX:
            return Unanswered(bytes(raw))
        chunk = _read(fd, FIRST_READ_MAX - len(raw))
        if not chunk:
            return Unanswered(bytes(raw))
        raw += chunk
        try:
            frames = decoder.feed(chunk)
        except wire.ProtocolError:
            return Unanswered(bytes(raw))
    first = frames[0]
    if first.kind is not wire.Kind.CONTROL:
        return Unanswered(bytes(raw))
    try:
        msg = wire.decode_control(first)
    except wire.ProtocolError:
        return Unanswered(bytes(raw))
    rid, args = msg.get("id"), msg.get("args", {})
    if msg.get("op") != "hello" or isinstance(rid, bool) or not isinstance(rid, int) or rid <= 0 \
            or not isinstance(args, dict):
        return Unanswered(bytes(raw))
    try:
        result, w = respond(args, offered, None)
    except protocol.AgentError:
        return Unanswered(bytes(raw))  # the server refuses it, with the same error
    _write_all(fd, wire.encode_control(protocol.response_ok(rid, result)))
    rest = b"".join(wire.encode(f) for f in frames[1:]) + decoder.take_pending()
    return Greeted(w, rest)


def _read(fd: int, n: int) -> bytes:
    while True:
        try:
            return os.read(fd, n)
        except BlockingIOError:
            _wait(fd, select.POLLIN)
        except InterruptedError:
            continue


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            _wait(fd, select.POLLOUT)


def _wait(fd: int, event: int) -> None:
    p = select.poll()
    p.register(fd, event)
    p.poll()
