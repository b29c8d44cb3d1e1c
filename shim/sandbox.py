"""Sandboxes: where a shim's containers run, and how the shim reaches their agent.

One shim daemon = one group of containers = one sandbox = one agent.  The Task service only
uses this small interface; :func:`for_config` picks the implementation from the sandbox's
config (shim/config.py): host mode (below) or VM mode (:class:`shim.vm.VmSandbox`: QEMU + the
agent over virtio-serial):

* ``await start()``      bring the agent up (idempotent; the first Create waits for it)
* ``await agent()``      the connected :class:`ccpu.agent.client.AgentClient` (after start)
* ``await stop()``       ask the agent to shut down, then make sure it is gone
* ``describe()``         a dict for logs and the sandbox record (mode, pids, ``vm``, ...)
* ``layer_path(dir)``    the agent's path of a host repo layer dir (identity on the host; the
                         guest's share path in a VM) -- for live layers
* ``placement(id, bundle, rootfs, spec)``  the agent's ``bundle``/``rootfs``(/``spec``) args
                         of a container's ``create`` (raises TtrpcError if it cannot run here)
* ``created/started/deleted(id, ...)``  host-side work at those points of a container's
                         life (VM mode: the spec's OCI hooks, shim/hooks.py)
* ``on_lost``            callback(reason) when the agent goes away unexpectedly
* ``on_event``           callback(event) for the agent's events

Host mode has two ways to run the agent (``FRACTAL_AGENT``, see :func:`host_sandbox`):

* :class:`InprocSandbox` (default, ``inproc``): the agent's code runs in the shim daemon's own
  process and event loop, over a ``socket.socketpair()``, with the daemon's one reaper.  No
  second interpreter: faster sandbox start, half the memory.  A SIGKILLed shim takes the
  agent with it, exactly as in process mode; containers are cleaned up by ``delete``.
* :class:`HostSandbox` (``process``): the agent as a child process (``python3 -m ccpu.agent
  --fd N``) over a socketpair -- the same process boundary as in a VM, useful to debug the
  protocol, or to keep the shim's and the agent's faults apart.  The agent dies with the shim
  (PR_SET_PDEATHSIG=SIGKILL); a crashed agent is reported as exited tasks.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

from ccpu.agent.client import AgentClient

log = logging.getLogger("shim.sandbox")

PR_SET_PDEATHSIG = 1
_CODE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: ``FRACTAL_AGENT`` values
AGENT_MODES = ("inproc", "process")


def agent_mode() -> str:
    mode = os.environ.get("FRACTAL_AGENT", "").strip() or "inproc"
    if mode not in AGENT_MODES:
        log.warning("FRACTAL_AGENT=%r unknown (want inproc or process): using inproc", mode)
        mode = "inproc"
    return mode


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


class Sandbox:
    """Interface (see the module docstring)."""

    mode = "?"
    agent_mode = "?"
    pid: int | None = None
    on_lost: Callable[[str], None] | None = None
    on_event: Callable[[dict[str, Any]], None] | None = None

    async def start(self) -> None:
        raise NotImplementedError

    _client: AgentClient | None = None
    _stopping = False

    async def agent(self) -> AgentClient:
        """The connected agent client, started on first use."""
        await self.start()
        assert self._client is not None
        return self._client

    def _link_lost(self, reason: str) -> None:
        """The agent connection broke while we were not stopping: report it once upward."""
        if not self._stopping and not self.lost:
            self.lost = True
            if self.on_lost is not None:
                self.on_lost(reason)

    async def stop(self) -> None:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError

    lost = False  # the agent went away unexpectedly (its containers were reported exited)

    def cleanup_after_loss(self, cid: str, bundle: str) -> None:
        """Undo on the host what a lost agent left of container `cid` (blocking; run in a thread).

        Host sandboxes: runc may still know the container (its processes outlive the agent as
        the shim's orphans) and its rootfs is mounted in the bundle.  VM sandboxes override it:
        what the guest had died with the guest.
        """
        runc_root = getattr(self, "runc_root", None)
        if runc_root and os.path.exists(os.path.join(runc_root, cid)):
            import subprocess

            try:
                subprocess.run([shutil.which("runc") or "runc", "--root", runc_root, "delete", "--force", cid],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               timeout=10)
            except (OSError, subprocess.TimeoutExpired) as exc:
                log.warning("runc delete --force %s after agent loss: %s", cid, exc)
        rootfs = os.path.join(bundle, "rootfs")
        for _ in range(8):  # stacked mounts (live layers) come off one at a time
            if not os.path.ismount(rootfs):
                break
            if subprocess_umount(rootfs) != 0:
                break

    def layer_path(self, host_dir: str) -> str:
        """Where the agent sees a layer dir of the host's repo: the same path on the host."""
        return host_dir

    def layers_adding(self, cid: str, host_dirs: list[str]) -> None:
        """Before a live restack stacks ``host_dirs`` on ``cid`` (a VM makes them visible to its
        guest: shim/layerview.py).  Raising fails the add."""

    def layers_now(self, cid: str, host_dirs: list[str]) -> None:
        """``cid``'s stack after a live restack (or after a failed one: the stack as it is)."""

    def diagnose(self) -> str:
        """What to log when the agent is slow to answer (VM mode: the guest console's tail)."""
        try:
            return f"sandbox {self.describe()}"
        except Exception as exc:  # noqa: BLE001 - a diagnostic must not raise
            return f"(no sandbox details: {exc!r})"

    # Lifecycle points where a sandbox may act on the host (VM mode runs OCI hooks there).
    async def created(self, cid: str, pid: int) -> None:
        """After the agent created ``cid``; raising fails the Create (the shim deletes it)."""

    async def started(self, cid: str, pid: int) -> None:
        """After ``cid``'s init process started."""

    async def deleted(self, cid: str) -> None:
        """After ``cid`` was deleted."""

    def placement(self, cid: str, bundle: str, rootfs: dict[str, Any],
                  spec: dict[str, Any] | None) -> dict[str, Any]:
        """``create`` args saying where the container lives: on the host, the bundle as is (the
        agent reads its config.json)."""
        return {"bundle": bundle, "rootfs": rootfs}


class FailedSandbox(Sandbox):
    """A sandbox that could not be configured: every container's Create gets the reason."""

    mode = "?"
    agent_mode = "none"

    def __init__(self, reason: str, code: int | None = None) -> None:
        self.reason = reason
        self.code = code  # a ttrpc Code; None = FailedPrecondition

    async def start(self) -> None:
        from ccpu.ttrpc import Code, TtrpcError

        raise TtrpcError(Code(self.code) if self.code is not None else Code.FAILED_PRECONDITION,
                         self.reason)

    async def agent(self) -> AgentClient:
        await self.start()
        raise AssertionError("unreachable")

    async def stop(self) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, "error": self.reason}


