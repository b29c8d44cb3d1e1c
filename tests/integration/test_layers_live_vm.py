"""Live layers inside a fractal VM: the added layers come from the repo share, the PID stays."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from hack.containerd_env import FractalEnv

RUNTIME = "io.containerd.fractal.v1"
VM = ["--annotation", "io.fractal.mode=vm"]


def fractal(env: FractalEnv, *args: str) -> subprocess.CompletedProcess[str]:
    e = {**os.environ, "FRACTAL_RUN_DIR": str(env.fractal_run_dir), "FRACTAL_ROOT": str(env.snapshotter_root)}
    return subprocess.run([sys.executable, "-m", "ccpu.cli", *args], capture_output=True, text=True, env=e,
                          timeout=120)


def task_pid(env: FractalEnv, ns: str, cid: str) -> int:
    for line in env.ctr("tasks", "ls", namespace=ns).stdout.splitlines()[1:]:
        f = line.split()
        if f and f[0] == cid:
            return int(f[1])
    raise AssertionError(f"no task {cid}")


def test_add_and_remove_a_layer_in_a_vm_container(fenv: FractalEnv, registry, namespace: str) -> None:
    bb, tools = registry.ref("busybox"), registry.ref("tools")
    fenv.pull(bb, namespace=namespace)
    fenv.pull(tools, namespace=namespace)
    fenv.run(bb, "vmlive", "sleep", "600", rm=False, namespace=namespace, runtime=RUNTIME, extra=["-d", *VM],
             timeout=300)
    try:
        exec_ = lambda eid, *cmd, **kw: fenv.ctr("tasks", "exec", "--exec-id", eid, "vmlive", *cmd,  # noqa: E731
                                                 namespace=namespace, **kw)
        assert exec_("k", "uname", "-r").stdout.strip() != os.uname().release  # really in the guest
        exec_("w", "sh", "-c", "echo mine > /mine")
        # a dir of the (one-layer) image replaced in the guest's tmpfs upper (issue 16: not EIO)
        assert exec_("d", "sh", "-c", "rm -rf /root && mkdir /root && echo made").stdout == "made\n"
        pid = task_pid(fenv, namespace, "vmlive")
        r = fractal(fenv, "layers", "add", "-a", str(fenv.address), "-n", namespace, "vmlive", tools)
        assert r.returncode == 0, r.stderr
        assert exec_("c", "cat", "/opt/tools/hello.txt").stdout == "hello from tools\n"
        assert exec_("m", "cat", "/mine").stdout == "mine\n"
        assert task_pid(fenv, namespace, "vmlive") == pid
        mounts = exec_("p", "cat", "/proc/mounts").stdout
        root = next(line for line in mounts.splitlines() if line.split()[1] == "/")
        # the same upper, over a read-only overlay of the share's layers (stack.NestedOverlay)
        assert "upperdir=/run/fractal/containers/vmlive/upper" in root and "rootfs.live.lower" in root, root
        r = fractal(fenv, "layers", "rm", "-a", str(fenv.address), "-n", namespace, "vmlive", tools)
        assert r.returncode == 0, r.stderr
        assert exec_("g", "test", "-e", "/opt/tools/hello.txt", check=False).returncode != 0
        assert exec_("m2", "cat", "/mine").stdout == "mine\n"
        assert task_pid(fenv, namespace, "vmlive") == pid
    finally:
        fenv.ctr("tasks", "kill", "-s", "SIGKILL", "vmlive", namespace=namespace, check=False)
        deadline = time.monotonic() + 60
        while fenv.ctr("tasks", "delete", "vmlive", namespace=namespace, check=False).returncode != 0:
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        fenv.ctr("containers", "delete", "vmlive", namespace=namespace, check=False)
