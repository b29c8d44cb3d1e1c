"""A crashed agent (process mode) is reported as exited tasks, not a hang, and leaks nothing."""

from __future__ import annotations

import os
import signal
import time

from hack.containerd_env import FractalEnv, mounts_under

RUNTIME = "io.containerd.fractal.v1"


def _agent_pids() -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                cmd = open(f"/proc/{d}/cmdline", "rb").read().split(b"\0")
            except OSError:
                continue
            if b"ccpu.agent" in cmd:
                out.append(int(d))
    return out


def test_agent_crash_reports_exit_and_cleans_up(registry) -> None:
    env = FractalEnv()
    env.containerd.extra_env["FRACTAL_AGENT"] = "process"
    with env:
        ns = env.new_namespace()
        ref = registry.ref("busybox")
        env.pull(ref, namespace=ns)
        before = set(_agent_pids())
        env.run(ref, "victim", "sleep", "600", rm=False, namespace=ns, runtime=RUNTIME, extra=["-d"])
        agents = set(_agent_pids()) - before
        assert len(agents) == 1, agents
        task_pid = int(env.ctr("tasks", "ls", namespace=ns).stdout.split("victim", 1)[1].split()[0])
        os.kill(agents.pop(), signal.SIGKILL)
        deadline = time.monotonic() + 20
        while "STOPPED" not in env.ctr("tasks", "ls", namespace=ns).stdout:
            assert time.monotonic() < deadline, env.ctr("tasks", "ls", namespace=ns).stdout
            time.sleep(0.2)
        env.ctr("tasks", "delete", "victim", namespace=ns)
        env.ctr("containers", "delete", "victim", namespace=ns)
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{task_pid}") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not os.path.exists(f"/proc/{task_pid}"), "the container's process outlived its agent"
        assert mounts_under(env.run_dir, env.root_dir) == []
        assert env.remove_namespace(ns) == []
