"""Sandboxes: where a shim's containers run.  The Task and Layers services know only this interface.

One shim daemon = one group of containers = one sandbox.  :class:`Sandbox` owns where and how a
container runs -- its whole life: create (placement, the agent's create, OCI hooks, undoing all
of it when a step fails), start, exec, kill, delete (also after the sandbox was lost), stats,
its root's layers and their live restack.  The Task service (shim/task.py) keeps what
containerd sees (shim/state.py: status, pids, exits; events; the stdio relays it is handed) and
calls the sandbox for everything else; the Layers service (shim/layers.py) keeps the live-layer
records.  Neither looks inside a sandbox.

Implementations, chosen by :func:`shim.sandboxkind.for_config` from the sandbox's config (shim/config.py):

* :class:`shim.hostsandbox.InprocSandbox` (host mode, default; ``FRACTAL_AGENT=inproc``): the
  agent's code in the shim daemon's own process and event loop, over a socketpair;
* :class:`shim.hostsandbox.HostSandbox` (host mode, ``FRACTAL_AGENT=process``): the agent as a
  child process over a socketpair -- the process boundary of a VM, on the host;
* :class:`shim.vm.VmSandbox` (VM mode): QEMU, the agent in the guest over virtio-serial;
* :class:`FailedSandbox`: a sandbox that could not be configured; every call raises why.

The first three are :class:`shim.agentsandbox.AgentSandbox`: everything that speaks the agent
protocol (docs/agent-protocol.md) shares its request timeouts, its create sequence and its
delete-after-loss there, and differs only in how the agent is reached and what the host does
around it.  A new kind (a pool of VMs, a remote agent) is one new module with one class: an
AgentSandbox subclass if it talks to an agent, else a Sandbox; plus one line in
:func:`shim.sandboxkind.for_config` (docs/architecture.md, "Adding a sandbox kind").

Errors: every method raises :mod:`ccpu.errdefs` errors (NotFound, FailedPrecondition, ...), which
the service edge turns into ttrpc codes (shim/errors.py).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ccpu import errdefs
from shim.rootfs import Rootfs



# ---------------------------------------------------------------------------------------------
# what crosses the interface


class Relay(Protocol):
    """One process's stdio relay as the Task service drives it (:class:`shim.stdio.ProcessIO`
    for agent sandboxes): the sandbox connects it, the Task service owns it afterwards."""

    def start_stdin(self) -> None:
        """The process exists: forward containerd's stdin to it from now on."""

    def close_stdin(self) -> None:
        """containerd's CloseIO: end the process's stdin once what is buffered went through."""

    async def wait_output(self, timeout: float | None) -> bool:
        """Wait until all output was relayed (an exit is reported only then); False on timeout."""

    def close(self) -> None:
        """Drop everything (the process is deleted, or its sandbox lost)."""


@dataclass(frozen=True)
class Stdio:
    """Where a process's stdio goes: containerd's FIFOs (or log URIs for stdout), "" for none."""

    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False


@dataclass(frozen=True)
class NewContainer:
    """What Create gives the sandbox."""

    id: str
    bundle: str  # the bundle dir on the host
    rootfs: Rootfs  # shim.rootfs.parse's value (host paths)
    spec: dict[str, Any] | None  # the bundle's config.json (None: unreadable)
    stdio: Stdio = field(default_factory=Stdio)


@dataclass(frozen=True)
class Created:
    pid: int  # the init process's pid, as the sandbox reports it
    io: Relay


@dataclass(frozen=True)
class Exit:
    """What the sandbox knows of a deleted process's end (0, 0 when it forgot the process)."""

    status: int
    at: int  # ns since the epoch; 0 = unknown


@dataclass(frozen=True)
class ProcessEntry:
    pid: int
    exec_id: str  # "" for the init process (or a process of no exec)


@dataclass(frozen=True)
class RootLayers:
    """A container's root as stacked now: ``lowers`` nearest first, as HOST dirs."""

    lowers: list[str]
    upper: str | None
    history: list[Any]


# ---------------------------------------------------------------------------------------------
# the interface


