"""ttrpc server: unary request dispatch over any stream connection (asyncio).

Why it looks like this (behaviour mirrors containerd/ttrpc server.go and services.go):

* Every request runs in its own task and responses are written under a per-connection lock as
  they complete, so a blocking call (Task.Wait) never holds up others on the same connection and
  answers may go out of order (the client matches them by stream id).
* Protocol violations are answered on the offending stream and the connection keeps going:
  oversized frame -> RESOURCE_EXHAUSTED (after discarding its data), even stream id ->
  INVALID_ARGUMENT, stream id not increasing -> INVALID_ARGUMENT, undecodable Request envelope ->
  INVALID_ARGUMENT, unknown service/method -> UNIMPLEMENTED.  Unknown frame types are ignored
  for forward compatibility, as in Go.  Only a truncated stream (EOF inside a frame) or a
  socket error ends a connection, and nothing on one connection can stop the others.
* Streaming (Data frames, Request frames flagged remote-open/remote-closed) is not supported:
  such requests are answered UNIMPLEMENTED, stray Data frames INVALID_ARGUMENT.
* ``timeout_nano`` becomes a deadline: when it passes the handler task is cancelled and the
  answer is DEADLINE_EXCEEDED.  When the peer disconnects, its in-flight handlers are cancelled
  (Go cancels the connection context the same way).

Deliberate difference from Go: a request payload that does not decode as the method's request
type is answered INVALID_ARGUMENT (Go's generated code returns INTERNAL); a handler exception
that is not a :class:`TtrpcError` is answered UNKNOWN with its message (Go additionally maps a
few os errors to codes; we leave that choice to the handler).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from google.protobuf import message as pb_message
from google.rpc import status_pb2

from .context import RequestContext, metadata_from_pairs
from .framing import (
    MAX_DATA_LENGTH,
    Flags,
    Frame,
    MessageType,
    OversizedFrameError,
    TruncatedFrameError,
    read_frame,
    write_frame,
)
from .messages import Request, Response
from .status import Code, TtrpcError, make_status

log = logging.getLogger(__name__)

Handler = Callable[[Any, RequestContext], Awaitable[pb_message.Message]]
MethodTable = Mapping[str, tuple[type[pb_message.Message], Handler]]
#: ``observer(service, method, status code, seconds)`` after each answered call (metrics)
Observer = Callable[[str, str, int, float], None]

_STREAM_FLAGS = Flags.REMOTE_OPEN | Flags.REMOTE_CLOSED


class Server:
    """A ttrpc server: register services, then serve listeners or single connections."""

    def __init__(self) -> None:
        self._services: dict[str, dict[str, tuple[type[pb_message.Message], Handler]]] = {}
        self._listeners: list[asyncio.AbstractServer] = []
        self._connections: set[_Connection] = set()
        self._socket_files: list[tuple[str, int, int]] = []  # (path, dev, inode) we created
        self._closing = False
        #: told of every answered call; set by whoever wants RPC metrics (shim/promexport.py)
        self.observer: Observer | None = None

    # -- registration -------------------------------------------------------------------

    def register(self, service_name: str, methods: MethodTable) -> None:
        """Register ``{method: (request_cls, async handler(request, ctx) -> response)}``.

        ``service_name`` is the full protobuf service name, e.g. ``containerd.task.v2.Task``.
        Registering a service twice is a programming error (Go panics), hence ValueError.
        """
        if service_name in self._services:
            raise ValueError(f"duplicate service {service_name} registered")
        table: dict[str, tuple[type[pb_message.Message], Handler]] = {}
        for name, (request_cls, handler) in methods.items():
            if not callable(handler):
                raise TypeError(f"handler for {service_name}/{name} is not callable")
            table[name] = (request_cls, handler)
        self._services[service_name] = table

    # -- serving ------------------------------------------------------------------------

    async def serve_unix(self, path: str, *, mode: int | None = 0o600) -> None:
        """Listen on a unix socket path and serve it in the background (returns once bound).

        An existing file at ``path`` is an error (OSError EADDRINUSE), never silently replaced
        as asyncio's own unix server would: the caller decides whether a socket is stale (a
        live shim must not lose its socket).  ``mode`` is applied before listening (containerd
        shim sockets are 0600); the file is removed again at shutdown, as Go's listener does.
        """
        self._check_open()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            if mode is not None:
                os.chmod(path, mode)
            sock.listen(socket.SOMAXCONN)
            sock.setblocking(False)
            listener = await asyncio.start_unix_server(self._accepted, sock=sock)
        except BaseException:
            sock.close()
            raise
        st = os.stat(path)
        self._socket_files.append((path, st.st_dev, st.st_ino))
        self._listeners.append(listener)

    async def serve_fd(self, fd: int) -> None:
        """Serve an already listening socket passed in as a file descriptor (returns at once).

        The shim daemon inherits its listener this way; the socket object takes ownership of
        ``fd`` and closes it on shutdown.
        """
        self._check_open()
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        if sock.family == socket.AF_UNIX:
            listener = await asyncio.start_unix_server(self._accepted, sock=sock)
        else:
            listener = await asyncio.start_server(self._accepted, sock=sock)
        self._listeners.append(listener)

    async def serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Serve one established connection until the peer leaves or the server shuts down."""
        if self._closing:
            writer.close()
            return
        conn = _Connection(self, reader, writer)
        self._connections.add(conn)
        try:
            await conn.run()
        finally:
            self._connections.discard(conn)

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self.serve_connection(reader, writer)
        except Exception:  # never let one connection's failure reach the listener
            log.exception("ttrpc: connection failed")

    def _check_open(self) -> None:
        if self._closing:
            raise RuntimeError("ttrpc server is shut down")

    # -- stopping -----------------------------------------------------------------------

    async def shutdown(self, grace: float = 5.0) -> None:
        """Stop listening and reading new requests; give in-flight calls ``grace`` seconds.

        Calls still running after the grace period are cancelled and connections closed.
        Must not be awaited from inside a handler (it would wait for itself): schedule it with
        ``asyncio.create_task`` so the handler can return its answer first.
        """
        current = asyncio.current_task()
        if any(current in conn.calls for conn in self._connections):
            raise RuntimeError("ttrpc: shutdown() awaited from a handler; schedule it instead")
        self._closing = True
        for listener in self._listeners:
            listener.close()
        conns = list(self._connections)
        for conn in conns:
            conn.stop_reading()
        waits = [asyncio.ensure_future(conn.finished.wait()) for conn in conns]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=grace)
            for w in pending:
                w.cancel()
        for conn in conns:
            await conn.abort()
        for listener in self._listeners:
            await listener.wait_closed()
        self._listeners.clear()
        for path, dev, ino in self._socket_files:
            try:
                st = os.stat(path)
                if (st.st_dev, st.st_ino) == (dev, ino):  # still ours, not a successor's
                    os.unlink(path)
            except OSError:
                pass
        self._socket_files.clear()

    async def close(self) -> None:
        """Shut down at once: in-flight calls are cancelled without an answer."""
        await self.shutdown(grace=0)

    @property
    def serving(self) -> bool:
        return not self._closing

    # -- dispatch -----------------------------------------------------------------------

    async def _dispatch(self, req: Any) -> tuple[status_pb2.Status, bytes]:
        """Run one unary call; returns (status, response payload). Raises only CancelledError.

        The observer, if any, hears of every answered call (a failing observer is logged, and
        the call's answer goes out regardless)."""
        if self.observer is None:
            return await self._call(req)
        t0 = time.monotonic()
        status, payload = await self._call(req)
        try:
            self.observer(req.service, req.method, status.code, time.monotonic() - t0)
        except Exception:  # noqa: BLE001 - metrics never fail a call
            log.exception("ttrpc: observer failed")
        return status, payload

    async def _call(self, req: Any) -> tuple[status_pb2.Status, bytes]:
        service = self._services.get(req.service)
        if service is None:
            return make_status(Code.UNIMPLEMENTED, f"service {req.service}"), b""
        entry = service.get(req.method)
        if entry is None:
            return make_status(Code.UNIMPLEMENTED, f"method {req.method}"), b""
        request_cls, handler = entry
        try:
            msg = request_cls.FromString(req.payload)
        except Exception as exc:  # DecodeError, or worse from a broken payload
            return make_status(
                Code.INVALID_ARGUMENT, f"ttrpc: error unmarshalling payload: {exc}"
            ), b""

        timeout: float | None = None
        deadline: float | None = None
        if req.timeout_nano:  # 0 means none; negative means already expired (as in Go)
            timeout = req.timeout_nano / 1e9
            deadline = time.monotonic() + timeout
        ctx = RequestContext(
            service=req.service,
            method=req.method,
            metadata=metadata_from_pairs(req.metadata),
            deadline=deadline,
        )
        full = f"/{req.service}/{req.method}"
        cm = asyncio.timeout(timeout)
        try:
            async with cm:
                resp = await handler(msg, ctx)
        except TimeoutError as exc:
            if cm.expired():
                return make_status(Code.DEADLINE_EXCEEDED, f"{full}: deadline exceeded"), b""
            log.exception("ttrpc: handler %s failed", full)
            return make_status(Code.UNKNOWN, _describe(exc)), b""
        except TtrpcError as exc:
            return exc.to_status(), b""
        except Exception as exc:
            log.exception("ttrpc: handler %s failed", full)
            return make_status(Code.UNKNOWN, _describe(exc)), b""
        if not isinstance(resp, pb_message.Message):
            log.error("ttrpc: handler %s returned %r, not a protobuf message", full, resp)
            return make_status(Code.UNKNOWN, "ttrpc: handler returned no message"), b""
        return make_status(Code.OK), resp.SerializeToString()


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return text if text else type(exc).__name__


