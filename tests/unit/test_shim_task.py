"""Task service against an in-memory agent: state machine, event order, Wait, stdio FIFOs."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import pytest

from ccpu.api.gen.containerd.events import task_pb2 as ev
from ccpu.api.gen.containerd.runtime.v2.task import shim_pb2 as pb
from ccpu.ttrpc import Code, RequestContext, TtrpcError
from shim.errors import AgentCallError
from shim.events import forward_request, pack_any, topic_of
from shim.state import Status
from shim.sandbox import Sandbox
from shim.task import TaskService

CTX = RequestContext(service="containerd.task.v2.Task", method="x")


class FakeAgent:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.channels: dict[int, FakeChannel] = {}
        self.received: dict[int, bytearray] = {}
        self.closed: set[int] = set()
        self.next = 1
        self.fail: dict[str, tuple[str, str]] = {}
        self.handler = None

    async def call(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        self.calls.append((op, args))
        if op in self.fail:
            raise AgentCallError(*self.fail[op])
        if op in ("create", "start"):
            return {"pid": 100 + len(self.calls)}
        if op == "delete":
            return {"pid": 1, "exit_status": 0, "exited_at": 0}
        if op == "pids":
            return {"processes": [{"pid": 7, "exec": ""}, {"pid": 8, "exec": "e1"}]}
        return {}

    def open_channel(self, number: int | None = None, *, on_data: Any = None,
                     on_close: Any = None) -> FakeChannel:
        """As ccpu.agent.client.AgentClient.open_channel (odd numbers from 1)."""
        if number is None:
            number = self.next
            self.next += 2
        ch = FakeChannel(self, number, on_data, on_close)
        self.channels[number] = ch
        return ch

    # test helpers: what the agent would send
    def output(self, ch: int, data: bytes) -> None:
        self.channels[ch].on_data(data)

    def close(self, ch: int) -> None:
        self.channels[ch].on_close()


class FakeChannel:
    """The part of ccpu.agent.client.Channel the shim uses."""

    def __init__(self, agent: FakeAgent, number: int, on_data: Any, on_close: Any) -> None:
        self.agent = agent
        self.number = number
        self.on_data = on_data
        self.on_close = on_close

    async def write(self, data: bytes) -> None:
        self.agent.received.setdefault(self.number, bytearray()).extend(data)

    async def close_write(self) -> None:
        self.agent.closed.add(self.number)

    def release(self) -> None:
        self.agent.channels.pop(self.number, None)


class FakeSandbox(Sandbox):
    def __init__(self, agent: FakeAgent) -> None:
        self._agent = agent

    async def agent(self) -> FakeAgent:
        return self._agent


@pytest.fixture
def svc() -> tuple[TaskService, FakeAgent, list[Any], list[bool]]:
    agent = FakeAgent()
    events: list[Any] = []
    exits: list[bool] = []
    s = TaskService(FakeSandbox(agent), lambda ns, e: events.append((ns, e)), "ns1",
                    repo_root="/repo", request_exit=lambda: exits.append(True))
    return s, agent, events, exits


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_lifecycle_and_event_order(svc) -> None:  # noqa: ANN001
    s, agent, events, exits = svc

    async def go() -> None:
        r = await s.Create(pb.CreateTaskRequest(id="c1", bundle="/b/c1"), CTX)
        assert r.pid == 101
        st = await s.State(pb.StateRequest(id="c1"), CTX)
        assert st.status == Status.CREATED and st.pid == 101 and st.bundle == "/b/c1"
        waiter = asyncio.create_task(s.Wait(pb.WaitRequest(id="c1"), CTX))
        await s.Start(pb.StartRequest(id="c1"), CTX)
        assert (await s.State(pb.StateRequest(id="c1"), CTX)).status == Status.RUNNING
        with pytest.raises(TtrpcError) as ei:
            await s.Delete(pb.DeleteRequest(id="c1"), CTX)
        assert ei.value.code == Code.FAILED_PRECONDITION
        await s.Shutdown(pb.ShutdownRequest(id="c1"), CTX)
        assert not exits  # containers remain
        s.on_agent_event({"event": "exit", "container": "c1", "exec": "", "pid": 102,
                          "exit_status": 3, "exited_at": 5_000_000_007})
        w = await asyncio.wait_for(waiter, 2)
        assert w.exit_status == 3 and w.exited_at.seconds == 5 and w.exited_at.nanos == 7
        st = await s.State(pb.StateRequest(id="c1"), CTX)
        assert st.status == Status.STOPPED and st.exit_status == 3
        d = await s.Delete(pb.DeleteRequest(id="c1"), CTX)
        assert d.exit_status == 3 and d.pid == 102
        with pytest.raises(TtrpcError) as ei:
            await s.State(pb.StateRequest(id="c1"), CTX)
        assert ei.value.code == Code.NOT_FOUND
        await s.Shutdown(pb.ShutdownRequest(id="c1"), CTX)
        assert exits == [True]

    run(go())
    assert [type(e).__name__ for _, e in events] == ["TaskCreate", "TaskStart", "TaskExit",
                                                     "TaskDelete"]
    assert {ns for ns, _ in events} == {"ns1"}
    exit_ev = events[2][1]
    assert exit_ev.container_id == "c1" and exit_ev.id == "c1" and exit_ev.exit_status == 3
    assert [op for op, _ in agent.calls] == ["create", "start", "delete"]
    assert agent.calls[0][1]["rootfs"] == {"kind": "none"}


def test_agent_errors_map_one_to_one(svc) -> None:  # noqa: ANN001
    s, agent, events, _ = svc
    agent.fail["create"] = ("InvalidArgument", "bad bundle")

    async def go() -> None:
        with pytest.raises(TtrpcError) as ei:
            await s.Create(pb.CreateTaskRequest(id="c1", bundle="/b"), CTX)
        assert ei.value.code == Code.INVALID_ARGUMENT and "bad bundle" in ei.value.message
        assert len(s.tasks) == 0
        del agent.fail["create"]
        await s.Create(pb.CreateTaskRequest(id="c1", bundle="/b"), CTX)
        with pytest.raises(TtrpcError) as ei:
            await s.Create(pb.CreateTaskRequest(id="c1", bundle="/b"), CTX)
        assert ei.value.code == Code.ALREADY_EXISTS
        agent.fail["kill"] = ("NotFound", "gone")
        with pytest.raises(TtrpcError) as ei:
            await s.Kill(pb.KillRequest(id="c1", signal=9), CTX)
        assert ei.value.code == Code.NOT_FOUND
        with pytest.raises(TtrpcError) as ei:
            await s.Checkpoint(pb.CheckpointTaskRequest(id="c1"), CTX)
        assert ei.value.code == Code.UNIMPLEMENTED
        # Update: LinuxResources JSON -> agent `update`; bad JSON is InvalidArgument
        req = pb.UpdateTaskRequest(id="c1")
        req.resources.value = b'{"memory": {"limit": 1048576}}'
        await s.Update(req, CTX)
        assert agent.calls[-1] == ("update", {"container": "c1",
                                              "resources": {"memory": {"limit": 1048576}}})
        req.resources.value = b"not json"
        with pytest.raises(TtrpcError) as ei:
            await s.Update(req, CTX)
        assert ei.value.code == Code.INVALID_ARGUMENT

    run(go())
    assert [type(e).__name__ for _, e in events] == ["TaskCreate"]


def test_exit_before_start_answer_keeps_order(svc) -> None:  # noqa: ANN001
    s, agent, events, _ = svc
    gate = asyncio.Event

    async def go() -> None:
        await s.Create(pb.CreateTaskRequest(id="c1", bundle="/b"), CTX)
        orig = agent.call
        release = gate()

        async def slow_start(op: str, args: dict[str, Any]) -> dict[str, Any]:
            if op == "start":
                s.on_agent_event({"event": "exit", "container": "c1", "pid": 5, "exit_status": 0,
                                  "exited_at": time.time_ns()})
                await release.wait()
            return await orig(op, args)

        agent.call = slow_start  # type: ignore[method-assign]
        t = asyncio.create_task(s.Start(pb.StartRequest(id="c1"), CTX))
        await asyncio.sleep(0.05)
        assert s.tasks.process("c1").status == Status.CREATED
        release.set()
        await t
        await s.Wait(pb.WaitRequest(id="c1"), CTX)

    run(go())
    assert [type(e).__name__ for _, e in events] == ["TaskCreate", "TaskStart", "TaskExit"]


def test_exec_pause_resume_pids(svc) -> None:  # noqa: ANN001
    s, agent, events, _ = svc

    async def go() -> None:
        await s.Create(pb.CreateTaskRequest(id="c1", bundle="/b"), CTX)
        with pytest.raises(TtrpcError) as ei:  # not running yet
            await s.Exec(pb.ExecProcessRequest(id="c1", exec_id="e1"), CTX)
        assert ei.value.code == Code.FAILED_PRECONDITION
        await s.Start(pb.StartRequest(id="c1"), CTX)
        spec = pb.ExecProcessRequest(id="c1", exec_id="e1")
        spec.spec.type_url = "types.containerd.io/opencontainers/runtime-spec/1/Process"
        spec.spec.value = b'{"args": ["true"], "cwd": "/"}'
        await s.Exec(spec, CTX)
        with pytest.raises(TtrpcError) as ei:
            await s.Exec(spec, CTX)
        assert ei.value.code == Code.ALREADY_EXISTS
        await s.Start(pb.StartRequest(id="c1", exec_id="e1"), CTX)
        s.on_agent_event({"event": "exit", "container": "c1", "exec": "e1", "pid": 9,
                          "exit_status": 0, "exited_at": 1})
        await s.Wait(pb.WaitRequest(id="c1", exec_id="e1"), CTX)
        await s.Delete(pb.DeleteRequest(id="c1", exec_id="e1"), CTX)
        await s.Pause(pb.PauseRequest(id="c1"), CTX)
        assert (await s.State(pb.StateRequest(id="c1"), CTX)).status == Status.PAUSED
        with pytest.raises(TtrpcError):
            await s.Pause(pb.PauseRequest(id="c1"), CTX)
        await s.Resume(pb.ResumeRequest(id="c1"), CTX)
        assert (await s.State(pb.StateRequest(id="c1"), CTX)).status == Status.RUNNING
        pids = await s.Pids(pb.PidsRequest(id="c1"), CTX)
        assert [p.pid for p in pids.processes] == [7, 8]
        assert pids.processes[1].info.type_url == "containerd.runc.v1.ProcessDetails"
        c = await s.Connect(pb.ConnectRequest(id="c1"), CTX)
        assert c.shim_pid == os.getpid() and c.task_pid == 102

    run(go())
    names = [type(e).__name__ for _, e in events]
    assert names == ["TaskCreate", "TaskStart", "TaskExecAdded", "TaskExecStarted", "TaskExit",
                     "TaskPaused", "TaskResumed"]
    exit_ev = events[4][1]
    assert exit_ev.id == "e1" and exit_ev.container_id == "c1"
    exec_args = [a for op, a in agent.calls if op == "exec"][0]
    assert exec_args["process"] == {"args": ["true"], "cwd": "/"}


def test_stdio_fifos_and_exit_after_output(svc, tmp_path) -> None:  # noqa: ANN001
    s, agent, events, _ = svc
    paths = {n: str(tmp_path / n) for n in ("in", "out", "err")}
    for p in paths.values():
        os.mkfifo(p)

    async def go() -> bytes:
        # containerd's ends: its stdout/stderr readers are open before Create
        out_r = os.open(paths["out"], os.O_RDONLY | os.O_NONBLOCK)
        err_r = os.open(paths["err"], os.O_RDONLY | os.O_NONBLOCK)
        await s.Create(pb.CreateTaskRequest(id="c1", bundle="/b", stdin=paths["in"],
                                            stdout=paths["out"], stderr=paths["err"]), CTX)
        args = agent.calls[0][1]
        assert (args["stdin"], args["stdout"], args["stderr"]) == (1, 3, 5)
        in_w = os.open(paths["in"], os.O_WRONLY)
        os.write(in_w, b"hello")
        await asyncio.sleep(0.05)
        assert 1 not in agent.received  # stdin flows only once the process started
        await s.Start(pb.StartRequest(id="c1"), CTX)
        os.close(in_w)
        for _ in range(100):
            if 1 in agent.closed:
                break
            await asyncio.sleep(0.01)
        assert bytes(agent.received[1]) == b"hello" and 1 in agent.closed
        waiter = asyncio.create_task(s.Wait(pb.WaitRequest(id="c1"), CTX))
        agent.output(3, b"out1 ")
        s.on_agent_event({"event": "exit", "container": "c1", "pid": 1, "exit_status": 0,
                          "exited_at": 1})
        await asyncio.sleep(0.05)
        assert not waiter.done()  # output channels still open
        agent.output(3, b"out2")
        agent.output(5, b"err")
        agent.close(3)
        agent.close(5)
        await asyncio.wait_for(waiter, 2)
        data = os.read(out_r, 100)
        assert os.read(err_r, 100) == b"err"
        assert os.read(out_r, 100) == b""  # our write end is closed
        os.close(out_r)
        os.close(err_r)
        return data

    assert run(go()) == b"out1 out2"


def test_event_encoding() -> None:
    e = ev.TaskExit(container_id="c", id="c", pid=3, exit_status=1)
    a = pack_any(e)
    assert a.type_url == "containerd.events.TaskExit"
    assert ev.TaskExit.FromString(a.value) == e
    req = forward_request("ns", e)
    assert req.envelope.topic == "/tasks/exit" and req.envelope.namespace == "ns"
    assert req.envelope.timestamp.seconds > 0
    assert topic_of(ev.TaskExecStarted()) == "/tasks/exec-started"
    with pytest.raises(ValueError):
        topic_of(pb.StateRequest())


def test_slow_create_logs_what_the_agent_is_doing(svc, monkeypatch, caplog) -> None:  # noqa: ANN001
    """A create the agent does not answer in time leaves a trace: the agent's `diagnose`
    (it serves requests concurrently) and the sandbox's own account, in the shim log."""
    from shim import task as task_mod

    s, agent, _, _ = svc
    monkeypatch.setattr(task_mod, "SLOW_CREATE", 0.05)
    plain_call = agent.call

    async def call(op: str, args: dict[str, Any]) -> dict[str, Any]:
        if op == "create":
            await asyncio.sleep(0.3)
        if op == "diagnose":
            return {"processes": [{"pid": 42, "state": "D", "wchan": "p9_client_rpc", "age_s": 0.2,
                                   "cmd": "runc create c1"}]}
        return await plain_call(op, args)

    agent.call = call
    run(s.Create(pb.CreateTaskRequest(id="c1", bundle="/b/c1"), CTX))
    text = caplog.text
    assert "create of c1: no answer from the agent" in text
    assert "42 D p9_client_rpc 0.2s runc create c1" in text


