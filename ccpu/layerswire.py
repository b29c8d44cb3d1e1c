"""``fractal layers add`` and ``rm``'s calls to their shim without asyncio or protobuf: a
synchronous ttrpc client of two methods (``AddImages``, ``RemoveTargets``) over a unix socket, with the few protobuf messages it needs
encoded and decoded by hand.

Why by hand: the whole CLI process of ``fractal layers add`` should cost <= 100 ms (issue 13),
and importing asyncio (the project's ttrpc client) and protobuf (the generated classes) was
most of it once gRPC was gone (docs/performance.md has the figures).  The protobuf wire format
of these messages is small and fixed: strings, a double, varints, nested messages and a map.
tests/unit/test_layerswire.py checks the encoding byte for byte and the decoding field for
field against the generated classes (ccpu/layersmsg.py), so the two cannot drift apart.

Stdlib only (``_socket``, ``struct``), and never imports ``ccpu.ttrpc`` (its package imports
asyncio).  The decoded answer has the shape of :func:`ccpu.layersmsg.answer_dict`.
"""

from __future__ import annotations

import _socket  # the C module: `socket` adds ~3-6 ms of enum conversions and selectors (issue 13)
import struct

TYPE_CHECKING = False  # typing costs `fractal layers add` ~4 ms of imports: annotations only
if TYPE_CHECKING:
    from typing import Any

SERVICE = "fractal.layers.v1.Layers"  # ccpu/layersapi.py's (not imported: one module less)
METHOD = "AddImages"
REMOVE_METHOD = "RemoveTargets"

#: ttrpc framing (ccpu/ttrpc/framing.py): length, stream id, type, flags; big endian
_HEADER = struct.Struct(">IIBB")
_TYPE_REQUEST = 1
_TYPE_RESPONSE = 2
#: an answer bigger than this is not a Stack of a sane container (ttrpc's own limit is 4 MiB)
MAX_MESSAGE = 4 << 20

#: ttrpc/gRPC status codes the CLI tells apart (ccpu/ttrpc/status.py)
UNIMPLEMENTED = 12
UNAVAILABLE = 14


