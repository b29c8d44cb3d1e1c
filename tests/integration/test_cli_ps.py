"""`fractal ps` through a real containerd and real shims."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from hack.containerd_env import FractalEnv

RUNTIME = "io.containerd.fractal.v1"


def fractal(env: FractalEnv, *args: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    e = {**os.environ, "FRACTAL_RUN_DIR": str(env.fractal_run_dir), **(extra_env or {})}
    return subprocess.run([sys.executable, "-m", "ccpu.cli", *args], capture_output=True, text=True, env=e, timeout=60)


def test_ps_shows_one_sandbox_with_its_containers(fenv: FractalEnv, registry, namespace: str) -> None:
    ref = registry.ref("busybox")
    fenv.pull(ref, namespace=namespace)
    for cid in ("ps-a", "ps-b"):
        fenv.run(ref, cid, "sleep", "300", rm=False, namespace=namespace, runtime=RUNTIME,
                 extra=["-d", "--annotation", "io.fractal.sandbox=psbox"])
    fenv.run(ref, "ps-solo", "sleep", "300", rm=False, namespace=namespace, runtime=RUNTIME, extra=["-d"])
    try:
        r = fractal(fenv, "ps", "-a", str(fenv.address), "-n", namespace, "--json")
        assert r.returncode == 0, r.stderr
        got = {s["sandbox"]: s for s in json.loads(r.stdout)}
        assert set(got) == {"psbox", "ps-solo"}
        box = got["psbox"]
        assert box["mode"] == "host"
        assert box["shim_pid"] and os.path.exists(f"/proc/{box['shim_pid']}")
        assert sorted(c["id"] for c in box["containers"]) == ["ps-a", "ps-b"]
        assert all(c["status"] == "running" and c["pid"] > 0 for c in box["containers"])
        assert got["ps-solo"]["shim_pid"] != box["shim_pid"]
        # ctr's environment variables work the same as the flags; the table names every container
        r = fractal(fenv, "ps", extra_env={"CONTAINERD_ADDRESS": str(fenv.address), "CONTAINERD_NAMESPACE": namespace})
        assert r.returncode == 0, r.stderr
        for word in ("psbox", "ps-a", "ps-b", "ps-solo", "running", str(box["shim_pid"])):
            assert word in r.stdout
    finally:
        for cid in ("ps-a", "ps-b", "ps-solo"):
            fenv.ctr("tasks", "kill", "-s", "SIGKILL", cid, namespace=namespace, check=False)
        for cid in ("ps-a", "ps-b", "ps-solo"):
            for _ in range(50):
                if fenv.ctr("tasks", "delete", cid, namespace=namespace, check=False).returncode == 0:
                    break
                time.sleep(0.1)
            fenv.ctr("containers", "delete", cid, namespace=namespace, check=False)


def test_ps_unreachable_containerd_is_a_clear_error(fenv: FractalEnv, tmp_path) -> None:
    r = fractal(fenv, "ps", "-a", str(tmp_path / "nope.sock"))
    assert r.returncode == 1
    assert "cannot reach containerd" in r.stderr and "Traceback" not in r.stderr
