"""The agent answers `hello` before its container machinery exists (ccpu/agent/__main__.py "Ready
first"), imports it right after, and builds it when a request first needs it."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from ccpu.agent import protocol, wire
from ccpu.agent.client import AgentClient
from ccpu.agent.server import LazySupervisor, Outbox, Server

ROOT = Path(__file__).resolve().parents[2]


class _Sup:
    """The few Supervisor members the Server touches for `state`."""

    def __init__(self) -> None:
        self.containers: dict[str, Any] = {}
        self.reaper = None

    async def state(self, args: Any) -> dict[str, Any]:
        raise protocol.NotFound(f"container {args.get('container')} not found")

    def serialized(self, cid: str) -> Any:
        return _Null()

    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None


class _Null:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *a: object) -> None:
        return None


async def _roundtrip(server: Server, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    a, b = socket.socketpair()
    ra, wa = await asyncio.open_connection(sock=a)
    rb, wb = await asyncio.open_connection(sock=b)
    task = asyncio.ensure_future(server.serve(rb, wb))
    out = []
    for req in requests:
        wa.write(wire.encode_control(req))
        await wa.drain()
        frame = await asyncio.wait_for(wire.read_frame(ra), 30)
        assert frame is not None
        out.append(wire.decode_control(frame))
    wa.close()
    await asyncio.wait_for(task, 30)
    return out


def test_hello_is_answered_before_the_supervisor_exists_and_the_first_request_builds_it() -> None:
    built: list[_Sup] = []
    preloaded = threading.Event()
    states: list[tuple[bool, bool]] = []

    def build() -> _Sup:
        built.append(_Sup())
        return built[-1]

    def preload() -> None:
        assert threading.current_thread() is not threading.main_thread()  # off the event loop
        preloaded.set()

    async def go() -> list[dict[str, Any]]:
        server = Server(LazySupervisor(build=build, preload=preload), Outbox(), nics=True)  # type: ignore[arg-type]
        hello = await _roundtrip(server, [protocol.request(1, "hello", {"version": protocol.PROTOCOL_VERSION})])
        states.append((server.loaded, bool(built)))
        await asyncio.get_running_loop().run_in_executor(None, preloaded.wait, 30)
        rest = await _roundtrip(server, [
            protocol.request(1, "hello", {"version": protocol.PROTOCOL_VERSION}),
            protocol.request(2, "shutdown", {}),  # no containers: answered without the machinery
        ])
        states.append((server.loaded, bool(built)))
        rest += await _roundtrip(server, [
            protocol.request(1, "hello", {"version": protocol.PROTOCOL_VERSION}),
            protocol.request(2, "state", {"container": "c1"}),
            protocol.request(3, "state", {"container": "c2"}),
        ])
        return hello + rest

    hello, _, shutdown, _, s1, s2 = asyncio.run(go())
    assert hello["ok"] and "nic" in hello["result"]["features"]
    assert shutdown["ok"]
    assert states == [(False, False), (False, False)]
    assert preloaded.is_set()
    assert s1["error"]["code"] == "NotFound" and s2["error"]["code"] == "NotFound"
    assert len(built) == 1  # built once, by the first request that needed it


def test_the_agent_process_answers_hello_then_serves_requests(tmp_path: Path) -> None:
    """The real `python3 -m ccpu.agent --fd`: after `hello` a request builds the Supervisor
    (reaper, runc root) and is answered; the agent ends when the stream closes."""
    ours, theirs = socket.socketpair()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ccpu.agent", "--fd", str(theirs.fileno()), "--runc-root", str(tmp_path / "runc"),
         "--runc", sys.executable, "--bundle-root", str(tmp_path)],
        pass_fds=(theirs.fileno(),), env=env, stderr=subprocess.PIPE, text=True)
    theirs.close()

    async def go() -> tuple[dict[str, Any], str]:
        client = await AgentClient.connect_socket(ours)
        try:
            hello = await asyncio.wait_for(client.hello(), 60)
            assert not (tmp_path / "runc").exists()  # nothing of the machinery before a request
            with pytest.raises(protocol.NotFound) as e:
                await asyncio.wait_for(client.call("state", {"container": "nope"}), 60)
            return hello, str(e.value)
        finally:
            await client.close()

    try:
        hello, err = asyncio.run(go())
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert hello["version"] == protocol.PROTOCOL_VERSION
    assert "nope" in err
    assert (tmp_path / "runc").is_dir()  # built by the request


def test_requests_wait_for_the_guests_init_to_finish_booting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--init-done: `hello` and `shutdown` are answered while the init still loads modules and mounts
    the shares (ccpu/guest/init.sh finish_boot); any other request waits for the file, and is
    refused (Unavailable) if it never comes."""
    done = tmp_path / "init.done"
    built: list[_Sup] = []

    def build() -> _Sup:
        assert done.exists(), "the Supervisor was built before the init finished booting"
        built.append(_Sup())
        return built[-1]

    async def go() -> tuple[list[dict[str, Any]], bool]:
        server = Server(LazySupervisor(build=build, preload=lambda: None), Outbox(), nics=True,  # type: ignore[arg-type]
                        init_done=str(done))
        first = await _roundtrip(server, [protocol.request(1, "hello", {"version": protocol.PROTOCOL_VERSION}),
                                          protocol.request(2, "shutdown", {})])
        loop = asyncio.get_running_loop()
        loop.call_later(0.3, done.touch)
        waited = await _roundtrip(server, [protocol.request(1, "hello", {"version": protocol.PROTOCOL_VERSION}),
                                           protocol.request(2, "state", {"container": "c1"})])
        return first + waited, done.exists()

    (hello, shutdown, _, state), existed = asyncio.run(go())
    assert hello["ok"] and shutdown["ok"]
    assert state["error"]["code"] == "NotFound" and existed and len(built) == 1

    # never done: refused after the bound, and nothing built
    from ccpu.agent import server as server_mod

    monkeypatch.setattr(server_mod, "INIT_DONE_WAIT", 0.2)
    built.clear()

    async def never() -> list[dict[str, Any]]:
        server = Server(LazySupervisor(build=build, preload=lambda: None), Outbox(), nics=True,  # type: ignore[arg-type]
                        init_done=str(tmp_path / "never"))
        return await _roundtrip(server, [protocol.request(1, "hello", {"version": protocol.PROTOCOL_VERSION}),
                                         protocol.request(2, "state", {"container": "c1"})])

    _, refused = asyncio.run(never())
    assert refused["error"]["code"] == "Unavailable" and "has not finished booting" in refused["error"]["message"]
    assert not built
