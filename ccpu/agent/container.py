"""Containers and the operations on them (create/start/exec/kill/.../delete).

Why one `Supervisor` owning all containers: the table outlives client connections (a restarted
shim reconnects and finds its containers), and the operations need the one reaper, the one runc
wrapper and the one event outlet.  The server serializes requests per container (`serialized`);
the methods here may assume they are the only operation on their container at a time.

State machine: the one table of ccpu.linux.taskstate (the shim checks the same), as containerd's
runc shim.  Kill of a stopped process is NotFound "process already finished"; delete of a running
one is FailedPrecondition.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..linux import mountinfo
from ..linux.mount import MS_NODEV, MS_NOSUID, mount
from ..linux.reaper import Reaper
from ..linux.taskstate import Op, Status, after, allowed
from . import jsonbound, limits, live, mounts, placed, protocol
from .oom import OomWatcher
from .process import DRAIN_TIMEOUT, Events, Process
from .runc import Runc
from .stdio import ConsoleStdio, PipeStdio, StdinQueue, Stdio

log = logging.getLogger(__name__)

CONSOLE_TIMEOUT = 10.0  # runc sends the pty master during create; this only bounds a broken runc
DELETE_EXIT_TIMEOUT = 3.0
SETTLE_TIMEOUT = 3.0  # shutdown waits this long for `runc delete`s still running in the background


@dataclass
class Container:
    id: str
    bundle: str
    init: Process
    rootfs: str  # bundle/rootfs
    mounted: int  # how many mounts the agent stacked on `rootfs`
    kill_all_on_exit: bool  # no pid namespace of its own: its processes outlive init
    execs: dict[str, Process] = field(default_factory=dict)
    live: live.LiveStack | None = None  # the stack of a `layers` rootfs (live.py: restack)
    made: list[str] = field(default_factory=list)  # dirs the agent created: removed on delete
    scratch: str | None = None  # the tmpfs holding its upper/work (limits.py), unmounted on delete
    poststop_hooks: bool = False  # runc runs them in `runc delete`: that delete is waited for


def read_spec(bundle: str) -> dict[str, Any]:
    try:
        with open(os.path.join(bundle, "config.json"), encoding="utf-8") as f:
            spec = jsonbound.loads(f.read())
    except FileNotFoundError:
        raise protocol.InvalidArgument(f"bundle {bundle} has no config.json and no spec was given") from None
    except (OSError, ValueError) as e:
        raise protocol.InvalidArgument(f"bundle {bundle}: unreadable config.json: {e}") from None
    if not isinstance(spec, dict):
        raise protocol.InvalidArgument(f"bundle {bundle}: config.json is not an object")
    return spec


def _write_json(path: str, value: Any, mode: int = 0o600) -> None:
    """Atomically (temp + rename) so runc never reads half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(value, f)
    os.replace(tmp, path)


def _has_pid_namespace(spec: Mapping[str, Any]) -> bool:
    linux = spec.get("linux") or {}
    nss = linux.get("namespaces") or [] if isinstance(linux, dict) else []
    return any(isinstance(ns, dict) and ns.get("type") == "pid" and not ns.get("path") for ns in nss)


def _has_poststop_hooks(spec: Mapping[str, Any]) -> bool:
    hooks = spec.get("hooks")
    return isinstance(hooks, dict) and bool(hooks.get("poststop"))


def _read_pid(path: str) -> int:
    with open(path, encoding="ascii") as f:
        return int(f.read().strip())


def _unlink(*paths: str) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)


