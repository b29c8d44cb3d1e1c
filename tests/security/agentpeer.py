"""A hostile agent for the real shim: the shim's agent client + Task service on one end of a
socketpair, a scripted peer speaking the agent wire format on the other.

Why not the real agent: in VM mode guest root can write anything to the virtio-serial port, so
the shim must survive frames no honest agent sends.  Everything on the shim side here is the
shim's own code (``ccpu.agent.client.AgentClient``, ``shim.agentsandbox.AgentSandbox``,
``shim.task.TaskService`` served through ``shim.errors.at_edge``, ``shim.stdio.ProcessIO``);
only the agent is replaced by :class:`Peer`, which answers requests like an agent and lets a
test inject raw bytes.

Used in-process by the targeted tests and as a script (``python3 -m tests.security.agentpeer
fuzz ...``) by the RSS tests, so the memory measured is a fresh process's, not pytest's.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import Callable
from typing import Any

from ccpu.agent import wire
from ccpu.agent.client import AgentClient
from ccpu.api.gen.containerd.runtime.v2.task import shim_pb2 as pb
from ccpu.ttrpc import RequestContext
from shim.agentsandbox import AgentSandbox
from shim.errors import at_edge
from shim.task import TaskService

CTX = RequestContext(service="containerd.task.v2.Task", method="x")


class PeerSandbox(AgentSandbox):
    """The shim's agent sandbox, its agent already connected (to the Peer)."""

    mode = "host"

    def __init__(self, client: AgentClient) -> None:
        super().__init__()
        self._client = client

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode}


class Peer:
    """The agent's end: answers requests (hello, create, start, ...) and sends what it is told."""

    def __init__(self, sock: socket.socket, *, flow: bool = True) -> None:
        self.sock = sock
        self.flow = flow
        self.requests: list[dict[str, Any]] = []
        self.grants: dict[int, int] = {}  # channel -> bytes granted by the shim
        self.results: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {}
        self.next_pid = 100
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(sock=self.sock, limit=1 << 21)
        self._task = asyncio.ensure_future(self._serve())

    def send(self, raw: bytes) -> None:
        assert self._writer is not None
        if not self._writer.is_closing():
            self._writer.write(raw)

    async def drain(self) -> None:
        """Wait until the shim took what was sent (nothing to wait for once it hung up)."""
        assert self._writer is not None
        try:
            await self._writer.drain()
        except ConnectionError:
            pass

    def event(self, **fields: Any) -> None:
        self.send(wire.encode_control(fields))

    def _answer(self, msg: dict[str, Any]) -> dict[str, Any]:
        op, args = msg.get("op"), msg.get("args") or {}
        if op in self.results:
            return self.results[op](args)
        if op == "hello":
            res: dict[str, Any] = {"version": 1, "agent_pid": 1, "features": [], "kernel": "x"}
            if self.flow and "window" in args:
                res.update(features=["flow"], window=args["window"])
            return res
        if op in ("create", "start"):
            self.next_pid += 1
            return {"pid": self.next_pid}
        if op == "delete":
            return {"pid": 0, "exit_status": 0, "exited_at": 0}
        return {}

    async def _serve(self) -> None:
        assert self._reader is not None
        while True:
            try:
                frame = await wire.read_frame(self._reader)
            except (ConnectionError, wire.ProtocolError):
                return
            if frame is None:
                return
            if frame.kind is getattr(wire.Kind, "WINDOW", None):
                self.grants[frame.channel] = self.grants.get(frame.channel, 0) + wire.decode_window(frame)
            elif frame.kind is wire.Kind.CONTROL:
                msg = wire.decode_control(frame)
                self.requests.append(msg)
                self.send(wire.encode_control({"id": msg["id"], "ok": True, "result": self._answer(msg)}))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._writer is not None:
            self._writer.close()


class Shim:
    """The real shim side wired to a :class:`Peer`."""

    def __init__(self, client: AgentClient, peer: Peer) -> None:
        self.client = client
        self.peer = peer
        self.events: list[Any] = []
        self.svc = TaskService(PeerSandbox(client), lambda ns, e: self.events.append(e), "ns")
        #: the handlers as containerd reaches them (errors as ttrpc statuses)
        self.rpc = {name: fn for name, (_, fn) in at_edge(self.svc.methods()).items()}
        client.set_event_handler(self.svc.on_agent_event)
        client.add_lost_handler(self.svc.on_agent_lost)

    @classmethod
    async def start(cls, *, flow: bool = True) -> Shim:
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        theirs.setblocking(False)
        peer = Peer(theirs, flow=flow)
        await peer.start()
        client = await AgentClient.connect_socket(ours)
        shim = cls(client, peer)
        await client.hello()
        return shim

    async def create(self, cid: str, bundle: str = "/nonexistent", **io: str) -> int:
        r = await self.rpc["Create"](pb.CreateTaskRequest(id=cid, bundle=bundle, **io), CTX)
        return int(r.pid)

    async def start_task(self, cid: str) -> int:
        return int((await self.rpc["Start"](pb.StartRequest(id=cid), CTX)).pid)

    async def state(self, cid: str) -> pb.StateResponse:
        return await self.rpc["State"](pb.StateRequest(id=cid), CTX)

    async def close(self) -> None:
        for c in list(self.svc.tasks.containers.values()):
            for p in (c.init, *c.execs.values()):
                if p.io is not None:
                    p.io.close()
        await self.client.close()
        await self.peer.close()
        for t in list(self.svc._exit_tasks):
            t.cancel()


def frame(length: int, channel: int, kind: int, payload: bytes = b"") -> bytes:
    """A raw frame, header fields as given (may lie about the length)."""
    return struct.pack(">IIB", length, channel, kind) + payload


