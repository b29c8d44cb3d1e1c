"""The containerd Task service (``containerd.task.v2.Task``) on top of one sandbox.

Every RPC that touches a container is one call of the :class:`shim.sandbox.Sandbox` interface
(which runs it: the sandbox owns placement, the agent, hooks and their undoing); this service
keeps what containerd sees: the state machine is :mod:`shim.state`, stdio relaying
:mod:`shim.stdio` (relays the sandbox connected), events :mod:`shim.events`.  Handlers never
wait for event delivery.  Exits come from the sandbox's ``exit`` events; a process is reported
stopped (Wait returns, TaskExit is published) only after its output was fully relayed and after
its TaskStart went out, so containerd always sees create, start, exit, delete in that order.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Coroutine
from typing import Any

from google.protobuf import any_pb2, empty_pb2

from ccpu.api.gen.containerd.events import task_pb2 as ev
from ccpu.api.gen.containerd.runtime.v2.task import shim_pb2 as pb
from ccpu.api.gen.containerd.types.task import task_pb2 as task_types
from ccpu import errdefs
from ccpu.agent import jsonbound
from ccpu.ttrpc import RequestContext
from ccpu import logfmt
from shim import agentvalues, rootfs as rootfs_mod
from shim.agentvalues import BadAgentValue
from shim.config import ConfigError, conflict
from shim.errors import config_error
from shim.events import timestamp
from shim.sandbox import NewContainer, Sandbox, Stdio
from shim.state import Container, Process, Status, Tasks

log = logging.getLogger("shim.task")

SERVICE = "containerd.task.v2.Task"

#: How long an exit waits for the agent to finish relaying the process's output.
OUTPUT_GRACE = 10.0

#: at most one TaskOOM per container per this many seconds (the agent could send millions)
OOM_INTERVAL = 1.0


def _process_details(exec_id: str) -> Any:
    """runc's ProcessDetails (exec id of a pid) for `ctr task ps` (imported when first used)."""
    try:
        from ccpu.api.gen.containerd.runtime.v2.runc.options import oci_pb2
    except ImportError:  # pragma: no cover
        return None
    return _any(oci_pb2.ProcessDetails(exec_id=exec_id))


def _read_spec(bundle: str) -> dict[str, Any] | None:
    """The bundle's config.json (None if unreadable: the agent then reports it)."""
    try:
        with open(os.path.join(bundle, "config.json"), "rb") as f:
            spec = jsonbound.loads(f.read())
    except (OSError, ValueError):
        return None
    return spec if isinstance(spec, dict) else None


def _annotations(spec: dict[str, Any] | None) -> dict[str, str]:
    ann = (spec or {}).get("annotations")
    return {str(k): str(v) for k, v in ann.items()} if isinstance(ann, dict) else {}


def _any(msg: Any) -> any_pb2.Any:
    return any_pb2.Any(type_url=msg.DESCRIPTOR.full_name, value=msg.SerializeToString())


