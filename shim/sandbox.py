"""Sandboxes: where a shim's containers run, and how the shim reaches their agent.

One shim daemon = one group of containers = one sandbox = one agent.  The Task service only
uses this small interface, so a VM sandbox (QEMU + agent over virtio-serial) slots in later:

* ``await start()``      bring the agent up (idempotent; the first Create waits for it)
* ``await agent()``      the connected :class:`shim.agentlink.AgentLink` (after start)
* ``await stop()``       ask the agent to shut down, then make sure it is gone
* ``describe()``         a dict for logs and the sandbox record (mode, pids, ...)
* ``on_lost``            callback(reason) when the agent goes away unexpectedly

:class:`HostSandbox` runs the agent as a child process on the host, over a socketpair.  The
agent dies with the shim (PR_SET_PDEATHSIG=SIGKILL), so a SIGKILLed shim leaves no agent; its
containers are then cleaned up by the ``delete`` verb.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from shim.agentlink import AgentLink

log = logging.getLogger("shim.sandbox")

PR_SET_PDEATHSIG = 1
_CODE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _die_with_parent() -> None:  # preexec_fn: runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


class Sandbox:
    """Interface (see the module docstring)."""

    mode = "?"
    on_lost: Callable[[str], None] | None = None

    async def start(self) -> None:
        raise NotImplementedError

    async def agent(self) -> AgentLink:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError


class HostSandbox(Sandbox):
    """The agent as a child process of the shim, on the host."""

    mode = "host"

    def __init__(self, *, reaper: Any, runc_root: str, bundle_root: str, layer_roots: list[str],
                 python: str = sys.executable, extra_args: list[str] | None = None,
                 on_event: Callable[[dict[str, Any]], None] | None = None,
                 ready_timeout: float = 30.0) -> None:
        self.reaper = reaper
        self.runc_root = runc_root
        self.bundle_root = bundle_root
        self.layer_roots = list(layer_roots)
        self.python = python
        self.extra_args = list(extra_args or [])
        self.on_event = on_event
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None
        self.exit_status: int | None = None
        self._link: AgentLink | None = None
        self._ready: asyncio.Task[AgentLink] | None = None
        self._stopping = False

    def command(self, fd: int) -> list[str]:
        runc = shutil.which("runc") or "runc"  # an absolute path: the agent does not search PATH
        return [self.python, "-m", "ccpu.agent", "--fd", str(fd), "--runc", runc,
                "--runc-root", self.runc_root, "--bundle-root", self.bundle_root,
                *[a for r in self.layer_roots for a in ("--layer-root", r)], *self.extra_args]

    async def start(self) -> None:
        if self._ready is None:
            self._ready = asyncio.get_running_loop().create_task(self._start())
        await asyncio.shield(self._ready)

    async def _start(self) -> AgentLink:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (_CODE_ROOT, env.get("PYTHONPATH", "")) if p)
            os.makedirs(self.runc_root, mode=0o711, exist_ok=True)
            fd = theirs.fileno()
            # Spawned from the event loop's thread: PDEATHSIG follows the spawning thread.
            self.proc = subprocess.Popen(
                self.command(fd), pass_fds=(fd,), stdin=subprocess.DEVNULL,
                stdout=2, stderr=2, cwd="/", env=env, preexec_fn=_die_with_parent)
            self.pid = self.proc.pid
            exited = self.reaper.wait(self.pid)
            exited.add_done_callback(self._agent_exited)
        finally:
            theirs.close()
        ours.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=ours)
        link = AgentLink(reader, writer)
        if self.on_event is not None:
            link.set_event_handler(self.on_event)
        link.add_lost_handler(self._link_lost)
        self._link = link
        hello = await link.handshake(timeout=self.ready_timeout)
        log.info("agent up: pid %s, %s", self.pid, hello)
        return link

    def _agent_exited(self, fut: asyncio.Future[int]) -> None:
        if fut.cancelled():
            return
        self.exit_status = fut.result()
        if self.proc is not None:
            self.proc.returncode = self.exit_status  # reaped by our reaper, not by Popen
        log.log(logging.INFO if self._stopping else logging.ERROR,
                "agent pid %s exited with %s", self.pid, self.exit_status)

    def _link_lost(self, reason: str) -> None:
        if not self._stopping and self.on_lost is not None:
            self.on_lost(reason)

    async def agent(self) -> AgentLink:
        await self.start()
        assert self._link is not None
        return self._link

    async def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        if self._link is not None and self._link.lost is None:
            try:
                await self._link.call("shutdown", {}, timeout=timeout)
            except Exception as exc:  # noqa: BLE001
                log.warning("agent shutdown: %s", exc)
        if self.pid is not None and self.exit_status is None:
            fut = self.reaper.wait(self.pid)
            try:
                await asyncio.wait_for(asyncio.shield(fut), timeout)
            except TimeoutError:
                log.warning("agent pid %s did not exit; killing it", self.pid)
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                try:
                    await asyncio.wait_for(asyncio.shield(fut), timeout)
                except TimeoutError:
                    pass
        if self._link is not None:
            await self._link.close()

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, "agent_pid": self.pid, "runc_root": self.runc_root,
                "bundle_root": self.bundle_root, "layer_roots": self.layer_roots}
