"""Task service against an in-memory agent: state machine, event order, Wait, stdio FIFOs."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import pytest

from ccpu.api.gen.containerd.events import task_pb2 as ev
from ccpu.api.gen.containerd.runtime.v2.task import shim_pb2 as pb
from ccpu import errdefs
from ccpu.ttrpc import Code, RequestContext, TtrpcError
from shim.agentsandbox import AgentSandbox
from shim.config import Timeouts
from shim.errors import at_edge
from shim.events import forward_request, pack_any, topic_of
from shim.state import Status
from shim.task import TaskService

CTX = RequestContext(service="containerd.task.v2.Task", method="x")


class FakeAgent:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.channels: dict[int, FakeChannel] = {}
        self.received: dict[int, bytearray] = {}
        self.closed: set[int] = set()
        self.next = 1
        self.fail: dict[str, errdefs.Error] = {}  # op -> what the agent answers
        self.handler = None

    async def call(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        self.calls.append((op, args))
        if op in self.fail:
            raise self.fail[op]
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


class FakeSandbox(AgentSandbox):
    """An agent sandbox (the real create/delete sequences, timeouts) whose agent is a FakeAgent;
    records its host-side lifecycle points, and fails ``created`` when told (a hook failed)."""

    mode = "host"

    def __init__(self, agent: FakeAgent, timeouts: Timeouts | None = None) -> None:
        super().__init__(namespace="ns1", timeouts=timeouts)
        self._agent = agent
        self.points: list[tuple[str, str]] = []
        self.fail_created: Exception | None = None
        self.placed: list[str] = []

    async def agent(self) -> Any:
        return self._agent

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode}

    def placement(self, cid: str, bundle: str, rootfs: Any,
                  spec: dict[str, Any] | None) -> dict[str, Any]:
        self.placed.append(cid)
        return super().placement(cid, bundle, rootfs, spec)

    async def created(self, cid: str, pid: int) -> None:
        self.points.append(("created", cid))
        if self.fail_created is not None:
            raise self.fail_created

    async def started(self, cid: str, pid: int) -> None:
        self.points.append(("started", cid))

    async def deleted(self, cid: str) -> None:
        self.points.append(("deleted", cid))

    def cleanup_after_loss(self, cid: str, bundle: str | None) -> None:
        self.points.append(("cleanup_after_loss", f"{cid} {bundle}"))


class Served:
    """The Task service as containerd reaches it: every handler through the daemon's error edge
    (shim.errors.at_edge), so the tests see the ttrpc codes containerd sees."""

    def __init__(self, svc: TaskService) -> None:
        self.svc = svc
        self.handlers = {name: fn for name, (_, fn) in at_edge(svc.methods()).items()}

    def __getattr__(self, name: str) -> Any:
        handler = self.__dict__["handlers"].get(name)
        return handler if handler is not None else getattr(self.__dict__["svc"], name)


def served(sandbox: AgentSandbox, publish: Any = lambda ns, e: None, **kw: Any) -> Any:
    return Served(TaskService(sandbox, publish, "ns1", repo_root="/repo", **kw))


@pytest.fixture
def svc() -> tuple[Any, FakeAgent, list[Any], list[bool]]:
    agent = FakeAgent()
    events: list[Any] = []
    exits: list[bool] = []
    s = served(FakeSandbox(agent), lambda ns, e: events.append((ns, e)),
               request_exit=lambda: exits.append(True))
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
    agent.fail["create"] = errdefs.InvalidArgument("bad bundle")

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
        agent.fail["kill"] = errdefs.NotFound("gone")
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
    from shim import agentsandbox

    s, agent, _, _ = svc
    monkeypatch.setattr(agentsandbox, "SLOW_CREATE", 0.05)
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
    s = served(FakeSandbox(agent, Timeouts(create=0.2, default=0.1)))

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
    agent.fail["start"] = errdefs.ResourceExhausted("start: No space left on device: container c1's writable layer")

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
    s = served(FakeSandbox(agent), admit=lambda ann: shim_config.check_annotations(cfg, ann))
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


# -- the sandbox's create sequence, through the Task service ---------------------------------


def test_a_failed_created_hook_undoes_the_create() -> None:
    """A createRuntime hook that fails: the agent's container is deleted again, the sandbox's
    ``deleted`` runs (poststop, the placement's host work undone), containerd gets
    FailedPrecondition naming the container, and the id is free for a new Create."""
    agent = FakeAgent()
    sandbox = FakeSandbox(agent)
    sandbox.fail_created = RuntimeError("createRuntime hook /bin/false exited with 1")
    events: list[Any] = []
    s = served(sandbox, lambda ns, e: events.append(e))

    async def go() -> None:
        with pytest.raises(TtrpcError) as ei:
            await s.Create(pb.CreateTaskRequest(id="c1", bundle="/b/c1"), CTX)
        assert ei.value.code == Code.FAILED_PRECONDITION
        assert ei.value.message == "container c1: createRuntime hook /bin/false exited with 1"
        assert [op for op, _ in agent.calls] == ["create", "delete"]
        assert agent.calls[1][1] == {"container": "c1"}
        assert sandbox.points == [("created", "c1"), ("deleted", "c1")]
        assert s.container("c1") is None and not agent.channels  # stdio relay released
        with pytest.raises(TtrpcError) as ei:
            await s.State(pb.StateRequest(id="c1"), CTX)
        assert ei.value.code == Code.NOT_FOUND
        sandbox.fail_created = None
        assert (await s.Create(pb.CreateTaskRequest(id="c1", bundle="/b/c1"), CTX)).pid > 0

    run(go())
    assert [type(e).__name__ for e in events] == ["TaskCreate"]  # only the second create


def test_a_refused_create_leaves_nothing() -> None:
    """The agent refuses the create: its kind reaches containerd; only the placement is undone
    (no hook ran, so no poststop); an unreachable agent is Unavailable, undone the same way."""
    agent = FakeAgent()
    sandbox = FakeSandbox(agent)
    s = served(sandbox)
    agent.fail["create"] = errdefs.FailedPrecondition("rootfs: not a directory")

    async def go() -> None:
        with pytest.raises(TtrpcError) as ei:
            await s.Create(pb.CreateTaskRequest(id="c1", bundle="/b/c1"), CTX)
        assert (ei.value.code, ei.value.message) == (Code.FAILED_PRECONDITION, "rootfs: not a directory")
        assert sandbox.points == [("deleted", "c1")] and s.container("c1") is None

        async def no_agent() -> Any:
            raise OSError("guest did not boot")

        sandbox.agent = no_agent  # type: ignore[method-assign]
        sandbox.points.clear()
        with pytest.raises(TtrpcError) as ei:
            await s.Create(pb.CreateTaskRequest(id="c2", bundle="/b/c2"), CTX)
        assert ei.value.code == Code.UNAVAILABLE
        assert ei.value.message == "sandbox agent unavailable: guest did not boot"
        assert sandbox.points == [("deleted", "c2")] and s.container("c2") is None

    run(go())


def test_a_mode_conflict_is_refused_before_the_sandbox_sees_it(tmp_path) -> None:  # noqa: ANN001
    import json

    sandbox = FakeSandbox(FakeAgent())
    s = served(sandbox)
    (tmp_path / "config.json").write_text(json.dumps({"annotations": {"io.fractal.mode": "vm"}}))

    async def go() -> None:
        with pytest.raises(TtrpcError) as ei:
            await s.Create(pb.CreateTaskRequest(id="c1", bundle=str(tmp_path)), CTX)
        assert ei.value.code == Code.FAILED_PRECONDITION and "host mode" in ei.value.message

    run(go())
    assert sandbox.placed == [] and sandbox.points == []


def test_delete_after_the_agent_was_lost() -> None:
    """A lost agent (a dead VM, a crashed agent process) took its containers along: Delete still
    succeeds, the host's leftovers are cleaned up once, and containerd gets TaskDelete.  An
    agent that is merely unreachable (not lost) fails the Delete instead."""
    agent = FakeAgent()
    sandbox = FakeSandbox(agent)
    events: list[Any] = []
    s = served(sandbox, lambda ns, e: events.append(e))

    async def go() -> None:
        await s.Create(pb.CreateTaskRequest(id="c1", bundle="/b/c1"), CTX)
        await s.Start(pb.StartRequest(id="c1"), CTX)
        agent.fail["delete"] = errdefs.Unavailable("connection closed: closed by the agent")
        s.on_agent_lost("test")  # the Task service reports the processes exited (255)
        await s.Wait(pb.WaitRequest(id="c1"), CTX)
        with pytest.raises(TtrpcError) as ei:  # not lost (yet): the error stands
            await s.Delete(pb.DeleteRequest(id="c1"), CTX)
        assert ei.value.code == Code.UNAVAILABLE
        sandbox.lost = True
        d = await s.Delete(pb.DeleteRequest(id="c1"), CTX)
        assert d.exit_status == 255

    run(go())
    assert sandbox.points[-2:] == [("cleanup_after_loss", "c1 /b/c1"), ("deleted", "c1")]
    assert [type(e).__name__ for e in events][-2:] == ["TaskExit", "TaskDelete"]


def test_a_sandbox_that_could_not_be_configured_refuses_with_its_reason() -> None:
    from shim.sandbox import FailedSandbox

    s = served(FailedSandbox(errdefs.InvalidArgument("fractal config: io.fractal.mode is not allowed")))

    async def go() -> None:
        with pytest.raises(TtrpcError) as ei:
            await s.Create(pb.CreateTaskRequest(id="c1", bundle="/b/c1"), CTX)
        assert (ei.value.code, ei.value.message) == (
            Code.INVALID_ARGUMENT, "fractal config: io.fractal.mode is not allowed")
        assert s.container("c1") is None

    run(go())


def test_any_sandbox_kind_serves_the_task_api() -> None:
    """The Task service needs nothing of a sandbox but the interface: a kind that is no agent
    sandbox at all (here: processes in a dict) runs a container's whole life through it."""
    from shim.sandbox import Created, Exit, NewContainer, ProcessEntry, RootLayers, Sandbox, Stdio

    class NullRelay:
        def start_stdin(self) -> None: ...
        def close_stdin(self) -> None: ...
        async def wait_output(self, timeout: float | None) -> bool:
            return True
        def close(self) -> None: ...

    class DictSandbox(Sandbox):
        mode = "dict"

        def __init__(self) -> None:
            self.procs: dict[str, int] = {}

        async def start(self) -> None: ...
        async def stop(self) -> None: ...
        def describe(self) -> dict[str, Any]:
            return {"mode": self.mode}

        async def create(self, c: NewContainer) -> Created:
            self.procs[c.id] = 7
            return Created(7, NullRelay())

        async def start_process(self, cid: str, exec_id: str = "") -> int:
            return self.procs[cid]

        async def exec(self, cid: str, exec_id: str, process: dict[str, Any], stdio: Stdio) -> Any:
            return NullRelay()

        async def kill(self, cid: str, exec_id: str, signal: int, all: bool = False) -> None:  # noqa: A002
            assert self.on_event is not None
            self.on_event({"event": "exit", "container": cid, "exec": exec_id, "pid": 7,
                           "exit_status": 128 + signal, "exited_at": 1})

        async def delete(self, cid: str, exec_id: str = "") -> Exit:
            if cid not in self.procs:
                raise errdefs.NotFound(f"{cid}: gone")
            del self.procs[cid]
            return Exit(0, 0)

        async def pids(self, cid: str) -> list[ProcessEntry]:
            return [ProcessEntry(self.procs[cid], "")]

        async def pause(self, cid: str) -> None: ...
        async def resume(self, cid: str) -> None: ...
        async def resize_pty(self, cid: str, exec_id: str, width: int, height: int) -> None: ...
        async def update(self, cid: str, resources: dict[str, Any]) -> None: ...
        async def stats(self, cid: str) -> dict[str, Any]:
            return {}

        async def layers(self, cid: str) -> RootLayers:
            return RootLayers([], None, [])

        async def restack(self, cid: str, add: list[str], remove: list[str],
                          position: str | int) -> list[str]:
            raise errdefs.Unimplemented("no layers here")

    sandbox = DictSandbox()
    events: list[Any] = []
    s = Served(TaskService(sandbox, lambda ns, e: events.append(e), "ns1"))
    sandbox.on_event = s.on_agent_event

    async def go() -> None:
        assert (await s.Create(pb.CreateTaskRequest(id="c1", bundle="/b/c1"), CTX)).pid == 7
        await s.Start(pb.StartRequest(id="c1"), CTX)
        assert [p.pid for p in (await s.Pids(pb.PidsRequest(id="c1"), CTX)).processes] == [7]
        await s.Kill(pb.KillRequest(id="c1", signal=9), CTX)
        assert (await s.Wait(pb.WaitRequest(id="c1"), CTX)).exit_status == 137
        await s.Delete(pb.DeleteRequest(id="c1"), CTX)

    run(go())
    assert [type(e).__name__ for e in events] == ["TaskCreate", "TaskStart", "TaskExit", "TaskDelete"]
    assert sandbox.procs == {}
