"""The containerd Task service (``containerd.task.v2.Task``) on top of one sandbox's agent.

Every RPC is translated into agent operations (docs/agent-protocol.md); the state machine is
:mod:`shim.state`, stdio relaying :mod:`shim.stdio`, events :mod:`shim.events`.  Handlers never
wait for event delivery.  Exits come from the agent's ``exit`` events; a process is reported
stopped (Wait returns, TaskExit is published) only after its output was fully relayed and after
its TaskStart went out, so containerd always sees create, start, exit, delete in that order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from google.protobuf import any_pb2, empty_pb2

from ccpu.api.gen.containerd.events import task_pb2 as ev
from ccpu.api.gen.containerd.runtime.v2.task import shim_pb2 as pb
from ccpu.api.gen.containerd.types.task import task_pb2 as task_types
from ccpu.agent import jsonbound
from ccpu.ttrpc import Code, RequestContext, TtrpcError
from ccpu import logfmt
from shim import agentvalues, rootfs as rootfs_mod
from shim.agentvalues import BadAgentValue
from shim.config import ConfigError, Timeouts, conflict
from shim.errors import agent_error_code, config_error, to_ttrpc
from shim.events import timestamp
from shim.state import Container, Process, Status, Tasks
from shim.stdio import ProcessIO

log = logging.getLogger("shim.task")

#: seconds after which a create still waiting on the agent is logged, with what the sandbox can
#: tell (a VM: its console's tail) -- a hang should leave a trace before containerd's timeout
SLOW_CREATE = 30.0

SERVICE = "containerd.task.v2.Task"

#: How long an exit waits for the agent to finish relaying the process's output.
OUTPUT_GRACE = 10.0

#: at most one TaskOOM per container per this many seconds (the agent could send millions)
OOM_INTERVAL = 1.0


def _checked(what: str, fn: Callable[[], Any]) -> Any:
    """``fn()``, with a value out of range from the agent as a clear INTERNAL error."""
    try:
        return fn()
    except BadAgentValue as exc:
        raise TtrpcError(Code.INTERNAL, f"{what}: {exc}") from None


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

    ``sandbox`` gives the agent (``await sandbox.agent()``); ``publish(namespace, event)``
    queues an event; ``request_exit()`` is called when Shutdown finds no containers left.
    """

    def __init__(self, sandbox: Any, publish: Callable[[str, Any], None], namespace: str,
                 *, repo_root: str | None = None,
                 request_exit: Callable[[], None] | None = None,
                 on_change: Callable[[], None] | None = None,
                 admit: Callable[[dict[str, str]], None] | None = None,
                 timeouts: Timeouts | None = None) -> None:
        self.sandbox = sandbox
        #: raises shim.config.ConfigError for a container the sandbox's config refuses
        #: (a Kubernetes pod's annotation the operator does not allow)
        self.admit = admit
        self.timeouts = timeouts or Timeouts()
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

    async def _agent(self) -> Any:
        try:
            return await self.sandbox.agent()
        except TtrpcError:
            raise
        except Exception as exc:
            raise TtrpcError(Code.UNAVAILABLE, f"sandbox agent unavailable: {exc}") from exc

    async def _call(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        """The agent's answer to ``op``, within ``self.timeouts`` (docs/shim.md): a guest that
        is stuck, stopped or overloaded gives DEADLINE_EXCEEDED naming what did not answer,
        never a caller waiting for ever.  Agent errors map to ttrpc codes here, once."""
        agent = await self._agent()
        limit = self.timeouts.for_op(op)
        call = asyncio.ensure_future(agent.call(op, args))
        try:
            done, _ = await asyncio.wait({call}, timeout=limit)
        except BaseException:  # our caller gave up (containerd's deadline, a closed connection)
            call.cancel()
            raise
        if not done:
            self._undo_when_answered(op, args, call)
            raise TtrpcError(Code.DEADLINE_EXCEEDED, self._no_answer(op, args, limit))
        try:
            return call.result()
        except TtrpcError:
            raise
        except Exception as exc:
            code = agent_error_code(exc)
            if code is not None:
                raise to_ttrpc(code, getattr(exc, "message", str(exc))) from exc
            raise TtrpcError(Code.UNAVAILABLE, f"agent {op}: {exc}") from exc

    def _no_answer(self, op: str, args: dict[str, Any], limit: float) -> str:
        what = f" of container {args['container']}" if args.get("container") else ""
        if args.get("exec"):
            what += f" (exec {args['exec']})"
        where = getattr(self.sandbox, "mode", "")
        pid = getattr(self.sandbox, "pid", None)
        agent = f"the {where} sandbox's agent" + (f" (VM pid {pid})" if where == "vm" and pid else "")
        return (f"{agent} did not answer {op}{what} within {limit:g}s: it is stuck or overloaded "
                "(deadline exceeded; timeouts in the fractal config's [timeouts])")

    def _undo_when_answered(self, op: str, args: dict[str, Any], call: asyncio.Future[Any]) -> None:
        """A create or exec we gave up on may still succeed in the agent: undo it then, so the
        container or exec id is free again and nothing runs that containerd does not know."""
        log.warning("agent did not answer %s %s in time; undoing it if it still succeeds", op,
                    args.get("container", ""))

        def answered(fut: asyncio.Future[Any]) -> None:
            if fut.cancelled() or fut.exception() is not None or op not in ("create", "exec"):
                return
            undo = {"container": args["container"], **({"exec": args["exec"]} if op == "exec" else {})}
            log.warning("late answer to %s %s: deleting it again", op, undo)

            async def delete() -> None:
                with contextlib.suppress(Exception):
                    agent = await self._agent()  # created / never-started processes delete directly
                    await asyncio.wait_for(agent.call("delete", undo), self.timeouts.delete)

            self._spawn(delete())

        call.add_done_callback(answered)

    @staticmethod
    def _exec_arg(exec_id: str) -> dict[str, str]:
        return {"exec": exec_id} if exec_id else {}

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
            except TtrpcError:
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
            raise TtrpcError(Code.UNIMPLEMENTED, "checkpoint/restore is not supported")
        if req.id in self.tasks.containers:
            raise TtrpcError(Code.ALREADY_EXISTS, f"container {req.id}: already exists")
        rootfs = rootfs_mod.translate(list(req.rootfs), self.repo_root)
        spec = _read_spec(req.bundle)
        annotations = _annotations(spec)
        if self.admit is not None:
            try:
                self.admit(annotations)
            except ConfigError as exc:
                raise config_error(exc, f"container {req.id}: ") from None
        why = conflict(getattr(self.sandbox, "mode", "host"), annotations)
        if why:
            raise TtrpcError(Code.FAILED_PRECONDITION, f"container {req.id}: {why}")
        place = getattr(self.sandbox, "placement", None)  # where it runs (shim.sandbox, shim.vm)
        placement = (place(req.id, req.bundle, rootfs, spec) if place is not None
                     else {"bundle": req.bundle, "rootfs": rootfs})
        agent = await self._agent()
        proc = Process(container=req.id, exec_id="", stdin=req.stdin, stdout=req.stdout,
                       stderr=req.stderr, terminal=req.terminal)
        container = Container(id=req.id, bundle=req.bundle, init=proc, rootfs=list(req.rootfs))
        self.tasks.add(container)
        try:
            proc.io = ProcessIO(agent, req.stdin, req.stdout, req.stderr, req.terminal,
                                container_id=req.id, namespace=self.namespace)
            slow = asyncio.get_running_loop().call_later(
                SLOW_CREATE, lambda: self._spawn(self._log_slow_create(req.id, agent)))
            try:
                result = await self._call("create", {
                    "container": req.id, **placement,
                    "terminal": req.terminal, **proc.io.agent_args()})
            finally:
                slow.cancel()
        except BaseException:
            if proc.io is not None:
                proc.io.close()
            self.tasks.remove(req.id)
            await self.sandbox.deleted(req.id)  # forgets it (no hook ran yet)
            raise
        proc.pid = _checked(f"create {req.id}", lambda: agentvalues.result_pid(result, "create"))
        try:
            await self.sandbox.created(req.id, proc.pid)
        except Exception as exc:  # e.g. a createRuntime hook failed: undo the create
            with contextlib.suppress(Exception):
                await self._call("delete", {"container": req.id})
            proc.io.close()
            self.tasks.remove(req.id)
            await self.sandbox.deleted(req.id)  # poststop hooks, as the runtime spec says
            raise TtrpcError(Code.FAILED_PRECONDITION, f"container {req.id}: {exc}") from None
        log.info("created %s (pid %d, rootfs %s)", req.id, proc.pid, rootfs["kind"])
        self.on_change()
        self.publish(ev.TaskCreate(
            container_id=req.id, bundle=req.bundle, rootfs=list(req.rootfs),
            io=ev.TaskIO(stdin=req.stdin, stdout=req.stdout, stderr=req.stderr,
                         terminal=req.terminal),
            checkpoint=req.checkpoint, pid=proc.pid))
        return pb.CreateTaskResponse(pid=proc.pid)

    def _spawn(self, coro: Any) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._exit_tasks.add(t)
        t.add_done_callback(self._exit_tasks.discard)

    async def _log_slow_create(self, cid: str, agent: Any) -> None:
        """A create still unanswered: log what the agent's processes are doing (it serves
        requests concurrently) and what the sandbox can tell (a VM: its console)."""
        try:
            procs = (await asyncio.wait_for(agent.call("diagnose", {}), 10)).get("processes", [])
            ps = "\n".join(f"  {p.get('pid')} {p.get('state')} {p.get('wchan') or '-'} {p.get('age_s')}s "
                           f"{p.get('cmd')}" for p in procs) or "  (none)"
        except Exception as exc:  # noqa: BLE001 - a diagnostic must not raise
            ps = f"  (agent did not answer diagnose: {exc!r})"
        log.warning("create of %s: no answer from the agent after %.0fs; its processes (pid state "
                    "wchan age cmd):\n%s\n%s", cid, SLOW_CREATE, ps, self.sandbox.diagnose())

    async def Start(self, req: pb.StartRequest, ctx: RequestContext) -> pb.StartResponse:
        proc = self.tasks.process(req.id, req.exec_id)
        proc.check_start()
        proc.starting = True
        proc.started.clear()
        try:
            result = await self._call("start", {"container": req.id,
                                                **self._exec_arg(req.exec_id)})
            proc.mark_running(_checked(f"start {proc.name}",
                                       lambda: agentvalues.result_pid(result, "start")))
            # stdin flows once the process exists: the FIFO holds what comes earlier
            if proc.io is not None:
                proc.io.start_stdin()
            if proc.is_init:
                self.publish(ev.TaskStart(container_id=req.id, pid=proc.pid))
                await self.sandbox.started(req.id, proc.pid)
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
        if proc.is_init and any(p.status != Status.STOPPED for p in c.execs.values()):
            # runc's shim kills remaining execs with the container; the agent does the same
            pass
        result: dict[str, Any] = {}
        try:
            result = await self._call("delete", {"container": req.id,
                                                 **self._exec_arg(req.exec_id)})
        except TtrpcError as exc:
            # NotFound: the agent has forgotten it; a lost agent (dead VM) took it along
            lost = exc.code == Code.UNAVAILABLE and getattr(self.sandbox, "lost", False)
            if exc.code != Code.NOT_FOUND and not lost:
                raise
            if lost and proc.is_init:
                await asyncio.to_thread(self.sandbox.cleanup_after_loss, req.id, c.bundle)
        if proc.io is not None:
            proc.io.close()
        if proc.status != Status.STOPPED:  # created, never started
            status, at = _checked(f"delete {proc.name}", lambda: agentvalues.result_exit(result))
            proc.mark_exited(status, at or time.time_ns())
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
            await self.sandbox.deleted(req.id)
            self.publish(ev.TaskDelete(container_id=req.id, pid=pid, exit_status=exit_status,
                                       exited_at=timestamp(exited_at), id=req.id))
        else:
            c.execs.pop(req.exec_id, None)
        resp = pb.DeleteResponse(pid=pid, exit_status=exit_status)
        resp.exited_at.CopyFrom(timestamp(exited_at))
        return resp

    async def Pids(self, req: pb.PidsRequest, ctx: RequestContext) -> pb.PidsResponse:
        self.tasks.get(req.id)
        result = await self._call("pids", {"container": req.id})
        resp = pb.PidsResponse()
        entries = result.get("processes", [])
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise TtrpcError(Code.INTERNAL, "pids: agent sent a malformed process list")
        for entry in entries:
            info = task_types.ProcessInfo(pid=_checked("pids", lambda: agentvalues.pid(entry.get("pid", 0))))
            exec_id = _checked("pids", lambda: agentvalues.ident(entry.get("exec", ""), "exec id", empty=True))
            details = _process_details(exec_id) if exec_id else None
            if details is not None:
                info.info.CopyFrom(details)
            resp.processes.append(info)
        return resp

    async def Pause(self, req: pb.PauseRequest, ctx: RequestContext) -> empty_pb2.Empty:
        c = self.tasks.get(req.id)
        c.check_pause()
        c.init.status = Status.PAUSING
        try:
            await self._call("pause", {"container": req.id})
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
        await self._call("resume", {"container": req.id})
        c.set_paused(False)
        self.publish(ev.TaskResumed(container_id=req.id))
        return empty_pb2.Empty()

    async def Checkpoint(self, req: pb.CheckpointTaskRequest, ctx: RequestContext) -> empty_pb2.Empty:
        raise TtrpcError(Code.UNIMPLEMENTED, "checkpoint is not supported by fractal")

    async def Kill(self, req: pb.KillRequest, ctx: RequestContext) -> empty_pb2.Empty:
        proc = self.tasks.process(req.id, req.exec_id)
        if proc.status == Status.STOPPED and not req.all:
            raise TtrpcError(Code.NOT_FOUND, f"process {proc.name} already finished")
        await self._call("kill", {"container": req.id, **self._exec_arg(req.exec_id),
                                  "signal": int(req.signal), "all": bool(req.all)})
        return empty_pb2.Empty()

    async def Exec(self, req: pb.ExecProcessRequest, ctx: RequestContext) -> empty_pb2.Empty:
        c = self.tasks.get(req.id)
        if not req.exec_id:
            raise TtrpcError(Code.INVALID_ARGUMENT, "exec id is required")
        try:
            process_spec = jsonbound.loads(req.spec.value or b"{}")
        except ValueError as exc:
            raise TtrpcError(Code.INVALID_ARGUMENT, f"exec spec is not JSON: {exc}") from exc
        agent = await self._agent()
        proc = Process(container=req.id, exec_id=req.exec_id, stdin=req.stdin,
                       stdout=req.stdout, stderr=req.stderr, terminal=req.terminal)
        c.add_exec(proc)
        try:
            proc.io = ProcessIO(agent, req.stdin, req.stdout, req.stderr, req.terminal,
                                container_id=req.id, namespace=self.namespace)
            await self._call("exec", {"container": req.id, "exec": req.exec_id,
                                      "process": process_spec, "terminal": req.terminal,
                                      **proc.io.agent_args()})
        except BaseException:
            if proc.io is not None:
                proc.io.close()
            c.execs.pop(req.exec_id, None)
            raise
        self.publish(ev.TaskExecAdded(container_id=req.id, exec_id=req.exec_id))
        return empty_pb2.Empty()

    async def ResizePty(self, req: pb.ResizePtyRequest, ctx: RequestContext) -> empty_pb2.Empty:
        self.tasks.process(req.id, req.exec_id)
        await self._call("resize_pty", {"container": req.id, **self._exec_arg(req.exec_id),
                                        "width": int(req.width), "height": int(req.height)})
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
            raise TtrpcError(Code.INVALID_ARGUMENT, f"resources are not JSON: {exc}") from exc
        if not isinstance(resources, dict):
            raise TtrpcError(Code.INVALID_ARGUMENT, "resources must be a JSON object")
        await self._call("update", {"container": req.id, "resources": resources})
        return empty_pb2.Empty()

    async def Wait(self, req: pb.WaitRequest, ctx: RequestContext) -> pb.WaitResponse:
        proc = self.tasks.process(req.id, req.exec_id)
        await proc.exited.wait()
        resp = pb.WaitResponse(exit_status=proc.exit_status)
        resp.exited_at.CopyFrom(timestamp(proc.exited_at))
        return resp

    async def Stats(self, req: pb.StatsRequest, ctx: RequestContext) -> pb.StatsResponse:
        self.tasks.get(req.id)
        result = await self._call("stats", {"container": req.id})
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
