"""The fractal agent end to end: a real agent process, real runc, the busybox test image.

Each test starts its own agent (over a socketpair, `--fd`, like the shim does) with a private
runc root, bundle root and layer root under a temp dir, and talks to it with
`ccpu.agent.client.AgentClient`.  Teardown force-deletes every runc container of that root and
unmounts whatever is still mounted below the temp dir, whatever the test did.

Rootfs: the busybox image is unpacked once per module (umoci); tests stack it as the lower dir
of an overlay (`rootfs.kind = "layers"`) with a fresh upper per container, so the unpacked
image is never written to.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ccpu.agent import protocol
from ccpu.agent.client import AgentClient

REPO = Path(__file__).resolve().parents[2]
RUNC = shutil.which("runc") or "/usr/sbin/runc"


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """busybox unpacked once: <dir>/config.json (umoci's) and <dir>/rootfs."""
    if shutil.which("umoci") is None:
        pytest.skip("umoci not installed")
    from hack import testimages

    layout = testimages.build("busybox")
    dst = tmp_path_factory.mktemp("agent-image") / "busybox"
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:latest", str(dst)], check=True, capture_output=True)
    return dst


def _mounts_below(prefix: str) -> list[str]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].replace("\\040", " ")
            if mp == prefix or mp.startswith(prefix + "/"):
                out.append(mp)
    return out


class Agent:
    """One agent process and its dirs."""

    def __init__(self, base: Path, image: Path, listen: bool = False) -> None:
        self.base = base
        self.image = image
        self.bundles = base / "bundles"
        self.layers = base / "layers"
        self.runc_root = base / "runc"
        for d in (self.bundles, self.layers, self.runc_root):
            d.mkdir()
        self.sock_path = str(base / "agent.sock") if listen else None
        self.log = base / "agent.log"
        parent, child = socket.socketpair()
        self.sock = parent
        argv = [
            sys.executable, "-m", "ccpu.agent", "--fd", str(child.fileno()),
            "--runc-root", str(self.runc_root), "--runc", RUNC,
            "--bundle-root", str(self.bundles), "--layer-root", str(self.layers),
            "--layer-root", str(image), "--debug", "--log", str(self.log), "--drain-timeout", "1",
        ]  # fmt: skip
        if self.sock_path:
            argv += ["--listen", f"unix:{self.sock_path}"]
        self.proc = subprocess.Popen(argv, pass_fds=(child.fileno(),), cwd=REPO)
        child.close()

    def bundle(self, container: str, args: list[str], terminal: bool = False, **process: Any) -> tuple[Path, dict[str, Any]]:
        """A bundle dir with a config.json running `args`; and the rootfs arg stacking the image."""
        spec = json.loads((self.image / "config.json").read_text())
        spec["process"]["args"] = args
        spec["process"]["terminal"] = terminal
        spec["process"].update(process)
        b = self.bundles / container
        b.mkdir()
        (b / "config.json").write_text(json.dumps(spec))
        upper, work = self.layers / container / "upper", self.layers / container / "work"
        upper.mkdir(parents=True)
        work.mkdir()
        rootfs = {"kind": "layers", "lowers": [str(self.image / "rootfs")], "upper": str(upper), "work": str(work)}
        return b, rootfs

    def cleanup(self) -> None:
        try:
            listed = subprocess.run([RUNC, "--root", str(self.runc_root), "list", "-q"], capture_output=True, text=True)
            for cid in listed.stdout.split():
                subprocess.run([RUNC, "--root", str(self.runc_root), "delete", "--force", cid], capture_output=True)
        finally:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.sock.close()
            for mp in sorted(_mounts_below(str(self.base)), key=len, reverse=True):
                subprocess.run(["umount", "-l", mp], capture_output=True)