def test_an_agent_that_does_not_answer_gives_deadline_exceeded() -> None:
    """Issue 18: a stuck agent (a stopped or overloaded guest) never makes a caller wait for
    ever: each request kind has its timeout, the error says what did not answer, and a create
    that succeeds after the shim gave up is deleted again."""
    from shim.config import Timeouts

    agent = FakeAgent()
    stuck: dict[str, asyncio.Future[Any]] = {}
    orig = agent.call

    async def call(op: str, args: dict[str, Any]) -> dict[str, Any]:
        if op in ("pids", "create") and op not in stuck:
            stuck[op] = asyncio.get_running_loop().create_future()
            agent.calls.append((op, args))
            return await stuck[op]
        return await orig(op, args)

    agent.call = call  # type: ignore[method-assign]
    s = TaskService(FakeSandbox(agent), lambda ns, e: None, "ns1", repo_root="/repo",
                    timeouts=Timeouts(create=0.2, default=0.1))

    async def go() -> None:
        with pytest.raises(TtrpcError) as ei:
            await s.Create(pb.CreateTaskRequest(id="c1", bundle="/b"), CTX)
        assert ei.value.code == Code.DEADLINE_EXCEEDED
        assert "did not answer create of container c1 within 0.2s" in ei.value.message
        assert len(s.tasks) == 0
        stuck["create"].set_result({"pid": 42})  # the late answer: undone
        for _ in range(50):
            await asyncio.sleep(0.01)
            if agent.calls[-1][0] == "delete":
                break
        assert agent.calls[-1] == ("delete", {"container": "c1"})
        await s.Create(pb.CreateTaskRequest(id="c1", bundle="/b"), CTX)  # the id is free again
        with pytest.raises(TtrpcError) as ei:
            await s.Pids(pb.PidsRequest(id="c1"), CTX)
        assert ei.value.code == Code.DEADLINE_EXCEEDED and "pids of container c1 within 0.1s" in ei.value.message

    run(go())


