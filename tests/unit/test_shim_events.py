"""Event publisher: ordered delivery over ttrpc, retries when containerd is not there yet."""

from __future__ import annotations

import asyncio
import tempfile

from google.protobuf import empty_pb2

from ccpu.api.gen.containerd.events import task_pb2 as ev
from ccpu.api.gen.containerd.services.ttrpc.events.v1 import events_pb2
from ccpu.ttrpc import Code, Server, TtrpcError
from shim.events import SERVICE, Publisher


def test_publisher_orders_and_retries() -> None:
    async def go() -> list[tuple[str, str, str]]:
        d = tempfile.mkdtemp(prefix="ev", dir="/tmp")
        path = f"{d}/ttrpc.sock"
        got: list[tuple[str, str, str]] = []
        fail_first = [True]

        async def forward(req: events_pb2.ForwardRequest, ctx) -> empty_pb2.Empty:  # noqa: ANN001
            if fail_first[0]:
                fail_first[0] = False
                raise TtrpcError(Code.UNAVAILABLE, "not yet")
            e = req.envelope
            got.append((e.namespace, e.topic, e.event.type_url))
            return empty_pb2.Empty()

        pub = Publisher(path, backoff=0.01)
        # published before the server even exists: retried until it does
        pub.publish("ns", ev.TaskCreate(container_id="c"))
        pub.publish("ns", ev.TaskStart(container_id="c"))
        await asyncio.sleep(0.05)
        server = Server()
        server.register(SERVICE, {"Forward": (events_pb2.ForwardRequest, forward)})
        await server.serve_unix(path)
        pub.publish("ns", ev.TaskExit(container_id="c", id="c"))
        pub.publish("ns", ev.TaskDelete(container_id="c"))
        await pub.flush(5)
        await pub.close()
        await server.close()
        return got

    got = asyncio.run(go())
    assert got == [("ns", "/tasks/create", "containerd.events.TaskCreate"),
                   ("ns", "/tasks/start", "containerd.events.TaskStart"),
                   ("ns", "/tasks/exit", "containerd.events.TaskExit"),
                   ("ns", "/tasks/delete", "containerd.events.TaskDelete")]