class Sandbox(abc.ABC):
    """Where a shim's containers run (see the module docstring).

    Container ids are the Task API's; ``exec_id`` "" means the container's init process.
    Events (exits, OOMs) go to ``on_event`` in the agent protocol's shape (docs/agent-protocol.md,
    "Events"); ``on_lost(reason)`` is called once when the sandbox went away unexpectedly (its
    processes are then reported exited)."""

    mode = "?"  # "host" or "vm" (io.fractal.mode); a container asking for another is refused
    agent_mode = "?"  # how the agent runs, for logs and records (inproc, process, vm, none)
    pid: int | None = None  # the agent's process (QEMU's in VM mode), for records
    on_event: Callable[[dict[str, Any]], None] | None = None
    on_lost: Callable[[str], None] | None = None

    # -- the sandbox itself ------------------------------------------------------------------

    @abc.abstractmethod
    async def start(self) -> None:
        """Bring the sandbox up (idempotent: the daemon starts it early, the first Create waits)."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Shut it down and make sure it is gone (the shim is exiting)."""

    async def discard(self) -> None:
        """:meth:`stop` when containerd asked the shim to leave after its last task's Delete:
        nothing of the sandbox is needed any more, so a kind may end it faster (a VM: at once,
        shim/vm.py).  The default is :meth:`stop`."""
        await self.stop()

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """A dict for logs and the sandbox record (mode, pids, ``vm``, ...)."""

    def diagnose(self) -> str:
        """What to log when the sandbox is slow to answer (VM mode: the guest console's tail)."""
        try:
            return f"sandbox {self.describe()}"
        except Exception as exc:  # noqa: BLE001 - a diagnostic must not raise
            return f"(no sandbox details: {exc!r})"

    # -- containers --------------------------------------------------------------------------

    @abc.abstractmethod
    async def create(self, c: NewContainer) -> Created:
        """Create ``c`` (not started).  All or nothing: when any step fails, whatever the earlier
        ones did is undone before the error is raised."""

    @abc.abstractmethod
    async def start_process(self, cid: str, exec_id: str = "") -> int:
        """Start a created process (the init's poststart work included); its pid."""

    @abc.abstractmethod
    async def exec(self, cid: str, exec_id: str, process: dict[str, Any], stdio: Stdio) -> Relay:
        """Add process ``exec_id`` (an OCI process spec) to running container ``cid``."""

    @abc.abstractmethod
    async def kill(self, cid: str, exec_id: str, signal: int, all: bool = False) -> None:  # noqa: A002
        """Signal a process (``all``: every process of the container)."""

    @abc.abstractmethod
    async def delete(self, cid: str, exec_id: str = "") -> Exit:
        """Delete a created or stopped process; for the init, the container with what the host
        holds for it.  A process the sandbox no longer knows, or that a lost sandbox took
        along, is deleted without error."""

    @abc.abstractmethod
    async def pids(self, cid: str) -> list[ProcessEntry]:
        """The container's processes."""

    @abc.abstractmethod
    async def pause(self, cid: str) -> None: ...

    @abc.abstractmethod
    async def resume(self, cid: str) -> None: ...

    @abc.abstractmethod
    async def resize_pty(self, cid: str, exec_id: str, width: int, height: int) -> None: ...

    @abc.abstractmethod
    async def update(self, cid: str, resources: dict[str, Any]) -> None:
        """New OCI LinuxResources for the container."""

    @abc.abstractmethod
    async def stats(self, cid: str) -> dict[str, Any]:
        """The container's cgroup statistics (the agent's ``stats`` shape, shim/metrics.py)."""

    # -- live layers (docs/live-layers.md) ---------------------------------------------------

    @abc.abstractmethod
    async def layers(self, cid: str) -> RootLayers:
        """The container's root as stacked now, in host dirs."""

    @abc.abstractmethod
    async def restack(self, cid: str, add: list[str], remove: list[str],
                      position: str | int) -> list[str]:
        """Stack the host layer dirs ``add`` (nearest first) at ``position`` ("top", "bottom"
        or an index) and take ``remove`` away, while the container runs; the new lowers, in
        host dirs.  The sandbox makes the dirs reachable to wherever the container runs."""


class FailedSandbox(Sandbox):
    """A sandbox that could not be configured: every container operation raises ``reason``
    (its kind is what containerd sees: shim/errors.py, ``config_error``)."""

    agent_mode = "none"

    def __init__(self, reason: errdefs.Error) -> None:
        self.reason = reason

    def _refuse(self) -> errdefs.Error:
        return type(self.reason)(self.reason.message)

    async def start(self) -> None:
        raise self._refuse()

    async def stop(self) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, "error": self.reason.message}

    async def create(self, c: NewContainer) -> Created:
        raise self._refuse()

    async def start_process(self, cid: str, exec_id: str = "") -> int:
        raise self._refuse()

    async def exec(self, cid: str, exec_id: str, process: dict[str, Any], stdio: Stdio) -> Relay:
        raise self._refuse()

    async def kill(self, cid: str, exec_id: str, signal: int, all: bool = False) -> None:  # noqa: A002
        raise self._refuse()

    async def delete(self, cid: str, exec_id: str = "") -> Exit:
        raise self._refuse()

    async def pids(self, cid: str) -> list[ProcessEntry]:
        raise self._refuse()

    async def pause(self, cid: str) -> None:
        raise self._refuse()

    async def resume(self, cid: str) -> None:
        raise self._refuse()

    async def resize_pty(self, cid: str, exec_id: str, width: int, height: int) -> None:
        raise self._refuse()

    async def update(self, cid: str, resources: dict[str, Any]) -> None:
        raise self._refuse()

    async def stats(self, cid: str) -> dict[str, Any]:
        raise self._refuse()

    async def layers(self, cid: str) -> RootLayers:
        raise self._refuse()

    async def restack(self, cid: str, add: list[str], remove: list[str],
                      position: str | int) -> list[str]:
        raise self._refuse()
