"""OCI hooks run on the host by the shim, for containers whose runc is elsewhere (in the VM).

Why the shim runs them: hook binaries (nerdctl's ``nerdctl internal oci-hook``, CNI or GPU
helpers) live on the host and do host-side work; runc in the guest cannot run them.  kata does
the same.  Semantics follow the runtime spec (config.md#posix-platform-hooks): the container's
state JSON on stdin, ``path``/``args``/``env`` as given (no ``env``: the shim's, as with runc), ``timeout`` in seconds; a failing
``prestart``/``createRuntime`` hook fails the create, a failing ``poststart``/``poststop`` hook is
only logged.  The state's ``pid`` is QEMU's, as in kata: the process that *is* the container
from the host's point of view.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

log = logging.getLogger("shim.hooks")

DEFAULT_TIMEOUT = 30.0


class HookFailed(RuntimeError):
    pass


def state(cid: str, status: str, pid: int, bundle: str, annotations: Mapping[str, str]) -> dict[str, Any]:
    return {"ociVersion": "1.0.2", "id": cid, "status": status, "pid": pid, "bundle": bundle,
            "annotations": dict(annotations)}


async def run_one(hook: Mapping[str, Any], st: Mapping[str, Any]) -> None:
    path = str(hook.get("path") or "")
    if not os.path.isabs(path):
        raise HookFailed(f"hook path {path!r} is not absolute")
    args = [str(a) for a in hook.get("args") or [path]]
    # as runc (Go's exec.Cmd): no env given -> the hook inherits ours
    given = hook.get("env")
    env = dict(e.split("=", 1) for e in given if "=" in e) if given else None
    timeout = float(hook.get("timeout") or DEFAULT_TIMEOUT)
    try:
        proc = await asyncio.create_subprocess_exec(
            path, *args[1:], stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=env, executable=path, cwd=str(st.get("bundle") or "/"))
    except OSError as exc:
        raise HookFailed(f"hook {path}: {exc}") from None
    try:
        out, err = await asyncio.wait_for(proc.communicate(json.dumps(st).encode()), timeout)
    except (TimeoutError, asyncio.TimeoutError):
        proc.kill()
        await proc.wait()
        raise HookFailed(f"hook {path} timed out after {timeout:g}s") from None
    if proc.returncode != 0:
        text = (err or out).decode(errors="replace").strip()[-500:]
        raise HookFailed(f"hook {path} exited with {proc.returncode}: {text}")


async def run(kind: str, hooks: Sequence[Mapping[str, Any]], st: Mapping[str, Any], *,
              fatal: bool) -> None:
    """Run ``hooks`` in order; the first failure raises (``fatal``) or is logged."""
    for hook in hooks:
        try:
            await run_one(hook, st)
        except HookFailed as exc:
            if fatal:
                raise HookFailed(f"{kind} {exc}") from None
            log.warning("%s %s (container %s)", kind, exc, st.get("id"))