class Supervisor:
    def __init__(
        self,
        runc: Runc,
        reaper: Reaper,
        events: Events,
        bundle_roots: Sequence[str],
        layer_roots: Sequence[str],
        drain_timeout: float = DRAIN_TIMEOUT,
        cgroup_parent: str | None = None,
    ) -> None:
        self.runc = runc
        self.cgroup_parent = cgroup_parent  # in a guest: every container's cgroup goes below it
        self.drain_timeout = drain_timeout
        self.reaper = reaper
        self.events = events
        self.bundle_roots = list(bundle_roots)
        self.layer_roots = list(layer_roots)
        self.containers: dict[str, Container] = {}
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self._stdin: dict[int, StdinQueue] = {}
        self._oom: OomWatcher | None = None
        # `runc delete`s of stopped containers still running (delete answered before them):
        # a create of the same id waits for its entry; a failed one stays until then
        self._deleting: dict[str, asyncio.Task[bool]] = {}

    def _oom_watcher(self) -> OomWatcher:
        if self._oom is None:
            self._oom = OomWatcher(asyncio.get_running_loop(),
                                   lambda cid: self.events.event(protocol.event("oom", container=cid)))
        return self._oom

    # -- serialization -------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def serialized(self, container: str) -> AsyncIterator[None]:
        """Per-container FIFO lock.  Acquire it before the first await after a request arrived,
        so requests for one container run in arrival order (asyncio.Lock is fair)."""
        lock, users = self._locks.get(container, (asyncio.Lock(), 0))
        self._locks[container] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[container]
            if users <= 1:
                del self._locks[container]
            else:
                self._locks[container] = (lock, users - 1)

    # -- stdin routing -------------------------------------------------------------------------

    def reserve_stdin(self, channel: int) -> None:
        """Called by the connection as soon as a create/exec naming `channel` arrives, so data
        frames that follow the request are kept until the process's stdin exists.

        A closed queue left under that number belongs to an earlier process whose delete has
        not been handled yet (the client may reuse a channel number as soon as it released
        it): the new process gets a fresh queue."""
        if channel:
            q = self._stdin.get(channel)
            if q is None or q.closed:
                self._stdin[channel] = StdinQueue()

    def release_stdin(self, channel: int, queue: StdinQueue | None = None) -> None:
        """Drop the stdin queue of `channel`; with `queue`, only if that number still maps to
        it (a reused channel number may belong to a newer process by now)."""
        q = self._stdin.get(channel)
        if q is not None and (queue is None or q is queue):
            del self._stdin[channel]
            q.close()
        elif queue is not None:
            queue.close()

    def stdin_data(self, channel: int, data: bytes) -> None:
        q = self._stdin.get(channel)
        if q is not None:  # data for a channel nobody opened is dropped
            q.put(data)

    def stdin_close(self, channel: int) -> None:
        """End of input.  The queue stays registered (closed) until the process is deleted:
        a close that arrives before `start` must still reach the process once it exists."""
        q = self._stdin.get(channel)
        if q is not None:
            q.close()

    def _stdio(self, terminal: bool, stdin: int, stdout: int, stderr: int) -> Stdio:
        queue = None
        if stdin:
            if stdin not in self._stdin:  # keep a queue reserved (maybe already closed) at request time
                self._stdin[stdin] = StdinQueue()
            queue = self._stdin[stdin]
        return ConsoleStdio(stdin, stdout, stderr, queue) if terminal else PipeStdio(stdin, stdout, stderr, queue)

    # -- lookups -------------------------------------------------------------------------------

    def full_filesystem(self, path: str) -> str:
        """What is full, for an ENOSPC on `path` (a container's writable layer is named)."""
        real = os.path.realpath(path)
        for c in self.containers.values():
            if c.scratch and (real == c.scratch or real.startswith(c.scratch + "/")):
                return f"container {c.id}'s writable layer: {mounts.full_filesystem(c.scratch)}"
        return mounts.full_filesystem(path)

    def _container(self, args: Mapping[str, Any]) -> Container:
        cid = protocol.validate_id(args.get("container"), "container id")
        c = self.containers.get(cid)
        if c is None:
            raise protocol.NotFound(f"container {cid} not found")
        return c

    def _process(self, args: Mapping[str, Any]) -> tuple[Container, Process]:
        c = self._container(args)
        eid = args.get("exec") or ""
        if not eid:
            return c, c.init
        protocol.validate_id(eid, "exec id")
        p = c.execs.get(eid)
        if p is None:
            raise protocol.NotFound(f"exec {eid} not found in container {c.id}")
        return c, p

    # -- operations ----------------------------------------------------------------------------

    async def create(self, args: Mapping[str, Any]) -> dict[str, Any]:
        cid = protocol.validate_id(args.get("container"), "container id")
        if cid in self.containers:
            raise protocol.AlreadyExists(f"container {cid} already exists")
        await self._deleted_by_runc(cid)
        bundle = protocol.resolve_inside(args.get("bundle"), self.bundle_roots, "bundle")
        terminal = protocol.arg_bool(args, "terminal", False) or False
        stdin, stdout, stderr = (protocol.arg_channel(args, n) for n in ("stdin", "stdout", "stderr"))
        plan = mounts.rootfs_plan(args.get("rootfs") or {"kind": "none"}, self.layer_roots)
        spec = protocol.arg_dict(args, "spec", None)
        scratch = limits.scratch_arg(args, self.layer_roots)
        layers = plan.stack  # validated once (protocol.resolve_stack); live.py keeps it
        writable = [d for d in (layers.upper, layers.work) if d] if layers is not None else []
        if scratch is not None and not all(os.path.commonpath([d, scratch[0]]) == scratch[0] for d in writable):
            raise protocol.InvalidArgument(f"the upper and work dirs must be inside the scratch dir {scratch[0]}")
        # A VM guest has no bundle of its own: with an inline spec the agent makes the bundle
        # dir, the container's scratch tmpfs and the upper/work dirs of a `layers` rootfs on it.
        # What it made it removes again on delete.
        made: list[str] = []
        scratch_dir = None
        try:
            if spec is not None and not os.path.isdir(bundle):
                made += placed.makedirs(bundle)
            if scratch is not None:
                if os.path.isdir(scratch[0]) and mountinfo.is_mountpoint(scratch[0]):
                    raise protocol.FailedPrecondition(f"scratch dir {scratch[0]} is already mounted")
                made += placed.makedirs(scratch[0])
                mount("tmpfs", scratch[0], "tmpfs", MS_NOSUID | MS_NODEV, limits.scratch_options(scratch[1]))
                scratch_dir = scratch[0]
            for d in writable:
                if not os.path.isdir(d):
                    made += placed.makedirs(d)
            placed.place_files(args, bundle, self.layer_roots, scratch_dir)
            return await self._create(cid, bundle, terminal, stdin, stdout, stderr, plan, spec, made,
                                      scratch_dir)
        except BaseException:
            if scratch_dir is not None:
                mounts.unmount(scratch_dir, 1)
            placed.remove_made(made)
            raise

    async def _create(self, cid: str, bundle: str, terminal: bool, stdin: int, stdout: int, stderr: int,
                      plan: mounts.RootfsPlan, spec: dict[str, Any] | None, made: list[str],
                      scratch: str | None) -> dict[str, Any]:
        if not os.path.isdir(bundle):
            raise protocol.InvalidArgument(f"bundle {bundle} is not a directory")
        if spec is not None:
            if self.cgroup_parent:
                limits.adjust_spec(spec, cid, self.cgroup_parent)
            _write_json(os.path.join(bundle, "config.json"), spec)
        else:
            spec = read_spec(bundle)
        process = spec.get("process")
        if not isinstance(process, dict):
            raise protocol.InvalidArgument("the spec has no process object")
        if bool(process.get("terminal", False)) != terminal:
            raise protocol.InvalidArgument(
                f"terminal={terminal} but the spec's process.terminal is {bool(process.get('terminal'))}"
            )
        rootfs = os.path.join(bundle, "rootfs")
        os.makedirs(rootfs, exist_ok=True)
        pid_file = os.path.join(bundle, "init.pid")
        log_file = os.path.join(bundle, "log.json")
        _unlink(pid_file)

        mounted = await mounts.mount_all(self.reaper, plan.mounts, rootfs)
        stdio: Stdio | None = None
        try:
            stdio = self._stdio(terminal, stdin, stdout, stderr)
            pid, exited = await self._run_runc(
                stdio,
                lambda fds, sock: self.runc.spawn_create(cid, bundle, pid_file, log_file, fds, sock),
                "create",
                log_file,
                pid_file,
            )
        except BaseException as e:
            if stdio is not None:
                stdio.release()
            self.release_stdin(stdin)
            # runc may have got as far as creating it (e.g. the console never came); but an id
            # runc already knew is someone else's container: leave that one alone
            if not isinstance(e, protocol.AlreadyExists):
                with contextlib.suppress(Exception):
                    await self.runc.delete(cid, force=True)
            try:
                mounts.unmount(rootfs, mounted)
            except OSError as ue:
                log.error("create %s failed and its rootfs stays mounted: %s", cid, ue)
            raise
        init = Process(cid, "", stdio)
        c = Container(cid, bundle, init, rootfs, mounted, kill_all_on_exit=not _has_pid_namespace(spec), made=made,
                      scratch=scratch, poststop_hooks=_has_poststop_hooks(spec))
        c.live = live.initial_stack(plan.stack)
        self.containers[cid] = c
        if c.kill_all_on_exit:
            exited.add_done_callback(lambda _f: asyncio.ensure_future(self._kill_all_quietly(cid)))
        init.watch(pid, exited, self.events, self.drain_timeout)
        stdio.start(self.events)
        return {"pid": pid}

    async def _run_runc(self, stdio: Stdio, spawn: Any, what: str, log_file: str, pid_file: str) -> tuple[int, asyncio.Future[int]]:
        """Run `runc create`/`runc exec` with `stdio`; the new process's pid and exit future.

        The reaper's collect window covers runc's run and the pid-file read, so an exit of the
        new process before we know its pid is not lost."""
        console = stdio.socket_path if isinstance(stdio, ConsoleStdio) else None
        with self.reaper.collect():
            spawned = spawn(stdio.child_fds(), console)
            stdio.close_child_ends()
            receiving = asyncio.ensure_future(stdio.receive_master()) if isinstance(stdio, ConsoleStdio) else None
            try:
                result = await spawned.result()
                self.runc.check(what, result.status, log_file)
                if receiving is not None:
                    await asyncio.wait_for(receiving, CONSOLE_TIMEOUT)
            finally:
                if receiving is not None and not receiving.done():
                    receiving.cancel()
            try:
                pid = _read_pid(pid_file)
            except (OSError, ValueError) as e:
                raise protocol.Internal(f"runc {what}: no pid file: {e}") from None
            return pid, self.reaper.wait(pid)

    async def _kill_all_quietly(self, cid: str) -> None:
        # as the runc shim (ShouldKillAllOnExit): without its own pid namespace, a container's
        # other processes would outlive its init and hold its stdio open
        with contextlib.suppress(Exception):
            await self.runc.kill(cid, 9, all_=True)

    async def start(self, args: Mapping[str, Any]) -> dict[str, Any]:
        c, p = self._process(args)
        if not allowed(Op.START, p.status):
            raise protocol.FailedPrecondition(f"process is {p.status}, not created")
        p.start_answered.clear()
        try:
            return await self._start(c, p)
        finally:
            # wakes the exit reporter only after the caller (server) wrote the response: waking
            # takes a loop step, writing the response does not
            p.start_answered.set()

    async def _start(self, c: Container, p: Process) -> dict[str, Any]:
        if p is c.init:
            if p.exited is None:
                await self.runc.start(c.id)
            else:
                how = await self.runc.start_created(c.id, p.exited)
                log.debug("%s started (%s)", c.id, how)
            p.status = after(Op.START, p.status)
            oom = self._oom_watcher()
            if oom.watch(c.id, p.pid):
                p.before_exit_report = lambda: oom.check_exit(c.id)
            return {"pid": p.pid}
        if not allowed(Op.START_EXEC, c.init.status):
            raise protocol.FailedPrecondition(f"container {c.id} is {c.init.status}")
        base = os.path.join(c.bundle, f".exec-{p.exec_id}")
        process_file, pid_file, log_file = base + ".json", base + ".pid", base + ".log.json"
        _write_json(process_file, p.spec)
        _unlink(pid_file)
        stdio = self._stdio(p.terminal, p.stdio.stdin_ch, p.stdio.stdout_ch, p.stdio.stderr_ch)
        try:
            pid, exited = await self._run_runc(
                stdio,
                lambda fds, sock: self.runc.spawn_exec(c.id, process_file, pid_file, log_file, fds, sock),
                "exec",
                log_file,
                pid_file,
            )
        except BaseException:
            stdio.release()
            raise
        finally:
            _unlink(process_file, pid_file)
        p.stdio = stdio
        p.status = after(Op.START, p.status)
        p.watch(pid, exited, self.events, self.drain_timeout)
        stdio.start(self.events)
        return {"pid": pid}

    async def exec(self, args: Mapping[str, Any]) -> dict[str, Any]:
        c = self._container(args)
        eid = protocol.validate_id(args.get("exec"), "exec id")
        if eid in c.execs:
            raise protocol.AlreadyExists(f"exec {eid} already exists in container {c.id}")
        if not allowed(Op.EXEC, c.init.status):
            raise protocol.FailedPrecondition(f"container {c.id} is {c.init.status}")
        spec = dict(protocol.arg_dict(args, "process"))
        terminal = protocol.arg_bool(args, "terminal", False) or False
        spec["terminal"] = terminal
        stdin, stdout, stderr = (protocol.arg_channel(args, n) for n in ("stdin", "stdout", "stderr"))
        # pipes/console are made when the exec is started (an exec never started holds no fds);
        # until then a bare Stdio keeps the channels and the stdin queue collects data
        if stdin:
            self.reserve_stdin(stdin)
        p = Process(c.id, eid, Stdio(stdin, stdout, 0 if terminal else stderr, None), spec, terminal=terminal)
        c.execs[eid] = p
        return {}

    async def kill(self, args: Mapping[str, Any]) -> dict[str, Any]:
        c, p = self._process(args)
        sig = protocol.arg_int(args, "signal", 15) or 15
        all_ = protocol.arg_bool(args, "all", False) or False
        if not 0 < sig < 65:
            raise protocol.InvalidArgument(f"invalid signal {sig}")
        if p.status == Status.STOPPED:
            raise protocol.NotFound("process already finished")
        if p is c.init:
            await self.runc.kill(c.id, sig, all_=all_)
            return {}
        if p.status == Status.CREATED:
            raise protocol.FailedPrecondition(f"exec {p.exec_id} is not started")
        try:
            os.kill(p.pid, sig)
        except ProcessLookupError:
            raise protocol.NotFound("process already finished") from None
        return {}

    async def resize_pty(self, args: Mapping[str, Any]) -> dict[str, Any]:
        _c, p = self._process(args)
        width = protocol.arg_int(args, "width")
        height = protocol.arg_int(args, "height")
        if not (0 <= width <= 0xFFFF and 0 <= height <= 0xFFFF):
            raise protocol.InvalidArgument("width and height must fit in 16 bits")
        try:
            p.stdio.resize(width, height)
        except OSError as e:
            raise protocol.FailedPrecondition(f"resize: {e}") from None
        return {}

    async def close_stdin(self, args: Mapping[str, Any]) -> dict[str, Any]:
        _c, p = self._process(args)
        if p.stdio.stdin_ch:
            self.release_stdin(p.stdio.stdin_ch, p.stdio.stdin_queue)
        return {}

    async def pause(self, args: Mapping[str, Any]) -> dict[str, Any]:
        c = self._container(args)
        if not allowed(Op.PAUSE, c.init.status):
            raise protocol.FailedPrecondition(f"container {c.id} is {c.init.status}, not running")
        await self.runc.pause(c.id)
        c.init.status = after(Op.PAUSE, c.init.status)
        return {}

    async def resume(self, args: Mapping[str, Any]) -> dict[str, Any]:
        c = self._container(args)
        if not allowed(Op.RESUME, c.init.status):
            raise protocol.FailedPrecondition(f"container {c.id} is {c.init.status}, not paused")
        await self.runc.resume(c.id)
        c.init.status = after(Op.RESUME, c.init.status)
        return {}

    async def state(self, args: Mapping[str, Any]) -> dict[str, Any]:
        _c, p = self._process(args)
        return p.state()

    async def pids(self, args: Mapping[str, Any]) -> dict[str, Any]:
        c = self._container(args)
        pids = await self.runc.ps(c.id)
        by_pid = {p.pid: eid for eid, p in c.execs.items() if p.pid and p.status != Status.STOPPED}
        return {"processes": [{"pid": pid, "exec": by_pid.get(pid, "")} for pid in pids]}

    async def update(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """New cgroup limits (an OCI LinuxResources object) for a running or paused container."""
        c = self._container(args)
        resources = protocol.arg_dict(args, "resources")
        if not allowed(Op.UPDATE, c.init.status):
            raise protocol.FailedPrecondition(f"container {c.id} is {c.init.status}")
        await self.runc.update(c.id, resources)
        return {}

    async def stats(self, args: Mapping[str, Any]) -> dict[str, Any]:
        c = self._container(args)
        return await self.runc.stats(c.id)

    async def delete(self, args: Mapping[str, Any]) -> dict[str, Any]:
        c, p = self._process(args)
        if p.running():
            raise protocol.FailedPrecondition(f"cannot delete a {p.status} process")
        if p is not c.init:
            if p.status == Status.STOPPED:
                await self._reported(p)
            p.close()
            self.release_stdin(p.stdio.stdin_ch, p.stdio.stdin_queue)
            del c.execs[p.exec_id]
            _unlink(os.path.join(c.bundle, f".exec-{p.exec_id}.log.json"))
            return p.exit_fields()
        if p.status == Status.CREATED:
            # never started: runc delete --force kills the init waiting in runc's exec fifo; that
            # exit is the delete's result, not an event
            p.report_exit = False
        else:
            await self._reported(p)
        if p.status == Status.STOPPED and not c.kill_all_on_exit and not c.poststop_hooks:
            self._delete_in_background(c.id)
        else:
            try:
                await self.runc.delete(c.id, force=True)
            except protocol.NotFound:
                pass
        if p.status != Status.STOPPED:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(p.reported.wait(), DELETE_EXIT_TIMEOUT)
        for e in c.execs.values():
            e.close()
            self.release_stdin(e.stdio.stdin_ch, e.stdio.stdin_queue)
        p.close()
        self.release_stdin(p.stdio.stdin_ch, p.stdio.stdin_queue)
        if self._oom is not None:
            self._oom.unwatch(c.id)
        mounts.unmount(c.rootfs, c.mounted)
        live.cleanup(c.live)
        if c.scratch is not None:
            mounts.unmount(c.scratch, 1)  # its writes go with it
        del self.containers[c.id]
        _unlink(os.path.join(c.bundle, "init.pid"))
        placed.remove_made(c.made)
        return p.exit_fields()

    # -- runc delete off the delete's path ------------------------------------------------------

    def _delete_in_background(self, cid: str) -> None:
        """`runc delete` of a stopped container, answered without waiting for it.

        Why: it is a Go start (~10-20 ms on a host, ~0.3 s under TCG) whose work nothing in the
        answer depends on, when the container had its own pid namespace (its processes died
        with the init: the kernel kills them before the init can be reaped) and no poststop
        hooks (runc runs them in delete; a caller may expect them done).  What it still does --
        remove the cgroup and runc's state dir -- only matters to a create of the same id, which
        waits for it (`_deleted_by_runc`).  If the agent dies first, the runc process carries on
        (it is not killed with us); if it was killed too, the state dir stays and the shim's
        clean-up (`delete` after a lost shim, `cleanup_after_loss`) deletes it as today."""
        task = asyncio.ensure_future(self._runc_delete(cid))
        self._deleting[cid] = task

        def done(t: asyncio.Task[bool]) -> None:
            if not t.cancelled() and t.result() and self._deleting.get(cid) is t:
                del self._deleting[cid]

        task.add_done_callback(done)

    async def _runc_delete(self, cid: str) -> bool:
        try:
            await self.runc.delete(cid, force=True)
        except protocol.NotFound:
            pass
        except Exception as e:  # noqa: BLE001 - kept (False) for the next create of this id
            log.warning("runc delete %s (after the delete was answered) failed: %s", cid, e)
            return False
        return True

    async def _deleted_by_runc(self, cid: str) -> None:
        """Before a create of `cid`: its earlier container's `runc delete` has finished; if that
        failed, it is tried once more here and its error is the create's."""
        task = self._deleting.get(cid)
        if task is None:
            return
        ok = await asyncio.shield(task)
        if self._deleting.get(cid) is task:
            del self._deleting[cid]
        if not ok:
            try:
                await self.runc.delete(cid, force=True)
            except protocol.NotFound:
                pass

    async def settle(self, timeout: float = SETTLE_TIMEOUT) -> None:
        """Wait (bounded) for the background `runc delete`s: before the agent's shutdown, so a
        clean stop leaves runc no state."""
        pending = [t for t in self._deleting.values() if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)

    async def _reported(self, p: Process) -> None:
        """Let a stopped process's exit event go out before the delete's response."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(p.reported.wait(), self.drain_timeout + 1)

