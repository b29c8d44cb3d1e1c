"""ccpu.ttrpc against real Go ttrpc peers (containerd 1.6 and ctr).

* Client -> containerd: Forward an event on containerd's ttrpc socket (``<grpc address>.ttrpc``,
  the TTRPC_ADDRESS a shim gets) and see it arrive at a ``ctr events`` subscriber.
* Go client -> our Server: ``ctr shim --id ID state`` dials the shim socket containerd would use
  (/run/containerd/s/<sha256(address/namespace/id)>) with ttrpc's Go client.

Uses its own private containerd (not the session fixtures), so it is cheap and independent.
Prerequisites (root, containerd, ctr) are enforced by tests/harness.py: skipped
locally when missing, failing under CI.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import any_pb2, empty_pb2, timestamp_pb2

from ccpu.api.gen.containerd.events import task_pb2
from ccpu.api.gen.containerd.runtime.v2.task import shim_pb2
from ccpu.api.gen.containerd.services.ttrpc.events.v1 import events_pb2
from ccpu.ttrpc import Client, Code, RequestContext, Server, TtrpcError

EVENTS = "containerd.services.events.ttrpc.v1.Events"


@pytest.fixture(scope="module")
def containerd_sock() -> Iterator[str]:
    """A private containerd; yields its gRPC socket path (ttrpc is at ``+ '.ttrpc'``)."""
    if shutil.which("containerd") is None or shutil.which("ctr") is None:
        pytest.skip("containerd/ctr not installed")
    d = Path(tempfile.mkdtemp(prefix="ttrpc-ctd-", dir="/tmp"))
    sock = d / "c.sock"
    (d / "config.toml").write_text(
        "version = 2\n"
        f'root = "{d}/root"\n'
        f'state = "{d}/state"\n'
        'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        "[grpc]\n"
        f'  address = "{sock}"\n'
    )
    log = open(d / "containerd.log", "wb")
    proc = subprocess.Popen(
        ["containerd", "--config", str(d / "config.toml")],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 15
        while not Path(f"{sock}.ttrpc").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    "private containerd did not start:\n"
                    + (d / "containerd.log").read_text(errors="replace")[-2000:]
                )
            time.sleep(0.05)
        yield str(sock)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
        shutil.rmtree(d, ignore_errors=True)


def _envelope(topic: str, pid: int) -> Any:
    ts = timestamp_pb2.Timestamp()
    ts.GetCurrentTime()
    exit_ev = task_pb2.TaskExit(
        container_id="fractal-c1", id="fractal-c1", pid=pid, exit_status=3, exited_at=ts
    )
    return events_pb2.Envelope(
        timestamp=ts,
        namespace="default",
        topic=topic,
        event=any_pb2.Any(
            type_url="containerd.events.TaskExit", value=exit_ev.SerializeToString()
        ),
    )


def test_forward_event_reaches_ctr_events_subscriber(containerd_sock: str) -> None:
    async def go() -> str:
        sub = await asyncio.create_subprocess_exec(
            "ctr", "--address", containerd_sock, "events",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            async with await Client.connect(containerd_sock + ".ttrpc") as client:
                assert sub.stdout is not None
                # The subscriber may not be subscribed yet: forward until one event shows up.
                for attempt in range(20):
                    await client.call(
                        EVENTS,
                        "Forward",
                        events_pb2.ForwardRequest(envelope=_envelope("/fractal/test", 1000)),
                        empty_pb2.Empty,
                        timeout=5,
                        metadata={"containerd-namespace-ttrpc": "default"},
                    )
                    try:
                        line = await asyncio.wait_for(sub.stdout.readline(), 0.5)
                    except TimeoutError:
                        continue
                    return line.decode()
                raise AssertionError("no event reached `ctr events`")
        finally:
            sub.kill()
            await sub.wait()

    line = asyncio.run(go())
    # "<timestamp> <namespace> <topic> <event as JSON>"
    assert " default /fractal/test " in line, line
    event = json.loads(line[line.index("{") :])
    assert event["container_id"] == "fractal-c1" and event["id"] == "fractal-c1"
    assert event["pid"] == 1000 and event["exit_status"] == 3


def test_containerd_errors_come_back_as_status_codes(containerd_sock: str) -> None:
    async def go() -> list[tuple[int, str]]:
        out = []
        async with await Client.connect(containerd_sock + ".ttrpc") as client:
            for method, req in [
                ("Forward", events_pb2.ForwardRequest(envelope=_envelope("no-slash", 1))),
                ("Publish", events_pb2.ForwardRequest()),
            ]:
                with pytest.raises(TtrpcError) as ei:
                    await client.call(EVENTS, method, req, empty_pb2.Empty, timeout=5)
                out.append((ei.value.code, ei.value.message))
            # the connection is still usable after errors
            await client.call(
                EVENTS, "Forward",
                events_pb2.ForwardRequest(envelope=_envelope("/fractal/ok", 2)),
                empty_pb2.Empty, timeout=5,
            )
        return out

    (bad_topic, unknown) = asyncio.run(go())
    assert bad_topic[0] == Code.INVALID_ARGUMENT and "topic" in bad_topic[1]
    assert unknown == (Code.UNIMPLEMENTED, "method Publish")


def test_go_ttrpc_client_calls_python_server() -> None:
    """`ctr shim state` is ttrpc's Go client calling containerd.task.v2.Task/State on us."""
    if shutil.which("ctr") is None:
        pytest.skip("ctr not installed")
    d = tempfile.mkdtemp(prefix="ttrpc-shim-", dir="/tmp")
    address, namespace, task_id = os.path.join(d, "fake-containerd.sock"), "fractal-ttrpc", "t1"
    digest = hashlib.sha256(os.path.join(address, namespace, task_id).encode()).hexdigest()
    sock = f"/run/containerd/s/{digest}"  # runtime/v2/shim SocketAddress in containerd 1.6

    async def go() -> tuple[list[tuple[int, bytes, bytes]], list[str]]:
        seen: list[str] = []

        async def state(req: Any, ctx: RequestContext) -> Any:
            seen.append(req.id)
            return shim_pb2.StateResponse(id=req.id, bundle="/b", pid=4242, status=2)

        server = Server()
        server.register("containerd.task.v2.Task", {"State": (shim_pb2.StateRequest, state)})
        os.makedirs("/run/containerd/s", exist_ok=True)
        await server.serve_unix(sock)
        results = []
        try:
            for verb in ("state", "delete"):
                p = await asyncio.create_subprocess_exec(
                    "ctr", "--address", address, "-n", namespace, "shim", "--id", task_id, verb,
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                )
                out, err = await asyncio.wait_for(p.communicate(), 10)
                assert p.returncode is not None
                results.append((p.returncode, out, err))
        finally:
            await server.shutdown(grace=1)
            if os.path.exists(sock):
                os.unlink(sock)
        return results, seen

    try:
        results, seen = asyncio.run(go())
    finally:
        shutil.rmtree(d, ignore_errors=True)
    (state_rc, state_out, state_err), (del_rc, _, del_err) = results
    assert state_rc == 0, state_err
    got = json.loads(state_out)
    assert (got["id"], got["bundle"], got["pid"], got["status"]) == ("t1", "/b", 4242, 2)
    assert seen == ["t1"]
    assert del_rc != 0 and b"Unimplemented desc = method Delete" in del_err
