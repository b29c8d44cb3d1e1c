"""Task state machine: containers and their processes as the shim reports them to containerd.

Pure bookkeeping (plus asyncio.Events to wake waiters): the TaskService decides what to ask
the sandbox, this module decides what is allowed and what a process looks like afterwards, by
the table the agent checks too (:mod:`ccpu.linux.taskstate`).  Refusals are :mod:`ccpu.errdefs`
errors (NotFound, AlreadyExists, FailedPrecondition), turned into ttrpc codes at the service
edge (shim/errors.py).

    CREATED --start--> RUNNING --pause--> PAUSED --resume--> RUNNING
       |                  |                  |
       +------exit--------+-------exit-------+----> STOPPED --delete--> (gone)
    CREATED --delete--> (gone)

Status values are containerd.types.task Status numbers.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ccpu import errdefs
from ccpu.linux.taskstate import Op, Status, after, allowed

if TYPE_CHECKING:
    from shim.sandbox import Relay


@dataclass
class Process:
    container: str
    exec_id: str  # "" for the init process
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False
    pid: int = 0
    status: Status = Status.CREATED
    exit_status: int = 0
    exited_at: int = 0  # ns since the epoch, 0 while not stopped
    io: Relay | None = None  # connected by the sandbox (shim.stdio.ProcessIO for an agent)
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    starting: bool = False  # a Start call is in flight
    started: asyncio.Event = field(default_factory=asyncio.Event)  # Start finished (ok or not)
    exit_pending: bool = False  # an exit is being reported (one per process, whatever the agent sends)

    @property
    def is_init(self) -> bool:
        return self.exec_id == ""

    @property
    def name(self) -> str:
        return self.container if self.is_init else f"{self.container}/{self.exec_id}"

    def check_start(self) -> None:
        if not allowed(Op.START, self.status) or self.starting:
            raise errdefs.FailedPrecondition(f"process {self.name} is {self.status.name.lower()}, "
                                      "cannot start")

    def mark_running(self, pid: int) -> None:
        if pid:
            self.pid = pid
        self.status = after(Op.START, self.status)

    def mark_exited(self, exit_status: int, exited_at: int) -> None:
        self.status = Status.STOPPED
        self.exit_status = exit_status
        self.exited_at = exited_at
        self.exited.set()

    def check_delete(self) -> None:
        if not allowed(Op.DELETE, self.status):
            raise errdefs.FailedPrecondition(f"process {self.name} is {self.status.name.lower()}, "
                                      "cannot delete")


@dataclass
class Container:
    id: str
    bundle: str
    init: Process
    rootfs: list[Any] = field(default_factory=list)
    execs: dict[str, Process] = field(default_factory=dict)

    @property
    def status(self) -> Status:
        return self.init.status

    def process(self, exec_id: str) -> Process:
        if not exec_id:
            return self.init
        try:
            return self.execs[exec_id]
        except KeyError:
            raise errdefs.NotFound(f"exec {exec_id} of {self.id}: not found") from None

    def add_exec(self, proc: Process) -> None:
        if proc.exec_id in self.execs:
            raise errdefs.AlreadyExists(f"exec {proc.exec_id}: already exists")
        if not allowed(Op.EXEC, self.init.status):
            raise errdefs.FailedPrecondition(f"container {self.id} is "
                                      f"{self.init.status.name.lower()}, cannot exec")
        self.execs[proc.exec_id] = proc

    def check_pause(self) -> None:
        if not allowed(Op.PAUSE, self.init.status):
            raise errdefs.FailedPrecondition(f"container {self.id} is {self.init.status.name.lower()}, "
                                      "cannot pause")

    def check_resume(self) -> None:
        if not allowed(Op.RESUME, self.init.status):
            raise errdefs.FailedPrecondition(f"container {self.id} is not paused")

    def set_paused(self, paused: bool) -> None:
        self.init.status = after(Op.PAUSE if paused else Op.RESUME, self.init.status)


class Tasks:
    """All containers of one shim (its group)."""

    def __init__(self) -> None:
        self.containers: dict[str, Container] = {}

    def __len__(self) -> int:
        return len(self.containers)

    def get(self, cid: str) -> Container:
        try:
            return self.containers[cid]
        except KeyError:
            raise errdefs.NotFound(f"container {cid}: not found") from None

    def add(self, container: Container) -> None:
        if container.id in self.containers:
            raise errdefs.AlreadyExists(f"container {container.id}: already exists")
        self.containers[container.id] = container

    def remove(self, cid: str) -> None:
        self.containers.pop(cid, None)

    def process(self, cid: str, exec_id: str = "") -> Process:
        return self.get(cid).process(exec_id)

    def live_processes(self) -> list[Process]:
        out = []
        for c in self.containers.values():
            for p in (c.init, *c.execs.values()):
                if p.status != Status.STOPPED:
                    out.append(p)
        return out
