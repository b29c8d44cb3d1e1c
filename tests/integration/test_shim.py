"""containerd-shim-fractal-v1 through a real containerd: ctr run/exec/kill/pause, events,
sandbox sharing, snapshotters, containerd restart, shim crash clean-up."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from hack.containerd_env import FractalEnv, mounts_under
from shim import address as addr
from shim import procs
from tests.harness import wait_for

RUNTIME = "io.containerd.fractal.v1"


@pytest.fixture
def image(fenv: FractalEnv, registry, namespace: str) -> str:  # noqa: ANN001
    ref = registry.ref("busybox")
    fenv.pull(ref, namespace=namespace)
    return ref


def run(env: FractalEnv, ns: str, image: str, cid: str, *cmd: str, **kw):  # noqa: ANN003, ANN201
    return env.run(image, cid, *cmd, namespace=ns, runtime=RUNTIME, **kw)


def shim_pids(env: FractalEnv) -> list[int]:
    """Daemons of our shim started by this env's containerd (shim/procs.py's one rule: however
    they were started)."""
    return procs.daemon_pids(str(env.address))


def agent_children(shim: int) -> list[int]:
    """Agent processes of a shim (none with the default in-process agent)."""
    out = []
    for p in children(shim):
        try:
            if b"ccpu.agent" in Path(f"/proc/{p}/cmdline").read_bytes():
                out.append(p)
        except OSError:
            pass
    return out


def in_process_agent() -> bool:
    return os.environ.get("FRACTAL_AGENT", "inproc") in ("", "inproc")


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def bundle(env: FractalEnv, ns: str, cid: str) -> Path:
    return env.run_dir / "st" / "io.containerd.runtime.v2.task" / ns / cid


def task_status(env: FractalEnv, ns: str, cid: str) -> str:
    r = env.ctr("tasks", "ls", namespace=ns)
    for line in r.stdout.splitlines()[1:]:
        parts = line.split()
        if parts and parts[0] == cid:
            return parts[-1]
    return ""


def task_pid(env: FractalEnv, ns: str, cid: str) -> int:
    r = env.ctr("tasks", "ls", namespace=ns)
    for line in r.stdout.splitlines()[1:]:
        parts = line.split()
        if parts and parts[0] == cid:
            return int(parts[1])
    raise AssertionError(f"{cid} not in `ctr tasks ls`: {r.stdout}")


def start_detached(env: FractalEnv, ns: str, image: str, cid: str, *cmd: str,
                   extra: tuple[str, ...] = ()) -> None:
    env.ctr("run", "-d", "--snapshotter", "fractal", "--fifo-dir", str(env.fifo_dir),
            "--runtime", RUNTIME, *extra, image, cid, *cmd, namespace=ns)
    wait_for(lambda: task_status(env, ns, cid) == "RUNNING", what=f"{cid} running")


def remove(env: FractalEnv, ns: str, cid: str) -> None:
    env.ctr("tasks", "kill", "-s", "SIGKILL", cid, namespace=ns, check=False)
    wait_for(lambda: task_status(env, ns, cid) in ("STOPPED", ""), what=f"{cid} stopped")
    env.ctr("tasks", "delete", cid, namespace=ns, check=False)
    env.ctr("containers", "rm", cid, namespace=ns, check=False)


def test_run_echo(fenv: FractalEnv, namespace: str, image: str) -> None:
    r = run(fenv, namespace, image, "echo1", "echo", "hi")
    assert r.stdout == "hi\n"
    assert fenv.ctr("containers", "ls", "-q", namespace=namespace).stdout.strip() == ""
    assert not mounts_under(bundle(fenv, namespace, "echo1"))


@pytest.mark.parametrize("code", [0, 1, 3])
def test_exit_codes(fenv: FractalEnv, namespace: str, image: str, code: int) -> None:
    r = run(fenv, namespace, image, f"exit{code}", "sh", "-c", f"echo out; echo err >&2; exit {code}",
            check=False)
    assert r.returncode == code, r.stderr
    assert r.stdout == "out\n"
    assert "err\n" in r.stderr


def test_stdin_non_tty(fenv: FractalEnv, namespace: str, image: str) -> None:
    argv = fenv.containerd.ctr_argv("run", "--rm", "--snapshotter", "fractal", "--fifo-dir",
                                    str(fenv.fifo_dir), "--runtime", RUNTIME, image, "cat1", "cat",
                                    namespace=namespace)
    r = subprocess.run(argv, input=b"data line\nmore\n", capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"data line\nmore\n"


def test_tty(fenv: FractalEnv, namespace: str, image: str) -> None:
    argv = fenv.containerd.ctr_argv("run", "--rm", "-t", "--snapshotter", "fractal", "--fifo-dir",
                                    str(fenv.fifo_dir), "--runtime", RUNTIME, image, "tty1",
                                    "sh", "-c", "tty; sleep 0.5; stty size; exit 4", namespace=namespace)
    cmd = " ".join(f"'{a}'" for a in argv)
    r = subprocess.run(["script", "-qec", f"stty cols 91 rows 17; {cmd}", "/dev/null"],
                       capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    out = r.stdout.decode(errors="replace")
    assert "/dev/pts/" in out or "/dev/console" in out, out
    assert "17 91" in out, out
    assert r.returncode == 4, out


def test_kill_gives_137(fenv: FractalEnv, namespace: str, image: str) -> None:
    start_detached(fenv, namespace, image, "sleeper", "sleep", "300")
    fenv.ctr("tasks", "kill", "-s", "SIGKILL", "sleeper", namespace=namespace)
    wait_for(lambda: task_status(fenv, namespace, "sleeper") == "STOPPED", what="stopped")
    r = fenv.ctr("tasks", "delete", "sleeper", namespace=namespace)
    assert "137" in r.stdout or r.returncode == 0
    fenv.ctr("containers", "rm", "sleeper", namespace=namespace)


def test_task_commands(fenv: FractalEnv, namespace: str, image: str) -> None:
    start_detached(fenv, namespace, image, "svc", "sleep", "300")
    try:
        ps = fenv.ctr("tasks", "ps", "svc", namespace=namespace).stdout
        assert len(ps.splitlines()) >= 2, ps
        r = fenv.ctr("tasks", "exec", "--exec-id", "e1", "svc", "sh", "-c", "echo from-exec; exit 5",
                     namespace=namespace, check=False)
        assert r.returncode == 5 and r.stdout == "from-exec\n", r
        r = fenv.ctr("tasks", "exec", "--exec-id", "e2", "svc", "cat", namespace=namespace,
                     input="via exec stdin\n")
        assert r.stdout == "via exec stdin\n"
        fenv.ctr("tasks", "pause", "svc", namespace=namespace)
        assert task_status(fenv, namespace, "svc") == "PAUSED"
        fenv.ctr("tasks", "resume", "svc", namespace=namespace)
        assert task_status(fenv, namespace, "svc") == "RUNNING"
        r = fenv.ctr("tasks", "delete", "svc", namespace=namespace, check=False)
        assert r.returncode != 0  # running
    finally:
        remove(fenv, namespace, "svc")
    assert task_status(fenv, namespace, "svc") == ""


def test_started_without_runc_start_is_running_for_runc(fenv: FractalEnv, namespace: str, image: str) -> None:
    """The agent does runc's exec-fifo handshake itself (no `runc start`): runc sees the task
    running, and ps/exec/kill/delete and an immediate re-run of the same id work."""
    import json

    root = fenv.fractal_run_dir / "runc" / namespace
    for round_ in range(2):  # the second: the same id again right after delete
        start_detached(fenv, namespace, image, "fifo1", "sh", "-c", "echo up; exec sleep 300")
        try:
            r = subprocess.run(["runc", "--root", str(root), "state", "fifo1"], capture_output=True, text=True)
            assert r.returncode == 0 and json.loads(r.stdout)["status"] == "running", (r.stdout, r.stderr)
            assert not (root / "fifo1" / "exec.fifo").exists()
            assert len(fenv.ctr("tasks", "ps", "fifo1", namespace=namespace).stdout.splitlines()) >= 2
            r = fenv.ctr("tasks", "exec", "--exec-id", f"x{round_}", "fifo1", "echo", "in", namespace=namespace)
            assert r.stdout == "in\n"
        finally:
            remove(fenv, namespace, "fifo1")
        assert task_status(fenv, namespace, "fifo1") == ""
        wait_for(lambda: not (root / "fifo1").exists(), what="runc state of fifo1 removed")


def test_events(fenv: FractalEnv, namespace: str, image: str) -> None:
    argv = fenv.containerd.ctr_argv("events", namespace=None)
    ev = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        run(fenv, namespace, image, "evt", "true")
        time.sleep(0.5)
    finally:
        ev.terminate()
        out, _ = ev.communicate(timeout=10)
    topics = [w for line in out.splitlines() if f" {namespace} /tasks/" in line and '"evt"' in line
              for w in line.split() if w.startswith("/tasks/")]
    assert topics == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"], out


def test_sandbox_shares_one_shim(fenv: FractalEnv, namespace: str, image: str) -> None:
    before = set(shim_pids(fenv))
    ann = ("--label", "x=y", "--annotation", "io.fractal.sandbox=sb1") if False else \
        ("--annotation", "io.fractal.sandbox=sb1")
    start_detached(fenv, namespace, image, "sb-a", "sleep", "300", extra=ann)
    start_detached(fenv, namespace, image, "sb-b", "sleep", "300", extra=ann)
    try:
        addr_a = (bundle(fenv, namespace, "sb-a") / "address").read_text()
        addr_b = (bundle(fenv, namespace, "sb-b") / "address").read_text()
        assert addr_a == addr_b
        new = set(shim_pids(fenv)) - before
        assert len(new) == 1, new
        shim = new.pop()
        if in_process_agent():
            # the agent runs inside the shim: the containers are the shim's own children
            assert agent_children(shim) == []
            assert {task_pid(fenv, namespace, c) for c in ("sb-a", "sb-b")} <= set(children(shim))
        else:
            assert len(agent_children(shim)) == 1
        # deleting one container leaves the shim serving the other
        remove(fenv, namespace, "sb-a")
        assert shim in shim_pids(fenv)
        r = fenv.ctr("tasks", "exec", "--exec-id", "x", "sb-b", "echo", "still", namespace=namespace)
        assert r.stdout == "still\n"
    finally:
        remove(fenv, namespace, "sb-a")
        remove(fenv, namespace, "sb-b")
    wait_for(lambda: shim not in shim_pids(fenv), what="shim exit after last container")


def test_overlayfs_snapshotter(fenv: FractalEnv, namespace: str, registry) -> None:  # noqa: ANN001
    ref = registry.ref("busybox")
    fenv.pull(ref, namespace=namespace, snapshotter="overlayfs")
    r = fenv.run(ref, "ovl", "sh", "-c", "echo via-overlayfs", namespace=namespace,
                 runtime=RUNTIME, snapshotter="overlayfs")
    assert r.stdout == "via-overlayfs\n"


def test_containerd_restart_keeps_tasks(fenv: FractalEnv, namespace: str, image: str) -> None:
    start_detached(fenv, namespace, image, "survivor", "sleep", "300")
    shims = shim_pids(fenv)
    try:
        fenv.containerd.restart()
        wait_for(lambda: task_status(fenv, namespace, "survivor") == "RUNNING",
                 what="task listed after restart")
        assert shim_pids(fenv) == shims
        r = fenv.ctr("tasks", "exec", "--exec-id", "after", "survivor", "echo", "ok",
                     namespace=namespace)
        assert r.stdout == "ok\n"
        fenv.ctr("tasks", "kill", "-s", "SIGKILL", "survivor", namespace=namespace)
        wait_for(lambda: task_status(fenv, namespace, "survivor") == "STOPPED", what="stopped")
        fenv.ctr("tasks", "delete", "survivor", namespace=namespace)
    finally:
        remove(fenv, namespace, "survivor")
    assert not mounts_under(bundle(fenv, namespace, "survivor"))


def _alive(pid: int) -> bool:
    try:
        st = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return st[st.rindex(")") + 2:].split()[0] != "Z"


def test_shim_kill9_cleans_up(fenv: FractalEnv, namespace: str, image: str) -> None:
    before = set(shim_pids(fenv))
    start_detached(fenv, namespace, image, "doomed", "sleep", "300")
    (shim,) = set(shim_pids(fenv)) - before
    agent = agent_children(shim)
    pid = task_pid(fenv, namespace, "doomed")
    rootfs = bundle(fenv, namespace, "doomed") / "rootfs"
    assert mounts_under(rootfs)
    sock = Path(addr.strip_scheme((bundle(fenv, namespace, "doomed") / "address").read_text()))
    assert sock.is_socket()
    os.kill(shim, signal.SIGKILL)
    try:
        wait_for(lambda: not _alive(shim) and not any(_alive(p) for p in agent),
                 what="shim and agent gone")
        # containerd notices the lost shim and runs `delete`: task gone, processes killed,
        # rootfs unmounted (the task may leave `ctr tasks ls` before `delete` has finished)
        wait_for(lambda: task_status(fenv, namespace, "doomed") == "", what="task cleaned up")
        wait_for(lambda: not _alive(pid), what="container process killed")
        wait_for(lambda: not mounts_under(rootfs), what="rootfs unmounted")
        wait_for(lambda: not sock.exists(), what="stale shim socket removed")
    finally:
        fenv.ctr("tasks", "delete", "-f", "doomed", namespace=namespace, check=False)
        fenv.ctr("containers", "rm", "doomed", namespace=namespace, check=False)
    assert fenv.ctr("containers", "ls", "-q", namespace=namespace).stdout.strip() == ""


def test_shim_kill9_right_after_a_delete(fenv: FractalEnv, namespace: str, image: str) -> None:
    """The agent answers a stopped container's delete before its `runc delete` ends; a shim
    killed -9 just then leaves runc no state and no cgroup of that container."""
    import json

    root = fenv.fractal_run_dir / "runc" / namespace
    ann = ("--annotation", "io.fractal.sandbox=k9d")
    before = set(shim_pids(fenv))
    start_detached(fenv, namespace, image, "k9d-keep", "sleep", "300", extra=ann)
    (shim,) = set(shim_pids(fenv)) - before
    try:
        fenv.ctr("run", "-d", "--snapshotter", "fractal", "--fifo-dir", str(fenv.fifo_dir), "--runtime", RUNTIME,
                 *ann, image, "k9d-gone", "true", namespace=namespace)
        wait_for(lambda: task_status(fenv, namespace, "k9d-gone") == "STOPPED", what="k9d-gone stopped")
        cgroup = json.loads((bundle(fenv, namespace, "k9d-gone") / "config.json").read_text())["linux"]["cgroupsPath"]
        cgdirs = [Path("/sys/fs/cgroup", c, cgroup.lstrip("/")) for c in ("pids", "memory", "unified")]
        assert any(d.is_dir() for d in cgdirs), cgdirs
        fenv.ctr("tasks", "delete", "k9d-gone", namespace=namespace)
        os.kill(shim, signal.SIGKILL)
        wait_for(lambda: not _alive(shim), what="shim gone")
        wait_for(lambda: not (root / "k9d-gone").exists(), what="runc state of k9d-gone removed")
        wait_for(lambda: not any(d.is_dir() for d in cgdirs), what="cgroup of k9d-gone removed")
    finally:
        remove(fenv, namespace, "k9d-gone")
        fenv.ctr("tasks", "delete", "-f", "k9d-keep", namespace=namespace, check=False)
        fenv.ctr("containers", "rm", "k9d-keep", namespace=namespace, check=False)


def update_resources(env: FractalEnv, ns: str, cid: str, resources: dict) -> None:
    import asyncio
    import json

    from google.protobuf import any_pb2, empty_pb2

    from ccpu.api.gen.containerd.runtime.v2.task import shim_pb2 as pb
    from ccpu.ttrpc import Client

    sock = addr.strip_scheme((bundle(env, ns, cid) / "address").read_text())
    req = pb.UpdateTaskRequest(id=cid, resources=any_pb2.Any(
        type_url="types.containerd.io/opencontainers/runtime-spec/1/LinuxResources",
        value=json.dumps(resources).encode()))

    async def go() -> None:
        client = await Client.connect(sock, timeout=5)
        try:
            await client.call("containerd.task.v2.Task", "Update", req, empty_pb2.Empty, timeout=10)
        finally:
            await client.close()

    asyncio.run(go())


def test_metrics_and_update(fenv: FractalEnv, namespace: str, image: str) -> None:
    """`ctr task metrics` (Task.Stats -> io.containerd.cgroups.v1.Metrics) and `ctr task update`
    (Task.Update -> runc update)."""
    start_detached(fenv, namespace, image, "metered", "sleep", "300")
    try:
        limit = 96 * 1024 * 1024
        # ctr 1.6 has no `tasks update`: call the shim's Task.Update as containerd would (CRI's
        # UpdateContainerResources), with the runtime-spec LinuxResources as JSON in the Any
        update_resources(fenv, namespace, "metered", {"memory": {"limit": limit}})
        out = fenv.ctr("tasks", "metrics", "metered", namespace=namespace).stdout
        values = {}
        for line in out.splitlines():
            parts = line.split()
            if len(parts) >= 2:
                values[parts[0]] = parts[1]
        assert int(values["memory.usage_in_bytes"]) > 0, out
        assert int(values["memory.limit_in_bytes"]) == limit, out
        assert int(values["cpuacct.usage"]) > 0, out
        assert int(values["pids.current"]) >= 1, out
        js = fenv.ctr("tasks", "metrics", "--format", "json", "metered", namespace=namespace).stdout
        assert '"pids"' in js and '"memory"' in js, js
    finally:
        remove(fenv, namespace, "metered")