# ---------------------------------------------------------------------------------------------
# script mode: a flood in a fresh process, its peak RSS printed as JSON (see the RSS tests)


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def _flood(kind: str, count: int) -> dict[str, Any]:
    import os
    import tempfile

    shim = await Shim.start(flow=False)  # a hostile agent: ignores flow control
    with tempfile.TemporaryDirectory() as tmp:
        fifo, fifo_in = os.path.join(tmp, "out"), os.path.join(tmp, "in")
        os.mkfifo(fifo)
        os.mkfifo(fifo_in)
        await shim.create("c1", stdout=fifo, stdin=fifo_in)  # nobody ever reads the FIFO
        await shim.start_task("c1")
        # "stdin": the agent sends output on the process's stdin channel (nobody reads that)
        ch = shim.svc.tasks.process("c1").io.channels["stdin" if kind == "stdin" else "stdout"]
        await asyncio.sleep(0)
        base = _rss_kib()
        peak = base
        chunk = b"x" * 65536
        for i in range(count):
            if kind == "exit":
                shim.peer.event(event="exit", container="c1", exec="", pid=101, exit_status=0,
                                exited_at=1)
            elif kind in ("output", "stdin"):
                shim.peer.send(wire.encode_data(ch, chunk))
            if i % (256 if kind == "exit" else 8) == 7:
                await shim.peer.drain()
                await asyncio.sleep(0)
                peak = max(peak, _rss_kib())
        await shim.peer.drain()
        for _ in range(50):
            await asyncio.sleep(0.01)
        peak = max(peak, _rss_kib())
        out = {"base_kib": base, "peak_kib": peak, "growth_kib": peak - base,
               "tasks": len(shim.svc._exit_tasks), "dropped": dict(getattr(shim.svc, "dropped_events", {})),
               "lost": shim.client.closed}
        await shim.close()
    return out


def random_frame(rng: Any, channels: list[int]) -> bytes:
    """One frame a hostile agent might send: well-formed or not, plausible or not."""
    pick = rng.random()
    big = [0, 1, -1, 255, 256, 2**31, 2**32, 2**40, 2**64, 2**70, 10**30]
    anything = [None, True, "", "c1", "x" * rng.randint(0, 3000), [], {}, 1.5, *big]
    if pick < 0.35:
        msg: dict[str, Any] = {"event": rng.choice(["exit", "oom", "bogus", 7, None]),
                               "container": rng.choice(["c1", "c2", "nope", *anything]),
                               "exec": rng.choice(["", "e1", *anything]),
                               "pid": rng.choice(big + anything),
                               "exit_status": rng.choice(big + anything),
                               "exited_at": rng.choice(big + anything)}
        return wire.encode_control({k: v for k, v in msg.items() if rng.random() < 0.9})
    if pick < 0.45:  # responses to requests never made, or with junk ids
        return wire.encode_control({"id": rng.choice(big + anything), "ok": rng.choice([True, False, None]),
                                    "result": rng.choice(anything), "error": rng.choice(anything)})
    if pick < 0.75:
        return wire.encode_data(rng.choice(channels + [rng.randint(1, 2**32 - 1)]),
                                rng.randbytes(rng.randint(1, 70000)))
    if pick < 0.9:
        return wire.encode_close(rng.choice(channels + [rng.randint(1, 2**32 - 1)]))
    if pick < 0.98:  # nesting, constants, non-objects: protocol errors
        return frame(0, 0, 1) if rng.random() < 0.1 else wire.encode(wire.Frame(0, wire.Kind.CONTROL, rng.choice(
            [b"[" * 5000 + b"]" * 5000, b'{"a":' * 100 + b"1" + b"}" * 100, b'{"x": NaN}', b'{"x": Infinity}',
             b"[]", b"\xff\xfe", b"null"])))
    return rng.randbytes(rng.randint(1, 40))  # garbage: whatever the header says


async def _fuzz(count: int, seed: int) -> dict[str, Any]:
    """`count` random frames through fresh shims (a new one after each protocol error), peak
    RSS of this process over all of them."""
    import os
    import random
    import tempfile

    rng = random.Random(seed)
    base = peak = 0
    sent = reconnects = 0
    with tempfile.TemporaryDirectory() as tmp:
        while sent < count:
            shim = await Shim.start(flow=rng.random() < 0.5)
            fifo, fifo_in = os.path.join(tmp, f"out{reconnects}"), os.path.join(tmp, f"in{reconnects}")
            os.mkfifo(fifo)
            os.mkfifo(fifo_in)
            await shim.create("c1", stdout=fifo, stdin=fifo_in)  # nobody reads stdout
            await shim.start_task("c1")
            channels = [shim.svc.tasks.process("c1").io.channels[n] for n in ("stdout", "stdin")]
            if not base:
                base = peak = _rss_kib()
            while sent < count and not shim.client.closed:
                shim.peer.send(random_frame(rng, channels))
                sent += 1
                if sent % 16 == 0:
                    await shim.peer.drain()
                    await asyncio.sleep(0)
                    peak = max(peak, _rss_kib())
            await asyncio.sleep(0.005)
            await shim.state("c1")  # the Task service still answers
            peak = max(peak, _rss_kib())
            await shim.close()
            os.unlink(fifo)
            os.unlink(fifo_in)
            reconnects += 1
    return {"base_kib": base, "peak_kib": peak, "growth_kib": peak - base, "frames": sent,
            "connections": reconnects}


def main(argv: list[str]) -> int:
    kind, count = argv[0], int(argv[1])
    if kind == "fuzz":
        result = asyncio.run(_fuzz(count, int(argv[2]) if len(argv) > 2 else 0))
    else:
        result = asyncio.run(_flood(kind, count))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