@pytest.fixture
def agent(image: Path) -> Iterator[Agent]:
    base = Path(tempfile.mkdtemp(prefix="agent-", dir="/tmp"))  # short: console socket paths
    a = Agent(base, image)
    try:
        yield a
    finally:
        a.cleanup()
        if os.environ.get("KEEP_AGENT_LOG"):
            print((base / "agent.log").read_text())
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def listening_agent(image: Path) -> Iterator[Agent]:
    base = Path(tempfile.mkdtemp(prefix="agent-", dir="/tmp"))
    a = Agent(base, image, listen=True)
    try:
        yield a
    finally:
        a.cleanup()
        shutil.rmtree(base, ignore_errors=True)


def run(agent: Agent, scenario: Callable[[AgentClient], Awaitable[None]], timeout: float = 20) -> None:
    """Run `scenario` with a connected, hello'd client on the agent's socketpair."""

    async def main() -> None:
        client = await AgentClient.connect_socket(agent.sock)  # closed at the end: agent sees EOF
        try:
            await client.hello()
            await asyncio.wait_for(scenario(client), timeout)
        finally:
            await client.close()

    asyncio.run(main())


def cid() -> str:
    return "t-" + uuid.uuid4().hex[:12]


async def create(client: AgentClient, agent: Agent, args: list[str], *, stdin: bool = False, terminal: bool = False, **process: Any) -> dict[str, Any]:
    """Create a container running `args`; returns ids and channels."""
    c = cid()
    bundle, rootfs = agent.bundle(c, args, terminal=terminal, **process)
    out = client.open_channel()
    err = client.open_channel() if not terminal else None
    inp = client.open_channel() if stdin else None
    res = await client.call(
        "create", container=c, bundle=str(bundle), rootfs=rootfs, terminal=terminal,
        stdin=inp.number if inp else 0, stdout=out.number, stderr=err.number if err else 0,
    )  # fmt: skip
    return {"id": c, "bundle": bundle, "pid": res["pid"], "out": out, "err": err, "in": inp}


async def exit_event(client: AgentClient, container: str, exec_id: str = "", timeout: float = 10) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        ev = await client.next_event(max(0.01, deadline - time.monotonic()))
        if ev.get("event") == "exit" and ev["container"] == container and ev["exec"] == exec_id:
            return ev


async def runc_forgot(agent: Agent, container: str, timeout: float = 10) -> None:
    """runc's state of `container` is gone (its `runc delete` may finish after the agent's
    delete was answered)."""
    deadline = time.monotonic() + timeout
    while (agent.runc_root / container).exists():
        assert time.monotonic() < deadline, f"runc still knows {container}"
        await asyncio.sleep(0.02)


async def finish(client: AgentClient, container: str) -> None:
    """Kill (if needed) and delete a container."""
    st = await client.call("state", container=container)
    if st["status"] != "stopped":
        if st["status"] == "paused":
            await client.call("resume", container=container)
        await client.call("kill", container=container, signal=9, all=True)
        await exit_event(client, container)
    await client.call("delete", container=container)


# ---------------------------------------------------------------------------------------------
# tests


def test_output_then_exit_status(agent: Agent) -> None:
    async def scenario(client: AgentClient) -> None:
        c = await create(client, agent, ["sh", "-c", "echo out; echo err >&2; exit 3"])
        assert (await client.call("state", container=c["id"]))["status"] == "created"
        started = await client.call("start", container=c["id"])
        assert started["pid"] == c["pid"] > 0
        ev = await exit_event(client, c["id"])
        # output is complete (closed) by the time the exit event arrives
        assert c["out"].closed_by_agent and c["err"].closed_by_agent
        assert await c["out"].read_all() == b"out\n"
        assert await c["err"].read_all() == b"err\n"
        assert ev["exit_status"] == 3 and ev["pid"] == c["pid"] and ev["exited_at"] > 0
        st = await client.call("state", container=c["id"])
        assert st == {"status": "stopped", "pid": c["pid"], "exit_status": 3, "exited_at": ev["exited_at"]}
        with pytest.raises(protocol.NotFound):
            await client.call("kill", container=c["id"], signal=15)
        deleted = await client.call("delete", container=c["id"])
        assert deleted["exit_status"] == 3 and deleted["pid"] == c["pid"]
        assert not _mounts_below(str(c["bundle"]))
        await runc_forgot(agent, c["id"])
        with pytest.raises(protocol.NotFound):
            await client.call("state", container=c["id"])

    run(agent, scenario)


