"""Remote mode through containerd: the agent on a "machine" reached only over TCP + mutual TLS.

The machine is simulated on this host: the agent runs in a network namespace made here (a veth
pair with link-local 169.254.X.0/30 addresses on it only), in a PID and mount namespace of its
own -- so killing the agent (the namespace's init) takes its containers and mounts with it, as a
machine that dies.  It has a layer repo of its own (``--repo``), and the host's fractal repo and
bundle dir are hidden under a tmpfs in its mount namespace: every layer it runs was streamed to
it by the shim (containerd's blob, verified, unpacked once) and every spec came inside create.

`ctr run --runtime io.containerd.fractal.v1 --annotation io.fractal.mode=remote` runs a
container on it (output read back, exec works); a killed agent is reported as the exit of the
task and nothing is left on the host; an agent whose certificate another CA issued is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ccpu import pki
from hack.containerd_env import FractalEnv, mounts_under
from hack.remote_machine import Machine, RemoteAgent, machine_netns, remote_config
from tests.harness import shim_daemons, wait_for

RUNTIME = "io.containerd.fractal.v1"
REMOTE = ["--annotation", "io.fractal.mode=remote"]


@pytest.fixture
def machine() -> Iterator[Machine]:
    with machine_netns() as m:
        yield m


def _pids_running(needle: bytes) -> list[int]:
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError):
                if needle in Path(f"/proc/{d}/cmdline").read_bytes():
                    found.append(int(d))
    return found


@pytest.fixture
def remote_env(machine: Machine, registry, tmp_path: Path) -> Iterator[tuple[FractalEnv, Machine, Path, str, str]]:  # noqa: ANN001
    pki_dir = tmp_path / "pki"
    pki.init(str(pki_dir), [machine.agent_ip])
    env = FractalEnv()
    with env:
        ns = env.new_namespace()
        ref = registry.ref("busybox")
        env.pull(ref, namespace=ns)
        remote_config(env, machine, pki_dir)
        yield env, machine, pki_dir, ns, ref


def test_remote_run_exec_and_machine_loss(remote_env) -> None:  # noqa: ANN001
    env, m, pki_dir, ns, ref = remote_env
    agent = RemoteAgent(env, m, pki_dir)
    try:
        out = env.run(ref, "r1", "sh", "-c", "echo remote-ok; cat /etc/os-release | head -1",
                      namespace=ns, runtime=RUNTIME, extra=REMOTE)
        assert "remote-ok" in out.stdout, out
        log = agent._tail()
        assert "connected (identity sha256:" in log and "create {'container': 'r1'" in log, log  # it ran there

        marker = f"fr15-sleep-{secrets.token_hex(4)}"
        # r2 and r3 share one sandbox: one agent serves one sandbox (docs/remote.md)
        shared = [*REMOTE, "--annotation", "io.fractal.sandbox=rsb", "-d"]
        env.run(ref, "r2", "sh", "-c", f"sleep 600; echo {marker}", rm=False, namespace=ns,
                runtime=RUNTIME, extra=shared)
        wait_for(lambda: "RUNNING" in env.ctr("tasks", "ls", namespace=ns).stdout, 60,
                 f"task r2 running: {env.ctr('tasks', 'ls', namespace=ns).stdout}")
        ex = env.ctr("tasks", "exec", "--exec-id", "e1", "r2", "sh", "-c", "echo exec-ok", namespace=ns)
        assert "exec-ok" in ex.stdout
        assert _pids_running(marker.encode()), "the container's process is not running"
        assert shim_daemons(env, ns, "rsb"), "no shim daemon for sandbox rsb"  # its exit is waited for below
        metrics = env.ctr("tasks", "metrics", "r2", namespace=ns).stdout  # the agent's stats
        assert "r2" in metrics and "memory" in metrics.lower(), metrics

        env.run(ref, "r3", "sleep", "600", rm=False, namespace=ns, runtime=RUNTIME, extra=shared)
        wait_for(lambda: "r3" in env.ctr("tasks", "ls", namespace=ns).stdout, 60, "task r3")
        env.ctr("tasks", "kill", "-s", "SIGKILL", "r3", namespace=ns)
        wait_for(lambda: any(ln.startswith("r3") and "STOPPED" in ln
                             for ln in env.ctr("tasks", "ls", namespace=ns).stdout.splitlines()), 60, "r3 killed")
        env.ctr("tasks", "delete", "r3", namespace=ns)
        env.ctr("containers", "delete", "r3", namespace=ns)

        agent.kill_machine()
        wait_for(lambda: "STOPPED" in env.ctr("tasks", "ls", namespace=ns).stdout, 60,
                 "the task's exit after the machine died")
        env.ctr("tasks", "delete", "r2", namespace=ns)
        env.ctr("containers", "delete", "r2", namespace=ns)
        assert not _pids_running(marker.encode()), "the container outlived its machine"
        assert mounts_under(env.run_dir, env.root_dir) == []
        wait_for(lambda: not shim_daemons(env, ns, "rsb"), 30, "the shim's exit")
    finally:
        agent.stop()
    assert env.remove_namespace(ns) == []


def test_a_dead_shims_containers_are_reaped_on_the_machine(remote_env) -> None:  # noqa: ANN001
    """The host side dies (shim SIGKILLed, the TLS link breaks without shutdown): the agent
    kills and deletes the containers it ran for it once its grace period is over."""
    env, m, pki_dir, ns, ref = remote_env
    agent = RemoteAgent(env, m, pki_dir, orphan_grace=1)
    try:
        marker = f"fr15-orphan-{secrets.token_hex(4)}"
        env.run(ref, "o1", "sh", "-c", f"sleep 600; echo {marker}", rm=False, namespace=ns,
                runtime=RUNTIME, extra=[*REMOTE, "-d"])
        wait_for(lambda: _pids_running(marker.encode()), 60, "the container's process")
        # by comm and socket, not by command line (matching a namespace in it found no shim
        # whenever the fork-server had forked it: the cause of a flake)
        shims = shim_daemons(env, ns, "o1")
        assert shims, "no shim daemon found for o1"
        for pid in shims:
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not _pids_running(marker.encode()), 60, "the machine reaping the orphaned container")
        wait_for(lambda: "reaped container o1" in agent._tail(), 30, "the agent's log of the reaping")
        # runc's state goes a moment after the agent's delete (its `runc delete` is not waited for)
        wait_for(lambda: not (agent.runc_root / "o1").exists(), 10, "runc forgetting o1 on the machine")
        state = json.loads((agent.repo / "state.json").read_text())  # its layers released (idle)
        assert state["refs"] == {} and len(state["idle"]) == 1, state
        env.ctr("tasks", "delete", "o1", namespace=ns, check=False)
        env.ctr("containers", "delete", "o1", namespace=ns, check=False)
        assert mounts_under(env.run_dir, env.root_dir) == []
    finally:
        agent.stop()
    assert env.remove_namespace(ns) == []


def test_agent_with_a_certificate_of_another_ca_is_refused(remote_env, tmp_path: Path) -> None:  # noqa: ANN001
    env, m, pki_dir, ns, ref = remote_env
    rogue = tmp_path / "rogue"
    pki.init(str(rogue), [m.agent_ip])  # a complete PKI of its own, same address
    agent = RemoteAgent(env, m, rogue)
    try:
        res = env.run(ref, "x1", "echo", "must-not-run", namespace=ns, runtime=RUNTIME, extra=REMOTE,
                      check=False)
        assert res.returncode != 0 and "must-not-run" not in res.stdout
        assert "certificate" in res.stderr and "ca.pem" in res.stderr, res.stderr
        assert "connected (identity" not in agent._tail()  # the agent never served it either
    finally:
        agent.stop()
    with contextlib.suppress(Exception):
        env.ctr("containers", "delete", "x1", namespace=ns, check=False)
    assert mounts_under(env.run_dir, env.root_dir) == []
    assert env.remove_namespace(ns) == []


def _fractal(env: FractalEnv, *args: str) -> subprocess.CompletedProcess[str]:
    e = {**os.environ, "FRACTAL_RUN_DIR": str(env.fractal_run_dir)}
    for k in ("CONTAINERD_ADDRESS", "CONTAINERD_NAMESPACE"):
        e.pop(k, None)
    return subprocess.run([sys.executable, "-m", "ccpu.cli", *args], capture_output=True, text=True,
                          env=e, timeout=180)


def test_layers_are_streamed_to_the_machine_once_and_released(remote_env, registry) -> None:  # noqa: ANN001
    """The machine cannot see the host's repo or bundles: the image's layer arrives as
    containerd's blob (once for two containers), a live layer add pulls the new layers first,
    deleting the containers releases them on the machine, and the next sandbox finds them in
    the machine's cache (no transfer)."""
    env, m, pki_dir, ns, ref = remote_env
    agent = RemoteAgent(env, m, pki_dir)
    try:
        for d in (env.snapshotter_root, env.run_dir / "st"):  # the host's repo and bundles
            hidden = subprocess.run(["nsenter", "-t", str(agent.agent_pid()), "-m", "ls", "-A", str(d)],
                                    capture_output=True, text=True, timeout=30)
            assert hidden.returncode == 0 and hidden.stdout.strip() == "", hidden  # the tmpfs, empty
        assert os.listdir(env.snapshotter_root / "layers"), "the host's repo has the image's layers"

        shared = [*REMOTE, "--annotation", "io.fractal.sandbox=pull", "-d"]
        env.run(ref, "p1", "sh", "-c", "head -1 /etc/passwd > /first; sleep 600", rm=False,
                namespace=ns, runtime=RUNTIME, extra=shared)
        wait_for(lambda: "p1" in env.ctr("tasks", "ls", namespace=ns).stdout, 60, "task p1")
        first = env.ctr("tasks", "exec", "--exec-id", "x1", "p1", "cat", "/first", namespace=ns).stdout
        assert first.startswith("root:"), first  # a file of the image, read on the machine
        assert agent.received() == 1 and len(agent.layers()) == 1, agent._tail()

        env.run(ref, "p2", "sleep", "600", rm=False, namespace=ns, runtime=RUNTIME, extra=shared)
        wait_for(lambda: "p2" in env.ctr("tasks", "ls", namespace=ns).stdout, 60, "task p2")
        assert agent.received() == 1, "the second container's layer was transferred again"
        assert "create {'container': 'p2'" in agent._tail()

        tools = registry.ref("tools")
        r = _fractal(env, "layers", "add", "-a", str(env.address), "-n", ns, "--plain-http", "p1", tools)
        assert r.returncode == 0, r.stderr
        hello = env.ctr("tasks", "exec", "--exec-id", "x2", "p1", "cat", "/opt/tools/hello.txt",
                        namespace=ns).stdout
        assert hello.strip() == "hello from tools", hello
        assert agent.received() == 3 and len(agent.layers()) == 3  # tools' own two, on busybox's

        for cid in ("p1", "p2"):
            env.ctr("tasks", "kill", "-s", "SIGKILL", cid, namespace=ns)
        for cid in ("p1", "p2"):
            wait_for(lambda: any(ln.startswith(cid) and "STOPPED" in ln
                                 for ln in env.ctr("tasks", "ls", namespace=ns).stdout.splitlines()), 60, cid)
            env.ctr("tasks", "delete", cid, namespace=ns)
            env.ctr("containers", "delete", cid, namespace=ns)
        wait_for(lambda: "session ended by shutdown" in agent._tail(), 60, "the sandbox's end")
        state = json.loads((agent.repo / "state.json").read_text())
        assert state["refs"] == {} and len(state["idle"]) == 3, state  # released, kept as cache
        out = env.run(ref, "p3", "head", "-1", "/etc/passwd", namespace=ns, runtime=RUNTIME, extra=REMOTE)
        assert out.stdout.startswith("root:"), out
        assert agent.received() == 3, "a new sandbox transferred a cached layer again"
        assert mounts_under(env.run_dir, env.root_dir) == []
    finally:
        agent.stop()
    assert env.remove_namespace(ns) == []
