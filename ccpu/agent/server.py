"""Connections: framing in, requests dispatched, responses/output/events out.

Why the shape:
* One client at a time (the shim).  A second client is answered `Unavailable` while the first
  is connected; once it is gone, a new one may connect (a restarted shim) and finds the
  containers as they are.
* Over TCP (remote mode, mutual TLS: ccpu/agent/tls.py) each connection carries its peer's
  certificate identity.  The first client to say `hello` owns the agent's containers; while any
  exist, a client presenting another identity is refused (`FailedPrecondition`), even after
  the owner's connection went away -- a stolen or different host key cannot take them over.
  A successful `shutdown` (no containers) frees the agent for the next client.  When the
  owner's connection breaks instead, the shim has reported every process exited (a lost link is
  a lost machine to it): after `orphan_grace` seconds without the owner back, the agent kills
  and deletes the containers, so nothing runs on the machine that no host knows of.
* Events are never lost: while no client has said `hello`, they are queued and delivered after
  the next `hello`.  Process output produced while nobody is connected is dropped (the
  channels belonged to the old connection).
* Requests run concurrently, each in its own task; per container they are serialized in arrival
  order (`Supervisor.serialized`, acquired before the task's first suspension).
* Output flow control (feature `flow`, asked for by the client's `window` in `hello`): each
  output channel may have at most `window` bytes sent and not yet granted back by the client's
  `window` frames; a relay with no credit left waits, so its process blocks on its pipe while
  every other channel and the control messages keep flowing.  Without it (an older client),
  output is paced only by the connection as a whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import hello as hello_
from . import protocol, wire

if TYPE_CHECKING:  # the container machinery loads after `hello` (Server's docstring)
    from .container import Supervisor

if TYPE_CHECKING:
    from .layerpull import LocalRepo, Receiver

log = logging.getLogger(__name__)

FEATURES = hello_.FEATURES
MIN_WINDOW, MAX_WINDOW = hello_.MIN_WINDOW, hello_.MAX_WINDOW


class Connection:
    def __init__(self, writer: asyncio.StreamWriter, name: str) -> None:
        self.writer = writer
        self.name = name
        self.ready = False  # hello answered
        self.closed = False
        self.window: int | None = None  # flow control: the client's per-channel window
        self.identity: str | None = None  # the peer's certificate fingerprint (TCP + TLS)
        self._credits: dict[int, int] = {}  # output channel -> bytes we may still send
        self._waiters: dict[int, asyncio.Future[None]] = {}

    def send(self, raw: bytes) -> None:
        if not self.closed and raw:
            try:
                self.writer.write(raw)
            except (ConnectionError, RuntimeError):
                self.closed = True

    async def drain(self) -> None:
        if not self.closed:
            try:
                await self.writer.drain()
            except ConnectionError:
                self.closed = True

    async def credit(self, channel: int, want: int) -> int:
        """Bytes (1..want) we may send on `channel` now, waiting for a grant if none are left;
        0 once the connection is closed."""
        assert self.window is not None
        while not self.closed:
            avail = self._credits.setdefault(channel, self.window)
            if avail > 0:
                take = min(avail, want)
                self._credits[channel] = avail - take
                return take
            fut = self._waiters[channel] = asyncio.get_running_loop().create_future()
            try:
                await fut
            finally:
                if self._waiters.get(channel) is fut:
                    del self._waiters[channel]
        return 0

    def grant(self, channel: int, increment: int) -> None:
        """A `window` frame: more room on `channel` (ignored for channels not sending)."""
        if self.window is None:
            raise wire.ProtocolError("window frame without flow control")
        if channel in self._credits:
            # never more than a window: a client granting too much gets no extra buffering from us
            self._credits[channel] = min(self._credits[channel] + increment, self.window)
            fut = self._waiters.get(channel)
            if fut is not None and not fut.done():
                fut.set_result(None)

    def forget(self, channel: int) -> None:
        """The channel is closed: no more credit bookkeeping for it."""
        self._credits.pop(channel, None)

    def close(self) -> None:
        self.closed = True
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_result(None)
        with contextlib.suppress(Exception):
            self.writer.close()


class Outbox:
    """The current connection, as the processes see it (see stdio.Outbox / process.Events)."""

    def __init__(self) -> None:
        self.conn: Connection | None = None
        self._queued: list[dict[str, Any]] = []

    def _live(self) -> Connection | None:
        c = self.conn
        return c if c is not None and c.ready and not c.closed else None

    async def data(self, channel: int, data: bytes) -> None:
        c = self._live()
        if c is None:
            return
        if c.window is None:
            c.send(wire.encode_data(channel, data))
            await c.drain()  # backpressure: a slow client slows the relayed process
            return
        view = memoryview(data)
        while view:
            n = await c.credit(channel, len(view))  # a slow reader of this channel waits here
            if n == 0 or self._live() is not c:
                return  # the client went away: output is dropped, as without a client
            c.send(wire.encode_data(channel, bytes(view[:n])))
            view = view[n:]
        await c.drain()

    def close(self, channel: int) -> None:
        c = self._live()
        if c is not None:
            c.send(wire.encode_close(channel))
            c.forget(channel)

    def event(self, message: dict[str, Any]) -> None:
        c = self._live()
        if c is None:
            self._queued.append(message)
        else:
            c.send(wire.encode_control(message))

    def attach(self, conn: Connection) -> None:
        """`conn` said hello: it is the client now; queued events go to it."""
        self.conn = conn
        queued, self._queued = self._queued, []
        for message in queued:
            conn.send(wire.encode_control(message))

    def detach(self, conn: Connection) -> None:
        if self.conn is conn:
            self.conn = None


Handler = Callable[[Mapping[str, Any]], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class LazySupervisor:
    """How to build the Supervisor when a request first needs it (``build``, in the event
    loop's thread) and how to import its modules ahead of that (``preload``, in a thread)."""

    build: Callable[[], Supervisor]
    preload: Callable[[], None]


class Server:
    """Serves the protocol over the Supervisor.

    ``supervisor`` may be a `LazySupervisor`: then the container machinery (ccpu.agent.container and what
    it imports: runc, live, mounts, stdio, oom, limits, the reaper's libc) is built only when a
    request first needs it, and the agent answers ``hello`` without it.  In a guest under TCG
    those imports are ~half of the boot -> ready time (docs/vm.md "The agent's imports"); the
    shim (and the pool) waits only for ``hello``.  `preload` imports them in a thread right
    after the first ``hello``, so a pooled VM has them before its sandbox's first request.
    """

    def __init__(self, supervisor: Supervisor | LazySupervisor, outbox: Outbox,
                 orphan_grace: float | None = None, nics: bool = False, repo: LocalRepo | None = None,
                 tls_spki: bytes | None = None, init_done: str | None = None) -> None:
        self._sup: Supervisor | None = None
        self._factory: Callable[[], Supervisor] | None = None
        self._preload: Callable[[], None] | None = None
        if isinstance(supervisor, LazySupervisor):
            self._factory, self._preload = supervisor.build, supervisor.preload
        else:
            self._sup = supervisor
        self._preloading: asyncio.Future[None] | None = None
        self.orphan_grace = orphan_grace  # TCP: reap a lost owner's containers after this (s)
        self._orphans: asyncio.Task[None] | None = None
        self.outbox = outbox
        self.stopped = asyncio.Event()  # set by `shutdown`
        self._tasks: set[asyncio.Task[None]] = set()
        self._count = 0
        self.owner: str | None = None  # the identity that owns the containers (TCP + TLS)
        self._ops: dict[str, Handler] | None = None
        # configuring NICs: only a guest's agent (--nics); on the host it would take the host's
        self._nics = nics
        # a machine's own layer repo (remote mode, --repo): layers streamed by the shim
        self.repo = repo
        self._pulls: dict[int, tuple[Receiver, asyncio.Event, Connection]] = {}
        # a TPM quote of what this guest booted (shim/vm.py asks before any container): only a
        # guest's agent, and only with a TPM and tpm2-tools (a VM booted with vm.attest)
        self._attest = nics and hello_.attest_available()
        self.features = hello_.features(nics, repo is not None, self._attest)
        self.tls_spki = tls_spki  # sha256 of the SPKI of this machine's boot TLS key (--tls-ca-pin)
        # a guest's init finishes its boot (shares, NICs, modules) beside the agent: every request
        # but `hello`/`shutdown` waits for this file (--init-done; ccpu/guest/init.sh)
        self._init_done = init_done

    @property
    def sup(self) -> Supervisor:
        """The Supervisor, built on first use (the container modules are imported then)."""
        if self._sup is None:
            assert self._factory is not None
            self._sup = self._factory()
            self._factory = None
        return self._sup

    @property
    def loaded(self) -> bool:
        """Whether the Supervisor exists (no container can exist before it does)."""
        return self._sup is not None

    def container_count(self) -> int:
        return len(self._sup.containers) if self._sup is not None else 0

    def ops(self) -> dict[str, Handler]:
        if self._ops is None:
            from . import diagnose, live

            sup = self.sup
            self._ops = {
                "create": sup.create,
                "start": sup.start,
                "exec": sup.exec,
                "kill": sup.kill,
                "resize_pty": sup.resize_pty,
                "close_stdin": sup.close_stdin,
                "pause": sup.pause,
                "resume": sup.resume,
                "state": sup.state,
                "pids": sup.pids,
                "stats": sup.stats,
                "update": sup.update,
                "delete": sup.delete,
                "layers": lambda args: live.layers_op(sup, args),
                "restack": lambda args: live.restack_op(sup, args),
                "diagnose": diagnose.diagnose_op,
            }
            if self._nics:
                from . import nic

                self._ops["nic"] = lambda args: nic.nic_op(sup.reaper, args)
            if self.repo is not None:
                self._ops.update({"layers_have": self._layers_have, "layers_pull": self._layers_pull,
                                  "layers_release": self._layers_release})
            if self._attest:
                from . import tpm

                # a machine's boot TLS key: every quote binds it (qualifying data), never the bare nonce
                self._ops["attest"] = lambda args: tpm.attest_op(sup.reaper, args, bind=self.tls_spki)
        return self._ops

    def _start_preload(self) -> None:
        """Import the container machinery in a thread, once, after the first `hello` was sent:
        the event loop keeps serving meanwhile (a request that needs the modules first waits on
        the import lock, as it would have waited for the import itself)."""
        if self._preload is None or self._preloading is not None or self._sup is not None:
            return
        self._preloading = asyncio.get_running_loop().run_in_executor(None, self._preload)
        self._preloading.add_done_callback(_preload_done)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    identity: str | None = None, greeted: hello_.Greeted | None = None) -> None:
        """Serve one connection until it closes or breaks the protocol.  ``identity``: the
        peer's authenticated identity (its TLS certificate's fingerprint), None on a local link.
        ``greeted``: its first `hello` was answered already (hello.answer_first, before this
        process imported asyncio; its bytes past the `hello` are in ``reader`` already)."""
        self._count += 1
        conn = Connection(writer, f"conn{self._count}")
        conn.identity = identity
        log.debug("%s: connected", conn.name)
        if greeted is not None:
            self._greeted(conn, greeted.window)
        try:
            while True:
                frame = await wire.read_frame(reader)
                if frame is None or conn.closed:
                    break
                if frame.kind is wire.Kind.CONTROL:
                    self._on_control(conn, wire.decode_control(frame))
                elif not conn.ready:
                    continue
                elif frame.kind is wire.Kind.DATA:
                    pull = self._pulls.get(frame.channel)
                    if pull is not None and pull[2] is conn:
                        pull[0].feed(frame.payload)  # to its temp file: the socket is the buffer
                    else:
                        self.sup.stdin_data(frame.channel, frame.payload)
                elif frame.kind is wire.Kind.WINDOW:
                    conn.grant(frame.channel, wire.decode_window(frame))
                else:
                    pull = self._pulls.get(frame.channel)
                    if pull is not None and pull[2] is conn:
                        pull[0].close()
                        pull[1].set()
                    else:
                        self.sup.stdin_close(frame.channel)
        except wire.ProtocolError as e:
            log.warning("%s: protocol error: %s", conn.name, e)
        except (ConnectionError, OSError) as e:
            log.debug("%s: connection error: %s", conn.name, e)
        finally:
            log.debug("%s: disconnected", conn.name)
            for ch, (rx, done, by) in list(self._pulls.items()):
                if by is conn:  # a stream cut short: its pull fails, its temp file goes
                    rx.error = rx.error or "the connection closed before the layer's end"
                    rx.close()
                    done.set()
                    if not rx.claimed:  # no request waits for it: nobody else removes the file
                        del self._pulls[ch]
                        rx.discard()
            owner_lost = conn.ready and self.outbox.conn is conn and conn.identity is not None
            self.outbox.detach(conn)
            conn.close()
            if owner_lost and self.orphan_grace is not None and self.container_count() and not self.stopped.is_set():
                log.warning("%s: the owner's connection broke with %d containers; reaping them in %gs "
                            "unless it comes back", conn.name, self.container_count(), self.orphan_grace)
                self._orphans = asyncio.ensure_future(self._reap_orphans(self.orphan_grace))

    async def _reap_orphans(self, grace: float) -> None:
        """Kill and delete every container of an owner that did not come back."""
        await asyncio.sleep(grace)
        if self.outbox.conn is not None:
            return  # the owner is back
        for cid in list(self.sup.containers):
            try:
                await self._reap(cid)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the next container still goes
                log.exception("reaping container %s of a lost owner", cid)
        if not self.sup.containers:
            self.owner = None

    async def _reap(self, cid: str) -> None:
        async with self.sup.serialized(cid):
            with contextlib.suppress(protocol.AgentError):
                await self.sup.kill({"container": cid, "signal": 9, "all": True})
        for _ in range(600):  # the init's exit is reported within seconds of SIGKILL
            if self.outbox.conn is not None:
                return  # the owner came back meanwhile: the rest is its business
            try:
                async with self.sup.serialized(cid):
                    await self.sup.delete({"container": cid})
            except protocol.NotFound:
                return
            except protocol.FailedPrecondition:
                await asyncio.sleep(0.1)
                continue
            log.warning("reaped container %s of a lost owner", cid)
            if self.repo is not None:
                self.repo.release(cid)  # no shim will send layers_release for it
            return

    def _on_control(self, conn: Connection, msg: dict[str, Any]) -> None:
        rid = msg.get("id")
        op = msg.get("op")
        args = msg.get("args", {})
        if args is None:
            args = {}
        if isinstance(rid, bool) or not isinstance(rid, int) or rid <= 0:
            raise wire.ProtocolError(f"request without a positive integer id: {str(msg)[:200]}")
        if not isinstance(op, str) or not isinstance(args, dict):
            conn.send(wire.encode_control(protocol.response_error(rid, protocol.InvalidArgument("malformed request"))))
            return
        if not conn.ready:
            current = self.outbox.conn
            if current is not None and current is not conn and not current.closed:
                err: protocol.AgentError = protocol.Unavailable("another client is connected")
                conn.send(wire.encode_control(protocol.response_error(rid, err)))
                conn.close()
                return
            if op != "hello":
                err = protocol.FailedPrecondition("the first request must be hello")
                conn.send(wire.encode_control(protocol.response_error(rid, err)))
                conn.close()
                return
            try:
                self._check_owner(conn)
                result, window = hello_.respond(args, self.features, self.repo.root if self.repo is not None else None)
            except protocol.AgentError as e:
                conn.send(wire.encode_control(protocol.response_error(rid, e)))
                conn.close()
                return
            conn.send(wire.encode_control(protocol.response_ok(rid, result)))
            self._greeted(conn, window)
            return
        if op == "layers_pull" and self.repo is not None:
            self._reserve_pull(conn, args)  # before the data frames that follow the request
        if op in ("create", "exec"):
            # keep stdin data that follows this request until the process exists
            ch = args.get("stdin")
            if isinstance(ch, int) and not isinstance(ch, bool) and ch > 0:
                self.sup.reserve_stdin(ch)
        task = asyncio.ensure_future(self.handle_request(conn, rid, op, args))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- layers streamed to a machine's repo (ccpu/agent/layerpull.py) -------------------------

    def _reserve_pull(self, conn: Connection, args: dict[str, Any]) -> None:
        """A receiver for the pull's data channel, registered as its request arrives; a bad
        request registers nothing (its handler answers the same error)."""
        from .layerpull import LayerBlob

        assert self.repo is not None
        try:
            protocol.validate_id(args.get("container"), "container id")
            blob = LayerBlob.from_args(args, self.repo.max_blob)
            ch = protocol.arg_channel(args, "channel")
        except protocol.AgentError:
            return
        if ch and ch not in self._pulls:
            self._pulls[ch] = (self.repo.receiver(blob), asyncio.Event(), conn)

    async def _layers_have(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """{container, chain_ids} -> {missing, repo}: the container references the others."""
        assert self.repo is not None
        cid = protocol.validate_id(args.get("container"), "container id")
        chains = protocol.arg_list(args, "chain_ids")
        if len(chains) > 1024 or not all(isinstance(c, str) for c in chains):
            raise protocol.InvalidArgument("chain_ids must be at most 1024 strings")
        missing = self.repo.have(cid, chains)
        return {"missing": missing, "layers": self.repo.layers}

    async def _layers_pull(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """{container, chain_id, diff_id, digest, media_type, size, channel}: the blob follows
        on ``channel``; answered once it is verified and unpacked -> {path, transfers}."""
        from .layerpull import LayerBlob

        assert self.repo is not None
        cid = protocol.validate_id(args.get("container"), "container id")
        blob = LayerBlob.from_args(dict(args), self.repo.max_blob)  # the refusal _reserve_pull met
        ch = protocol.arg_channel(args, "channel")
        pull = self._pulls.get(ch)
        if not ch or pull is None or pull[0].claimed or pull[0].blob != blob:
            raise protocol.InvalidArgument(f"channel {ch} is not free for a layer stream")
        rx, done, _ = pull
        rx.claimed = True
        try:
            await done.wait()
            path = await asyncio.to_thread(self.repo.publish, cid, rx)
        finally:
            self._pulls.pop(ch, None)
            rx.close()
        log.info("layer %s received (%d bytes) for %s -> %s", rx.blob.chain_id, rx.received, cid, path)
        return {"path": path, "transfers": self.repo.transfers}

    async def _layers_release(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """{container[, chain_ids]} -> {removed}: the layers nobody uses any more are gone."""
        assert self.repo is not None
        cid = protocol.validate_id(args.get("container"), "container id")
        chains = protocol.arg_list(args, "chain_ids", None)
        if chains is not None and not all(isinstance(c, str) for c in chains):
            raise protocol.InvalidArgument("chain_ids must be strings")
        return {"removed": self.repo.release(cid, chains)}

    def _check_owner(self, conn: Connection) -> None:
        """A client of another identity may not take over existing containers."""
        if self.owner is not None and conn.identity != self.owner and self.container_count():
            log.warning("%s: refused: identity %s is not %s, which owns %d containers", conn.name,
                        conn.identity, self.owner, self.container_count())
            raise protocol.FailedPrecondition(
                f"this agent's {self.container_count()} containers belong to another client "
                f"identity ({self.owner}); yours is {conn.identity}")

    def _greeted(self, conn: Connection, window: int | None) -> None:
        """``conn`` got its `hello` answered: it is the client now."""
        conn.window = window
        conn.ready = True
        self.owner = conn.identity
        if self._orphans is not None:
            self._orphans.cancel()  # the owner is back (or the containers are gone)
            self._orphans = None
        self.outbox.attach(conn)
        self._start_preload()

    async def handle_request(self, conn: Connection, rid: int, op: str, args: dict[str, Any]) -> None:
        try:
            try:
                result = await self._dispatch(op, args)
            except OSError as e:
                if e.errno not in protocol.NO_SPACE:
                    raise
                # a full filesystem is the caller's to know about, not a bug: say which one
                log.warning("%s %s: %s", op, args.get("container", ""), e)
                raise protocol.ResourceExhausted(f"{op}: {e.strerror}: {self.sup.full_filesystem(e.filename or '/')}") from None
            response = protocol.response_ok(rid, result)
        except protocol.AgentError as e:
            response = protocol.response_error(rid, e)
            if op in ("create", "exec") and isinstance(args.get("stdin"), int) and args["stdin"] > 0:
                if op == "create" or not self._exec_exists(args):
                    self.sup.release_stdin(args["stdin"])
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("%s %s failed", op, args.get("container", ""))
            response = protocol.response_error(rid, protocol.Internal(f"{type(e).__name__}: {e}"))
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s %s -> %s", op, _brief(args), _brief(response))
        conn.send(wire.encode_control(response))
        if op == "shutdown" and response.get("ok"):
            self.owner = None
            await conn.drain()
            self.stopped.set()

    async def _warm(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """The ``warm`` op (``container``: false skips the throw-away container): what a sandbox's first ``create`` would otherwise do
        first, done now -- the container modules' import (the preload) awaited, the Supervisor
        built (its reaper, the guest's container cgroup), runc's warm-up (Runc.warm) and one throw-away
        container's whole life cycle (ccpu/agent/warmup.py: create, start, exit, delete, everything
        removed and checked gone; ``container.left`` lists anything that was not).  The
        pool calls it before it offers a guest (shim/poold.py), so the sandbox that adopts the
        guest finds its create path hot.  Nothing of a sandbox exists yet and nothing is kept
        but the page cache and the loaded code, which every sandbox would load the same way."""
        import time

        t0 = time.monotonic()
        if self._preloading is not None:
            with contextlib.suppress(Exception):  # the build below imports (and reports) again
                await self._preloading
        out = await self.sup.runc.warm()
        if not protocol.arg_bool(args, "container", True):
            out["container"] = {"ok": False, "skipped": "not asked for", "left": []}
        elif self.container_count():  # a sandbox's guest already: its own creates are warm enough
            out["container"] = {"ok": False, "skipped": f"{self.container_count()} containers exist", "left": []}
        else:
            from .warmup import container_life_cycle

            if self._init_done is not None:  # the overlay module and the rest of the boot
                await self._wait_init_done()

            out["container"] = await container_life_cycle(self.sup)
        return {**out, "seconds": round(time.monotonic() - t0, 3)}

    def _exec_exists(self, args: Mapping[str, Any]) -> bool:
        if self._sup is None:
            return False
        c = self._sup.containers.get(str(args.get("container")))
        return c is not None and str(args.get("exec")) in c.execs

    async def _dispatch(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        if op == "hello":
            raise protocol.FailedPrecondition("hello was already done on this connection")
        if op == "warm":
            return await self._warm(args)
        if op == "shutdown":
            if self.container_count():
                raise protocol.FailedPrecondition(f"{self.container_count()} containers exist")
            if self._sup is not None:
                await self._sup.settle()
            return {}
        if self._init_done is not None:
            await self._wait_init_done()
        handler = self.ops().get(op)
        if handler is None:
            raise protocol.Unimplemented(f"unknown operation {op!r}")
        cid = args.get("container")
        if not isinstance(cid, str):
            return await handler(args)  # the handler refuses the missing/bad id
        async with self.sup.serialized(cid):
            return await handler(args)


    async def _wait_init_done(self) -> None:
        """Wait (bounded: INIT_DONE_WAIT s) until the guest's init has finished the boot steps it
        runs beside the agent; Unavailable if it never does (the init powers the guest off when a
        step fails, so this is a hung step)."""
        path = self._init_done
        assert path is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + INIT_DONE_WAIT
        while not os.path.exists(path):
            if loop.time() > deadline:
                raise protocol.Unavailable(f"the guest's init has not finished booting ({path} missing after "
                                           f"{INIT_DONE_WAIT:.0f} s)")
            await asyncio.sleep(0.02)
        self._init_done = None


#: seconds a request waits for the guest's init to finish booting (--init-done)
INIT_DONE_WAIT = 300.0


def _preload_done(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled() and fut.exception() is not None:  # the first request will say it again
        log.warning("preloading the container modules failed: %s", fut.exception())


def _brief(value: Any) -> str:
    text = str(value)
    return text if len(text) < 300 else text[:300] + "..."
