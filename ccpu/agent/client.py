"""An asyncio client of the agent protocol -- for the shim and for tests.

Usage::

    client = await AgentClient.connect_unix("/run/fractal/agent.sock")   # or connect_fd(fd)
    await client.hello()
    out = client.open_channel()                 # channel numbers are allocated for you
    await client.call("create", container="c1", bundle=b, rootfs={"kind": "none"},
                      terminal=False, stdin=0, stdout=out.number, stderr=0)
    await client.call("start", container="c1")
    data = await out.read_all()                 # everything up to the agent's `close`
    event = await client.next_event()           # {"event": "exit", ...}
    await client.close()

`call` raises the `protocol.AgentError` subclass named by the error code (NotFound, ...); when
the connection is lost, pending and later calls raise `Unavailable`.  Events are queued from
the moment the client is connected; read them with `next_event()` or `async for` over
`events()`.  Standard library only, like the agent.

Callback style (what the shim uses, one implementation for both styles)::

    client.set_event_handler(on_event)          # events (also those queued so far) -> on_event
    client.add_lost_handler(on_lost)            # on_lost(reason) once, when the connection ends
    out = client.open_channel(on_data=fifo.write, on_close=fifo.close)

A channel with callbacks delivers output to `on_data` as it arrives instead of buffering it, and
calls `on_close` once: when the agent closes the channel, or when the connection is lost.

Flow control (docs/agent-protocol.md, feature `flow`): `hello()` offers a per-channel window
(`DEFAULT_WINDOW`); an agent that accepts sends at most that many bytes per output channel
before the client grants more.  A callback channel grants bytes back when its consumer calls
`Channel.consumed(n)` (the shim: once they left for containerd's FIFO, or were dropped), so a
slow consumer slows only its own process; a buffered channel grants at once (unbounded, as
before: for tests and tools that read with `read_all`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import stat
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from . import protocol, wire

#: bytes the agent may send on one output channel before the client grants more
DEFAULT_WINDOW = 256 * 1024
#: grant back once this share of the window was consumed (fewer, larger window frames)
_GRANT_DIVISOR = 4
#: no grants are queued while this much is waiting to go to an agent that does not read
_MAX_UNSENT = 4 << 20


class Channel:
    """One stdio channel: write to it (a process's stdin) and/or read from it (its output)."""

    def __init__(
        self,
        client: AgentClient,
        number: int,
        on_data: Callable[[bytes], None] | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.client = client
        self.number = number
        self._reader = asyncio.StreamReader(limit=2**30)
        self._on_data = on_data
        self._on_close = on_close
        self.closed_by_agent = False  # the agent sent `close`: all output is in (maybe unread)
        self._ungranted = 0  # consumed bytes not yet granted back (flow control)

    async def write(self, data: bytes) -> None:
        await self.client._send(wire.encode_data(self.number, data))

    async def close_write(self) -> None:
        """Send `close`: the process's stdin sees EOF."""
        await self.client._send(wire.encode_close(self.number))

    async def read(self, n: int = -1) -> bytes:
        """Some output (b"" once the agent closed the channel)."""
        return await self._reader.read(n) if n >= 0 else await self._reader.read(65536)

    async def read_all(self) -> bytes:
        """All output up to the agent's `close` of this channel."""
        return await self._reader.read(-1)

    def at_eof(self) -> bool:
        """Closed by the agent and everything read."""
        return self._reader.at_eof()

    def release(self) -> None:
        """Forget the channel (its number may be reused); later data for it is dropped."""
        if self.client._channels.get(self.number) is self:
            del self.client._channels[self.number]
        self._on_data = self._on_close = None

    def consumed(self, n: int) -> None:
        """`n` bytes of this channel's output are out of our hands: let the agent send more."""
        if n <= 0 or self.client.window is None or self.client._channels.get(self.number) is not self:
            return
        self._ungranted += n
        if self._ungranted >= self.client.window // _GRANT_DIVISOR:
            n, self._ungranted = self._ungranted, 0
            self.client._grant(self.number, n)

    def _feed(self, data: bytes) -> None:
        if self._on_data is not None:
            self._on_data(data)
        elif self._on_close is None:
            self._reader.feed_data(data)
            self.consumed(len(data))
        else:
            self.consumed(len(data))  # nobody reads it

    def _eof(self, by_agent: bool = True) -> None:
        if by_agent:
            self.closed_by_agent = True
        self._reader.feed_eof()
        cb, self._on_close = self._on_close, None
        if cb is not None:
            cb()


#: a machine that vanishes (powered off, its QEMU killed, its network cut) sends no RST: TCP
#: keepalive probes after KEEPALIVE[0] s idle, every [1] s, [2] unanswered = the link is lost; and
#: data unacknowledged for USER_TIMEOUT_MS ends it too.  Then the sandbox's processes are
#: reported exited (shim/agentsandbox.py), as for a dead VM.
KEEPALIVE = (5, 2, 3)
USER_TIMEOUT_MS = 20000


def keepalive(sock: Any) -> None:
    """TCP keepalive and a user timeout on a remote agent's connection (best effort)."""
    if sock is None:
        return
    opts = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    for name, value in (("TCP_KEEPIDLE", KEEPALIVE[0]), ("TCP_KEEPINTVL", KEEPALIVE[1]),
                        ("TCP_KEEPCNT", KEEPALIVE[2]), ("TCP_USER_TIMEOUT", USER_TIMEOUT_MS)):
        if hasattr(socket, name):
            opts.append((socket.IPPROTO_TCP, getattr(socket, name), value))
    for level, opt, value in opts:
        try:
            sock.setsockopt(level, opt, value)
        except OSError:
            pass


class AgentClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._numbers = itertools.count(1, 2)  # channels: odd numbers from 1
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._channels: dict[int, Channel] = {}
        self._events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._event_handler: Callable[[dict[str, Any]], None] | None = None
        self._lost_handlers: list[Callable[[str], None]] = []
        self.closed = False
        self.close_reason: str = ""
        self.window: int | None = None  # per-channel window once the agent accepted flow control
        self._task = asyncio.ensure_future(self._read_loop())

    # -- connecting ----------------------------------------------------------------------------

    @classmethod
    async def connect_unix(cls, path: str) -> AgentClient:
        reader, writer = await asyncio.open_unix_connection(path, limit=2**21)
        return cls(reader, writer)

    @classmethod
    async def connect_fd(cls, fd: int) -> AgentClient:
        """Take over a connected socket fd (e.g. a socketpair end)."""
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise ValueError(f"fd {fd} is not a socket")
        reader, writer = await asyncio.open_connection(sock=socket.socket(fileno=fd), limit=2**21)
        return cls(reader, writer)

    @classmethod
    async def connect_tls(cls, host: str, port: int, context: Any, server_hostname: str | None = None,
                          timeout: float = 15.0) -> AgentClient:
        """A remote agent over TCP with mutual TLS (`context`: ccpu.agent.tls.client_context).
        The handshake (and so the certificate checks) completes before this returns."""
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=context, server_hostname=server_hostname or host,
                                    limit=2**21, ssl_handshake_timeout=timeout), timeout)
        keepalive(writer.get_extra_info("socket"))
        return cls(reader, writer)

    def peer_certificate(self) -> bytes:
        """The agent's TLS certificate (DER) from the handshake; b"" on a local link."""
        obj = self._writer.get_extra_info("ssl_object")
        return (obj.getpeercert(binary_form=True) or b"") if obj is not None else b""

    @property
    def peer_identity(self) -> str | None:
        """``sha256:HEX`` of the agent's TLS certificate (None on a local link)."""
        from .tls import peer_identity

        return peer_identity(self._writer.get_extra_info("ssl_object"))

    @classmethod
    async def connect_socket(cls, sock: socket.socket) -> AgentClient:
        reader, writer = await asyncio.open_connection(sock=sock, limit=2**21)
        return cls(reader, writer)

    async def hello(self, version: int = protocol.PROTOCOL_VERSION, auth: Mapping[str, str] | None = None,
                    window: int | None = DEFAULT_WINDOW) -> dict[str, Any]:
        """`window`: offer flow control with this per-channel window (None: do not)."""
        args: dict[str, Any] = {"version": version}
        if auth is not None:
            args["auth"] = dict(auth)
        if window is not None:
            args["window"] = window
        result = await self.call("hello", args)
        features = result.get("features")
        if window is not None and isinstance(features, list) and "flow" in features:
            self.window = window  # an older agent ignores `window` and does not list `flow`
        return result

    # -- requests ------------------------------------------------------------------------------

    async def call(self, op: str, args: Mapping[str, Any] | None = None, /, **kw: Any) -> dict[str, Any]:
        """Send a request and wait for its response's result (errors raise AgentError)."""
        if self.closed:
            raise protocol.Unavailable(f"connection closed: {self.close_reason}")
        rid = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            await self._send(wire.encode_control(protocol.request(rid, op, {**(args or {}), **kw})))
            response = await fut
        finally:
            self._pending.pop(rid, None)
        if response.get("ok"):
            result = response.get("result")
            return result if isinstance(result, dict) else {}
        raise protocol.error_from_wire(response.get("error"))

    # -- channels ------------------------------------------------------------------------------

    def open_channel(
        self,
        number: int | None = None,
        *,
        on_data: Callable[[bytes], None] | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> Channel:
        """A channel to name in create/exec; registered at once so no output is missed.

        With `on_data`/`on_close` output goes to the callbacks instead of the channel's buffer
        (see the module docstring)."""
        if number is None:
            number = next(n for n in self._numbers if n not in self._channels)
        if number <= 0 or number in self._channels:
            raise ValueError(f"channel {number} is invalid or in use")
        ch = Channel(self, number, on_data, on_close)
        self._channels[number] = ch
        return ch

    # -- callbacks -----------------------------------------------------------------------------

    def set_event_handler(self, handler: Callable[[dict[str, Any]], None] | None) -> None:
        """Deliver events to `handler` (called in the reading task) instead of the queue; events
        already queued are handed to it at once, in order."""
        self._event_handler = handler
        if handler is None:
            return
        while not self._events.empty():
            event = self._events.get_nowait()
            if event is None:
                self._events.put_nowait(None)
                break
            self._dispatch_event(event)

    def add_lost_handler(self, handler: Callable[[str], None]) -> None:
        """`handler(reason)` is called once when the connection ends (at once if it has)."""
        if self.closed:
            handler(self.close_reason)
        else:
            self._lost_handlers.append(handler)

    def _dispatch_event(self, event: dict[str, Any]) -> None:
        assert self._event_handler is not None
        try:
            self._event_handler(event)
        except Exception:  # noqa: BLE001 - a broken handler must not end the connection
            logging.getLogger(__name__).exception("agent event handler failed for %.300s", event)

    # -- events --------------------------------------------------------------------------------

    async def next_event(self, timeout: float | None = None) -> dict[str, Any]:
        """The next event; raises Unavailable once the connection is gone and none are left."""
        event = await asyncio.wait_for(self._events.get(), timeout)
        if event is None:
            self._events.put_nowait(None)  # keep signalling the end
            raise protocol.Unavailable(f"connection closed: {self.close_reason}")
        return event

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Events until the connection closes."""
        while True:
            try:
                yield await self.next_event()
            except protocol.Unavailable:
                return

    # -- plumbing ------------------------------------------------------------------------------

    async def _send(self, raw: bytes) -> None:
        if self.closed:
            raise protocol.Unavailable(f"connection closed: {self.close_reason}")
        try:
            self._writer.write(raw)
            await self._writer.drain()
        except (ConnectionError, RuntimeError, OSError) as e:
            self._lost(f"write failed: {e}")
            raise protocol.Unavailable(f"connection closed: {e}") from None

    def _grant(self, channel: int, n: int) -> None:
        """Queue a window frame (never waits: called from the consumer's callbacks).  An agent
        that stops reading gets no more grants once `_MAX_UNSENT` bytes wait for it."""
        if self.closed:
            return
        transport = self._writer.transport
        if transport is not None and transport.get_write_buffer_size() > _MAX_UNSENT:
            return
        try:
            self._writer.write(wire.encode_window(channel, min(n, 0xFFFFFFFF)))
        except (ConnectionError, RuntimeError, OSError) as e:
            self._lost(f"write failed: {e}")

    async def _read_loop(self) -> None:
        reason = "closed by the agent"
        try:
            while True:
                frame = await wire.read_frame(self._reader)
                if frame is None:
                    break
                if frame.kind is wire.Kind.CONTROL:
                    self._on_control(wire.decode_control(frame))
                elif frame.kind is wire.Kind.WINDOW:
                    raise wire.ProtocolError("window frame from the agent")
                else:
                    ch = self._channels.get(frame.channel)
                    if ch is None:
                        continue  # a channel we released (or never opened): dropped
                    if frame.kind is wire.Kind.DATA:
                        ch._feed(frame.payload)
                    else:
                        ch._eof()
        except (wire.ProtocolError, ConnectionError, OSError) as e:
            reason = f"{type(e).__name__}: {e}"
        except asyncio.CancelledError:
            reason = "closed by the client"
            raise
        except Exception as e:  # noqa: BLE001 - a failing callback: the connection cannot go on
            logging.getLogger(__name__).exception("agent connection failed")
            reason = f"{type(e).__name__}: {e}"
        finally:
            self._lost(reason)

    def _on_control(self, msg: dict[str, Any]) -> None:
        if "event" in msg:
            if self._event_handler is not None:
                self._dispatch_event(msg)
            else:
                self._events.put_nowait(msg)
            return
        rid = msg.get("id")
        fut = self._pending.get(rid) if isinstance(rid, int) else None
        if fut is not None and not fut.done():
            fut.set_result(msg)

    def _lost(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(protocol.Unavailable(f"connection closed: {reason}"))
        for ch in list(self._channels.values()):
            with contextlib.suppress(Exception):
                ch._eof(by_agent=False)  # no more data; `closed_by_agent` stays as it was
        self._events.put_nowait(None)
        with contextlib.suppress(Exception):
            self._writer.close()
        handlers, self._lost_handlers = self._lost_handlers, []
        for h in handlers:
            try:
                h(reason)
            except Exception:  # noqa: BLE001
                logging.getLogger(__name__).exception("agent lost handler failed")

    async def close(self) -> None:
        self._lost("closed by the client")
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
