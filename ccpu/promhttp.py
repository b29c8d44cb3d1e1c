"""Serve Prometheus' text exposition over HTTP from an asyncio process, on TCP or a unix socket.

Why not prometheus-client's own ``start_http_server``: it serves TCP only, from a thread of its
own, while our daemons are asyncio processes whose default endpoint is a unix socket (root-only,
no port opened uninvited; docs/metrics.md).  What a scrape needs is tiny: one ``GET /metrics``,
one answer, close.  The metrics text itself is prometheus-client's (``generate_latest``).

Addresses (`parse_address`): ``unix:/path`` (or an absolute path), ``HOST:PORT`` (``[::1]:9100``
for IPv6), ``none`` / empty for off.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

#: prometheus-client's CONTENT_TYPE_LATEST (text format 0.0.4), spelled out to avoid the import here
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_REQUEST_HEAD = 8192
REQUEST_TIMEOUT = 10.0


class AddressError(ValueError):
    """A metrics address that is neither unix:PATH, HOST:PORT nor none."""


@dataclass(frozen=True)
class Address:
    unix: Path | None = None
    host: str | None = None
    port: int | None = None

    def __str__(self) -> str:
        if self.unix is not None:
            return f"unix:{self.unix}"
        return f"[{self.host}]:{self.port}" if self.host and ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str | None) -> Address | None:
    """``unix:/run/x.sock`` or ``/run/x.sock``, ``127.0.0.1:9100``, ``[::1]:9100``; None for off."""
    text = (text or "").strip()
    if text.lower() in ("", "none", "off"):
        return None
    if text.startswith("unix:") or text.startswith("/"):
        path = text.removeprefix("unix:").removeprefix("//")
        if not path.startswith("/"):
            raise AddressError(f"metrics address {text!r}: a unix socket needs an absolute path")
        return Address(unix=Path(path))
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise AddressError(f"metrics address {text!r}: use unix:/PATH, HOST:PORT or none")
    return Address(host=host.strip("[]"), port=int(port))


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                  render: Callable[[], Awaitable[bytes]]) -> None:
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
        writer.close()
        return
    method, _, rest = head.split(b"\r\n", 1)[0].decode("latin-1").partition(" ")
    path = rest.split(" ", 1)[0].split("?", 1)[0]
    if method not in ("GET", "HEAD"):
        status, body, ctype = "405 Method Not Allowed", b"GET /metrics\n", "text/plain"
    elif path not in ("/metrics", "/"):
        status, body, ctype = "404 Not Found", b"GET /metrics\n", "text/plain"
    else:
        try:
            status, body, ctype = "200 OK", await render(), CONTENT_TYPE
        except Exception as exc:  # noqa: BLE001 - a broken collector must not end the daemon
            log.exception("metrics: rendering failed")
            status, body, ctype = "500 Internal Server Error", f"{type(exc).__name__}: {exc}\n".encode(), "text/plain"
    writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                 "Connection: close\r\n\r\n".encode() + (b"" if method == "HEAD" else body))
    try:
        await writer.drain()
    except ConnectionError:
        pass
    writer.close()


async def serve(address: Address, render: Callable[[], Awaitable[bytes]]) -> asyncio.AbstractServer:
    """Listen on ``address`` and answer each ``GET /metrics`` with ``await render()``.

    A unix socket is created mode 0600 (as the daemons' RPC sockets); a stale file at its path
    is replaced only when nothing answers on it.
    """
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _answer(reader, writer, render)

    if address.unix is None:
        return await asyncio.start_server(handle, address.host, address.port, limit=MAX_REQUEST_HEAD)
    path = address.unix
    path.parent.mkdir(mode=0o711, parents=True, exist_ok=True)
    if os.path.lexists(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
            raise OSError(f"{path} is already served by another process")
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o600)
    except BaseException:
        sock.close()
        raise
    return await asyncio.start_unix_server(handle, sock=sock, limit=MAX_REQUEST_HEAD)


def scrape(address: Address, timeout: float = 10.0) -> str:
    """``GET /metrics`` at ``address`` (blocking; for `fractal metrics`, `fractal collect` and
    tests): the exposition text, or OSError with the reason."""
    if address.unix is not None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: object = str(address.unix)
    else:
        s = socket.socket(socket.AF_INET6 if ":" in (address.host or "") else socket.AF_INET, socket.SOCK_STREAM)
        target = (address.host, address.port)
    with s:
        s.settimeout(timeout)
        s.connect(target)  # type: ignore[arg-type]
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: fractal\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(1 << 16):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].decode("latin-1")
    if " 200 " not in status + " ":
        raise OSError(f"{address}: {status or 'no answer'}")
    return body.decode("utf-8", "replace")