def test_full_filesystem_is_resource_exhausted(svc) -> None:  # noqa: ANN001
    s, agent, _, _ = svc
    agent.fail["start"] = ("ResourceExhausted", "start: No space left on device: container c1's writable layer")

    async def go() -> None:
        await s.Create(pb.CreateTaskRequest(id="c1", bundle="/b"), CTX)
        with pytest.raises(TtrpcError) as ei:
            await s.Start(pb.StartRequest(id="c1"), CTX)
        assert ei.value.code == Code.RESOURCE_EXHAUSTED and "writable layer" in ei.value.message

    run(go())


def test_deep_json_requests_get_invalid_argument(svc) -> None:  # noqa: ANN001
    """Exec specs and Update resources nested past the bound: InvalidArgument, not a crash."""
    s, agent, events, _ = svc
    deep = b"[" * 100_000 + b"]" * 100_000

    async def go() -> None:
        await s.Create(pb.CreateTaskRequest(id="c1", bundle="/b"), CTX)
        await s.Start(pb.StartRequest(id="c1"), CTX)
        req = pb.ExecProcessRequest(id="c1", exec_id="e1")
        req.spec.value = b'{"args": ' + deep + b"}"
        with pytest.raises(TtrpcError) as ei:
            await s.Exec(req, CTX)
        assert ei.value.code == Code.INVALID_ARGUMENT and "nested deeper" in ei.value.message
        upd = pb.UpdateTaskRequest(id="c1")
        upd.resources.value = deep
        with pytest.raises(TtrpcError) as ei:
            await s.Update(upd, CTX)
        assert ei.value.code == Code.INVALID_ARGUMENT

    run(go())


def test_create_checks_the_pod_policy_of_every_container(tmp_path) -> None:  # noqa: ANN001
    """A later container of a Kubernetes pod carrying an annotation the operator does not allow
    is refused (InvalidArgument naming it) before the agent sees it."""
    import json

    from shim import config as shim_config

    cfg = shim_config.Config()
    agent = FakeAgent()
    s = TaskService(FakeSandbox(agent), lambda ns, e: None, "ns1", repo_root="/repo",
                    admit=lambda ann: shim_config.check_annotations(cfg, ann))
    pod = {"io.kubernetes.cri.sandbox-id": "pod1", "io.kubernetes.cri.container-type": "container"}
    for name, ann in (("ok", pod), ("bad", {**pod, "io.fractal.mode": "host"})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"annotations": ann}))

    async def go() -> None:
        await s.Create(pb.CreateTaskRequest(id="ok", bundle=str(tmp_path / "ok")), CTX)
        with pytest.raises(TtrpcError) as ei:
            await s.Create(pb.CreateTaskRequest(id="bad", bundle=str(tmp_path / "bad")), CTX)
        assert ei.value.code == Code.INVALID_ARGUMENT and "io.fractal.mode" in ei.value.message
        assert "bad" not in s.tasks.containers

    run(go())