def for_config(cfg: Any, *, reaper: Any, namespace: str, group: str, repo_root: str,
               run_dir: str, runc_root: str, bundle_root: str, layer_roots: list[str],
               first_bundle: str | None = None) -> Sandbox:
    """The sandbox for a :class:`shim.config.Config`: a VM, or host mode (``FRACTAL_AGENT``).

    ``first_bundle``: the bundle of the container the shim was started for; a VM boots before
    its Create arrives and must know the pod network namespace (CRI's pause spec) by then."""
    if cfg.mode == "vm":
        from shim.vm import VmSandbox, first_netns

        return VmSandbox(reaper=reaper, namespace=namespace, group=group, repo_root=repo_root,
                         run_dir=run_dir, settings=cfg.vm,
                         netns=first_netns(first_bundle) if first_bundle else None)
    return host_sandbox(reaper=reaper, runc_root=runc_root, bundle_root=bundle_root,
                        layer_roots=layer_roots)


def host_sandbox(mode: str | None = None, **kw: Any) -> Sandbox:
    """The host-mode sandbox for ``mode`` (default: ``$FRACTAL_AGENT``, else inproc)."""
    mode = mode or agent_mode()
    return InprocSandbox(**kw) if mode == "inproc" else HostSandbox(**kw)


class InprocSandbox(Sandbox):
    """The agent's code in the shim daemon's process and loop (see the module docstring)."""

    mode = "host"
    agent_mode = "inproc"

    def __init__(self, *, reaper: Any, runc_root: str, bundle_root: str, layer_roots: list[str],
                 on_event: Callable[[dict[str, Any]], None] | None = None,
                 ready_timeout: float = 30.0, drain_timeout: float | None = None) -> None:
        self.reaper = reaper
        self.runc_root = runc_root
        self.bundle_root = bundle_root
        self.layer_roots = list(layer_roots)
        self.on_event = on_event
        self.ready_timeout = ready_timeout
        self.drain_timeout = drain_timeout
        self.pid = os.getpid()
        self._embedded: Any = None
        self._client: AgentClient | None = None
        self._ready: asyncio.Task[AgentClient] | None = None
        self._stopping = False

    async def start(self) -> None:
        if self._ready is None:
            self._ready = asyncio.get_running_loop().create_task(self._start())
        await asyncio.shield(self._ready)

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

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, "agent": self.agent_mode, "agent_pid": self.pid,
                "runc_root": self.runc_root, "bundle_root": self.bundle_root,
                "layer_roots": self.layer_roots}


class HostSandbox(Sandbox):
    """The agent as a child process of the shim, on the host (``FRACTAL_AGENT=process``)."""

    mode = "host"
    agent_mode = "process"

    def __init__(self, *, reaper: Any, runc_root: str, bundle_root: str, layer_roots: list[str],
                 python: str = sys.executable, extra_args: list[str] | None = None,
                 on_event: Callable[[dict[str, Any]], None] | None = None,
                 ready_timeout: float = 30.0, drain_timeout: float | None = None) -> None:
        self.reaper = reaper
        self.runc_root = runc_root
        self.bundle_root = bundle_root
        self.layer_roots = list(layer_roots)
        self.python = python
        self.extra_args = list(extra_args or [])
        if drain_timeout is not None:
            self.extra_args += ["--drain-timeout", str(drain_timeout)]
        self.on_event = on_event
        self.ready_timeout = ready_timeout
        self.proc: Any = None  # subprocess.Popen
        self.pid: int | None = None
        self.exit_status: int | None = None
        self._client: AgentClient | None = None
        self._ready: asyncio.Task[AgentClient] | None = None
        self._stopping = False

    def command(self, fd: int) -> list[str]:
        runc = shutil.which("runc") or "runc"  # an absolute path: the agent does not search PATH
        return [self.python, "-m", "ccpu.agent", "--fd", str(fd), "--runc", runc,
                "--runc-root", self.runc_root, "--bundle-root", self.bundle_root,
                *[a for r in self.layer_roots for a in ("--layer-root", r)], *self.extra_args,
                *(["--debug"] if logging.getLogger().isEnabledFor(logging.DEBUG) else [])]

    async def start(self) -> None:
        if self._ready is None:
            self._ready = asyncio.get_running_loop().create_task(self._start())
        await asyncio.shield(self._ready)

    async def _start(self) -> AgentClient:
        import subprocess

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

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, "agent": self.agent_mode, "agent_pid": self.pid,
                "runc_root": self.runc_root, "bundle_root": self.bundle_root,
                "layer_roots": self.layer_roots}
