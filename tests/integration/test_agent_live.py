"""Live layers end to end: a real agent, real runc, a running busybox container restacked.

The agent fixtures come from test_agent.py (an agent over a socketpair, private runc root,
bundle root and layer root; teardown force-deletes and unmounts).  The container runs on a
2-layer stack (a small layer over the unpacked busybox image) with its own upper.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from ccpu.agent import protocol
from ccpu.agent.client import AgentClient
from tests.integration.test_agent import (  # noqa: F401 -- fixtures
    Agent,
    _best_effort_finish,
    _mounts_below,
    agent,
    cid,
    exit_event,
    finish,
    image,
    run,
)

LOOP = "echo before > /written; while :; do cat /added/hello 2>/dev/null; sleep 0.05; done"


def _layer(base: Path, name: str, files: dict[str, str]) -> str:
    d = base / name
    d.mkdir(parents=True)
    for rel, text in files.items():
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return os.path.realpath(d)


async def _start_on_stack(client: AgentClient, agent: Agent, args: list[str], a_files: dict[str, str] | None = None, **spec_root: Any) -> dict[str, Any]:
    """A started container on [layer a, busybox] with its own upper."""
    c = cid()
    bundle, rootfs = agent.bundle(c, args)
    a = _layer(agent.layers / c, "a", {"a-file": "from a\n", **(a_files or {})})
    rootfs["lowers"] = [a] + rootfs["lowers"]
    spec = json.loads((bundle / "config.json").read_text())
    spec["root"].update(spec_root)
    out = client.open_channel()
    res = await client.call("create", container=c, bundle=str(bundle), rootfs=rootfs, spec=spec, terminal=False, stdout=out.number)
    await client.call("start", container=c)
    return {"id": c, "bundle": bundle, "pid": res["pid"], "out": out, "rootfs": rootfs, "a": a,
            "base": os.path.realpath(rootfs["lowers"][1]), "dir": agent.layers / c}  # fmt: skip


async def sh(client: AgentClient, container: str, script: str) -> tuple[int, bytes]:
    """Run `sh -c script` in the container; (exit status, stdout+stderr)."""
    eid = "e" + uuid.uuid4().hex[:8]
    out = client.open_channel()
    process = {"args": ["sh", "-c", "{ " + script + "\n} 2>&1"], "cwd": "/", "env": ["PATH=/bin:/usr/bin"], "user": {"uid": 0, "gid": 0}}
    await client.call("exec", container=container, exec=eid, process=process, terminal=False, stdout=out.number)
    await client.call("start", container=container, exec=eid)
    ev = await exit_event(client, container, eid)
    data = await out.read_all()
    await client.call("delete", container=container, exec=eid)
    return ev["exit_status"], data


async def _read_until(channel: Any, needle: bytes, timeout: float = 5) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"{needle!r} not seen in {seen[-200:]!r}")
        try:
            seen += await asyncio.wait_for(channel.read(65536), left)
        except asyncio.TimeoutError:
            continue
    return seen


def _ns_mounts(pid: int) -> list[str]:
    with open(f"/proc/{pid}/mountinfo") as f:
        return sorted(line.split()[4] for line in f)


async def _restack(client: AgentClient, container: str, **kw: Any) -> tuple[dict[str, Any], float]:
    t0 = time.monotonic()
    res = await client.call("restack", container=container, **kw)
    return res, (time.monotonic() - t0) * 1000


def test_restack_running_container(agent: Agent) -> None:
    latencies: list[float] = []

    async def scenario(client: AgentClient) -> None:
        c = await _start_on_stack(client, agent, ["sh", "-c", LOOP])
        cid_, a, base = c["id"], c["a"], c["base"]
        upper = Path(c["rootfs"]["upper"])
        try:
            deadline = time.monotonic() + 5
            while not (upper / "written").exists():
                assert time.monotonic() < deadline, "the container never wrote /written"
                await asyncio.sleep(0.02)
            info = await client.call("layers", container=cid_)
            assert info["lowers"] == [a, base] and info["upper"] == os.path.realpath(upper)
            assert len(info["history"]) == 1
            mounts_before = _ns_mounts(c["pid"])

            # add a layer on top: the running loop sees /added/hello, same pid, /written stays
            b = _layer(c["dir"], "b", {"added/hello": "hello\n"})
            res, ms = await _restack(client, cid_, add=[b])
            latencies.append(ms)
            assert res["lowers"] == [b, a, base]
            await _read_until(c["out"], b"hello")
            status, out = await sh(client, cid_, "cat /added/hello /written /a-file")
            assert (status, out) == (0, b"hello\nbefore\nfrom a\n")
            st = await client.call("state", container=cid_)
            assert st["status"] == "running" and st["pid"] == c["pid"]
            assert {"pid": c["pid"], "exec": ""} in (await client.call("pids", container=cid_))["processes"]
            assert _ns_mounts(c["pid"]) == mounts_before  # /proc, /dev, ... carried over
            assert _mounts_below(str(c["bundle"])) == [str(c["bundle"] / "rootfs")]  # agent's view: one mount
            assert (c["bundle"] / "rootfs" / "added" / "hello").read_text() == "hello\n"
            info = await client.call("layers", container=cid_)
            assert info["lowers"] == [b, a, base] and len(info["history"]) == 2
            assert info["history"][1]["added"] == [b]

            # the container writes on the new stack: it lands in the same upper
            assert (await sh(client, cid_, "echo after > /written2"))[0] == 0
            assert (upper / "written2").read_text() == "after\n"

            # remove it again: gone for new lookups
            res, ms = await _restack(client, cid_, remove=[b])
            latencies.append(ms)
            assert res["lowers"] == [a, base]
            status, out = await sh(client, cid_, "cat /added/hello; cat /written /written2")
            assert status == 0 and b"No such file" in out and out.endswith(b"before\nafter\n"), out

            # errors leave the stack alone
            with pytest.raises(protocol.NotFound):
                await client.call("restack", container=cid_, remove=[b])
            with pytest.raises(protocol.FailedPrecondition, match="every image layer"):
                await client.call("restack", container=cid_, remove=[a, base])
            with pytest.raises(protocol.AlreadyExists):
                await client.call("restack", container=cid_, add=[a])
            with pytest.raises(protocol.InvalidArgument):
                await client.call("restack", container=cid_, add=["/etc"])  # outside the layer roots
            with pytest.raises(protocol.InvalidArgument):
                await client.call("restack", container=cid_, add=[str(c["dir"] / "no-such-layer")])
            with pytest.raises(protocol.InvalidArgument):
                await client.call("restack", container=cid_, add=[b], position=7)
            # a failure half-way (after the new overlay is mounted): the layer left alone has no
            # /proc, /dev ... to carry the container's mounts -> nothing changes
            with pytest.raises(protocol.FailedPrecondition, match="no /"):
                await client.call("restack", container=cid_, remove=[base])
            assert (await client.call("layers", container=cid_))["lowers"] == [a, base]
            assert _mounts_below(str(c["bundle"])) == [str(c["bundle"] / "rootfs")]
            assert _ns_mounts(c["pid"]) == mounts_before
            assert sorted(p.name for p in c["dir"].iterdir()) == ["a", "b", "upper", "work", "work.1", "work.2"]  # no work.3
            assert (await sh(client, cid_, "cat /a-file"))[1] == b"from a\n"

            # two concurrent restacks on one container: applied one after the other, in order
            c1 = _layer(c["dir"], "c1", {"which": "c1\n"})
            c2 = _layer(c["dir"], "c2", {"which": "c2\n"})
            r1, r2 = await asyncio.gather(
                client.call("restack", container=cid_, add=[c1]),
                client.call("restack", container=cid_, add=[c2], position="bottom"),
            )
            assert r1["lowers"] == [c1, a, base] and r2["lowers"] == [c1, a, base, c2]
            assert (await sh(client, cid_, "cat /which"))[1] == b"c1\n"
            res, ms = await _restack(client, cid_, remove=[c1, c2], add=[b], position=1)
            latencies.append(ms)
            assert res["lowers"] == [a, b, base]
            assert (await sh(client, cid_, "cat /added/hello /which 2>/dev/null; true"))[1] == b"hello\n"
            assert (await client.call("state", container=cid_))["pid"] == c["pid"]

            await finish(client, cid_)
            assert not _mounts_below(str(agent.base))
            with open("/proc/self/mountinfo") as f:  # no overlay of this test left anywhere
                assert str(c["dir"]) not in f.read()
            left = sorted(p.name for p in c["dir"].iterdir())
            assert left == ["a", "b", "c1", "c2", "upper", "work"], left  # our work.N dirs are gone
        except BaseException:
            await _best_effort_finish(client, cid_)
            raise

    run(agent, scenario)
    print(f"\nrestack latency (ms, client round trip): {', '.join(f'{x:.1f}' for x in latencies)}")
    assert max(latencies) < 1000


def test_cwd_below_the_root_keeps_the_old_directory(agent: Agent) -> None:
    """Documented semantics: a cwd exactly at "/" moves with the pivot, a cwd below it does
    not (until the process chdirs again); absolute lookups see the new stack at once."""
    script = "cd /sub; while :; do [ -e new ] && echo rel; [ -e /sub/new ] && echo abs; sleep 0.05; done"

    async def scenario(client: AgentClient) -> None:
        c = await _start_on_stack(client, agent, ["sh", "-c", script], a_files={"sub/old": "old\n"})
        try:
            await asyncio.sleep(0.1)
            b = _layer(c["dir"], "b", {"sub/new": "new\n"})
            await client.call("restack", container=c["id"], add=[b])
            seen = await _read_until(c["out"], b"abs")
            await asyncio.sleep(0.3)
            seen += await asyncio.wait_for(c["out"].read(65536), 1)
            assert b"rel" not in seen, seen
            assert (await sh(client, c["id"], "cd /sub && cat new"))[1] == b"new\n"
        finally:
            await _best_effort_finish(client, c["id"])

    run(agent, scenario)


def test_restack_refuses_other_rootfs_kinds_and_stopped(agent: Agent) -> None:
    async def scenario(client: AgentClient) -> None:
        c = cid()
        bundle, _ = agent.bundle(c, ["sleep", "100"])
        rootfs = {"kind": "mounts", "mounts": [{"type": "bind", "source": str(agent.image / "rootfs"), "options": ["rbind", "ro"]}]}
        await client.call("create", container=c, bundle=str(bundle), rootfs=rootfs, terminal=False)
        try:
            with pytest.raises(protocol.FailedPrecondition, match="kind 'layers'"):
                await client.call("layers", container=c)
            with pytest.raises(protocol.FailedPrecondition, match="kind 'layers'"):
                await client.call("restack", container=c, add=[str(agent.image / "rootfs")])
        finally:
            await client.call("delete", container=c)
        with pytest.raises(protocol.NotFound):
            await client.call("restack", container="no-such", add=[str(agent.image / "rootfs")])

        s = await _start_on_stack(client, agent, ["true"])
        await exit_event(client, s["id"])
        b = _layer(s["dir"], "b", {"x": "x"})
        with pytest.raises(protocol.FailedPrecondition, match="stopped"):
            await client.call("restack", container=s["id"], add=[b])
        await client.call("delete", container=s["id"])

    run(agent, scenario)


def test_restack_keeps_a_readonly_root_readonly(agent: Agent) -> None:
    async def scenario(client: AgentClient) -> None:
        c = await _start_on_stack(client, agent, ["sleep", "100"], readonly=True)
        try:
            b = _layer(c["dir"], "b", {"added/hello": "hello\n"})
            await client.call("restack", container=c["id"], add=[b])
            status, out = await sh(client, c["id"], "cat /added/hello; touch /x")
            assert status != 0 and out.startswith(b"hello\n") and b"Read-only" in out, out
        finally:
            await _best_effort_finish(client, c["id"])
        assert not _mounts_below(str(agent.base))

    run(agent, scenario)


def test_restack_a_paused_container_without_upper(agent: Agent) -> None:
    """A read-only stack (no upper: a bind of the one lower, then an overlay of two) restacked
    while the container is paused."""

    async def scenario(client: AgentClient) -> None:
        c = cid()
        bundle, rootfs = agent.bundle(c, ["sleep", "100"])
        spec = json.loads((bundle / "config.json").read_text())
        spec["root"]["readonly"] = True
        rootfs = {"kind": "layers", "lowers": rootfs["lowers"]}
        await client.call("create", container=c, bundle=str(bundle), rootfs=rootfs, spec=spec, terminal=False)
        try:
            await client.call("start", container=c)
            await client.call("pause", container=c)
            b = _layer(agent.layers / c, "b", {"added/hello": "hello\n"})
            assert (await client.call("restack", container=c, add=[b]))["lowers"] == [b, os.path.realpath(rootfs["lowers"][0])]
            await client.call("resume", container=c)
            status, out = await sh(client, c, "cat /added/hello; touch /x")
            assert status != 0 and out.startswith(b"hello\n") and b"Read-only" in out, out
            info = await client.call("layers", container=c)
            assert info["upper"] is None and info["work"] is None
        finally:
            await _best_effort_finish(client, c)
        assert not _mounts_below(str(agent.base))

    run(agent, scenario)


@pytest.mark.parametrize("stage", ["attach", "binds"])
def test_failure_inside_the_container_namespace_changes_nothing(image: Path, stage: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The helper fails after attaching the new root (or after copying the submounts onto it):
    the new root is detached again, the agent's staging mount and fresh work dir are gone."""
    monkeypatch.setenv("FRACTAL_LIVE_FAIL_AT", stage)
    base = Path(__import__("tempfile").mkdtemp(prefix="agent-", dir="/tmp"))
    agent_ = Agent(base, image)
    try:

        async def scenario(client: AgentClient) -> None:
            c = await _start_on_stack(client, agent_, ["sh", "-c", LOOP])
            try:
                await asyncio.sleep(0.1)
                before = _ns_mounts(c["pid"])
                b = _layer(c["dir"], "b", {"added/hello": "hello\n"})
                with pytest.raises(protocol.Internal, match="injected"):
                    await client.call("restack", container=c["id"], add=[b])
                assert _ns_mounts(c["pid"]) == before
                assert _mounts_below(str(c["bundle"])) == [str(c["bundle"] / "rootfs")]
                assert not (c["dir"] / "work.1").exists()
                assert (await client.call("layers", container=c["id"]))["lowers"] == [c["a"], c["base"]]
                status, out = await sh(client, c["id"], "cat /a-file; test -e /added/hello || echo absent")
                assert (status, out) == (0, b"from a\nabsent\n")
            finally:
                await _best_effort_finish(client, c["id"])

        run(agent_, scenario)
    finally:
        agent_.cleanup()
        import shutil

        shutil.rmtree(base, ignore_errors=True)


def test_restack_under_a_shared_mount(agent: Agent) -> None:
    """Hosts with systemd have "/" shared: the staging mount and its clone are then shared too
    (pivot_root refuses a shared new root unless we make it private), and the agent's mounts
    propagate to peers.  Bind the bundle root onto itself as a shared mount to check that."""
    subprocess.run(["mount", "--bind", str(agent.bundles), str(agent.bundles)], check=True)
    subprocess.run(["mount", "--make-shared", str(agent.bundles)], check=True)
    try:

        async def scenario(client: AgentClient) -> None:
            c = await _start_on_stack(client, agent, ["sleep", "100"])
            try:
                b = _layer(c["dir"], "b", {"added/hello": "hello\n"})
                await client.call("restack", container=c["id"], add=[b])
                assert (await sh(client, c["id"], "cat /added/hello"))[1] == b"hello\n"
                await client.call("restack", container=c["id"], remove=[b])
                assert (await sh(client, c["id"], "cat /a-file"))[1] == b"from a\n"
            finally:
                await _best_effort_finish(client, c["id"])
            assert _mounts_below(str(agent.bundles)) == [str(agent.bundles)]

        run(agent, scenario)
    finally:
        subprocess.run(["umount", "-l", str(agent.bundles)], capture_output=True)
