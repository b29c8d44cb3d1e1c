"""Task events to containerd: encoding, and an ordered, never-blocking publisher.

Events travel as ``containerd.services.events.ttrpc.v1.Events/Forward`` calls on containerd's
ttrpc socket (TTRPC_ADDRESS).  The envelope's ``event`` Any carries the bare message name as
``type_url`` (``containerd.events.TaskExit``), as containerd's typeurl registers them.

RPC handlers only enqueue; one sender task delivers in order (create, start, exit, delete),
with a 5 s timeout per call and retries with backoff, reconnecting when containerd restarted.
An event that still fails after the retries is dropped with a log line (containerd's own shims
do the same) so one bad event never holds up the next.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from google.protobuf import any_pb2, timestamp_pb2
from google.protobuf import message as pb_message

from ccpu.api.gen.containerd.events import task_pb2 as ev
from ccpu.api.gen.containerd.services.ttrpc.events.v1 import events_pb2
from ccpu.ttrpc import Client, TtrpcError
from google.protobuf import empty_pb2

log = logging.getLogger("shim.events")

SERVICE = "containerd.services.events.ttrpc.v1.Events"

#: message type -> topic
TOPICS: dict[type[pb_message.Message], str] = {
    ev.TaskCreate: "/tasks/create",
    ev.TaskStart: "/tasks/start",
    ev.TaskExit: "/tasks/exit",
    ev.TaskDelete: "/tasks/delete",
    ev.TaskOOM: "/tasks/oom",
    ev.TaskExecAdded: "/tasks/exec-added",
    ev.TaskExecStarted: "/tasks/exec-started",
    ev.TaskPaused: "/tasks/paused",
    ev.TaskResumed: "/tasks/resumed",
}


def topic_of(event: pb_message.Message) -> str:
    try:
        return TOPICS[type(event)]
    except KeyError:
        raise ValueError(f"no topic for {type(event).__name__}") from None


def pack_any(msg: pb_message.Message) -> any_pb2.Any:
    """Any with the bare full name as type_url (what containerd 1.6 typeurl expects)."""
    return any_pb2.Any(type_url=msg.DESCRIPTOR.full_name, value=msg.SerializeToString())


def timestamp(ns: int | None = None) -> timestamp_pb2.Timestamp:
    """Timestamp from nanoseconds since the epoch (default: now)."""
    ns = time.time_ns() if ns is None else ns
    return timestamp_pb2.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


def forward_request(namespace: str, event: pb_message.Message,
                    ts: timestamp_pb2.Timestamp | None = None) -> events_pb2.ForwardRequest:
    req = events_pb2.ForwardRequest()
    env = req.envelope
    env.timestamp.CopyFrom(ts or timestamp())
    env.namespace = namespace
    env.topic = topic_of(event)
    env.event.CopyFrom(pack_any(event))
    return req


class Publisher:
    """Queue of events for one containerd; one background sender keeps them in order."""

    def __init__(self, address: str, *, timeout: float = 5.0, attempts: int = 5,
                 backoff: float = 0.1,
                 connect: Callable[[str], object] | None = None) -> None:
        self.address = address
        self.timeout = timeout
        self.attempts = attempts
        self.backoff = backoff
        self._connect = connect or (lambda a: Client.connect(a, timeout=timeout))
        self._queue: asyncio.Queue[events_pb2.ForwardRequest | None] = asyncio.Queue()
        self._client: Client | None = None
        self._task: asyncio.Task[None] | None = None
        self.sent = 0
        self.dropped = 0

    def publish(self, namespace: str, event: pb_message.Message) -> None:
        """Enqueue (never blocks, never raises for delivery problems)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        self._queue.put_nowait(forward_request(namespace, event))

    async def flush(self, timeout: float = 10.0) -> None:
        """Wait until everything queued so far was sent (or dropped)."""
        if self._task is None:
            return
        try:
            async with asyncio.timeout(timeout):
                await self._queue.join()
        except TimeoutError:
            log.warning("events: %d events not delivered at flush", self._queue.qsize())

    async def close(self) -> None:
        await self.flush()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def _run(self) -> None:
        while True:
            req = await self._queue.get()
            try:
                if req is not None:
                    await self._send(req)
            finally:
                self._queue.task_done()

    async def _send(self, req: events_pb2.ForwardRequest) -> None:
        delay = self.backoff
        for attempt in range(1, self.attempts + 1):
            try:
                if self._client is None or self._client.closed:
                    self._client = await self._connect(self.address)  # type: ignore[assignment]
                await self._client.call(SERVICE, "Forward", req, empty_pb2.Empty,  # type: ignore[union-attr]
                                        timeout=self.timeout)
                self.sent += 1
                return
            except TtrpcError as exc:
                log.warning("events: forwarding %s failed (attempt %d/%d): %s",
                            req.envelope.topic, attempt, self.attempts, exc)
                if self._client is not None:
                    await self._client.close()
                    self._client = None
            except Exception:  # noqa: BLE001 - the sender must survive anything
                log.exception("events: forwarding %s failed", req.envelope.topic)
            if attempt < self.attempts:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        self.dropped += 1
        log.error("events: dropped %s after %d attempts", req.envelope.topic, self.attempts)
