"""A VM booted by another process and handed over: watched and stopped through pidfds.

A pooled VM (shim/poold.py) is started by the pool, so its QEMU and virtiofsd are the pool's
children: the adopting shim can neither ``waitpid`` them nor rely on PR_SET_PDEATHSIG.  What it
gets instead is a pidfd of each (pidfd_open in the pool, passed with SCM_RIGHTS): readable when
the process has exited, and a signal sent through it can never reach a process that reused the
pid.  The exit *status* belongs to the parent (the pool, or init once the pool is gone), so it is
not known here: :attr:`exit_status` is :data:`UNKNOWN_STATUS` once QEMU is gone.

The interface is the part of :class:`ccpu.vm.machine.AsyncMachine` the VM sandbox uses (``pid``,
``exited``, ``exit_status``, ``stop``, ``pids``, ``accel``, ``qemu_user``, ``net``, ``ports``,
``attach_nic``, ``detach_nic``), so
shim/vm.py treats a booted and an adopted VM alike.  The same rule holds: a helper (virtiofsd)
that dies while the VM runs ends the VM, since the guest's files would hang for ever.

NICs: the pool hands over its QMP channel (a dup of its end of the socketpair) and the hot-plug
slots the VM still has free; :class:`ccpu.vm.nics.Nics` adds and removes NICs on it exactly as for
a VM booted here (a CRI pod's network, a nerdctl CNI network).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass

from . import nics as nics_
from . import qmp as qmp_
from .machine import KILL_WAIT, TERM_WAIT, GuestWatch, MachineError

log = logging.getLogger(__name__)

#: the exit status reported for an adopted QEMU (the status is its parent's to collect)
UNKNOWN_STATUS = -1


@dataclass(frozen=True)
class AdoptedAccel:
    """What the pool chose (ccpu.vm.accel.Choice's two fields)."""

    accel: str
    reason: str


@dataclass
class AdoptedProcess:
    name: str
    pid: int
    pidfd: int


class AdoptedMachine(GuestWatch):
    """QEMU and its helpers, owned by pidfd (see the module docstring).  Takes ownership of the
    pidfds (closed by :meth:`close`, which :meth:`stop` calls)."""

    def __init__(self, qemu: AdoptedProcess, helpers: list[AdoptedProcess], accel: AdoptedAccel,
                 qemu_user: str = "", on_end: Callable[[str], None] | None = None,
                 qmp: qmp_.Qmp | None = None, hotplug_slots: tuple[int, ...] = ()) -> None:
        self.qemu = qemu
        self.helpers = helpers
        self.accel = accel
        self.qemu_user = qemu_user
        self.on_end = on_end
        self.net = None  # a pooled VM boots without NICs (they are added live: issue 12 item 3)
        self.ports: dict[str, socket.socket] = {}
        self.exit_status: int | None = None
        self.ended: str | None = None
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._stopping = False
        self._stopper: asyncio.Task[None] | None = None
        self._helper_gone: dict[int, asyncio.Future[None]] = {}
        #: with the pool's QMP channel: the NICs added after adoption (ccpu.vm.nics)
        self.nics = nics_.Nics(qmp, hotplug_slots, self._alive) if qmp is not None else None
        loop = asyncio.get_running_loop()
        loop.add_reader(qemu.pidfd, self._qemu_gone)
        for h in helpers:
            self._helper_gone[h.pid] = loop.create_future()
            loop.add_reader(h.pidfd, self._helper_exit, h)

    @property
    def pid(self) -> int:
        return self.qemu.pid

    def pids(self) -> list[tuple[str, int]]:
        return [("qemu", self.qemu.pid)] + [(h.name, h.pid) for h in self.helpers]

    def _alive(self) -> bool:
        return not self.exited.done()

    async def attach_nic(self, netns: str) -> list:
        """Connect ``netns`` to the adopted VM (ccpu.vm.nics.Nics.attach, in a worker thread)."""
        if self.nics is None:
            raise MachineError("NICs can be added only to a pooled VM handed over with its QMP channel")
        return await asyncio.get_running_loop().run_in_executor(None, self._nic_call, self.nics.attach, netns)

    async def detach_nic(self, netns: str) -> None:
        if self.nics is None:
            raise MachineError(f"network namespace {netns} is not connected to this VM after boot")
        await asyncio.get_running_loop().run_in_executor(None, self._nic_call, self.nics.detach, netns)

    @staticmethod
    def _nic_call(fn: Callable[[str], object], netns: str) -> object:
        try:
            return fn(netns)
        except nics_.NicError as exc:
            raise MachineError(str(exc)) from None

    def _qemu_gone(self) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.qemu.pidfd)
        self.exit_status = UNKNOWN_STATUS
        if not self.exited.done():
            self.exited.set_result(UNKNOWN_STATUS)
        if self._stopping:
            log.info("adopted QEMU pid %s exited", self.qemu.pid)
        elif self.ended is None:
            self._end("QEMU exited")

    def _helper_exit(self, h: AdoptedProcess) -> None:
        asyncio.get_running_loop().remove_reader(h.pidfd)
        fut = self._helper_gone[h.pid]
        if not fut.done():
            fut.set_result(None)
        if self._stopping or self.ended is not None:
            return
        log.error("%s pid %s exited while its VM runs: the guest's files are gone; stopping the VM", h.name, h.pid)
        self._end(f"{h.name} exited")
        asyncio.get_running_loop().create_task(self.stop())

    def _end(self, reason: str) -> None:
        self.ended = reason
        if self.on_end is not None:
            self.on_end(reason)

    async def stop(self, grace: float = 0.0) -> None:
        """``grace`` s for QEMU to exit by itself, then SIGTERM, then SIGKILL (through its pidfd);
        then the helpers (SIGKILL).  Concurrent calls share one stop."""
        self._stopping = True
        if self._stopper is None or self._stopper.done():
            self._stopper = asyncio.get_running_loop().create_task(self._stop(grace))
        await asyncio.shield(self._stopper)

    async def _stop(self, grace: float) -> None:
        if not await _within(self.exited, grace):
            for sig, wait in ((signal.SIGTERM, TERM_WAIT), (signal.SIGKILL, KILL_WAIT)):
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(self.qemu.pidfd, sig)
                if await _within(self.exited, wait):
                    break
        for h in self.helpers:
            fut = self._helper_gone[h.pid]
            if not fut.done():
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(h.pidfd, signal.SIGKILL)
                if not await _within(fut, KILL_WAIT):
                    log.warning("%s pid %s did not exit after SIGKILL", h.name, h.pid)
        if self.exited.done():
            self.close()

    def close(self) -> None:
        """Once QEMU is gone: the pidfds, and the taps of the NICs added after adoption."""
        if self.nics is not None:
            self.nics.close()
        loop = asyncio.get_running_loop()
        for p in [self.qemu, *self.helpers]:
            if p.pidfd >= 0:
                loop.remove_reader(p.pidfd)
                os.close(p.pidfd)
                p.pidfd = -1


async def _within(fut: asyncio.Future, timeout: float) -> bool:
    if fut.done():
        return True
    try:
        await asyncio.wait_for(asyncio.shield(fut), timeout)
        return True
    except (TimeoutError, asyncio.TimeoutError):
        return False
