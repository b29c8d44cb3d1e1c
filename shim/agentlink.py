"""The shim's connection to a fractal agent: requests, events and stdio channels.

This is the interface the Task service needs from an agent (``call``, events, channels), over
any asyncio stream (socketpair in host mode, virtio-serial in a VM).  Framing is
``ccpu.agent.wire``, shared with the agent.  The first request is ``hello``.

Errors answered by the agent are raised as :class:`AgentCallError` whose ``code`` is the
protocol's code name; a lost connection fails every pending and later call with
``Unavailable``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from ccpu.agent import wire
from shim.errors import AgentCallError

log = logging.getLogger("shim.agent")

PROTOCOL_VERSION = 1


class AgentLink:
    """One connection to an agent; many concurrent calls from one event loop."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._next_id = 1
        self._next_channel = 1
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._channels: dict[int, tuple[Callable[[bytes], None], Callable[[], None]]] = {}
        self._used_channels: set[int] = set()
        self._write_lock = asyncio.Lock()
        self._event_handler: Callable[[dict[str, Any]], None] = lambda e: None
        self._lost_handlers: list[Callable[[str], None]] = []
        self.lost: str | None = None
        self.hello: dict[str, Any] = {}
        self._task = asyncio.get_running_loop().create_task(self._read_loop())

    # -- handlers ---------------------------------------------------------------------------

    def set_event_handler(self, handler: Callable[[dict[str, Any]], None]) -> None:
        self._event_handler = handler

    def add_lost_handler(self, handler: Callable[[str], None]) -> None:
        self._lost_handlers.append(handler)

    # -- requests ---------------------------------------------------------------------------

    async def handshake(self, timeout: float = 30.0) -> dict[str, Any]:
        self.hello = await self.call("hello", {"version": PROTOCOL_VERSION}, timeout=timeout)
        return self.hello

    async def call(self, op: str, args: dict[str, Any] | None = None,
                   timeout: float | None = None) -> dict[str, Any]:
        if self.lost is not None:
            raise AgentCallError("Unavailable", f"agent connection lost: {self.lost}")
        rid = self._next_id
        self._next_id += 1
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            await self._write(wire.encode_control({"id": rid, "op": op, "args": args or {}}))
            async with asyncio.timeout(timeout):
                msg = await fut
        except TimeoutError:
            raise AgentCallError("DeadlineExceeded", f"agent {op}: no answer in {timeout}s") from None
        finally:
            self._pending.pop(rid, None)
        if msg.get("ok"):
            result = msg.get("result")
            return result if isinstance(result, dict) else {}
        err = msg.get("error") or {}
        raise AgentCallError(str(err.get("code", "Internal")), str(err.get("message", "")))

    # -- channels ---------------------------------------------------------------------------

    def new_channel(self) -> int:
        """A free odd channel number (the shim's side of the numbering)."""
        ch = self._next_channel
        while ch in self._used_channels:
            ch += 2
            if ch > wire.MAX_CHANNEL:
                ch = 1
        self._used_channels.add(ch)
        self._next_channel = ch + 2 if ch + 2 <= wire.MAX_CHANNEL else 1
        return ch

    def open_channel(self, ch: int, on_data: Callable[[bytes], None],
                     on_close: Callable[[], None]) -> None:
        self._used_channels.add(ch)
        self._channels[ch] = (on_data, on_close)

    def release_channel(self, ch: int) -> None:
        self._channels.pop(ch, None)
        self._used_channels.discard(ch)

    async def send(self, ch: int, data: bytes) -> None:
        await self._write(wire.encode_data(ch, data))

    async def close_channel(self, ch: int) -> None:
        await self._write(wire.encode_close(ch))

    # -- connection -------------------------------------------------------------------------

    async def _write(self, data: bytes) -> None:
        if not data:
            return
        async with self._write_lock:
            if self.lost is not None:
                raise AgentCallError("Unavailable", f"agent connection lost: {self.lost}")
            try:
                self._writer.write(data)
                await self._writer.drain()
            except (ConnectionError, OSError) as exc:
                self._fail(f"write failed: {exc}")
                raise AgentCallError("Unavailable", f"agent connection lost: {exc}") from exc

    async def _read_loop(self) -> None:
        reason = "agent closed the connection"
        try:
            while True:
                frame = await wire.read_frame(self._reader)
                if frame is None:
                    break
                if frame.kind is wire.Kind.CONTROL:
                    self._control(wire.decode_control(frame))
                elif frame.kind is wire.Kind.DATA:
                    h = self._channels.get(frame.channel)
                    if h is not None:
                        h[0](frame.payload)
                else:
                    h = self._channels.get(frame.channel)
                    if h is not None:
                        h[1]()
        except asyncio.CancelledError:
            reason = "closed"
            raise
        except Exception as exc:  # noqa: BLE001 - protocol error, socket error
            reason = f"{type(exc).__name__}: {exc}"
            log.error("agent connection failed: %s", reason)
        finally:
            self._fail(reason)

    def _control(self, msg: dict[str, Any]) -> None:
        if "event" in msg:
            try:
                self._event_handler(msg)
            except Exception:  # noqa: BLE001
                log.exception("agent event handler failed for %s", msg)
            return
        fut = self._pending.get(msg.get("id"))  # type: ignore[arg-type]
        if fut is not None and not fut.done():
            fut.set_result(msg)

    def _fail(self, reason: str) -> None:
        if self.lost is not None:
            return
        self.lost = reason
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(AgentCallError("Unavailable", f"agent connection lost: {reason}"))
        for _, on_close in list(self._channels.values()):
            try:
                on_close()
            except Exception:  # noqa: BLE001
                pass
        for h in self._lost_handlers:
            try:
                h(reason)
            except Exception:  # noqa: BLE001
                log.exception("agent lost handler failed")

    async def close(self) -> None:
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        if not self._writer.is_closing():
            self._writer.close()
        try:
            await self._writer.wait_closed()
        except (ConnectionError, OSError):
            pass
