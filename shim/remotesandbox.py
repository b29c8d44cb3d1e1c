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

* layers (an agent with feature ``layers:pull``, i.e. a repo of its own): before a container's
  create (and before a live layer add) the shim asks which of its layers the machine lacks
  (``layers_have``, which also takes the container's reference on the others) and streams
  each missing one as containerd's compressed blob (``layers_pull``, a data channel:
  shim/remotelayers.py finds and reads the blob); the machine verifies and unpacks it once
  (ccpu/agent/layerpull.py).  ``create`` then carries the spec, and the stack names the
  machine's paths (its ``layers/<chain hex>``, the container's upper/work and bundle below its
  repo); ``delete`` releases the container's references.  An agent without the feature gets
  the host's paths as they are (it must see them: a machine that mounts them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import posixpath
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from ccpu import errdefs
from ccpu.agent.client import AgentClient
from ccpu.agent.endpoint import parse_tcp
from ccpu.stack import LayerStack
from shim.agentsandbox import AgentSandbox
from shim.config import RemoteSettings, Timeouts
from shim.rootfs import Rootfs
from shim.sandbox import Created, Exit, NewContainer

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
                 timeouts: Timeouts | None = None, repo_root: str | None = None,
                 containerd_address: str | None = None) -> None:
        super().__init__(namespace=namespace, timeouts=timeouts)
        self.settings = settings
        self.endpoint: str | None = None
        self.identity: str | None = None  # the agent's certificate fingerprint
        self._ready: asyncio.Task[AgentClient] | None = None
        self.repo_root = repo_root  # the host's fractal repo (its layer dirs -> chain IDs)
        self.containerd_address = containerd_address
        self.machine_repo: str | None = None  # the agent's own repo (feature layers:pull)
        self._paths: dict[str, str] = {}  # host layer dir -> the machine's dir of that layer
        self._source: Any = None  # shim.remotelayers.BlobSource, made on first use
        self.sent: list[tuple[str, int]] = []  # (chain ID, bytes) of the layers streamed
        self._pulling = asyncio.Lock()  # one have+pull at a time: a layer two containers need goes once
        self.attested: dict[str, Any] | None = None  # the verified measurement ([remote.attest])

    async def _attest(self, client: AgentClient, endpoint: str, hello: Any) -> dict[str, Any]:
        """The machine's TPM quote checked before any container (docs/hardware.md "The machine
        over a NIC"): it must show the build's PCR 11, the PCR 12 of the command line the operator
        booted it with -- which must trust our CA and no other -- and name the TLS key of this
        very connection (a relayed quote names another)."""
        import json
        import time

        from ccpu import attest, pki

        att = self.settings.attest
        assert att is not None
        t0 = time.monotonic()
        if not isinstance(hello, dict) or "attest" not in (hello.get("features") or []):
            raise attest.AttestationError(f"remote machine {endpoint} offers no attest (no TPM?): refused")
        own_uki = att.uki(endpoint)  # a UKI of its own, booted from a boot entry: the command line inside
        path = own_uki or att.manifest
        loader_cmdline = None if own_uki else att.cmdline(endpoint)
        if path is None or (own_uki is None and loader_cmdline is None):
            raise attest.AttestationError(f"[remote.attest] has no cmdline nor uki for {endpoint}")
        ours = pki.fingerprint(await asyncio.to_thread(Path(self.settings.tls_dir, "ca.pem").read_bytes))

        def trusts_us(cmdline: str) -> None:
            theirs = attest.ca_fingerprint_on(cmdline)
            if theirs != ours:
                raise attest.AttestationError(f"remote machine {endpoint}: its command line trusts CA {theirs}, "
                                              f"this host's is {ours} ({self.settings.tls_dir}/ca.pem)")

        if loader_cmdline is not None:  # known before any file is read
            trusts_us(loader_cmdline)

        def manifest() -> dict[str, Any]:
            with open(path, "rb") as f:
                return json.loads(f.read(1 << 20))

        try:
            built = await asyncio.to_thread(manifest)
            if not isinstance(built, dict):
                raise ValueError("not a JSON object")
            want = attest.expected(built, loader_cmdline)
            builtin = built["uki"]["cmdline"] if own_uki else None
            if own_uki and not isinstance(builtin, str):
                raise ValueError("its uki.cmdline is not a string")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise errdefs.FailedPrecondition(f"[remote.attest] manifest {path}: {exc!s:.300}") from None
        if builtin is not None:  # the command line the UKI carries (PCR 11 covers it)
            trusts_us(builtin)
        tls_key = attest.spki_sha256(client.peer_certificate())
        verified = await attest.attest(client.call, [Path(p) for p in att.ek_ca], want, tls_key=tls_key)
        took = time.monotonic() - t0
        out = {**verified.describe(), "tls_key": tls_key.hex(), "seconds": round(took, 3)}
        log.info("remote machine %s attested in %.3fs: TPM quote verified, EK %s, TLS key %s, %s", endpoint,
                 took, verified.ek_subject, tls_key.hex(), ", ".join(f"PCR {k} {v}" for k, v in out["pcrs"].items()))
        return out

    async def start(self) -> None:
        if self._ready is None:
            self._ready = asyncio.get_running_loop().create_task(self._start())
        await asyncio.shield(self._ready)

    async def _start(self) -> AgentClient:
        ssl = allow_ssl()
        from ccpu.agent import tls

        try:
            files = tls.TlsFiles.in_dir(self.settings.tls_dir, "host")
            # an attested machine's certificate is made at its boot: its key is pinned from the
            # handshake and must be the one its TPM quote names (_attest), before anything else
            context = (tls.attested_client_context(files.cert, files.key) if self.settings.attest
                       else tls.client_context(files))
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
            if self.settings.attest is not None:
                try:
                    self.attested = await asyncio.wait_for(self._attest(client, endpoint, hello),
                                                           max(60.0, self.timeouts.for_op("create")))
                except BaseException as exc:
                    await client.close()
                    if isinstance(exc, TimeoutError):
                        raise errdefs.DeadlineExceeded(f"remote machine {endpoint}: attestation not done "
                                                       "in time") from None
                    raise  # a machine that does not prove its boot: no other way is tried
            features = hello.get("features") if isinstance(hello, dict) else None
            repo = hello.get("repo") if isinstance(hello, dict) else None
            if isinstance(features, list) and "layers:pull" in features and isinstance(repo, str) \
                    and repo.startswith("/") and "\0" not in repo:
                self.machine_repo = repo
            client.set_event_handler(lambda e: self.on_event(e) if self.on_event else None)
            client.add_lost_handler(self._link_lost)
            self._client = client
            self.endpoint = endpoint
            self.identity = client.peer_identity
            log.info("remote agent %s up (identity %s): %s", endpoint, self.identity, hello)
            return client
        raise errdefs.Unavailable("no remote agent accepted this sandbox: " + "; ".join(failures))

    # -- layers on the machine (feature layers:pull) -----------------------------------------

    async def create(self, c: NewContainer) -> Created:
        await self.start()
        if self.machine_repo is None or not isinstance(c.rootfs, LayerStack):
            return await super().create(c)
        try:
            await self._ensure_layers(c.id, list(c.rootfs.lowers))
            return await super().create(c)
        except BaseException:
            await self._release(c.id)
            raise

    def placement(self, cid: str, bundle: str, rootfs: Rootfs,
                  spec: dict[str, Any] | None) -> dict[str, Any]:
        if self.machine_repo is None:
            return super().placement(cid, bundle, rootfs, spec)
        if spec is None:
            raise errdefs.InvalidArgument(f"bundle {bundle} has no readable config.json")
        if not isinstance(rootfs, LayerStack):
            raise errdefs.FailedPrecondition(
                f"container {cid} cannot run on a remote machine: its rootfs is not fractal repo "
                "layers (use the fractal snapshotter: ctr --snapshotter fractal)")
        scratch = posixpath.join(self.machine_repo, "containers", cid)
        writable = {"upper": posixpath.join(scratch, "upper"), "work": posixpath.join(scratch, "work")}
        stack = rootfs.map(lambda p, role: self.layer_path(p) if role == "lower" else writable[role])
        return {"bundle": posixpath.join(self.machine_repo, "bundles", cid),
                "rootfs": stack.to_wire(), "spec": spec}

    def layer_path(self, host_dir: str) -> str:
        return self._paths.get(os.path.normpath(host_dir), host_dir)

    def host_layer_path(self, agent_dir: str) -> str:
        for host, there in self._paths.items():
            if there == agent_dir:
                return host
        return agent_dir

    async def restack(self, cid: str, add: list[str], remove: list[str],
                      position: str | int) -> list[str]:
        if add and self.machine_repo is not None:
            await self._ensure_layers(cid, add)  # a live layer: on the machine first
        return await super().restack(cid, add, remove, position)

    async def delete(self, cid: str, exec_id: str = "") -> Exit:
        result = await super().delete(cid, exec_id)
        if not exec_id and self.machine_repo is not None:
            await self._release(cid)
        return result

    async def _release(self, cid: str) -> None:
        if self.lost or self._client is None or self._client.closed:
            return  # the machine is gone (or unreachable): its agent's recover() cleans up
        try:
            await self.call("layers_release", {"container": cid})
        except errdefs.Error as exc:
            log.warning("releasing %s's layers on the machine: %s", cid, exc)

    def _blob_source(self) -> Any:
        if self._source is None:
            from shim.remotelayers import BlobSource

            if not self.containerd_address:
                raise errdefs.FailedPrecondition("remote layers: the shim does not know containerd's address")
            self._source = BlobSource(self.containerd_address, self.namespace)
        return self._source

    async def _ensure_layers(self, cid: str, host_dirs: list[str]) -> None:
        """Every layer of ``host_dirs`` on the machine, referenced by ``cid``; their machine
        paths in ``self._paths``."""
        from shim.remotelayers import chain_ids_of

        if self.repo_root is None:
            raise errdefs.FailedPrecondition("remote layers: the shim does not know the fractal repo")
        dirs = [os.path.normpath(d) for d in host_dirs]
        chains = await asyncio.to_thread(chain_ids_of, self.repo_root, dirs)
        async with self._pulling:
            await self._have_and_pull(cid, dirs, chains)

    async def _have_and_pull(self, cid: str, dirs: list[str], chains: list[str]) -> None:
        have = await self.call("layers_have", {"container": cid, "chain_ids": chains})
        layers_dir = have.get("layers")
        missing = have.get("missing")
        if not isinstance(layers_dir, str) or not layers_dir.startswith("/") or \
                not isinstance(missing, list) or not all(isinstance(m, str) and m in chains for m in missing):
            raise errdefs.Internal("layers_have: the agent sent a malformed answer")
        if missing:
            source = self._blob_source()
            blobs = await asyncio.to_thread(source.resolve, cid, missing)
            for chain in missing:
                await self._pull(cid, blobs[chain], source)
        for d, chain in zip(dirs, chains):
            self._paths[d] = posixpath.join(layers_dir, chain.split(":", 1)[1])

    async def _pull(self, cid: str, blob: Any, source: Any) -> None:
        """Stream one blob on a data channel of its own; the answer comes once the machine has
        verified and unpacked it."""
        agent = await self.connected()
        ch = agent.open_channel()
        try:
            args = {"container": cid, "chain_id": blob.chain_id, "diff_id": blob.diff_id,
                    "digest": blob.digest, "media_type": blob.media_type, "size": blob.size,
                    "channel": ch.number}
            call = asyncio.ensure_future(agent.call("layers_pull", args))
            await asyncio.sleep(0)  # the request goes out before its data
            chunks = source.chunks(blob.digest)
            sent = 0
            try:
                while not call.done():
                    data = await asyncio.to_thread(next, chunks, None)
                    if data is None:
                        break
                    for i in range(0, len(data), 1 << 19):
                        await ch.write(data[i:i + (1 << 19)])
                    sent += len(data)
                if not call.done():
                    await ch.close_write()
            except BaseException as exc:
                # end the stream short: the agent refuses it (fewer bytes than declared) and
                # frees the channel and the container's turn, instead of waiting for the rest
                with contextlib.suppress(Exception):
                    await ch.close_write()
                call.cancel()
                if isinstance(exc, Exception) and not isinstance(exc, errdefs.Error):
                    raise errdefs.Unavailable(f"layer {blob.digest} for the remote machine: "
                                              f"{type(exc).__name__}: {exc}") from None
                raise
            limit = max(self.timeouts.for_op("create"), blob.size / (1 << 20))  # >= 1 MiB/s
            try:
                await asyncio.wait_for(call, limit)
            except TimeoutError:
                raise errdefs.DeadlineExceeded(f"the remote agent did not take layer {blob.digest} "
                                               f"within {limit:g}s") from None
            self.sent.append((blob.chain_id, sent))
            log.info("layer %s (%s, %d bytes) sent to %s for %s", blob.chain_id, blob.digest, sent,
                     self.endpoint, cid)
        finally:
            ch.release()

    async def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        if self._source is not None:
            self._source.close()
        if self._client is not None:
            if not self._client.closed:
                try:
                    await asyncio.wait_for(self._client.call("shutdown"), timeout)
                except Exception as exc:  # noqa: BLE001
                    log.warning("remote agent shutdown: %s", exc)
            await self._client.close()

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, "agent": self.agent_mode, "endpoint": self.endpoint,
                "agent_identity": self.identity, "endpoints": list(self.settings.endpoints),
                "machine_repo": self.machine_repo, "layers_sent": len(self.sent), "attested": self.attested,
                # the sandbox record's machine entry (`fractal ps`): an attested machine's measurement
                **({"vm": {"machine": self.endpoint, "attested": self.attested}} if self.settings.attest else {})}