def test_large_output_is_complete_before_exit(agent: Agent) -> None:
    async def scenario(client: AgentClient) -> None:
        c = await create(client, agent, ["sh", "-c", "head -c 3000000 /dev/zero; echo tail >&2"])
        await client.call("start", container=c["id"])
        ev = await exit_event(client, c["id"])
        assert ev["exit_status"] == 0 and c["out"].closed_by_agent
        assert len(await c["out"].read_all()) == 3000000
        assert await c["err"].read_all() == b"tail\n"
        await client.call("delete", container=c["id"])

    run(agent, scenario)


def test_stdin_cat(agent: Agent) -> None:
    async def scenario(client: AgentClient) -> None:
        c = await create(client, agent, ["cat"], stdin=True)
        await c["in"].write(b"hello ")  # before start: queued in the pipe
        await client.call("start", container=c["id"])
        await c["in"].write(b"world\n")
        assert await c["out"].read(100) in (b"hello world\n", b"hello ")
        await c["in"].close_write()
        ev = await exit_event(client, c["id"])
        assert ev["exit_status"] == 0
        await client.call("delete", container=c["id"])

    run(agent, scenario)


def test_exec_with_a_background_child_holding_stdout(agent: Agent) -> None:
    """The exec's exit is reported after the drain timeout even though its stdout never hits EOF."""

    async def scenario(client: AgentClient) -> None:
        c = await create(client, agent, ["sleep", "1000"])
        try:
            await client.call("start", container=c["id"])
            out = client.open_channel()
            process = {"args": ["sh", "-c", "sleep 1000 & echo bg"], "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}}
            await client.call("exec", container=c["id"], exec="bg", process=process, terminal=False, stdout=out.number)
            await client.call("start", container=c["id"], exec="bg")
            t0 = time.monotonic()
            ev = await exit_event(client, c["id"], "bg")
            assert ev["exit_status"] == 0 and 0.5 < time.monotonic() - t0 < 5
            assert out.closed_by_agent and await out.read_all() == b"bg\n"
        finally:
            await _best_effort_finish(client, c["id"])

    run(agent, scenario)


def test_close_stdin_op(agent: Agent) -> None:
    async def scenario(client: AgentClient) -> None:
        c = await create(client, agent, ["sh", "-c", "cat; echo done"], stdin=True)
        await client.call("start", container=c["id"])
        await c["in"].write(b"x\n")
        await client.call("close_stdin", container=c["id"])
        assert (await exit_event(client, c["id"]))["exit_status"] == 0
        assert await c["out"].read_all() == b"x\ndone\n"
        await client.call("delete", container=c["id"])

    run(agent, scenario)


def test_exec_kill_pause_pids(agent: Agent) -> None:
    async def scenario(client: AgentClient) -> None:
        c = await create(client, agent, ["sleep", "1000"])
        cid_ = c["id"]
        try:
            await client.call("start", container=cid_)
            eout, eerr = client.open_channel(), client.open_channel()
            process = {"args": ["sh", "-c", "echo in-exec; echo e >&2; exit 5"], "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}}
            await client.call("exec", container=cid_, exec="e1", process=process, terminal=False, stdin=0, stdout=eout.number, stderr=eerr.number)
            assert (await client.call("state", container=cid_, exec="e1"))["status"] == "created"
            with pytest.raises(protocol.AlreadyExists):
                await client.call("exec", container=cid_, exec="e1", process=process, terminal=False)
            epid = (await client.call("start", container=cid_, exec="e1"))["pid"]
            ev = await exit_event(client, cid_, "e1")
            assert ev["exit_status"] == 5 and ev["pid"] == epid
            assert await eout.read_all() == b"in-exec\n" and await eerr.read_all() == b"e\n"
            with pytest.raises(protocol.NotFound):
                await client.call("kill", container=cid_, exec="e1", signal=9)
            assert (await client.call("delete", container=cid_, exec="e1"))["exit_status"] == 5

            # stdin written and closed before the exec starts still reaches it (ctr exec < file)
            ein, eout3 = client.open_channel(), client.open_channel()
            await client.call("exec", container=cid_, exec="e3", process={**process, "args": ["cat"]},
                              terminal=False, stdin=ein.number, stdout=eout3.number, stderr=0)
            await ein.write(b"early input\n")
            await ein.close_write()
            await client.call("start", container=cid_, exec="e3")
            assert (await exit_event(client, cid_, "e3"))["exit_status"] == 0
            assert await eout3.read_all() == b"early input\n"
            await client.call("delete", container=cid_, exec="e3")

            # a long-running exec shows up in pids
            await client.call("exec", container=cid_, exec="e2", process={**process, "args": ["sleep", "1000"]}, terminal=False)
            e2 = (await client.call("start", container=cid_, exec="e2"))["pid"]
            procs = (await client.call("pids", container=cid_))["processes"]
            assert {"pid": c["pid"], "exec": ""} in procs and {"pid": e2, "exec": "e2"} in procs
            with pytest.raises(protocol.FailedPrecondition):
                await client.call("delete", container=cid_, exec="e2")

            await client.call("pause", container=cid_)
            assert (await client.call("state", container=cid_))["status"] == "paused"
            await client.call("resume", container=cid_)
            assert (await client.call("state", container=cid_))["status"] == "running"

            stats = await client.call("stats", container=cid_)
            assert "memory" in stats or "pids" in stats, stats

            with pytest.raises(protocol.FailedPrecondition):
                await client.call("delete", container=cid_)
            await client.call("kill", container=cid_, signal=9)
            ev = await exit_event(client, cid_)
            assert ev["exit_status"] == 137
            await client.call("delete", container=cid_)
            await runc_forgot(agent, cid_)
        except BaseException:
            await _best_effort_finish(client, cid_)
            raise

    run(agent, scenario)


async def _best_effort_finish(client: AgentClient, container: str) -> None:
    try:
        await asyncio.wait_for(finish(client, container), 10)
    except Exception:
        pass  # the fixture's teardown force-deletes


def test_terminal(agent: Agent) -> None:
    async def scenario(client: AgentClient) -> None:
        c = await create(client, agent, ["sh", "-c", "tty; stty size; read x; echo got $x"], terminal=True, stdin=True)
        await client.call("resize_pty", container=c["id"], width=100, height=30)
        await client.call("start", container=c["id"])
        # an exec with its own terminal while the init waits for input
        eout = client.open_channel()
        process = {"args": ["sh", "-c", "tty; echo exec-hi"], "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}}
        await client.call("exec", container=c["id"], exec="t1", process=process, terminal=True, stdout=eout.number)
        await client.call("start", container=c["id"], exec="t1")
        assert (await exit_event(client, c["id"], "t1"))["exit_status"] == 0
        eo = await eout.read_all()
        assert b"/dev/pts/" in eo and b"exec-hi" in eo, eo
        await client.call("delete", container=c["id"], exec="t1")
        await c["in"].write(b"abc\r")
        ev = await exit_event(client, c["id"])
        out = await c["out"].read_all()
        assert ev["exit_status"] == 0
        assert b"/dev/pts/" in out and b"30 100" in out and b"got abc" in out, out
        await client.call("delete", container=c["id"])

    run(agent, scenario)


def test_layers_two_lowers_and_upper(agent: Agent) -> None:
    async def scenario(client: AgentClient) -> None:
        c = cid()
        bundle, rootfs = agent.bundle(c, ["sh", "-c", "cat /extra/x; echo written > /new; rm /extra/x"])
        top = agent.layers / c / "top"
        (top / "extra").mkdir(parents=True)
        (top / "extra" / "x").write_text("from top\n")
        rootfs["lowers"] = [str(top)] + rootfs["lowers"]  # nearest first
        out = client.open_channel()
        await client.call("create", container=c, bundle=str(bundle), rootfs=rootfs, terminal=False, stdout=out.number)
        assert _mounts_below(str(bundle)) == [str(bundle / "rootfs")]
        await client.call("start", container=c)
        assert (await exit_event(client, c))["exit_status"] == 0
        assert await out.read_all() == b"from top\n"
        upper = Path(rootfs["upper"])
        assert (upper / "new").read_text() == "written\n"
        assert (top / "extra" / "x").exists()  # lower untouched; whiteout in upper
        await client.call("delete", container=c)
        assert not _mounts_below(str(bundle))
        await runc_forgot(agent, c)

    run(agent, scenario)


def test_layers_longer_than_a_page(agent: Agent) -> None:
    """120 lower dirs: the overlay options exceed a page and are mounted relative to their parent."""

    async def scenario(client: AgentClient) -> None:
        c = cid()
        bundle, rootfs = agent.bundle(c, ["sh", "-c", "cat /layer-7 /layer-100"])
        stack = agent.layers / c / "stack-with-a-rather-long-directory-name"
        shutil.copytree(agent.image / "rootfs", stack / "base", symlinks=True)
        lowers = []
        for i in range(120):
            d = stack / f"layer-number-{i:04d}"
            d.mkdir()
            (d / f"layer-{i}").write_text(f"{i}\n")
            lowers.append(str(d))
        rootfs["lowers"] = lowers[::-1] + [str(stack / "base")]
        assert len(":".join(rootfs["lowers"])) > 4096
        out = client.open_channel()
        await client.call("create", container=c, bundle=str(bundle), rootfs=rootfs, terminal=False, stdout=out.number)
        await client.call("start", container=c)
        assert (await exit_event(client, c))["exit_status"] == 0
        assert await out.read_all() == b"7\n100\n"
        await client.call("delete", container=c)
        assert not _mounts_below(str(bundle))

    run(agent, scenario)


def test_mounts_kind_bind_and_none(agent: Agent) -> None:
    async def scenario(client: AgentClient) -> None:
        # kind "mounts": a read-only bind of the image rootfs
        c = cid()
        bundle, _ = agent.bundle(c, ["sh", "-c", "echo ok; touch /x 2>/dev/null && echo writable || echo readonly"])
        spec = json.loads((bundle / "config.json").read_text())
        spec["root"]["readonly"] = False
        out = client.open_channel()
        rootfs = {"kind": "mounts", "mounts": [{"type": "bind", "source": str(agent.image / "rootfs"), "options": ["rbind", "ro"]}]}
        await client.call("create", container=c, bundle=str(bundle), rootfs=rootfs, spec=spec, terminal=False, stdout=out.number)
        await client.call("start", container=c)
        assert (await exit_event(client, c))["exit_status"] == 0
        assert await out.read_all() == b"ok\nreadonly\n"
        await client.call("delete", container=c)
        assert not _mounts_below(str(bundle))

        # kind "none": the bundle's rootfs is already there
        c2 = cid()
        bundle2, _ = agent.bundle(c2, ["echo", "none"])
        shutil.copytree(agent.image / "rootfs", bundle2 / "rootfs", symlinks=True)
        out2 = client.open_channel()
        await client.call("create", container=c2, bundle=str(bundle2), rootfs={"kind": "none"}, terminal=False, stdout=out2.number)
        await client.call("start", container=c2)
        assert (await exit_event(client, c2))["exit_status"] == 0
        assert await out2.read_all() == b"none\n"
        await client.call("delete", container=c2)

    run(agent, scenario)


def test_kill_created_and_delete_created(agent: Agent) -> None:
    async def scenario(client: AgentClient) -> None:
        c = await create(client, agent, ["true"])
        deleted = await client.call("delete", container=c["id"])  # never started
        assert deleted["pid"] == c["pid"]
        assert not _mounts_below(str(c["bundle"]))
        c2 = await create(client, agent, ["true"])
        await client.call("kill", container=c2["id"], signal=9)
        assert (await exit_event(client, c2["id"]))["exit_status"] == 137
        with pytest.raises(protocol.FailedPrecondition):
            await client.call("start", container=c2["id"])
        await client.call("delete", container=c2["id"])

    run(agent, scenario)


def runc_state(agent: Agent, container: str) -> str:
    r = subprocess.run([RUNC, "--root", str(agent.runc_root), "state", container], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["status"]


def test_start_through_the_exec_fifo(agent: Agent) -> None:
    """The agent starts the init itself (runc's exec-fifo handshake, no `runc start`): runc then
    sees a running container, and ps, exec, kill and delete work as after `runc start`."""

    async def scenario(client: AgentClient) -> None:
        c = await create(client, agent, ["sh", "-c", "echo started; exec sleep 1000"])
        fifo = agent.runc_root / c["id"] / "exec.fifo"
        assert fifo.exists() and runc_state(agent, c["id"]) == "created"
        try:
            assert (await client.call("start", container=c["id"]))["pid"] == c["pid"]
            assert await c["out"].read(100) == b"started\n"
            assert not fifo.exists() and runc_state(agent, c["id"]) == "running"
            assert f"{c['id']} started (fifo)" in agent.log.read_text()
            procs = (await client.call("pids", container=c["id"]))["processes"]
            assert {"pid": c["pid"], "exec": ""} in procs
            out = client.open_channel()
            process = {"args": ["echo", "in-exec"], "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}}
            await client.call("exec", container=c["id"], exec="e", process=process, terminal=False, stdout=out.number)
            await client.call("start", container=c["id"], exec="e")
            assert (await exit_event(client, c["id"], "e"))["exit_status"] == 0
            assert await out.read_all() == b"in-exec\n"
            await client.call("delete", container=c["id"], exec="e")
            await client.call("kill", container=c["id"], signal=9)
            assert (await exit_event(client, c["id"]))["exit_status"] == 137
            await client.call("delete", container=c["id"])
            await runc_forgot(agent, c["id"])
        except BaseException:
            await _best_effort_finish(client, c["id"])
            raise

    run(agent, scenario)


def test_start_after_the_init_died(agent: Agent) -> None:
    """The init killed while it waits on the exec fifo: start is a clean error, not a hang."""

    async def scenario(client: AgentClient) -> None:
        c = await create(client, agent, ["sleep", "1000"])
        os.kill(c["pid"], 9)
        with pytest.raises(protocol.FailedPrecondition):
            await asyncio.wait_for(client.call("start", container=c["id"]), 10)
        await exit_event(client, c["id"])
        await client.call("delete", container=c["id"])
        await runc_forgot(agent, c["id"])

    run(agent, scenario)


async def create_as(client: AgentClient, agent: Agent, container: str, name: str, args: list[str],
                    **process: Any) -> dict[str, Any]:
    """A container `container` from a bundle of its own (`name`): the same id twice."""
    bundle, rootfs = agent.bundle(name, args, **process)
    out = client.open_channel()
    res = await client.call("create", container=container, bundle=str(bundle), rootfs=rootfs, terminal=False,
                            stdout=out.number)
    return {"id": container, "bundle": bundle, "pid": res["pid"], "out": out}


def test_delete_then_create_the_same_id(agent: Agent) -> None:
    """delete is answered before its `runc delete` has finished; a create of the same id right
    after waits for it (else runc: "container with id exists")."""

    async def scenario(client: AgentClient) -> None:
        c = cid()
        for i in range(3):
            made = await create_as(client, agent, c, f"{c}-{i}", ["echo", f"round {i}"])
            await client.call("start", container=c)
            assert (await exit_event(client, c))["exit_status"] == 0
            assert await made["out"].read_all() == f"round {i}\n".encode()
            assert (await client.call("delete", container=c))["pid"] == made["pid"]
        await runc_forgot(agent, c)

    run(agent, scenario)


def test_shutdown_waits_for_the_background_deletes(agent: Agent) -> None:
    """A clean stop leaves runc nothing: `shutdown` answers after the `runc delete`s it had
    not waited for."""

    async def scenario(client: AgentClient) -> None:
        ids = []
        for _ in range(3):
            c = await create(client, agent, ["true"])
            await client.call("start", container=c["id"])
            await exit_event(client, c["id"])
            await client.call("delete", container=c["id"])
            ids.append(c["id"])
        await client.call("shutdown")
        assert [i for i in ids if (agent.runc_root / i).exists()] == []

    run(agent, scenario)


def test_poststop_hooks_run_before_delete_answers(agent: Agent, tmp_path: Path) -> None:
    """runc runs poststop hooks in `runc delete`: with hooks, delete waits for it."""
    mark = tmp_path / "poststop-ran"

    async def scenario(client: AgentClient) -> None:
        c = cid()
        bundle, rootfs = agent.bundle(c, ["true"])
        spec = json.loads((bundle / "config.json").read_text())
        spec["hooks"] = {"poststop": [{"path": "/bin/sh", "args": ["sh", "-c", f"touch {mark}"]}]}
        (bundle / "config.json").write_text(json.dumps(spec))
        await client.call("create", container=c, bundle=str(bundle), rootfs=rootfs, terminal=False)
        await client.call("start", container=c)
        await exit_event(client, c)
        await client.call("delete", container=c)
        assert mark.exists() and not (agent.runc_root / c).exists()

    run(agent, scenario)


def test_bad_requests(agent: Agent, tmp_path: Path) -> None:
    async def scenario(client: AgentClient) -> None:
        with pytest.raises(protocol.NotFound):
            await client.call("state", container="no-such-container")
        with pytest.raises(protocol.InvalidArgument):
            await client.call("state", container="../etc")
        with pytest.raises(protocol.InvalidArgument):
            await client.call("create", container="-bad", bundle=str(agent.bundles / "x"), rootfs={"kind": "none"})
        outside = tmp_path / "bundle"
        outside.mkdir()
        with pytest.raises(protocol.InvalidArgument):
            await client.call("create", container=cid(), bundle=str(outside), rootfs={"kind": "none"})
        link = agent.bundles / "escape"
        link.symlink_to(outside)
        with pytest.raises(protocol.InvalidArgument):
            await client.call("create", container=cid(), bundle=str(link), rootfs={"kind": "none"})
        c = cid()
        bundle, rootfs = agent.bundle(c, ["true"])
        with pytest.raises(protocol.InvalidArgument):
            await client.call("create", container=c, bundle=str(bundle), rootfs={**rootfs, "lowers": ["/etc"]})
        with pytest.raises(protocol.InvalidArgument):
            await client.call("create", container=c, bundle=str(bundle), rootfs={**rootfs, "upper": "/tmp"})
        # a failed runc create leaves nothing mounted and no container behind
        spec = json.loads((bundle / "config.json").read_text())
        spec["process"]["args"] = ["/no/such/binary"]
        with pytest.raises(protocol.AgentError, match="no/such/binary"):
            await client.call("create", container=c, bundle=str(bundle), rootfs=rootfs, spec=spec)
        assert not _mounts_below(str(bundle))
        with pytest.raises(protocol.NotFound):
            await client.call("state", container=c)
        with pytest.raises(protocol.Unimplemented):
            await client.call("checkpoint", container=c)
        with pytest.raises(protocol.FailedPrecondition):
            await client.call("hello", version=1)

    run(agent, scenario)


def test_request_before_hello(agent: Agent) -> None:
    async def main() -> None:
        client = await AgentClient.connect_socket(agent.sock)
        with pytest.raises(protocol.FailedPrecondition):
            await client.call("state", container="x")
        with pytest.raises(protocol.Unavailable):  # the agent closed the connection
            await client.next_event(5)
        await client.close()

    asyncio.run(main())
    agent.proc.wait(5)  # --fd only and no containers: the agent is done
    assert agent.proc.returncode == 0


def test_reconnect_sees_running_container(listening_agent: Agent) -> None:
    agent = listening_agent
    state: dict[str, Any] = {}

    async def first(client: AgentClient) -> None:
        c = await create(client, agent, ["sh", "-c", "read x; echo got $x; exit 4"], stdin=True)
        await client.call("start", container=c["id"])
        state.update(id=c["id"], pid=c["pid"], stdin=c["in"].number)

    async def second() -> None:
        assert agent.sock_path
        client = await AgentClient.connect_unix(agent.sock_path)
        try:
            info = await client.hello()
            assert info["version"] == 1 and info["agent_pid"] == agent.proc.pid
            st = await client.call("state", container=state["id"])
            assert st["status"] == "running" and st["pid"] == state["pid"]
            with pytest.raises(protocol.FailedPrecondition):
                await client.call("shutdown")  # containers exist
            # a second client while this one is connected is refused
            other = await AgentClient.connect_unix(agent.sock_path)
            with pytest.raises(protocol.Unavailable):
                await other.hello()
            await other.close()
            # the process's stdin channel still works from the new connection
            inp = client.open_channel(state["stdin"])
            await inp.write(b"again\n")
            ev = await exit_event(client, state["id"])
            assert ev["exit_status"] == 4
            await client.call("delete", container=state["id"])
            await client.call("shutdown")
        finally:
            await client.close()

    run(agent, first)  # the client disconnects with the container running
    asyncio.run(second())
    agent.proc.wait(5)
    assert agent.proc.returncode == 0


def test_flow_control_sends_at_most_the_window_ahead(agent: Agent) -> None:
    """Feature `flow`: per output channel the agent is never more than the window ahead of the
    client's grants; a channel without grants holds up neither another channel nor requests."""
    window = 4096

    async def main() -> None:
        client = await AgentClient.connect_socket(agent.sock)
        try:
            hello = await client.hello(window=window)
            assert "flow" in hello["features"] and hello["window"] == window
            c = cid()
            bundle, rootfs = agent.bundle(c, ["sh", "-c", "head -c 300000 /dev/zero; echo done >&2"])
            got = bytearray()
            ahead: list[int] = []
            granting = False
            granted = 0
            closed = asyncio.Event()

            def on_data(data: bytes) -> None:
                nonlocal granted
                got.extend(data)
                ahead.append(len(got) - granted)
                if granting:
                    granted += len(data)
                    out.consumed(len(data))

            out = client.open_channel(on_data=on_data, on_close=closed.set)
            err = client.open_channel()
            await client.call("create", container=c, bundle=str(bundle), rootfs=rootfs, terminal=False,
                              stdin=0, stdout=out.number, stderr=err.number)
            await client.call("start", container=c)
            while len(got) < window:
                await asyncio.sleep(0.01)
            assert (await client.call("state", container=c))["status"] == "running"  # requests flow
            assert len(got) == window  # and no more output without a grant
            granting = True
            granted = window
            out.consumed(window)
            await closed.wait()
            assert len(got) == 300000 and max(ahead) <= window
            assert await err.read_all() == b"done\n"  # the other channel was never held up
            await exit_event(client, c)
            await client.call("delete", container=c)
        finally:
            await client.close()

    asyncio.run(asyncio.wait_for(main(), 60))
