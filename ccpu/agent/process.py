"""One process of a container (its init, or an exec): state, exit and the exit's reporting.

Why the ordering lives here: the shim closes containerd's stdio FIFOs when it sees `close`
frames and completes Wait when it sees `exit`, so for every process the agent sends, in order:
all output, `close` for each output channel, then the `exit` event.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
import logging
import time
from typing import Any, Protocol

from ..linux.taskstate import Op, Status, allowed
from . import protocol
from .stdio import Stdio

log = logging.getLogger(__name__)

# how long an exited process's output may take to reach EOF (see Stdio.drain)
DRAIN_TIMEOUT = 5.0


class Events(Protocol):
    """Where exit events and channel closes go: the connection or its queue (server.py)."""

    async def data(self, channel: int, data: bytes) -> None: ...

    def close(self, channel: int) -> None: ...

    def event(self, message: dict[str, Any]) -> None: ...


class Process:
    def __init__(
        self,
        container: str,
        exec_id: str,
        stdio: Stdio,
        spec: dict[str, Any] | None = None,
        terminal: bool | None = None,
    ) -> None:
        self.container = container
        self.exec_id = exec_id
        self.stdio = stdio
        self.spec = spec  # the OCI process object of an exec (None for init)
        self.terminal = stdio.terminal if terminal is None else terminal
        self.status = Status.CREATED
        self.pid = 0
        self.exit_status = 0
        self.exited_at = 0
        self.reported = asyncio.Event()  # output, closes and exit event all sent
        self.report_exit = True  # cleared on delete: a deleted process's exit is not reported
        # cleared while a `start` of this process is being answered: its exit event must not
        # overtake the start's response (the shim learns the pid from that response)
        self.start_answered = asyncio.Event()
        self.start_answered.set()
        self._watch: asyncio.Task[None] | None = None
        self.exited: asyncio.Future[int] | None = None  # the exit status, once watched
        # e.g. the init's OOM check: runs when the exit is known, before it is reported
        self.before_exit_report: Callable[[], None] | None = None

    def running(self) -> bool:
        """Started and not exited: neither deletable nor startable."""
        return not allowed(Op.DELETE, self.status)

    def watch(self, pid: int, exited: asyncio.Future[int], events: Events, drain_timeout: float = DRAIN_TIMEOUT) -> None:
        """Follow `pid` (now started) until it exits and report that exit."""
        self.pid = pid
        self.exited = exited
        self._watch = asyncio.ensure_future(self._follow(exited, events, drain_timeout))

    async def _follow(self, exited: asyncio.Future[int], events: Events, drain_timeout: float) -> None:
        try:
            code = await exited
        except asyncio.CancelledError:
            return
        self.set_exited(code)
        if self.before_exit_report is not None:
            self.before_exit_report()
        await self.stdio.drain(drain_timeout)
        await self.start_answered.wait()
        for ch in self.stdio.output_channels():
            events.close(ch)
        if self.report_exit:
            events.event(protocol.event("exit", **self.exit_fields()))
        self.reported.set()

    def set_exited(self, code: int) -> None:
        if self.status != Status.STOPPED:
            self.status = Status.STOPPED
            self.exit_status = code
            self.exited_at = time.time_ns()
            log.debug("%s/%s pid %d exited with %d", self.container, self.exec_id or "init", self.pid, code)

    def exit_fields(self) -> dict[str, Any]:
        return {
            "container": self.container,
            "exec": self.exec_id,
            "pid": self.pid,
            "exit_status": self.exit_status,
            "exited_at": self.exited_at,
        }

    def state(self) -> dict[str, Any]:
        return {
            "status": str(self.status),  # the protocol's word: "created", "running", ...
            "pid": self.pid,
            "exit_status": self.exit_status,
            "exited_at": self.exited_at,
        }

    def close(self) -> None:
        """Forget the process (it was deleted): no more relaying, no exit event."""
        self.report_exit = False
        self.stdio.close()
