"""ttrpc client: unary calls multiplexed over one connection (asyncio).

Why: the shim publishes events to containerd (``containerd.services.events.ttrpc.v1.Events/
Forward`` on TTRPC_ADDRESS) and tests need a peer for the server.  Behaviour follows
containerd/ttrpc client.go: client-initiated stream ids are odd, starting at 1 and growing by 2;
one reader task matches Response frames to waiting calls by stream id, so answers may arrive in
any order; a call's timeout travels as ``timeout_nano`` and is also enforced locally.  When the
connection breaks, every pending and later call fails with UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, TypeVar

from google.protobuf import message as pb_message

from .context import MetadataInput, metadata_to_pairs
from .framing import (
    MAX_DATA_LENGTH,
    MAX_STREAM_ID,
    MessageType,
    OversizedFrameError,
    TruncatedFrameError,
    read_frame,
    write_frame,
)
from .messages import Request, Response
from .status import Code, TtrpcError

log = logging.getLogger(__name__)

M = TypeVar("M", bound=pb_message.Message)


def _strip_scheme(address: str) -> str:
    """Accept both a bare socket path and ``unix://path`` (as containerd addresses come)."""
    return address[len("unix://") :] if address.startswith("unix://") else address


class Client:
    """One ttrpc connection; safe for many concurrent :meth:`call` from one event loop."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._write_lock = asyncio.Lock()
        self._next_id = 1
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._closed_error: TtrpcError | None = None
        self._reader_task = asyncio.create_task(self._read_loop())

    @classmethod
    async def connect(cls, address: str, *, timeout: float | None = 5.0) -> Client:
        """Connect to a unix socket (path or ``unix://`` address).

        Connection failures are raised as TtrpcError(UNAVAILABLE), as for a lost connection.
        """
        path = _strip_scheme(address)
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_unix_connection(path)
        except (OSError, TimeoutError) as exc:
            raise TtrpcError(Code.UNAVAILABLE, f"ttrpc: cannot connect to {path}: {exc}") from exc
        return cls(reader, writer)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def closed(self) -> bool:
        return self._closed_error is not None

    async def call(
        self,
        service: str,
        method: str,
        request: pb_message.Message,
        response_cls: type[M],
        *,
        timeout: float | None = None,
        metadata: MetadataInput | None = None,
    ) -> M:
        """Make one unary call and return the decoded response.

        Raises TtrpcError: the peer's non-OK status; DEADLINE_EXCEEDED when ``timeout``
        seconds pass; UNAVAILABLE when the connection is or becomes unusable;
        RESOURCE_EXHAUSTED when the request exceeds the 4 MiB frame limit.
        """
        if self._closed_error is not None:
            raise TtrpcError(self._closed_error.code, self._closed_error.message)
        if timeout is not None and timeout <= 0:
            raise TtrpcError(Code.DEADLINE_EXCEEDED, "ttrpc: timeout already passed")
        req = Request(
            service=service,
            method=method,
            payload=request.SerializeToString(),
            timeout_nano=int(timeout * 1e9) if timeout is not None else 0,
        )
        req.metadata.extend(metadata_to_pairs(metadata))
        data = req.SerializeToString()
        if len(data) > MAX_DATA_LENGTH:
            raise TtrpcError(
                Code.RESOURCE_EXHAUSTED,
                f"message length {len(data)} exceed maximum message size of {MAX_DATA_LENGTH}",
            )

        stream_id = self._allocate_id()
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[stream_id] = fut
        try:
            async with asyncio.timeout(timeout):
                await self._send(stream_id, data)
                resp = await fut
        except TimeoutError:
            raise TtrpcError(
                Code.DEADLINE_EXCEEDED, f"ttrpc: /{service}/{method}: deadline exceeded"
            ) from None
        finally:
            self._pending.pop(stream_id, None)

        if resp.HasField("status") and resp.status.code != Code.OK:
            raise TtrpcError.from_status(resp.status)
        try:
            decoded: M = response_cls.FromString(resp.payload)
        except Exception as exc:
            raise TtrpcError(
                Code.INTERNAL, f"ttrpc: cannot decode /{service}/{method} response: {exc}"
            ) from exc
        return decoded

    async def close(self) -> None:
        """Close the connection; pending calls fail with UNAVAILABLE."""
        self._fail_all(TtrpcError(Code.UNAVAILABLE, "ttrpc: client closed"))
        self._reader_task.cancel()
        try:
            await self._reader_task
        except asyncio.CancelledError:
            pass
        if not self._writer.is_closing():
            self._writer.close()
        try:
            await self._writer.wait_closed()
        except (ConnectionError, OSError):
            pass

    def _allocate_id(self) -> int:
        stream_id = self._next_id
        if stream_id > MAX_STREAM_ID:
            # Go's client wraps around; a connection that made 2**31 calls is simply retired.
            raise TtrpcError(Code.UNAVAILABLE, "ttrpc: stream ids exhausted on this connection")
        self._next_id += 2
        return stream_id

    async def _send(self, stream_id: int, data: bytes) -> None:
        async with self._write_lock:
            if self._closed_error is not None:
                raise TtrpcError(self._closed_error.code, self._closed_error.message)
            try:
                await write_frame(self._writer, stream_id, MessageType.REQUEST, 0, data)
            except (ConnectionError, OSError) as exc:
                err = TtrpcError(Code.UNAVAILABLE, f"ttrpc: connection lost: {exc}")
                self._fail_all(err)
                raise TtrpcError(err.code, err.message) from exc

    async def _read_loop(self) -> None:
        reason = "connection closed by peer"
        try:
            while True:
                try:
                    frame = await read_frame(self._reader)
                except OversizedFrameError as exc:
                    self._resolve_error(
                        exc.stream_id, TtrpcError(Code.RESOURCE_EXHAUSTED, str(exc))
                    )
                    continue
                if frame is None:
                    break
                if frame.msg_type != MessageType.RESPONSE:
                    log.debug("ttrpc: ignoring frame type %d on stream %d", frame.msg_type,
                              frame.stream_id)
                    continue
                fut = self._pending.get(frame.stream_id)
                if fut is None or fut.done():
                    log.debug("ttrpc: response for unknown stream %d dropped", frame.stream_id)
                    continue
                try:
                    fut.set_result(Response.FromString(frame.data))
                except Exception as exc:
                    fut.set_exception(
                        TtrpcError(Code.INTERNAL, f"ttrpc: undecodable response: {exc}")
                    )
        except TruncatedFrameError as exc:
            reason = f"connection closed by peer inside a frame ({exc})"
        except (ConnectionError, OSError) as exc:
            reason = f"connection lost: {exc}"
        except asyncio.CancelledError:
            reason = "client closed"
            raise
        except Exception as exc:  # keep the promise: pending calls always get an answer
            log.exception("ttrpc: client read loop failed")
            reason = f"client read loop failed: {exc}"
        finally:
            self._fail_all(TtrpcError(Code.UNAVAILABLE, f"ttrpc: {reason}"))

    def _resolve_error(self, stream_id: int, err: TtrpcError) -> None:
        fut = self._pending.get(stream_id)
        if fut is not None and not fut.done():
            fut.set_exception(err)

    def _fail_all(self, err: TtrpcError) -> None:
        if self._closed_error is None:
            self._closed_error = err
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(TtrpcError(err.code, err.message))
