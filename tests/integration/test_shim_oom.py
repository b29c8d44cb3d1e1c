"""An OOM kill inside a container is reported to containerd as /tasks/oom, then the exit."""

from __future__ import annotations

import subprocess
import time

from hack.containerd_env import FractalEnv

RUNTIME = "io.containerd.fractal.v1"
HOG = "x=aaaaaaaaaaaaaaaa; while true; do x=$x$x; done"


def test_oom_event_then_exit_137(fenv: FractalEnv, registry, namespace: str) -> None:
    ref = registry.ref("busybox")
    fenv.pull(ref, namespace=namespace)
    ev = subprocess.Popen(fenv.containerd.ctr_argv("events", namespace=None), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        r = fenv.run(ref, "hog", "sh", "-c", HOG, namespace=namespace, runtime=RUNTIME,
                     extra=["--memory-limit", str(32 << 20)], check=False, timeout=120)
        time.sleep(0.5)
    finally:
        ev.terminate()
        out, _ = ev.communicate(timeout=10)
    assert r.returncode == 137, (r.returncode, r.stderr)
    topics = [w for line in out.splitlines() if f" {namespace} /tasks/" in line and '"hog"' in line
              for w in line.split() if w.startswith("/tasks/")]
    assert "/tasks/oom" in topics, out
    assert topics.index("/tasks/oom") < topics.index("/tasks/exit"), topics


def test_no_oom_event_for_a_normal_exit(fenv: FractalEnv, registry, namespace: str) -> None:
    ref = registry.ref("busybox")
    fenv.pull(ref, namespace=namespace)
    ev = subprocess.Popen(fenv.containerd.ctr_argv("events", namespace=None), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        fenv.run(ref, "calm", "true", namespace=namespace, runtime=RUNTIME, extra=["--memory-limit", str(32 << 20)])
        time.sleep(0.5)
    finally:
        ev.terminate()
        out, _ = ev.communicate(timeout=10)
    assert '"calm"' in out and "/tasks/exit" in out
    assert "/tasks/oom" not in out
