"""Remote mode (``io.fractal.mode=remote``): the sandbox's agent runs on another machine and the
shim talks to it over TCP with mutual TLS (docs/remote.md).

An :class:`shim.agentsandbox.AgentSandbox` like the host and VM kinds: the same agent protocol,
so the same Task API semantics (io, exits, exec, kill, stats, live layers).  What is its own:

* reaching the agent: the ``[remote] endpoints`` in order, each with TLS 1.3, the operator's CA
  only, the host's client certificate, the agent's name checked (ccpu/agent/tls.py).  An agent
  that refuses (busy with another sandbox: Unavailable) or cannot be reached is skipped; a
  certificate that fails verification is an error naming the endpoint, never a fallback;
* the agent's identity (its certificate's fingerprint) is recorded at the first connection; the
  agent in turn pins ours (ccpu/agent/server.py) -- a new identity on either side is refused;
* a lost connection is a lost machine, as a dead VM: the base class reports every process
  exited (``on_lost``) and ``delete`` completes without the agent; nothing is left on this host
  (the containers' mounts and processes live on the machine).

Limit of this step: the agent must see the host's bundle and repo paths at the same paths (the
"machine" shares this host's filesystem, as in the tests: a network namespace).  Streaming
layers to a machine is designed in docs/remote.md, not built.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from types import ModuleType
from typing import Any

from ccpu import errdefs
from ccpu.agent.client import AgentClient
from ccpu.agent.endpoint import parse_tcp
from shim.agentsandbox import AgentSandbox
from shim.config import RemoteSettings, Timeouts

log = logging.getLogger("shim.sandbox")


def allow_ssl() -> ModuleType:
    """``ssl``, importable again in a shim daemon that blocked it (shim/daemon.py ``skip_ssl``:
    ~10 ms of every other sandbox's start), and known to asyncio's modules, which were imported
    while it was blocked and so hold ``ssl = None`` (they would refuse TLS, or hang in the
    handshake: ``sslproto`` defines its retry errors only when ssl imported).  ``sslproto`` is
    re-run; the two others only test ``ssl`` by name."""
    import asyncio.base_events
    import asyncio.selector_events
    import asyncio.sslproto
    import importlib

    if "ssl" in sys.modules and sys.modules["ssl"] is None:
        del sys.modules["ssl"]
    import ssl

    if asyncio.sslproto.ssl is None:
        importlib.reload(asyncio.sslproto)
    for mod in (asyncio.base_events, asyncio.selector_events):
        if getattr(mod, "ssl", ssl) is None:
            mod.ssl = ssl  # type: ignore[attr-defined]
    return ssl


class RemoteSandbox(AgentSandbox):
    """A sandbox whose agent is at one of ``settings.endpoints``."""

    mode = "remote"
    agent_mode = "remote"

    def __init__(self, *, settings: RemoteSettings, namespace: str = "",
                 timeouts: Timeouts | None = None) -> None:
        super().__init__(namespace=namespace, timeouts=timeouts)
        self.settings = settings
        self.endpoint: str | None = None
        self.identity: str | None = None  # the agent's certificate fingerprint
        self._ready: asyncio.Task[AgentClient] | None = None

    async def start(self) -> None:
        if self._ready is None:
            self._ready = asyncio.get_running_loop().create_task(self._start())
        await asyncio.shield(self._ready)

    async def _start(self) -> AgentClient:
        ssl = allow_ssl()
        from ccpu.agent import tls

        try:
            context = tls.client_context(tls.TlsFiles.in_dir(self.settings.tls_dir, "host"))
        except tls.TlsConfigError as exc:
            raise errdefs.FailedPrecondition(f"remote mode: {exc}") from None
        failures: list[str] = []
        for endpoint in self.settings.endpoints:
            host, port = parse_tcp(endpoint)
            try:
                client = await AgentClient.connect_tls(host, port, context,
                                                       timeout=self.settings.connect_timeout)
            except ssl.SSLCertVerificationError as exc:
                # a machine that is not ours (or a man in the middle): say so, try no other way
                raise errdefs.FailedPrecondition(
                    f"remote agent {endpoint} refused: its certificate does not verify against "
                    f"{self.settings.tls_dir}/ca.pem: {exc.verify_message or exc}") from None
            except (OSError, ssl.SSLError, TimeoutError) as exc:
                failures.append(f"{endpoint}: {type(exc).__name__}: {exc}")
                continue
            try:
                hello = await asyncio.wait_for(client.hello(), self.settings.connect_timeout)
            except (errdefs.Error, OSError, TimeoutError) as exc:
                # busy with another sandbox, or our certificate was refused in the handshake's
                # last step (TLS 1.3 reports a bad client certificate on first read)
                await client.close()
                failures.append(f"{endpoint}: {exc}")
                continue
            client.set_event_handler(lambda e: self.on_event(e) if self.on_event else None)
            client.add_lost_handler(self._link_lost)
            self._client = client
            self.endpoint = endpoint
            self.identity = client.peer_identity
            log.info("remote agent %s up (identity %s): %s", endpoint, self.identity, hello)
            return client
        raise errdefs.Unavailable("no remote agent accepted this sandbox: " + "; ".join(failures))

    async def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        if self._client is not None:
            if not self._client.closed:
                try:
                    await asyncio.wait_for(self._client.call("shutdown"), timeout)
                except Exception as exc:  # noqa: BLE001
                    log.warning("remote agent shutdown: %s", exc)
            await self._client.close()

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, "agent": self.agent_mode, "endpoint": self.endpoint,
                "agent_identity": self.identity, "endpoints": list(self.settings.endpoints)}
