"""OCI hooks run on the host by the shim, for containers whose runc is elsewhere (in the VM).

Why the shim runs them: hook binaries (nerdctl's ``nerdctl internal oci-hook``, CNI or GPU
helpers) live on the host and do host-side work; runc in the guest cannot run them.  kata does
the same.  Semantics follow the runtime spec (config.md#posix-platform-hooks): the container's
state JSON on stdin, ``path``/``args``/``env`` as given (no ``env``: the shim's, as with runc), ``timeout`` in seconds; a failing
``prestart``/``createRuntime`` hook fails the create, a failing ``poststart``/``poststop`` hook is
only logged.  The state's ``pid`` is QEMU's, as in kata: the process that *is* the container
from the host's point of view; for a nerdctl CNI network the state's annotations also name the
netns the shim made for it (``nerdctl/network-namespace``, which nerdctl's hook prefers).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("shim.hooks")

DEFAULT_TIMEOUT = 30.0


class HookFailed(RuntimeError):
    pass


def state(cid: str, status: str, pid: int, bundle: str, annotations: Mapping[str, str]) -> dict[str, Any]:
    return {"ociVersion": "1.0.2", "id": cid, "status": status, "pid": pid, "bundle": bundle,
            "annotations": dict(annotations)}


def _write_all(fd: int, data: bytes) -> None:
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except OSError:
        pass  # the hook does not read its stdin: fine
    finally:
        os.close(fd)


async def run_one(hook: Mapping[str, Any], st: Mapping[str, Any], reaper: Any) -> None:
    """Run one hook.  Spawned and waited for through the shim's one ``reaper`` (it reaps every
    child with waitpid(-1): asyncio's own child watcher would race it and see status 255)."""
    from ccpu.linux import reaper as reaper_mod

    path = str(hook.get("path") or "")
    if not os.path.isabs(path):
        raise HookFailed(f"hook path {path!r} is not absolute")
    args = [str(a) for a in hook.get("args") or [path]]
    # as runc (Go's exec.Cmd): no env given -> the hook inherits ours
    given = hook.get("env")
    env = dict(e.split("=", 1) for e in given if "=" in e) if given else None
    timeout = float(hook.get("timeout") or DEFAULT_TIMEOUT)
    r, w = os.pipe()
    try:
        spawned = reaper_mod.spawn(reaper, [path, *args[1:]], stdin=r, env=env)
    except OSError as exc:
        os.close(w)
        raise HookFailed(f"hook {path}: {exc.strerror or exc}") from None
    finally:
        os.close(r)
    loop = asyncio.get_running_loop()
    writer = loop.run_in_executor(None, _write_all, w, json.dumps(st).encode())
    try:
        status = await asyncio.wait_for(asyncio.shield(spawned.exited), timeout)
    except (TimeoutError, asyncio.TimeoutError):
        with contextlib.suppress(ProcessLookupError):
            os.kill(spawned.pid, signal.SIGKILL)
        await spawned.exited
        raise HookFailed(f"hook {path} timed out after {timeout:g}s") from None
    finally:
        await writer
    try:
        result = await asyncio.wait_for(spawned.result(), 5)
        text = (result.stderr or result.stdout).decode(errors="replace").strip()[-500:]
    except (TimeoutError, asyncio.TimeoutError):  # a child of the hook still holds its output
        text = "(output not closed)"
    if status != 0:
        raise HookFailed(f"hook {path} exited with {status}: {text}")


async def run(kind: str, hooks: Sequence[Mapping[str, Any]], st: Mapping[str, Any], *,
              fatal: bool, reaper: Any) -> None:
    """Run ``hooks`` in order; the first failure raises (``fatal``) or is logged."""
    for hook in hooks:
        try:
            await run_one(hook, st, reaper)
        except HookFailed as exc:
            if fatal:
                raise HookFailed(f"{kind} {exc}") from None
            log.warning("%s %s (container %s)", kind, exc, st.get("id"))


@dataclass
class ContainerHooks:
    """One container's host hooks and where it is in its life (runtime-spec runtime.md,
    "Lifecycle"): ``prestart`` then ``createRuntime`` after create, fatal; ``poststart`` after
    start; ``poststop`` after delete -- only if create got that far (a failed createRuntime hook
    still ends with poststop, as the spec says; a failed create does not)."""

    cid: str
    hooks: Mapping[str, Sequence[Mapping[str, Any]]]
    bundle: str
    reaper: Any
    annotations: Mapping[str, str] = field(default_factory=dict)
    created: bool = False

    def _state(self, status: str, pid: int) -> dict[str, Any]:
        return state(self.cid, status, pid, self.bundle, self.annotations)

    async def on_created(self, pid: int) -> None:
        self.created = True
        st = self._state("created", pid)
        for kind in ("prestart", "createRuntime"):
            await run(kind, self.hooks.get(kind, []), st, fatal=True, reaper=self.reaper)

    async def on_started(self, pid: int) -> None:
        await run("poststart", self.hooks.get("poststart", []), self._state("running", pid), fatal=False,
                  reaper=self.reaper)

    async def on_deleted(self, pid: int) -> None:
        if self.created:
            await run("poststop", self.hooks.get("poststop", []), self._state("stopped", pid), fatal=False,
                      reaper=self.reaper)
