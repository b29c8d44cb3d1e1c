"""The agent inside another asyncio program (the shim daemon in host mode).

Why: on the host, a separate agent process costs an interpreter start (tens of ms on every
sandbox start) and ~25 MB of memory, for nothing a process boundary buys there -- the agent
runs with the shim's privileges on the shim's machine either way.  So in host mode the shim
runs the SAME agent code (Server, Supervisor, Runc, Reaper) in its own event loop and talks to
it over an in-process `socket.socketpair()` with the same protocol and the same client it uses
for a VM's or a remote agent.  Only the transport is short.

The host program must pass its one `Reaper` (started, and a child subreaper): there can be
only one SIGCHLD handler and one `waitpid(-1)` per process.

    agent = EmbeddedAgent(reaper, runc_root=..., bundle_roots=[...], layer_roots=[...])
    client = await agent.connect()          # an AgentClient, hello not yet done
    ...
    await agent.close()                      # after the client is closed
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
from collections.abc import Sequence

from ..linux.reaper import Reaper
from .client import AgentClient
from .container import Supervisor
from .process import DRAIN_TIMEOUT
from .runc import Runc
from .server import Outbox, Server


class EmbeddedAgent:
    def __init__(
        self,
        reaper: Reaper,
        *,
        runc_root: str,
        bundle_roots: Sequence[str],
        layer_roots: Sequence[str],
        runc: str = "runc",
        drain_timeout: float = DRAIN_TIMEOUT,
    ) -> None:
        binary = shutil.which(runc)  # processes are posix_spawn'ed: no PATH search later
        if binary is None:
            raise FileNotFoundError(f"runc binary {runc!r} not found")
        os.makedirs(runc_root, mode=0o700, exist_ok=True)
        self.outbox = Outbox()
        self.supervisor = Supervisor(
            Runc(reaper, runc_root, binary), reaper, self.outbox, bundle_roots, layer_roots, drain_timeout
        )
        self.server = Server(self.supervisor, self.outbox)
        self._serving: asyncio.Task[None] | None = None

    async def connect(self) -> AgentClient:
        """A new connection to the agent (one client at a time, as over any transport)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            theirs.setblocking(False)
            reader, writer = await asyncio.open_connection(sock=theirs, limit=2**21)
        except BaseException:
            ours.close()
            theirs.close()
            raise
        self._serving = asyncio.ensure_future(self.server.serve(reader, writer))
        ours.setblocking(False)
        return await AgentClient.connect_socket(ours)

    @property
    def containers(self) -> int:
        return len(self.supervisor.containers)

    async def close(self) -> None:
        """Stop serving (the containers are left as they are)."""
        if self._serving is not None:
            self._serving.cancel()
            with contextlib.suppress(BaseException):
                await self._serving
            self._serving = None
