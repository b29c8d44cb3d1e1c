"""Host mode: the agent runs on the host, next to the shim (``io.fractal.mode=host``).

Two ways to run it (``FRACTAL_AGENT``, see :func:`shim.sandboxkind.host_sandbox`):

* :class:`InprocSandbox` (default, ``inproc``): the agent's code runs in the shim daemon's own
  process and event loop, over a ``socket.socketpair()``, with the daemon's one reaper.  No
  second interpreter: faster sandbox start, half the memory.  A SIGKILLed shim takes the
  agent with it, exactly as in process mode; containers are cleaned up by ``delete``.
* :class:`HostSandbox` (``process``): the agent as a child process (``python3 -m ccpu.agent
  --fd N``) over a socketpair -- the same process boundary as in a VM, useful to debug the
  protocol, or to keep the shim's and the agent's faults apart.  The agent dies with the shim
  (PR_SET_PDEATHSIG=SIGKILL); a crashed agent is reported as exited tasks.

Both are :class:`shim.agentsandbox.AgentSandbox`: containers run by runc on the host, their
bundles as containerd wrote them, repo layers at their own paths.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from ccpu.agent.client import AgentClient
from shim.agentsandbox import AgentSandbox
from shim.config import Timeouts

log = logging.getLogger("shim.sandbox")

PR_SET_PDEATHSIG = 1
_CODE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_umount(path: str) -> int:
    """umount2(path, MNT_DETACH); 0 on success."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.umount2(path.encode(), 2))


def _die_with_parent() -> None:  # preexec_fn: runs in the child between fork and exec
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


class HostAgentSandbox(AgentSandbox):
    """What both host-mode sandboxes share: runc's root, the bundle and layer roots the agent
    may use, and the cleanup after the agent was lost."""

    mode = "host"

    def __init__(self, *, reaper: Any, runc_root: str, bundle_root: str, layer_roots: list[str],
                 on_event: Callable[[dict[str, Any]], None] | None = None,
                 ready_timeout: float = 30.0, drain_timeout: float | None = None,
                 namespace: str = "", timeouts: Timeouts | None = None) -> None:
        super().__init__(namespace=namespace, timeouts=timeouts)
        self.reaper = reaper
        self.runc_root = runc_root
        self.bundle_root = bundle_root
        self.layer_roots = list(layer_roots)
        self.on_event = on_event
        self.ready_timeout = ready_timeout
        self.drain_timeout = drain_timeout
        self._ready: asyncio.Task[AgentClient] | None = None

    async def start(self) -> None:
        if self._ready is None:
            self._ready = asyncio.get_running_loop().create_task(self._start())
        await asyncio.shield(self._ready)

    async def _start(self) -> AgentClient:
        """Start the agent, connect, say hello; set ``self._client``."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, "agent": self.agent_mode, "agent_pid": self.pid,
                "runc_root": self.runc_root, "bundle_root": self.bundle_root,
                "layer_roots": self.layer_roots}

    def cleanup_after_loss(self, cid: str, bundle: str | None) -> None:
        """runc may still know the container (its processes outlive the agent as the shim's
        orphans) and its rootfs is mounted in the bundle."""
        if os.path.exists(os.path.join(self.runc_root, cid)):
            try:
                subprocess.run([shutil.which("runc") or "runc", "--root", self.runc_root, "delete", "--force", cid],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               timeout=10)
            except (OSError, subprocess.TimeoutExpired) as exc:
                log.warning("runc delete --force %s after agent loss: %s", cid, exc)
        if not bundle:
            return
        rootfs = os.path.join(bundle, "rootfs")
        for _ in range(8):  # stacked mounts (live layers) come off one at a time
            if not os.path.ismount(rootfs):
                break
            if subprocess_umount(rootfs) != 0:
                break


class InprocSandbox(HostAgentSandbox):
    """The agent's code in the shim daemon's process and loop (see the module docstring)."""

    agent_mode = "inproc"

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.pid = os.getpid()
        self._embedded: Any = None

    async def _start(self) -> AgentClient:
        from ccpu.agent.embed import EmbeddedAgent

        kw: dict[str, Any] = {}
        if self.drain_timeout is not None:
            kw["drain_timeout"] = self.drain_timeout
        self._embedded = EmbeddedAgent(
            self.reaper, runc_root=self.runc_root, bundle_roots=[self.bundle_root],
            layer_roots=self.layer_roots, **kw)
        client = await self._embedded.connect()
        client.set_event_handler(lambda e: self.on_event(e) if self.on_event else None)
        client.add_lost_handler(self._link_lost)
        self._client = client
        hello = await asyncio.wait_for(client.hello(), self.ready_timeout)
        log.debug("agent up (in-process): %s", hello)
        return client

    async def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        if self._client is not None:
            if not self._client.closed:
                try:
                    await asyncio.wait_for(self._client.call("shutdown"), timeout)
                except Exception as exc:  # noqa: BLE001
                    log.warning("agent shutdown: %s", exc)
            await self._client.close()
        if self._embedded is not None:
            await self._embedded.close()


class HostSandbox(HostAgentSandbox):
    """The agent as a child process of the shim, on the host (``FRACTAL_AGENT=process``)."""

    agent_mode = "process"

    def __init__(self, *, python: str = sys.executable, extra_args: list[str] | None = None,
                 **kw: Any) -> None:
        super().__init__(**kw)
        self.python = python
        self.extra_args = list(extra_args or [])
        if self.drain_timeout is not None:
            self.extra_args += ["--drain-timeout", str(self.drain_timeout)]
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None
        self.exit_status: int | None = None

    def command(self, fd: int) -> list[str]:
        runc = shutil.which("runc") or "runc"  # an absolute path: the agent does not search PATH
        return [self.python, "-m", "ccpu.agent", "--fd", str(fd), "--runc", runc,
                "--runc-root", self.runc_root, "--bundle-root", self.bundle_root,
                *[a for r in self.layer_roots for a in ("--layer-root", r)], *self.extra_args,
                *(["--debug"] if logging.getLogger().isEnabledFor(logging.DEBUG) else [])]

    async def _start(self) -> AgentClient:
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
        client = await AgentClient.connect_socket(ours)
        client.set_event_handler(lambda e: self.on_event(e) if self.on_event else None)
        client.add_lost_handler(self._link_lost)
        self._client = client
        hello = await asyncio.wait_for(client.hello(), self.ready_timeout)
        log.info("agent up: pid %s, %s", self.pid, hello)
        return client

    def _agent_exited(self, fut: asyncio.Future[int]) -> None:
        if fut.cancelled():
            return
        self.exit_status = fut.result()
        if self.proc is not None:
            self.proc.returncode = self.exit_status  # reaped by our reaper, not by Popen
        log.log(logging.INFO if self._stopping else logging.ERROR,
                "agent pid %s exited with %s", self.pid, self.exit_status)

    async def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        if self._client is not None and not self._client.closed:
            try:
                await asyncio.wait_for(self._client.call("shutdown"), timeout)
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
        if self._client is not None:
            await self._client.close()
