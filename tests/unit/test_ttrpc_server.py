"""ttrpc server and client over real unix sockets: dispatch, errors, robustness, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import struct
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

from ccpu.api.gen.containerd.runtime.v2.task import shim_pb2
from ccpu.ttrpc import Client, Code, RequestContext, Server, TtrpcError
from ccpu.ttrpc.framing import (
    MAX_DATA_LENGTH,
    Flags,
    Frame,
    MessageType,
    encode_frame,
    read_frame,
)
from ccpu.ttrpc.messages import Request, Response

TASK = "containerd.task.v2.Task"


@pytest.fixture
def sock_dir() -> Iterator[str]:
    # Short path: unix socket paths are limited to ~107 bytes, pytest's tmp_path can exceed it.
    d = tempfile.mkdtemp(prefix="ttrpc-", dir="/tmp")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def run(coro: Awaitable[Any], limit: float = 5.0) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(limit):
            return await coro

    return asyncio.run(bounded())


class Handlers:
    """Test service: State echoes, Wait blocks until released, Kill fails on demand."""

    def __init__(self) -> None:
        self.release_wait = asyncio.Event()
        self.seen: list[RequestContext] = []
        self.cancelled: list[str] = []
        self.started = asyncio.Event()

    async def state(self, req: Any, ctx: RequestContext) -> Any:
        self.seen.append(ctx)
        return shim_pb2.StateResponse(
            id=req.id, exec_id=req.exec_id, pid=4242, status=2, stdout="/dev/null"
        )

    async def wait(self, req: Any, ctx: RequestContext) -> Any:
        self.started.set()
        try:
            await self.release_wait.wait()
        except asyncio.CancelledError:
            self.cancelled.append(req.id)
            raise
        return shim_pb2.WaitResponse(exit_status=7)

    async def kill(self, req: Any, ctx: RequestContext) -> Any:
        if req.signal == 1:
            raise TtrpcError(Code.NOT_FOUND, f"task {req.id} not found")
        if req.signal == 2:
            raise ValueError("boom from handler")
        if req.signal == 3:
            raise TimeoutError()
        return None  # not a message

    def table(self) -> dict[str, Any]:
        return {
            "State": (shim_pb2.StateRequest, self.state),
            "Wait": (shim_pb2.WaitRequest, self.wait),
            "Kill": (shim_pb2.KillRequest, self.kill),
        }


@contextlib.asynccontextmanager
async def serving(sock_dir: str) -> AsyncIterator[tuple[Server, str, Handlers]]:
    handlers = Handlers()
    server = Server()
    server.register(TASK, handlers.table())
    path = os.path.join(sock_dir, "s.sock")
    await server.serve_unix(path)
    try:
        yield server, path, handlers
    finally:
        handlers.release_wait.set()
        await server.shutdown(grace=1)


async def state_call(client: Client, task_id: str = "c1", **kw: Any) -> Any:
    return await client.call(
        TASK, "State", shim_pb2.StateRequest(id=task_id), shim_pb2.StateResponse, **kw
    )


# -- raw wire helpers ------------------------------------------------------------------------


async def raw_connect(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_unix_connection(path)


def request_frame(
    stream_id: int,
    method: str = "State",
    payload: bytes | None = None,
    *,
    service: str = TASK,
    timeout_nano: int = 0,
    flags: int = 0,
) -> bytes:
    if payload is None:
        payload = shim_pb2.StateRequest(id=f"s{stream_id}").SerializeToString()
    req = Request(service=service, method=method, payload=payload, timeout_nano=timeout_nano)
    return encode_frame(stream_id, MessageType.REQUEST, flags, req.SerializeToString())


async def read_response(reader: asyncio.StreamReader) -> tuple[int, Any]:
    frame = await read_frame(reader)
    assert frame is not None, "server closed the connection"
    assert frame.msg_type == MessageType.RESPONSE and frame.flags == 0
    return frame.stream_id, Response.FromString(frame.data)


# -- behaviour -------------------------------------------------------------------------------


def test_unary_call_with_real_task_messages(sock_dir: str) -> None:
    async def go() -> None:
        async with serving(sock_dir) as (_, path, handlers):
            async with await Client.connect(path) as client:
                resp = await client.call(
                    TASK,
                    "State",
                    shim_pb2.StateRequest(id="ctr-1", exec_id="exec-9"),
                    shim_pb2.StateResponse,
                )
        assert (resp.id, resp.exec_id, resp.pid, resp.status) == ("ctr-1", "exec-9", 4242, 2)
        assert handlers.seen[0].service == TASK and handlers.seen[0].method == "State"
        assert handlers.seen[0].deadline is None

    run(go())


def test_slow_call_does_not_block_fast_one(sock_dir: str) -> None:
    async def go() -> None:
        async with serving(sock_dir) as (_, path, handlers):
            async with await Client.connect(path) as client:
                order: list[str] = []

                async def slow() -> None:
                    r = await client.call(
                        TASK, "Wait", shim_pb2.WaitRequest(id="a"), shim_pb2.WaitResponse
                    )
                    order.append(f"wait:{r.exit_status}")

                slow_task = asyncio.create_task(slow())
                await handlers.started.wait()
                r = await state_call(client, "b")
                order.append(f"state:{r.id}")
                assert not slow_task.done()
                handlers.release_wait.set()
                await slow_task
                assert order == ["state:b", "wait:7"]

    run(go())


def test_responses_go_out_of_order_on_the_wire(sock_dir: str) -> None:
    async def go() -> None:
        async with serving(sock_dir) as (_, path, handlers):
            reader, writer = await raw_connect(path)
            wait_payload = shim_pb2.WaitRequest(id="w").SerializeToString()
            writer.write(request_frame(1, "Wait", wait_payload) + request_frame(3, "State"))
            sid, resp = await read_response(reader)
            assert sid == 3 and shim_pb2.StateResponse.FromString(resp.payload).id == "s3"
            handlers.release_wait.set()
            sid, resp = await read_response(reader)
            assert sid == 1 and resp.status.code == 0
            assert shim_pb2.WaitResponse.FromString(resp.payload).exit_status == 7
            writer.close()

    run(go())


def test_client_uses_odd_increasing_stream_ids() -> None:
    async def go() -> list[int]:
        seen: list[int] = []

        async def fake_server(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            for _ in range(3):
                frame = await read_frame(r)
                assert frame is not None
                seen.append(frame.stream_id)
                resp = Response(payload=shim_pb2.StateResponse(pid=frame.stream_id)
                                .SerializeToString())
                w.write(encode_frame(frame.stream_id, MessageType.RESPONSE, 0,
                                     resp.SerializeToString()))
            w.close()

        d = tempfile.mkdtemp(prefix="ttrpc-", dir="/tmp")
        try:
            path = os.path.join(d, "f.sock")
            srv = await asyncio.start_unix_server(fake_server, path=path)
            async with await Client.connect("unix://" + path) as client:
                pids = [(await state_call(client)).pid for _ in range(3)]
            srv.close()
        finally:
            shutil.rmtree(d, ignore_errors=True)
        assert pids == seen  # each answer matched to its own stream
        return seen

    assert run(go()) == [1, 3, 5]


def test_unknown_service_and_method_are_unimplemented(sock_dir: str) -> None:
    async def go() -> None:
        async with serving(sock_dir) as (_, path, _h):
            async with await Client.connect(path) as client:
                with pytest.raises(TtrpcError) as ei:
                    await client.call(TASK, "Checkpoint", shim_pb2.CheckpointTaskRequest(),
                                      shim_pb2.StateResponse)
                assert ei.value.code == Code.UNIMPLEMENTED and "Checkpoint" in ei.value.message
                with pytest.raises(TtrpcError) as ei:
                    await client.call("no.such.Service", "State", shim_pb2.StateRequest(),
                                      shim_pb2.StateResponse)
                assert ei.value.code == Code.UNIMPLEMENTED
                assert "no.such.Service" in ei.value.message

    run(go())


@pytest.mark.parametrize(
    ("signal", "code", "text"),
    [
        (1, Code.NOT_FOUND, "task t not found"),
        (2, Code.UNKNOWN, "boom from handler"),
        (3, Code.UNKNOWN, "TimeoutError"),  # a handler's own TimeoutError is not our deadline
        (0, Code.UNKNOWN, "no message"),
    ],
)
def test_handler_errors_become_status(sock_dir: str, signal: int, code: Code, text: str) -> None:
    async def go() -> None:
        async with serving(sock_dir) as (_, path, _h):
            async with await Client.connect(path) as client:
                with pytest.raises(TtrpcError) as ei:
                    await client.call(TASK, "Kill", shim_pb2.KillRequest(id="t", signal=signal),
                                      shim_pb2.StateResponse)
                assert ei.value.code == code
                assert text in ei.value.message
                # the server and the connection are still fine afterwards
                assert (await state_call(client, "after")).id == "after"

    run(go())


def test_client_timeout_is_deadline_exceeded_and_sent_as_timeout_nano(sock_dir: str) -> None:
    async def go() -> None:
        async with serving(sock_dir) as (_, path, handlers):
            async with await Client.connect(path) as client:
                loop = asyncio.get_running_loop()
                t0 = loop.time()
                with pytest.raises(TtrpcError) as ei:
                    await client.call(TASK, "Wait", shim_pb2.WaitRequest(id="slow"),
                                      shim_pb2.WaitResponse, timeout=0.2)
                assert ei.value.code == Code.DEADLINE_EXCEEDED
                assert 0.15 < loop.time() - t0 < 1.0
                await state_call(client, "x", timeout=3.0)
                remaining = handlers.seen[-1].time_remaining()
                assert remaining is not None and 2.0 < remaining <= 3.0
                await asyncio.sleep(0.05)
                assert handlers.cancelled == ["slow"]  # the server cancelled the handler

    run(go())


def test_server_enforces_timeout_nano_by_cancelling_handler(sock_dir: str) -> None:
    async def go() -> None:
        async with serving(sock_dir) as (_, path, handlers):
            reader, writer = await raw_connect(path)
            payload = shim_pb2.WaitRequest(id="w").SerializeToString()
            writer.write(request_frame(1, "Wait", payload, timeout_nano=100_000_000))
            t0 = asyncio.get_running_loop().time()
            sid, resp = await read_response(reader)
            assert sid == 1 and resp.status.code == Code.DEADLINE_EXCEEDED
            assert asyncio.get_running_loop().time() - t0 < 0.8
            assert handlers.cancelled == ["w"]
            writer.close()

    run(go())


def test_metadata_and_namespace_reach_the_handler(sock_dir: str) -> None:
    async def go() -> None:
        async with serving(sock_dir) as (_, path, handlers):
            async with await Client.connect(path) as client:
                await state_call(
                    client,
                    metadata={"containerd-namespace-ttrpc": "k8s.io", "X-Multi": ["a", "b"]},
                )
                await state_call(client)
        ctx, plain = handlers.seen
        assert ctx.namespace == "k8s.io"
        assert ctx.metadata["x-multi"] == ["a", "b"]
        assert ctx.get("X-MULTI") == "a"
        assert plain.namespace is None and plain.metadata == {}

    run(go())


def test_protocol_violations_are_answered_per_stream_and_connection_survives(
    sock_dir: str,
) -> None:
    async def go() -> None:
        async with serving(sock_dir) as (server, path, _h):
            reader, writer = await raw_connect(path)
            other = await Client.connect(path)

            async def expect(data: bytes, sid: int, code: Code, text: str) -> None:
                writer.write(data)
                got_sid, resp = await read_response(reader)
                assert (got_sid, resp.status.code) == (sid, code), resp.status.message
                assert text in resp.status.message
                # another client is unaffected at every step
                assert (await state_call(other, f"o{sid}")).id == f"o{sid}"

            await expect(request_frame(2), 2, Code.INVALID_ARGUMENT, "must be odd")
            await expect(request_frame(0), 0, Code.INVALID_ARGUMENT, "must be odd")
            await expect(encode_frame(1, MessageType.REQUEST, 0, b"\xff\xff\xff"),
                         1, Code.INVALID_ARGUMENT, "unmarshal request")
            await expect(request_frame(3, payload=b"\x0a\x05ab"), 3, Code.INVALID_ARGUMENT,
                         "unmarshalling payload")
            big = MAX_DATA_LENGTH + 1
            await expect(struct.pack(">IIBB", big, 5, 1, 0) + bytes(big), 5,
                         Code.RESOURCE_EXHAUSTED, "exceeds maximum")
            await expect(request_frame(7, flags=Flags.REMOTE_OPEN), 7, Code.UNIMPLEMENTED,
                         "streaming")
            await expect(encode_frame(7, MessageType.DATA, Flags.REMOTE_CLOSED, b""), 7,
                         Code.INVALID_ARGUMENT, "data frames")
            await expect(request_frame(7), 7, Code.INVALID_ARGUMENT, "re-used")
            # an unknown frame type is ignored; the next request is served normally
            writer.write(encode_frame(9, 0x7F, 0, b"future") + request_frame(11))
            sid, resp = await read_response(reader)
            assert sid == 11 and resp.status.code == 0
            assert shim_pb2.StateResponse.FromString(resp.payload).id == "s11"
            writer.close()
            await other.close()
            assert server.serving

    run(go())


def test_garbage_and_truncated_connections_do_not_affect_others(sock_dir: str) -> None:
    async def go() -> None:
        async with serving(sock_dir) as (server, path, _h):
            async with await Client.connect(path) as good:
                # garbage: the first header claims ~4 GiB; the server discards, never buffers
                _, garbage = await raw_connect(path)
                garbage.write(b"\xde\xad\xbe\xef" * 1000)
                await garbage.drain()
                # truncated: half a header, then half a frame, then hang up
                _, trunc = await raw_connect(path)
                trunc.write(request_frame(1)[:15])
                await trunc.drain()
                for i in range(5):
                    assert (await state_call(good, f"g{i}")).id == f"g{i}"
                trunc.close()
                garbage.close()
                await asyncio.sleep(0.05)
                assert (await state_call(good, "later")).id == "later"
            async with await Client.connect(path) as fresh:
                assert (await state_call(fresh, "fresh")).id == "fresh"
            assert server.serving

    run(go())


def test_server_closing_mid_call_gives_unavailable(sock_dir: str) -> None:
    async def go() -> None:
        handlers = Handlers()
        server = Server()
        server.register(TASK, handlers.table())
        path = os.path.join(sock_dir, "dying.sock")
        await server.serve_unix(path)
        client = await Client.connect(path)
        call = asyncio.create_task(
            client.call(TASK, "Wait", shim_pb2.WaitRequest(id="w"), shim_pb2.WaitResponse)
        )
        await handlers.started.wait()
        await server.close()
        with pytest.raises(TtrpcError) as ei:
            await call
        assert ei.value.code == Code.UNAVAILABLE
        assert handlers.cancelled == ["w"]
        with pytest.raises(TtrpcError) as ei:  # later calls fail fast, same code
            await state_call(client)
        assert ei.value.code == Code.UNAVAILABLE
        await client.close()

    run(go())


def test_peer_dying_after_reading_request_gives_unavailable(sock_dir: str) -> None:
    async def go() -> None:
        async def die(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await read_frame(r)
            w.transport.abort()

        path = os.path.join(sock_dir, "die.sock")
        srv = await asyncio.start_unix_server(die, path=path)
        client = await Client.connect(path)
        with pytest.raises(TtrpcError) as ei:
            await state_call(client)
        assert ei.value.code == Code.UNAVAILABLE
        await client.close()
        srv.close()

    run(go())


def test_connect_failure_is_unavailable(sock_dir: str) -> None:
    with pytest.raises(TtrpcError) as ei:
        run(Client.connect(os.path.join(sock_dir, "missing.sock")))
    assert ei.value.code == Code.UNAVAILABLE


def test_shutdown_lets_in_flight_calls_finish_and_refuses_new_connections(
    sock_dir: str,
) -> None:
    async def go() -> None:
        handlers = Handlers()
        server = Server()
        server.register(TASK, handlers.table())
        path = os.path.join(sock_dir, "grace.sock")
        await server.serve_unix(path)
        assert os.stat(path).st_mode & 0o777 == 0o600
        client = await Client.connect(path)
        call = asyncio.create_task(
            client.call(TASK, "Wait", shim_pb2.WaitRequest(id="w"), shim_pb2.WaitResponse)
        )
        await handlers.started.wait()
        stopping = asyncio.create_task(server.shutdown(grace=2))
        await asyncio.sleep(0.05)
        assert not stopping.done()  # waiting for the in-flight Wait
        with pytest.raises(TtrpcError):
            await Client.connect(path, timeout=0.5)
        handlers.release_wait.set()
        assert (await call).exit_status == 7
        await stopping
        assert handlers.cancelled == []
        await client.close()

    run(go())


def test_shutdown_grace_expiry_cancels_calls(sock_dir: str) -> None:
    async def go() -> None:
        handlers = Handlers()
        server = Server()
        server.register(TASK, handlers.table())
        path = os.path.join(sock_dir, "g.sock")
        await server.serve_unix(path)
        client = await Client.connect(path)
        call = asyncio.create_task(
            client.call(TASK, "Wait", shim_pb2.WaitRequest(id="w"), shim_pb2.WaitResponse)
        )
        await handlers.started.wait()
        await server.shutdown(grace=0.1)
        assert handlers.cancelled == ["w"]
        with pytest.raises(TtrpcError) as ei:
            await call
        assert ei.value.code == Code.UNAVAILABLE
        await client.close()

    run(go())


def test_shutdown_from_a_handler_is_refused(sock_dir: str) -> None:
    async def go() -> None:
        server = Server()
        errors: list[BaseException] = []

        async def shutdown_handler(req: Any, ctx: RequestContext) -> Any:
            try:
                await server.shutdown()
            except RuntimeError as exc:
                errors.append(exc)
            asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(server.shutdown()))
            return shim_pb2.StateResponse(id="bye")

        server.register(TASK, {"Shutdown": (shim_pb2.ShutdownRequest, shutdown_handler)})
        path = os.path.join(sock_dir, "sd.sock")
        await server.serve_unix(path)
        async with await Client.connect(path) as client:
            resp = await client.call(TASK, "Shutdown", shim_pb2.ShutdownRequest(),
                                     shim_pb2.StateResponse)
        assert resp.id == "bye" and len(errors) == 1
        for _ in range(50):
            if not server.serving:
                break
            await asyncio.sleep(0.01)
        assert not server.serving

    run(go())


def test_serve_fd_serves_an_inherited_listener(sock_dir: str) -> None:
    async def go() -> None:
        path = os.path.join(sock_dir, "fd.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen()
        fd = listener.detach()
        handlers = Handlers()
        server = Server()
        server.register(TASK, handlers.table())
        await server.serve_fd(fd)
        async with await Client.connect(path) as client:
            assert (await state_call(client, "via-fd")).id == "via-fd"
        await server.shutdown(grace=0.5)
        with pytest.raises(OSError):
            os.fstat(fd)  # the server owned and closed the descriptor

    run(go())


def test_register_rejects_duplicate_service() -> None:
    server = Server()
    server.register(TASK, {})
    with pytest.raises(ValueError):
        server.register(TASK, {})


def test_oversized_request_is_refused_locally(sock_dir: str) -> None:
    async def go() -> None:
        async with serving(sock_dir) as (_, path, _h):
            async with await Client.connect(path) as client:
                with pytest.raises(TtrpcError) as ei:
                    await state_call(client, "x" * (MAX_DATA_LENGTH + 1))
                assert ei.value.code == Code.RESOURCE_EXHAUSTED
                assert (await state_call(client, "ok")).id == "ok"

    run(go())


def test_response_frames_are_well_formed(sock_dir: str) -> None:
    """A successful response carries an OK status and the payload, flags 0 (as Go sends)."""

    async def go() -> Frame:
        async with serving(sock_dir) as (_, path, _h):
            reader, writer = await raw_connect(path)
            writer.write(request_frame(1))
            frame = await read_frame(reader)
            writer.close()
            assert frame is not None
            return frame

    frame = run(go())
    assert (frame.stream_id, frame.msg_type, frame.flags) == (1, MessageType.RESPONSE, 0)
    resp = Response.FromString(frame.data)
    assert resp.HasField("status") and resp.status.code == 0
    assert shim_pb2.StateResponse.FromString(resp.payload).id == "s1"


_ = Callable  # typing helper kept for readers of the handler signature


def test_serve_unix_never_replaces_an_existing_socket_and_cleans_up(sock_dir: str) -> None:
    async def go() -> None:
        async with serving(sock_dir) as (server, path, _h):
            second = Server()
            with pytest.raises(OSError):
                await second.serve_unix(path)
            async with await Client.connect(path) as client:  # the live server still answers
                assert (await state_call(client, "live")).id == "live"
        assert not os.path.exists(path)  # removed at shutdown

    run(go())


def test_oversized_response_becomes_resource_exhausted(sock_dir: str) -> None:
    async def go() -> None:
        async def huge(req: Any, ctx: RequestContext) -> Any:
            return shim_pb2.StateResponse(id=req.id, stdout="x" * (MAX_DATA_LENGTH + 1))

        server = Server()
        server.register(TASK, {"State": (shim_pb2.StateRequest, huge)})
        path = os.path.join(sock_dir, "huge.sock")
        await server.serve_unix(path)
        async with await Client.connect(path) as client:
            with pytest.raises(TtrpcError) as ei:
                await state_call(client)
            assert ei.value.code == Code.RESOURCE_EXHAUSTED
        await server.shutdown(grace=0.5)

    run(go())


def test_observer_hears_every_answered_call_and_cannot_break_one(sock_dir: str) -> None:
    heard: list[tuple[str, str, int]] = []

    def observer(service: str, method: str, code: int, seconds: float) -> None:
        assert seconds >= 0
        heard.append((service, method, code))
        if method == "Kill":
            raise RuntimeError("a broken observer")

    async def go() -> None:
        async with serving(sock_dir) as (server, path, _h):
            server.observer = observer
            async with await Client.connect(path) as client:
                await state_call(client)
                with pytest.raises(TtrpcError):
                    await client.call(TASK, "Kill", shim_pb2.KillRequest(id="t", signal=1), shim_pb2.StateResponse)
                with pytest.raises(TtrpcError):
                    await client.call(TASK, "Nope", shim_pb2.StateRequest(), shim_pb2.StateResponse)
                assert (await state_call(client, "after")).id == "after"

    run(go())
    assert heard == [(TASK, "State", Code.OK), (TASK, "Kill", Code.NOT_FOUND),
                     (TASK, "Nope", Code.UNIMPLEMENTED), (TASK, "State", Code.OK)]