class TaskService:
    """Task RPC handlers for the containers of one shim.

    ``sandbox`` runs the containers (shim/sandbox.py: every container operation goes there);
    this service keeps what containerd sees of them (shim/state.py), publishes their events and
    owns their stdio relays once the sandbox connected them.  ``publish(namespace, event)``
    queues an event; ``request_exit()`` is called when Shutdown finds no containers left.
    Handlers raise :mod:`ccpu.errdefs` errors; the daemon serves them through
    ``shim.errors.at_edge``, the one place they become ttrpc codes.
    """

    def __init__(self, sandbox: Sandbox, publish: Callable[[str, Any], None], namespace: str,
                 *, repo_root: str | None = None,
                 request_exit: Callable[[], None] | None = None,
                 on_change: Callable[[], None] | None = None,
                 admit: Callable[[dict[str, str]], None] | None = None) -> None:
        self.sandbox = sandbox
        #: raises shim.config.ConfigError for a container the sandbox's config refuses
        #: (a Kubernetes pod's annotation the operator does not allow)
        self.admit = admit
        self.publish_event = publish
        self.namespace = namespace
        self.repo_root = repo_root
        self.request_exit = request_exit or (lambda: None)
        self.on_change = on_change or (lambda: None)
        self.tasks = Tasks()
        self._exit_tasks: set[asyncio.Task[None]] = set()
        #: agent events dropped, by reason (unknown process, finished, malformed, ...)
        self.dropped_events: dict[str, int] = {}
        self._last_oom: dict[str, float] = {}

    # -- plumbing ---------------------------------------------------------------------------

    def methods(self) -> dict[str, tuple[type, Callable[..., Any]]]:
        """The handlers by RPC name (served through ``shim.errors.at_edge``)."""
        return {
            "State": (pb.StateRequest, self.State),
            "Create": (pb.CreateTaskRequest, self.Create),
            "Start": (pb.StartRequest, self.Start),
            "Delete": (pb.DeleteRequest, self.Delete),
            "Pids": (pb.PidsRequest, self.Pids),
            "Pause": (pb.PauseRequest, self.Pause),
            "Resume": (pb.ResumeRequest, self.Resume),
            "Checkpoint": (pb.CheckpointTaskRequest, self.Checkpoint),
            "Kill": (pb.KillRequest, self.Kill),
            "Exec": (pb.ExecProcessRequest, self.Exec),
            "ResizePty": (pb.ResizePtyRequest, self.ResizePty),
            "CloseIO": (pb.CloseIORequest, self.CloseIO),
            "Update": (pb.UpdateTaskRequest, self.Update),
            "Wait": (pb.WaitRequest, self.Wait),
            "Stats": (pb.StatsRequest, self.Stats),
            "Connect": (pb.ConnectRequest, self.Connect),
            "Shutdown": (pb.ShutdownRequest, self.Shutdown),
        }

    def publish(self, event: Any) -> None:
        self.publish_event(self.namespace, event)

    def container(self, cid: str) -> Container | None:
        """Container ``cid`` of this shim, if it has one (for the Layers service)."""
        return self.tasks.containers.get(cid)

    # -- agent events -----------------------------------------------------------------------

    def _drop_event(self, reason: str, detail: str) -> None:
        """Count a dropped agent event; log the 1st, 2nd, 4th, 8th... of each reason (a
        flooding guest cannot flood the log)."""
        n = self.dropped_events.get(reason, 0) + 1
        self.dropped_events[reason] = n
        if n & (n - 1) == 0:
            log.warning("agent event dropped (%s): %s; %d dropped for this reason so far",
                        reason, detail, n)

    def on_agent_event(self, event: dict[str, Any]) -> None:
        """An event from the agent.  Each is checked before it changes anything: an exit for
        an unknown or already finished process, a malformed one or one out of range is dropped
        and counted, so a process gets at most one exit task however many frames arrive."""
        name = event.get("event")
        if name == "exit":
            try:
                e = agentvalues.ExitEvent.parse(event)
            except BadAgentValue as exc:
                self._drop_event("malformed exit", str(exc))
                return
            try:
                proc = self.tasks.process(e.container, e.exec_id)
            except errdefs.NotFound:
                self._drop_event("exit of an unknown process", f"{e.container}/{e.exec_id}")
                return
            if proc.status == Status.STOPPED or proc.exit_pending:
                self._drop_event("exit of a finished process", proc.name)
                return
            proc.exit_pending = True
            self._spawn(self._process_exited(proc, e.pid or proc.pid, e.exit_status,
                                             e.exited_at or time.time_ns()))
        elif name == "oom":
            try:
                cid = agentvalues.ident(event.get("container"), "container id")
            except BadAgentValue as exc:
                self._drop_event("malformed oom", str(exc))
                return
            if cid not in self.tasks.containers:
                self._drop_event("oom of an unknown container", cid)
                return
            now = time.monotonic()
            last = self._last_oom.get(cid)
            if last is not None and now - last < OOM_INTERVAL:
                self._drop_event("oom repeated within a second", cid)
                return
            self._last_oom[cid] = now
            self.publish(ev.TaskOOM(container_id=cid))
        else:
            self._drop_event("unknown event", agentvalues.clip(name))

    def on_agent_lost(self, why: str) -> None:
        """The agent is gone: every process still alive is reported exited (255)."""
        log.error("agent lost (%s): %d live processes reported exited", why,
                  len(self.tasks.live_processes()))
        now = time.time_ns()
        for proc in self.tasks.live_processes():
            if proc.io is not None:
                proc.io.close()
            self._spawn(self._process_exited(proc, proc.pid, 255, now))

    async def _process_exited(self, proc: Process, pid: int, status: int, at: int) -> None:
        logfmt.bind(container=proc.container, exec=proc.exec_id)  # this task's own context
        if proc.status == Status.STOPPED:
            return
        if proc.io is not None and not await proc.io.wait_output(OUTPUT_GRACE):
            log.warning("%s: output not closed %.0fs after exit", proc.name, OUTPUT_GRACE)
        if proc.starting:
            await proc.started.wait()
        if proc.status == Status.STOPPED:
            return
        proc.pid = pid or proc.pid
        proc.mark_exited(status, at)
        log.info("%s exited with %d", proc.name, status)
        self.publish(ev.TaskExit(container_id=proc.container, id=proc.exec_id or proc.container,
                                 pid=proc.pid, exit_status=status, exited_at=timestamp(at)))

    # -- RPCs -------------------------------------------------------------------------------

    async def State(self, req: pb.StateRequest, ctx: RequestContext) -> pb.StateResponse:
        c = self.tasks.get(req.id)
        p = c.process(req.exec_id)
        resp = pb.StateResponse(
            id=p.exec_id or c.id, bundle=c.bundle, pid=p.pid, status=int(p.status),
            stdin=p.stdin, stdout=p.stdout, stderr=p.stderr, terminal=p.terminal,
            exit_status=p.exit_status, exec_id=p.exec_id)
        if p.exited_at:
            resp.exited_at.CopyFrom(timestamp(p.exited_at))
        return resp

    async def Create(self, req: pb.CreateTaskRequest, ctx: RequestContext) -> pb.CreateTaskResponse:
        if req.checkpoint or req.parent_checkpoint:
            raise errdefs.Unimplemented("checkpoint/restore is not supported")
        if req.id in self.tasks.containers:
            raise errdefs.AlreadyExists(f"container {req.id}: already exists")
        rootfs = rootfs_mod.parse(list(req.rootfs), self.repo_root)
        spec = _read_spec(req.bundle)
        annotations = _annotations(spec)
        if self.admit is not None:
            try:
                self.admit(annotations)
            except ConfigError as exc:
                raise config_error(exc, f"container {req.id}: ") from None
        why = conflict(self.sandbox.mode, annotations)
        if why:
            raise errdefs.FailedPrecondition(f"container {req.id}: {why}")
        proc = Process(container=req.id, exec_id="", stdin=req.stdin, stdout=req.stdout,
                       stderr=req.stderr, terminal=req.terminal)
        self.tasks.add(Container(id=req.id, bundle=req.bundle, init=proc, rootfs=list(req.rootfs)))
        try:  # placement, the agent's create, hooks -- undone by the sandbox if a step fails
            created = await self.sandbox.create(NewContainer(
                id=req.id, bundle=req.bundle, rootfs=rootfs, spec=spec,
                stdio=Stdio(req.stdin, req.stdout, req.stderr, req.terminal)))
        except BaseException:
            self.tasks.remove(req.id)
            raise
        proc.pid, proc.io = created.pid, created.io
        log.info("created %s (pid %d, rootfs %s)", req.id, proc.pid, rootfs_mod.kind(rootfs))
        self.on_change()
        self.publish(ev.TaskCreate(
            container_id=req.id, bundle=req.bundle, rootfs=list(req.rootfs),
            io=ev.TaskIO(stdin=req.stdin, stdout=req.stdout, stderr=req.stderr,
                         terminal=req.terminal),
            checkpoint=req.checkpoint, pid=proc.pid))
        return pb.CreateTaskResponse(pid=proc.pid)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._exit_tasks.add(t)
        t.add_done_callback(self._exit_tasks.discard)

    async def Start(self, req: pb.StartRequest, ctx: RequestContext) -> pb.StartResponse:
        proc = self.tasks.process(req.id, req.exec_id)
        proc.check_start()
        proc.starting = True
        proc.started.clear()
        try:
            proc.mark_running(await self.sandbox.start_process(req.id, req.exec_id))
            log.info("started %s (pid %d)", proc.name, proc.pid)
            # stdin flows once the process exists: the FIFO holds what comes earlier
            if proc.io is not None:
                proc.io.start_stdin()
            if proc.is_init:
                self.publish(ev.TaskStart(container_id=req.id, pid=proc.pid))
            else:
                self.publish(ev.TaskExecStarted(container_id=req.id, exec_id=req.exec_id,
                                                pid=proc.pid))
        finally:
            proc.starting = False
            proc.started.set()
        return pb.StartResponse(pid=proc.pid)

    async def Delete(self, req: pb.DeleteRequest, ctx: RequestContext) -> pb.DeleteResponse:
        c = self.tasks.get(req.id)
        proc = c.process(req.exec_id)
        proc.check_delete()
        # the init's delete takes the container's remaining execs along (runc's shim does too);
        # a process the sandbox forgot, or lost with the agent, is deleted all the same
        end = await self.sandbox.delete(req.id, req.exec_id)
        if proc.io is not None:
            proc.io.close()
        if proc.status != Status.STOPPED:  # created, never started
            proc.mark_exited(end.status, end.at or time.time_ns())
        pid = proc.pid
        exit_status = proc.exit_status
        exited_at = proc.exited_at or time.time_ns()
        if proc.is_init:
            for e in c.execs.values():
                if e.io is not None:
                    e.io.close()
            self.tasks.remove(req.id)
            self._last_oom.pop(req.id, None)
            self.on_change()
            self.publish(ev.TaskDelete(container_id=req.id, pid=pid, exit_status=exit_status,
                                       exited_at=timestamp(exited_at), id=req.id))
        else:
            c.execs.pop(req.exec_id, None)
        resp = pb.DeleteResponse(pid=pid, exit_status=exit_status)
        resp.exited_at.CopyFrom(timestamp(exited_at))
        return resp

    async def Pids(self, req: pb.PidsRequest, ctx: RequestContext) -> pb.PidsResponse:
        self.tasks.get(req.id)
        resp = pb.PidsResponse()
        for entry in await self.sandbox.pids(req.id):
            info = task_types.ProcessInfo(pid=entry.pid)
            details = _process_details(entry.exec_id) if entry.exec_id else None
            if details is not None:
                info.info.CopyFrom(details)
            resp.processes.append(info)
        return resp

    async def Pause(self, req: pb.PauseRequest, ctx: RequestContext) -> empty_pb2.Empty:
        c = self.tasks.get(req.id)
        c.check_pause()
        c.init.status = Status.PAUSING
        try:
            await self.sandbox.pause(req.id)
        except BaseException:
            if c.init.status == Status.PAUSING:
                c.init.status = Status.RUNNING
            raise
        if c.init.status == Status.PAUSING:
            c.init.status = Status.PAUSED
        self.publish(ev.TaskPaused(container_id=req.id))
        return empty_pb2.Empty()

    async def Resume(self, req: pb.ResumeRequest, ctx: RequestContext) -> empty_pb2.Empty:
        c = self.tasks.get(req.id)
        c.check_resume()
        await self.sandbox.resume(req.id)
        c.set_paused(False)
        self.publish(ev.TaskResumed(container_id=req.id))
        return empty_pb2.Empty()

    async def Checkpoint(self, req: pb.CheckpointTaskRequest, ctx: RequestContext) -> empty_pb2.Empty:
        raise errdefs.Unimplemented("checkpoint is not supported by fractal")

    async def Kill(self, req: pb.KillRequest, ctx: RequestContext) -> empty_pb2.Empty:
        proc = self.tasks.process(req.id, req.exec_id)
        if proc.status == Status.STOPPED and not req.all:
            raise errdefs.NotFound(f"process {proc.name} already finished")
        await self.sandbox.kill(req.id, req.exec_id, int(req.signal), bool(req.all))
        return empty_pb2.Empty()

    async def Exec(self, req: pb.ExecProcessRequest, ctx: RequestContext) -> empty_pb2.Empty:
        c = self.tasks.get(req.id)
        if not req.exec_id:
            raise errdefs.InvalidArgument("exec id is required")
        try:
            process_spec = jsonbound.loads(req.spec.value or b"{}")
        except ValueError as exc:
            raise errdefs.InvalidArgument(f"exec spec is not JSON: {exc}") from exc
        proc = Process(container=req.id, exec_id=req.exec_id, stdin=req.stdin,
                       stdout=req.stdout, stderr=req.stderr, terminal=req.terminal)
        c.add_exec(proc)
        try:
            proc.io = await self.sandbox.exec(req.id, req.exec_id, process_spec,
                                              Stdio(req.stdin, req.stdout, req.stderr, req.terminal))
        except BaseException:
            c.execs.pop(req.exec_id, None)
            raise
        self.publish(ev.TaskExecAdded(container_id=req.id, exec_id=req.exec_id))
        return empty_pb2.Empty()

    async def ResizePty(self, req: pb.ResizePtyRequest, ctx: RequestContext) -> empty_pb2.Empty:
        self.tasks.process(req.id, req.exec_id)
        await self.sandbox.resize_pty(req.id, req.exec_id, int(req.width), int(req.height))
        return empty_pb2.Empty()

    async def CloseIO(self, req: pb.CloseIORequest, ctx: RequestContext) -> empty_pb2.Empty:
        proc = self.tasks.process(req.id, req.exec_id)
        if req.stdin and proc.io is not None:
            proc.io.close_stdin()
        return empty_pb2.Empty()

    async def Update(self, req: pb.UpdateTaskRequest, ctx: RequestContext) -> empty_pb2.Empty:
        """New resources for a container: containerd sends the OCI LinuxResources as JSON in
        the Any (typeurl registers runtime-spec types as JSON); the agent runs `runc update`."""
        self.tasks.get(req.id)
        try:
            resources = jsonbound.loads(req.resources.value or b"{}")
        except ValueError as exc:
            raise errdefs.InvalidArgument(f"resources are not JSON: {exc}") from exc
        if not isinstance(resources, dict):
            raise errdefs.InvalidArgument("resources must be a JSON object")
        await self.sandbox.update(req.id, resources)
        return empty_pb2.Empty()

    async def Wait(self, req: pb.WaitRequest, ctx: RequestContext) -> pb.WaitResponse:
        proc = self.tasks.process(req.id, req.exec_id)
        await proc.exited.wait()
        resp = pb.WaitResponse(exit_status=proc.exit_status)
        resp.exited_at.CopyFrom(timestamp(proc.exited_at))
        return resp

    async def Stats(self, req: pb.StatsRequest, ctx: RequestContext) -> pb.StatsResponse:
        self.tasks.get(req.id)
        result = await self.sandbox.stats(req.id)
        from shim import metrics

        resp = pb.StatsResponse()
        resp.stats.CopyFrom(metrics.to_any(result))
        return resp

    async def Connect(self, req: pb.ConnectRequest, ctx: RequestContext) -> pb.ConnectResponse:
        c = self.tasks.containers.get(req.id)
        return pb.ConnectResponse(shim_pid=os.getpid(), task_pid=c.init.pid if c else 0,
                                  version="2")

    async def Shutdown(self, req: pb.ShutdownRequest, ctx: RequestContext) -> empty_pb2.Empty:
        if len(self.tasks) == 0:
            log.info("shutdown requested (%s): no containers left, exiting", req.id)
            self.request_exit()
        else:
            log.info("shutdown requested (%s): %d containers remain, staying", req.id,
                     len(self.tasks))
        return empty_pb2.Empty()

    async def drain_exits(self) -> None:
        if self._exit_tasks:
            await asyncio.wait(set(self._exit_tasks), timeout=OUTPUT_GRACE)
