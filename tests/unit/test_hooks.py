"""shim.hooks: OCI hooks of VM containers, run on the host (real processes, tiny shell hooks)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from shim import hooks


def _hook(tmp: Path, name: str, body: str, **extra) -> dict:  # noqa: ANN003
    script = tmp / name
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(0o755)
    return {"path": str(script), "args": [name, name], **extra}


def test_lifecycle_order_state_and_poststop(tmp_path: Path) -> None:
    log = tmp_path / "log"
    rec = f'read -r s; echo "$1 $s" >> {log}'
    hs = {k: [_hook(tmp_path, k, rec)] for k in ("prestart", "createRuntime", "poststart", "poststop")}
    c = hooks.ContainerHooks("c1", hs, str(tmp_path), {"a": "b"})

    async def go() -> None:
        await c.on_created(42)
        await c.on_started(42)
        await c.on_deleted(42)

    asyncio.run(go())
    lines = log.read_text().splitlines()
    assert [ln.split(" ", 1)[0] for ln in lines] == ["prestart", "createRuntime", "poststart", "poststop"]
    states = [json.loads(ln.split(" ", 1)[1]) for ln in lines]
    assert [s["status"] for s in states] == ["created", "created", "running", "stopped"]
    assert states[0] == {"ociVersion": "1.0.2", "id": "c1", "status": "created", "pid": 42,
                         "bundle": str(tmp_path), "annotations": {"a": "b"}}


def test_failed_create_hook_is_fatal_and_poststop_still_runs(tmp_path: Path) -> None:
    mark = tmp_path / "stopped"
    c = hooks.ContainerHooks("c1", {"createRuntime": [_hook(tmp_path, "bad", "echo no-network >&2; exit 3")],
                                    "poststop": [_hook(tmp_path, "stop", f"touch {mark}")]}, str(tmp_path))
    with pytest.raises(hooks.HookFailed, match="createRuntime hook .*bad exited with 3: no-network"):
        asyncio.run(c.on_created(1))
    asyncio.run(c.on_deleted(1))
    assert mark.exists()


def test_no_poststop_without_create(tmp_path: Path) -> None:
    mark = tmp_path / "stopped"
    c = hooks.ContainerHooks("c1", {"poststop": [_hook(tmp_path, "stop", f"touch {mark}")]}, str(tmp_path))
    asyncio.run(c.on_deleted(1))
    assert not mark.exists()


def test_non_fatal_hooks_only_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    c = hooks.ContainerHooks("c1", {"poststart": [_hook(tmp_path, "bad", "exit 1")]}, str(tmp_path))
    asyncio.run(c.on_started(1))
    assert "poststart hook" in caplog.text


def test_timeout_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    slow = _hook(tmp_path, "slow", "sleep 30", timeout=1)
    with pytest.raises(hooks.HookFailed, match="timed out after 1s"):
        asyncio.run(hooks.run_one(slow, {}))
    out = tmp_path / "env"
    monkeypatch.setenv("FRACTAL_HOOK_TEST", "inherited")
    asyncio.run(hooks.run_one(_hook(tmp_path, "e1", f'echo "$FRACTAL_HOOK_TEST" > {out}'), {}))
    assert out.read_text().strip() == "inherited"  # no env given: ours, as with runc
    asyncio.run(hooks.run_one(_hook(tmp_path, "e2", f'echo "$FRACTAL_HOOK_TEST-$X" > {out}', env=["X=1"]), {}))
    assert out.read_text().strip() == "-1"  # env given: exactly that


def test_relative_path_refused() -> None:
    with pytest.raises(hooks.HookFailed, match="not absolute"):
        asyncio.run(hooks.run_one({"path": "nerdctl"}, {}))
