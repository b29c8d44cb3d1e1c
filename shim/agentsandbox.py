"""A sandbox whose containers an agent runs: everything that speaks the agent protocol shares this.

:class:`AgentSandbox` implements the whole :class:`shim.sandbox.Sandbox` interface on top of one
agent (docs/agent-protocol.md).  A subclass says only how the agent is reached and what the host
does around it:

* ``start()`` (bring the agent up, set ``self._client``), ``stop()``, ``describe()`` -- required;
* ``placement(cid, bundle, rootfs, spec)``: the agent's ``bundle``/``rootfs`` (/``spec``, ...)
  arguments of a container's ``create`` for its parsed root (shim.rootfs.Rootfs, host paths);
  raising refuses the container (default: the host's);
* ``created``/``started``/``deleted(cid, ...)``: host-side work at those points of a
  container's life (VM mode: the spec's OCI hooks, shim/hooks.py; its layer view and volumes);
* ``cleanup_after_loss(cid, bundle)``: what the host must undo when the agent died with the
  container (host mode: runc's state and the rootfs mount);
* ``layer_path``/``host_layer_path``: a repo layer dir as the agent sees it and back (identity
  on the host; the guest's share path in a VM), applied to a whole stack by ``stack_for_agent``
  / ``stack_from_agent`` (one ``LayerStack.map``); ``layers_adding``/``layers_now``: make layers
  reachable before a restack, and learn the stack after one (a VM's layer view).

What it does for all of them, once:

* every request has a deadline (``timeouts``, docs/shim.md): an agent that does not answer gives
  DeadlineExceeded naming what did not answer, never a caller waiting for ever; a create or exec
  given up on is deleted again if the agent answers it late (nothing runs that containerd does
  not know);
* create is one sequence, all or nothing: placement -> the agent's create -> the ``created``
  hooks; a failure undoes what was done (the agent's container deleted, ``deleted`` run: the
  runtime spec's poststop after a failed createRuntime hook, the placement's host work undone);
* delete tolerates an agent that forgot the container or died with it (``cleanup_after_loss``);
* values from the agent are range-checked (shim/agentvalues.py): a bad one is Internal.

Errors are :mod:`ccpu.errdefs` errors: the agent's own answers pass through with their kind (the
agent client raises them), the sandbox's refusals are raised as such.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from ccpu import errdefs
from ccpu.agent.client import AgentClient
from ccpu.stack import LayerStack, StackError
from shim import agentvalues
from shim.agentvalues import BadAgentValue
from shim.config import Timeouts
from shim.rootfs import Rootfs
from shim.sandbox import Created, Exit, NewContainer, ProcessEntry, Relay, RootLayers, Sandbox, Stdio
from shim.stdio import ProcessIO

log = logging.getLogger("shim.sandbox")

#: seconds after which a create still waiting on the agent is logged, with what the sandbox can
#: tell (a VM: its console's tail) -- a hang should leave a trace before containerd's timeout
SLOW_CREATE = 30.0

T = TypeVar("T")


def checked(what: str, fn: Callable[[], T]) -> T:
    """``fn()``, with a value out of range from the agent as a clear Internal error."""
    try:
        return fn()
    except BadAgentValue as exc:
        raise errdefs.Internal(f"{what}: {exc}") from None


def _exec_arg(exec_id: str) -> dict[str, str]:
    return {"exec": exec_id} if exec_id else {}


def _name(cid: str, exec_id: str) -> str:
    return f"{cid}/{exec_id}" if exec_id else cid


class AgentSandbox(Sandbox):
    """A sandbox run by one agent (see the module docstring)."""

    def __init__(self, *, namespace: str = "", timeouts: Timeouts | None = None) -> None:
        self.namespace = namespace  # containerd's (a binary:// stdout logger is told it)
        self.timeouts = timeouts or Timeouts()
        self.lost = False  # the agent went away unexpectedly (its processes were reported exited)
        self._client: AgentClient | None = None
        self._stopping = False
        self._background: set[asyncio.Task[None]] = set()
        self._bundles: dict[str, str] = {}  # cid -> its host bundle (for cleanup after a loss)
        self._stacks: dict[str, list[str]] = {}  # cid -> its lowers as last seen (host dirs)

    # -- what a subclass may change ----------------------------------------------------------

    async def agent(self) -> AgentClient:
        """The connected agent client, started on first use."""
        await self.start()
        assert self._client is not None
        return self._client

    def placement(self, cid: str, bundle: str, rootfs: Rootfs,
                  spec: dict[str, Any] | None) -> dict[str, Any]:
        """``create`` args saying where the container lives: on the host, the bundle as is (the
        agent reads its config.json).  Raising refuses the container; nothing is left behind
        by a placement that raised (``deleted`` undoes one that succeeded)."""
        if isinstance(rootfs, LayerStack):
            rootfs = self.stack_for_agent(rootfs)
        return {"bundle": bundle, "rootfs": rootfs.to_wire()}

    async def created(self, cid: str, pid: int) -> None:
        """After the agent created ``cid``; raising fails the create (which is undone)."""

    async def started(self, cid: str, pid: int) -> None:
        """After ``cid``'s init process started."""

    async def deleted(self, cid: str) -> None:
        """After ``cid`` was deleted, or its create failed after a successful placement."""

    def cleanup_after_loss(self, cid: str, bundle: str | None) -> None:
        """Undo on the host what a lost agent left of container ``cid`` (blocking; run in a
        thread).  Default: nothing -- what the agent had died with it (a VM's guest)."""

    def layer_path(self, host_dir: str) -> str:
        """Where the agent sees a layer dir of the host's repo (default: the same path)."""
        return host_dir

    def host_layer_path(self, agent_dir: str) -> str:
        """The host dir of a layer path the agent reports (``layer_path`` reversed)."""
        return agent_dir

    def stack_for_agent(self, stack: LayerStack) -> LayerStack:
        """A stack of host layer dirs as the agent sees it (its lowers through ``layer_path``)."""
        return stack.map(lambda p, role: self.layer_path(p) if role == "lower" else p)

    def stack_from_agent(self, stack: LayerStack) -> LayerStack:
        """A stack the agent reports, in host layer dirs (``stack_for_agent`` reversed)."""
        return stack.map(lambda p, role: self.host_layer_path(os.path.normpath(p))
                         if role == "lower" else p)

    def layers_adding(self, cid: str, host_dirs: list[str]) -> None:
        """Before a restack stacks ``host_dirs`` on ``cid`` (a VM makes them visible to its
        guest: shim/layerview.py).  Raising fails the restack."""

    def layers_now(self, cid: str, host_dirs: list[str]) -> None:
        """``cid``'s stack after a restack (or after a failed one: the stack as it was)."""

    def _link_lost(self, reason: str) -> None:
        """The agent connection broke while we were not stopping: report it once upward."""
        if not self._stopping and not self.lost:
            self.lost = True
            if self.on_lost is not None:
                self.on_lost(reason)

    # -- talking to the agent ----------------------------------------------------------------

    async def connected(self) -> AgentClient:
        """The agent client; a sandbox that cannot bring its agent up is Unavailable."""
        try:
            return await self.agent()
        except Exception as exc:
            raise errdefs.Unavailable(f"sandbox agent unavailable: {exc}") from exc

    async def call(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        """The agent's answer to ``op``, within ``self.timeouts``."""
        agent = await self.connected()
        limit = self.timeouts.for_op(op)
        call = asyncio.ensure_future(agent.call(op, args))
        try:
            done, _ = await asyncio.wait({call}, timeout=limit)
        except BaseException:  # our caller gave up (containerd's deadline, a closed connection)
            call.cancel()
            raise
        if not done:
            self._undo_when_answered(op, args, call)
            raise errdefs.DeadlineExceeded(self._no_answer(op, args, limit))
        try:
            return call.result()
        except errdefs.Error:
            raise  # the agent's answer, with its kind
        except Exception as exc:
            raise errdefs.Unavailable(f"agent {op}: {exc}") from exc

    def _no_answer(self, op: str, args: dict[str, Any], limit: float) -> str:
        what = f" of container {args['container']}" if args.get("container") else ""
        if args.get("exec"):
            what += f" (exec {args['exec']})"
        agent = f"the {self.mode} sandbox's agent" + (
            f" (VM pid {self.pid})" if self.mode == "vm" and self.pid else "")
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
            undo = {"container": args["container"], **_exec_arg(args.get("exec", "") if op == "exec" else "")}
            log.warning("late answer to %s %s: deleting it again", op, undo)

            async def delete() -> None:
                with contextlib.suppress(Exception):
                    agent = await self.connected()  # created / never-started processes delete directly
                    await asyncio.wait_for(agent.call("delete", undo), self.timeouts.delete)

            self._spawn(delete())

        call.add_done_callback(answered)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._background.add(t)
        t.add_done_callback(self._background.discard)

    def _relay(self, agent: AgentClient, cid: str, stdio: Stdio) -> ProcessIO:
        return ProcessIO(agent, stdio.stdin, stdio.stdout, stdio.stderr, stdio.terminal,
                         container_id=cid, namespace=self.namespace)

    # -- containers --------------------------------------------------------------------------

    async def create(self, c: NewContainer) -> Created:
        placement = self.placement(c.id, c.bundle, c.rootfs, c.spec)
        self._bundles[c.id] = c.bundle
        try:
            agent = await self.connected()
            io = self._relay(agent, c.id, c.stdio)
        except BaseException:
            await self._forget(c.id)
            raise
        try:
            slow = asyncio.get_running_loop().call_later(
                SLOW_CREATE, lambda: self._spawn(self._log_slow_create(c.id, agent)))
            try:
                result = await self.call("create", {"container": c.id, **placement,
                                                    "terminal": c.stdio.terminal,
                                                    **io.agent_args()})
            finally:
                slow.cancel()
        except BaseException:
            io.close()
            await self._forget(c.id)  # no hook ran yet: this only undoes the placement
            raise
        try:
            pid = checked(f"create {c.id}", lambda: agentvalues.result_pid(result, "create"))
            await self.created(c.id, pid)
        except Exception as exc:  # a bad pid, or e.g. a createRuntime hook failed: undo the create
            with contextlib.suppress(Exception):
                await self.call("delete", {"container": c.id})
            io.close()
            await self._forget(c.id)  # poststop hooks, as the runtime spec says
            if isinstance(exc, errdefs.Error):
                raise exc
            raise errdefs.FailedPrecondition(f"container {c.id}: {exc}") from None
        return Created(pid, io)

    async def _forget(self, cid: str) -> None:
        """``cid`` is gone (or never came): the host-side work of ``deleted``.  Its errors are
        logged, not raised: the caller reports what went wrong first."""
        self._bundles.pop(cid, None)
        self._stacks.pop(cid, None)
        try:
            await self.deleted(cid)
        except Exception:  # noqa: BLE001
            log.exception("undoing the host side of container %s", cid)

    async def _log_slow_create(self, cid: str, agent: AgentClient) -> None:
        """A create still unanswered: log what the agent's processes are doing (it serves
        requests concurrently) and what the sandbox can tell (a VM: its console)."""
        try:
            procs = (await asyncio.wait_for(agent.call("diagnose", {}), 10)).get("processes", [])
            ps = "\n".join(f"  {p.get('pid')} {p.get('state')} {p.get('wchan') or '-'} {p.get('age_s')}s "
                           f"{p.get('cmd')}" for p in procs) or "  (none)"
        except Exception as exc:  # noqa: BLE001 - a diagnostic must not raise
            ps = f"  (agent did not answer diagnose: {exc!r})"
        log.warning("create of %s: no answer from the agent after %.0fs; its processes (pid state "
                    "wchan age cmd):\n%s\n%s", cid, SLOW_CREATE, ps, self.diagnose())

    async def start_process(self, cid: str, exec_id: str = "") -> int:
        result = await self.call("start", {"container": cid, **_exec_arg(exec_id)})
        pid = checked(f"start {_name(cid, exec_id)}", lambda: agentvalues.result_pid(result, "start"))
        if not exec_id:
            await self.started(cid, pid)
        return pid

    async def exec(self, cid: str, exec_id: str, process: dict[str, Any], stdio: Stdio) -> Relay:
        agent = await self.connected()
        io = self._relay(agent, cid, stdio)
        try:
            await self.call("exec", {"container": cid, "exec": exec_id, "process": process,
                                     "terminal": stdio.terminal, **io.agent_args()})
        except BaseException:
            io.close()
            raise
        return io

    async def kill(self, cid: str, exec_id: str, signal: int, all: bool = False) -> None:  # noqa: A002
        await self.call("kill", {"container": cid, **_exec_arg(exec_id), "signal": int(signal),
                                 "all": bool(all)})

    async def delete(self, cid: str, exec_id: str = "") -> Exit:
        try:
            result = await self.call("delete", {"container": cid, **_exec_arg(exec_id)})
        except errdefs.NotFound:
            result = {}  # the agent has forgotten it
        except errdefs.Unavailable:
            if not self.lost:
                raise
            result = {}  # a lost agent (a dead VM) took it along
            if not exec_id:
                await asyncio.to_thread(self.cleanup_after_loss, cid, self._bundles.get(cid))
        status, at = checked(f"delete {_name(cid, exec_id)}", lambda: agentvalues.result_exit(result))
        if not exec_id:
            self._bundles.pop(cid, None)
            self._stacks.pop(cid, None)
            await self.deleted(cid)
        return Exit(status, at)

    async def pids(self, cid: str) -> list[ProcessEntry]:
        result = await self.call("pids", {"container": cid})
        entries = result.get("processes", [])
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise errdefs.Internal("pids: agent sent a malformed process list")
        return [ProcessEntry(
            pid=checked("pids", lambda: agentvalues.pid(e.get("pid", 0))),
            exec_id=checked("pids", lambda: agentvalues.ident(e.get("exec", ""), "exec id", empty=True)))
            for e in entries]

    async def pause(self, cid: str) -> None:
        await self.call("pause", {"container": cid})

    async def resume(self, cid: str) -> None:
        await self.call("resume", {"container": cid})

    async def resize_pty(self, cid: str, exec_id: str, width: int, height: int) -> None:
        await self.call("resize_pty", {"container": cid, **_exec_arg(exec_id),
                                       "width": int(width), "height": int(height)})

    async def update(self, cid: str, resources: dict[str, Any]) -> None:
        await self.call("update", {"container": cid, "resources": resources})

    async def stats(self, cid: str) -> dict[str, Any]:
        return await self.call("stats", {"container": cid})

    # -- live layers -------------------------------------------------------------------------

    def _host_dirs(self, value: Any, what: str) -> list[str]:
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
            raise errdefs.Internal(f"{what}: agent sent a malformed layer list")
        return [self.host_layer_path(os.path.normpath(p)) for p in value]

    async def layers(self, cid: str) -> RootLayers:
        """The agent's live stack (the single source of truth), in host dirs."""
        state = await self.call("layers", {"container": cid})
        try:
            stack = self.stack_from_agent(LayerStack.from_wire(state))
        except StackError as exc:
            raise errdefs.Internal(f"layers: agent sent a malformed stack: {exc}") from None
        history = state.get("history")
        self._stacks[cid] = list(stack.lowers)
        return RootLayers(list(stack.lowers), stack.upper,
                          list(history) if isinstance(history, list) else [])

    async def restack(self, cid: str, add: list[str], remove: list[str],
                      position: str | int) -> list[str]:
        if add:
            try:
                self.layers_adding(cid, add)
            except Exception as exc:  # noqa: BLE001 - any failure to expose a layer fails the add
                raise errdefs.FailedPrecondition(f"container {cid}: cannot give the sandbox layers "
                                                 f"{', '.join(add)}: {exc}") from None
        args: dict[str, Any] = {"container": cid, "position": position}
        if add:
            args["add"] = [self.layer_path(d) for d in add]
        if remove:
            args["remove"] = [self.layer_path(d) for d in remove]
        try:
            result = await self.call("restack", args)
        except BaseException:
            before = self._stacks.get(cid)
            if before is not None:
                self._settle(cid, before)  # the stack stays as it was
            raise
        lowers = self._host_dirs(result.get("lowers"), "restack")
        self._stacks[cid] = lowers
        self._settle(cid, lowers)  # removed layers leave a VM's view (unless in use)
        return lowers

    def _settle(self, cid: str, lowers: list[str]) -> None:
        try:
            self.layers_now(cid, lowers)
        except Exception as exc:  # noqa: BLE001 - the restack itself is done; keep the binds
            log.error("%s: sandbox layer bookkeeping after restack: %s", cid, exc)