class WireError(Exception):
    """The shim answered with an error status (``code``) or not in ttrpc at all (code 14)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# -- encoding -----------------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64s are ten bytes of two's complement, as protobuf does
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _bytes_field(number: int, value: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(value)) + value


def _str_field(number: int, value: str) -> bytes:
    """A proto3 string field; the empty string is the default and is not written."""
    return _bytes_field(number, value.encode()) if value else b""


def add_images_request(container: str, images: list[str], position: str) -> bytes:
    """``AddImagesRequest{container, images, position}`` serialized."""
    return (_str_field(1, container) + b"".join(_bytes_field(2, i.encode()) for i in images)
            + _str_field(3, position))


def remove_targets_request(container: str, targets: list[str]) -> bytes:
    """``RemoveTargetsRequest{container, targets}`` serialized."""
    return _str_field(1, container) + b"".join(_bytes_field(2, t.encode()) for t in targets)


def ttrpc_request(service: str, method: str, payload: bytes, timeout_nano: int = 0) -> bytes:
    """``ttrpc.Request{service, method, payload, timeout_nano}`` serialized."""
    out = _str_field(1, service) + _str_field(2, method)
    if payload:
        out += _bytes_field(3, payload)
    if timeout_nano:
        out += _varint(4 << 3) + _varint(timeout_nano)
    return out


# -- decoding -----------------------------------------------------------------------------------


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ValueError("truncated or overlong varint")
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, i


def fields(buf: bytes) -> list[tuple[int, int, Any]]:
    """(number, wire type, value) of each field of a message, in wire order: a varint as an
    int, a fixed64 as 8 bytes, a length-delimited field as bytes."""
    out: list[tuple[int, int, Any]] = []
    i = 0
    while i < len(buf):
        key, i = _read_varint(buf, i)
        number, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _read_varint(buf, i)
        elif wt == 1:
            v, i = buf[i:i + 8], i + 8
        elif wt == 2:
            n, i = _read_varint(buf, i)
            v, i = buf[i:i + n], i + n
        elif wt == 5:
            v, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported wire type {wt}")
        if i > len(buf):
            raise ValueError("truncated field")
        out.append((number, wt, v))
    return out


def _int64(n: int) -> int:
    return n - (1 << 64) if n >= 1 << 63 else n


def _double(b: bytes) -> float:
    return float(struct.unpack("<d", b)[0])


def _layer(buf: bytes) -> dict[str, Any]:
    out: dict[str, Any] = {"dir": "", "live": False, "chain_id": "", "image": "", "size": None,
                           "gc_label": "", "added_at": None}
    names = {1: "dir", 3: "chain_id", 4: "image", 6: "gc_label"}
    for number, wt, v in fields(buf):
        if number in names and wt == 2:
            out[names[number]] = v.decode()
        elif number == 2 and wt == 0:
            out["live"] = bool(v)
        elif number == 5 and wt == 0:
            out["size"] = _int64(v)
        elif number == 7 and wt == 0:
            out["added_at"] = _int64(v)
    return out


def _change(buf: bytes) -> dict[str, Any]:
    out: dict[str, Any] = {"at": 0, "added": [], "removed": [], "restack_ms": 0.0}
    for number, wt, v in fields(buf):
        if number == 1 and wt == 0:
            out["at"] = _int64(v)
        elif number == 2 and wt == 2:
            out["added"].append(v.decode())
        elif number == 3 and wt == 2:
            out["removed"].append(v.decode())
        elif number == 4 and wt == 1:
            out["restack_ms"] = _double(v)
    return out


def stack(buf: bytes) -> dict[str, Any]:
    """A serialized ``Stack`` as :func:`ccpu.layersmsg.answer_dict` gives it, plus ``missing``."""
    out: dict[str, Any] = {"container": "", "repo_root": None, "upper": None, "layers": [],
                           "history": []}
    added: list[str] = []
    skipped: list[str] = []
    removed: list[dict[str, Any]] = []
    missing: dict[str, str] = {}
    restack_ms: float | None = None
    snapshotter = ""
    labels_removed: list[str] = []
    for number, wt, v in fields(buf):
        if wt == 2 and number in (1, 2, 3):
            out[{1: "container", 2: "repo_root", 3: "upper"}[number]] = v.decode()
        elif wt == 2 and number == 4:
            out["layers"].append(_layer(v))
        elif wt == 2 and number == 5:
            out["history"].append(_change(v))
        elif wt == 2 and number == 6:
            added.append(v.decode())
        elif wt == 2 and number == 7:
            skipped.append(v.decode())
        elif wt == 2 and number == 8:
            removed.append(_layer(v))
        elif wt == 1 and number == 9:
            restack_ms = _double(v)
        elif wt == 2 and number == 10:
            entry = {n: e.decode() for n, w, e in fields(v) if w == 2 and n in (1, 2)}
            missing[entry.get(1, "")] = entry.get(2, "")
        elif wt == 2 and number == 11:
            snapshotter = v.decode()
        elif wt == 2 and number == 12:
            labels_removed.append(v.decode())
    if restack_ms is not None:
        out.update(restack_ms=restack_ms, added=added, skipped=skipped, removed=removed)
    if missing:
        out.update(missing=missing, snapshotter=snapshotter)
    if labels_removed:
        out["labels_removed"] = labels_removed
    return out


def response(buf: bytes) -> bytes:
    """The payload of a ``ttrpc.Response``; an error status raises :class:`WireError`."""
    payload = b""
    code, message = 0, ""
    for number, wt, v in fields(buf):
        if number == 1 and wt == 2:  # google.rpc.Status{code = 1, message = 2, details = 3}
            for n, w, sv in fields(v):
                if n == 1 and w == 0:
                    code = _int64(sv)
                elif n == 2 and w == 2:
                    message = sv.decode(errors="replace")
        elif number == 2 and wt == 2:
            payload = v
    if code:
        raise WireError(code, message)
    return payload


# -- the call -----------------------------------------------------------------------------------


def _recv_exact(sock: _socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise WireError(UNAVAILABLE, "the shim closed the connection")
        buf += chunk
    return bytes(buf)


def call(address: str, payload: bytes, timeout: float, method: str = METHOD) -> bytes:
    """One unary call of the Layers service at ``address`` (``unix://PATH`` or a path); the
    answer's payload.  The socket's own timeout bounds the whole wait."""
    path = address.removeprefix("unix://")
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except OSError as e:
            raise WireError(UNAVAILABLE, f"cannot connect to {path}: {e.strerror or e}") from None
        body = ttrpc_request(SERVICE, method, payload, int(timeout * 1e9))
        try:
            sock.sendall(_HEADER.pack(len(body), 1, _TYPE_REQUEST, 0) + body)
            while True:
                length, stream, mtype, _flags = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
                if length > MAX_MESSAGE:
                    raise WireError(UNAVAILABLE, f"the shim sent a {length}-byte message")
                data = _recv_exact(sock, length)
                if stream == 1 and mtype == _TYPE_RESPONSE:
                    return response(data)
        except TimeoutError:
            raise WireError(UNAVAILABLE, f"no answer within {timeout:g} s") from None
        except OSError as e:
            raise WireError(UNAVAILABLE, str(e.strerror or e)) from None
        except ValueError as e:
            raise WireError(UNAVAILABLE, f"not a ttrpc answer: {e}") from None
    finally:
        sock.close()