class _Connection:
    """One accepted connection: the frame read loop plus its in-flight call tasks."""

    def __init__(
        self, server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._server = server
        self._reader = reader
        self._writer = writer
        self._write_lock = asyncio.Lock()
        self._last_stream_id = 0
        self._draining = False
        self._read_task: asyncio.Task[None] | None = None
        self.calls: set[asyncio.Task[None]] = set()
        self.finished = asyncio.Event()

    async def run(self) -> None:
        self._read_task = asyncio.create_task(self._read_loop())
        try:
            await asyncio.wait({self._read_task})
            if self._draining:
                # Shutdown: no new requests, but running calls may still answer.
                if self.calls:
                    await asyncio.wait(set(self.calls))
            else:
                # Peer gone or stream unusable: as Go, cancel what it was waiting for.
                await self._cancel_calls()
        finally:
            self._read_task.cancel()
            await self._cancel_calls()
            await self._close_writer()
            self.finished.set()

    def stop_reading(self) -> None:
        """Stop accepting requests on this connection (shutdown), keep running calls."""
        self._draining = True
        if self._read_task is not None:
            self._read_task.cancel()

    async def abort(self) -> None:
        """Cancel running calls and close the connection (end of the shutdown grace)."""
        self.stop_reading()
        await self._cancel_calls()
        await self._close_writer()

    async def _cancel_calls(self) -> None:
        calls = list(self.calls)
        for task in calls:
            task.cancel()
        if calls:
            await asyncio.wait(calls)

    async def _close_writer(self) -> None:
        if self._writer.is_closing():
            return
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except (ConnectionError, OSError):
            pass

    async def _read_loop(self) -> None:
        try:
            await self._read_frames()
        except Exception:  # a bug here must end this connection only, never the server
            log.exception("ttrpc: connection read loop failed")

    async def _read_frames(self) -> None:
        while True:
            try:
                frame = await read_frame(self._reader)
            except OversizedFrameError as exc:
                # channel.go discards the data and the server answers on that stream.
                await self._send_status(exc.stream_id, Code.RESOURCE_EXHAUSTED, str(exc))
                continue
            except TruncatedFrameError as exc:
                log.debug("ttrpc: connection ended inside a frame: %s", exc)
                return
            except (ConnectionError, OSError) as exc:
                log.debug("ttrpc: connection read failed: %s", exc)
                return
            if frame is None:
                return
            await self._on_frame(frame)

    async def _on_frame(self, frame: Frame) -> None:
        sid = frame.stream_id
        if sid % 2 != 1:
            await self._send_status(
                sid, Code.INVALID_ARGUMENT, "StreamID must be odd for client initiated streams"
            )
            return
        if frame.msg_type == MessageType.DATA:
            await self._send_status(
                sid, Code.INVALID_ARGUMENT, "ttrpc: data frames are not supported (unary only)"
            )
            return
        if frame.msg_type != MessageType.REQUEST:
            log.debug("ttrpc: ignoring frame of type %d on stream %d", frame.msg_type, sid)
            return
        if sid <= self._last_stream_id:
            await self._send_status(
                sid, Code.INVALID_ARGUMENT, "StreamID cannot be re-used and must increment"
            )
            return
        self._last_stream_id = sid
        if frame.flags & _STREAM_FLAGS:
            await self._send_status(
                sid, Code.UNIMPLEMENTED, "ttrpc: streaming requests are not supported"
            )
            return
        try:
            req = Request.FromString(frame.data)
        except Exception as exc:
            await self._send_status(sid, Code.INVALID_ARGUMENT, f"unmarshal request error: {exc}")
            return
        task = asyncio.create_task(self._call(sid, req))
        self.calls.add(task)
        task.add_done_callback(self.calls.discard)

    async def _call(self, stream_id: int, req: Any) -> None:
        status, payload = await self._server._dispatch(req)
        await self._send(stream_id, status, payload)

    async def _send_status(self, stream_id: int, code: Code, message: str) -> None:
        await self._send(stream_id, make_status(code, message), b"")

    async def _send(self, stream_id: int, status: status_pb2.Status, payload: bytes) -> None:
        resp = Response(payload=payload)
        resp.status.CopyFrom(status)
        data = resp.SerializeToString()
        if len(data) > MAX_DATA_LENGTH:
            log.error("ttrpc: response on stream %d is %d bytes, too large", stream_id, len(data))
            resp = Response()
            resp.status.CopyFrom(
                make_status(
                    Code.RESOURCE_EXHAUSTED,
                    f"message length {len(data)} exceed maximum message size of "
                    f"{MAX_DATA_LENGTH}",
                )
            )
            data = resp.SerializeToString()
        async with self._write_lock:
            if self._writer.is_closing():
                return
            try:
                await write_frame(self._writer, stream_id, MessageType.RESPONSE, 0, data)
            except (ConnectionError, OSError) as exc:
                log.debug("ttrpc: could not answer stream %d: %s", stream_id, exc)
