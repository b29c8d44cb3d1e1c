"""shim.hooks: OCI hooks of VM containers, run on the host (real processes, tiny shell hooks)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from ccpu.linux.reaper import Reaper
from shim import hooks


def run(coro_fn):  # noqa: ANN001, ANN201
    """Run ``coro_fn(reaper)`` in a fresh loop with the shim's kind of reaper (waitpid(-1))."""
    async def main():  # noqa: ANN202
        reaper = Reaper()
        reaper.start(asyncio.get_running_loop(), subreaper=False)
        try:
            return await coro_fn(reaper)
        finally:
            reaper.stop()
    return asyncio.run(main())


def _hook(tmp: Path, name: str, body: str, **extra) -> dict:  # noqa: ANN003
    script = tmp / name
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(0o755)
    return {"path": str(script), "args": [name, name], **extra}


def test_many_hooks_keep_their_exit_status(tmp_path: Path) -> None:
    """The shim reaps every child with waitpid(-1): hooks must go through that one reaper, or
    their status is lost (asyncio's watcher then reports 255 -- the bug this guards)."""
    ok, bad = _hook(tmp_path, "ok", "cat >/dev/null; exit 0"), _hook(tmp_path, "bad", "exit 7")

    async def go(reaper: Reaper) -> None:
        for _ in range(20):
            await hooks.run_one(ok, {"id": "x"}, reaper)
            with pytest.raises(hooks.HookFailed, match="exited with 7"):
                await hooks.run_one(bad, {"id": "x"}, reaper)

    run(go)


def test_lifecycle_order_state_and_poststop(tmp_path: Path) -> None:
    log = tmp_path / "log"
    rec = f'read -r s; echo "$1 $s" >> {log}'
    hs = {k: [_hook(tmp_path, k, rec)] for k in ("prestart", "createRuntime", "poststart", "poststop")}
    async def go(reaper: Reaper) -> None:
        c = hooks.ContainerHooks("c1", hs, str(tmp_path), reaper, {"a": "b"})
        await c.on_created(42)
        await c.on_started(42)
        await c.on_deleted(42)

    run(go)
    lines = log.read_text().splitlines()
    assert [ln.split(" ", 1)[0] for ln in lines] == ["prestart", "createRuntime", "poststart", "poststop"]
    states = [json.loads(ln.split(" ", 1)[1]) for ln in lines]
    assert [s["status"] for s in states] == ["created", "created", "running", "stopped"]
    assert states[0] == {"ociVersion": "1.0.2", "id": "c1", "status": "created", "pid": 42,
                         "bundle": str(tmp_path), "annotations": {"a": "b"}}


def test_failed_create_hook_is_fatal_and_poststop_still_runs(tmp_path: Path) -> None:
    mark = tmp_path / "stopped"
    hs = {"createRuntime": [_hook(tmp_path, "bad", "echo no-network >&2; exit 3")],
          "poststop": [_hook(tmp_path, "stop", f"touch {mark}")]}

    async def go(reaper: Reaper) -> None:
        c = hooks.ContainerHooks("c1", hs, str(tmp_path), reaper)
        with pytest.raises(hooks.HookFailed, match="createRuntime hook .*bad exited with 3: no-network"):
            await c.on_created(1)
        await c.on_deleted(1)

    run(go)
    assert mark.exists()


def test_no_poststop_without_create(tmp_path: Path) -> None:
    mark = tmp_path / "stopped"
    run(lambda reaper: hooks.ContainerHooks(
        "c1", {"poststop": [_hook(tmp_path, "stop", f"touch {mark}")]}, str(tmp_path), reaper).on_deleted(1))
    assert not mark.exists()


def test_non_fatal_hooks_only_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run(lambda reaper: hooks.ContainerHooks(
        "c1", {"poststart": [_hook(tmp_path, "bad", "exit 1")]}, str(tmp_path), reaper).on_started(1))
    assert "poststart hook" in caplog.text


def test_timeout_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    slow = _hook(tmp_path, "slow", "sleep 30", timeout=1)
    with pytest.raises(hooks.HookFailed, match="timed out after 1s"):
        run(lambda reaper: hooks.run_one(slow, {}, reaper))
    out = tmp_path / "env"
    monkeypatch.setenv("FRACTAL_HOOK_TEST", "inherited")
    run(lambda reaper: hooks.run_one(_hook(tmp_path, "e1", f'echo "$FRACTAL_HOOK_TEST" > {out}'), {}, reaper))
    assert out.read_text().strip() == "inherited"  # no env given: ours, as with runc
    run(lambda reaper: hooks.run_one(_hook(tmp_path, "e2", f'echo "$FRACTAL_HOOK_TEST-$X" > {out}',
                                           env=["X=1"]), {}, reaper))
    assert out.read_text().strip() == "-1"  # env given: exactly that


def test_relative_path_refused() -> None:
    with pytest.raises(hooks.HookFailed, match="not absolute"):
        run(lambda reaper: hooks.run_one({"path": "nerdctl"}, {}, reaper))
