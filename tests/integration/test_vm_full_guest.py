"""A guest that runs out of something hurts nobody but the container that caused it (issue 18).

Through containerd, in VM sandboxes of two or more containers (``io.fractal.sandbox``):

* a container that fills its writable layer gets ENOSPC at its own limit; its neighbour's exec
  and output, a new container in the VM and ``fractal layers add`` keep working, and the full
  container heals once it removes what it wrote;
* a container without a memory limit that eats the guest's memory is OOM-killed and reported
  (``/tasks/oom``, exit 137) while the agent keeps answering;
* an agent that stops answering (SIGSTOP from a container in the guest's pid namespace) gives
  ``ctr`` an error naming what did not answer, not a hang.

The guest has the tests' default RAM (512M), so fills and OOMs are quick under TCG.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hack.containerd_env import FractalEnv

from tests.integration.test_shim_vm import (VM, RUNTIME, _guest_built, _no_qemu_left, exec_, images, remove,  # noqa: F401
                           start_detached, task_status, vm_dir, wait_for)

MiB = 1 << 20
HOG = "x=aaaaaaaaaaaaaaaa; while true; do x=$x$x; done"


def fractal(env: FractalEnv, *args: str) -> subprocess.CompletedProcess[str]:
    e = {**os.environ, "FRACTAL_RUN_DIR": str(env.fractal_run_dir), "FRACTAL_ROOT": str(env.snapshotter_root)}
    return subprocess.run([sys.executable, "-m", "ccpu.cli", *args], capture_output=True, text=True, env=e,
                          timeout=180)


def sandbox(name: str) -> tuple[str, ...]:
    return ("--annotation", f"io.fractal.sandbox={name}")


def test_full_writable_layer_hurts_only_its_container(fenv: FractalEnv, namespace: str,
                                                     images: dict[str, str], tmp_path: Path) -> None:
    """The `dd of=/big bs=1M count=700` of issue 18, with the per-pod limit set to 64M."""
    box = (*sandbox("full"), "--annotation", "io.fractal.vm.scratch=64M")
    log = tmp_path / "calm.log"
    try:
        start_detached(fenv, namespace, images["busybox"], "calm", "sh", "-c",
                       "i=0; while true; do echo tick $i; i=$((i+1)); sleep 1; done",
                       extra=(*box, "--log-uri", f"file://{log}"))
        start_detached(fenv, namespace, images["busybox"], "filler", "sleep", "3600", extra=box)

        r = exec_(fenv, namespace, "filler", "dd", "dd", "if=/dev/zero", "of=/big", "bs=1M", "count=700",
                  check=False)
        assert r.returncode != 0, r.stdout + r.stderr
        assert "No space left on device" in r.stderr, r.stderr
        size = int(exec_(fenv, namespace, "filler", "sz", "stat", "-c", "%s", "/big").stdout)
        df = exec_(fenv, namespace, "filler", "df", "df", "-k", "/").stdout.splitlines()[-1].split()
        assert int(df[1]) == 64 * 1024, df  # the writable layer is exactly the asked-for 64M
        assert 48 * MiB < size <= 64 * MiB, size

        # the neighbour: exec and its output still work
        assert exec_(fenv, namespace, "calm", "e1", "echo", "calm ok").stdout == "calm ok\n"
        seen = log.read_text().count("tick")
        wait_for(lambda: log.read_text().count("tick") > seen + 1, what="calm's output after the fill")
        # a new container in the same VM
        r = fenv.run(images["busybox"], "newcomer", "sh", "-c", "echo new > /f && cat /f",
                     namespace=namespace, runtime=RUNTIME, extra=(*VM, *box), timeout=180)
        assert r.stdout == "new\n", r.stdout + r.stderr
        # live layers, on the neighbour and on the full container (same upper, fresh work dir)
        for cid in ("calm", "filler"):
            r = fractal(fenv, "layers", "add", "-a", str(fenv.address), "-n", namespace, cid, images["tools"])
            assert r.returncode == 0, (cid, r.stdout, r.stderr)
            assert exec_(fenv, namespace, cid, f"t-{cid}", "cat", "/opt/tools/hello.txt").stdout == "hello from tools\n"
        # the full container itself can still be entered, and heals once it frees space
        exec_(fenv, namespace, "filler", "rm", "rm", "/big")
        assert exec_(fenv, namespace, "filler", "w", "sh", "-c", "echo again > /g && cat /g").stdout == "again\n"
    finally:
        for cid in ("calm", "filler", "newcomer"):
            remove(fenv, namespace, cid)
    wait_for(lambda: not (fenv.fractal_run_dir / "vms" / namespace / "full").exists(), timeout=60,
             what="the VM gone after its last container")


def test_full_layer_is_resource_exhausted_naming_it_and_heals(fenv: FractalEnv, namespace: str,
                                                             images: dict[str, str]) -> None:
    """A writable layer out of inodes (1M: 1024 of them): the container's own writes fail, and a
    live restack, which needs a fresh work dir on that layer, is ResourceExhausted with a
    message saying which layer is full -- not Unknown, not a traceback.  Once the container
    removes its files, the restack works."""
    box = (*sandbox("inodes"), "--annotation", "io.fractal.vm.scratch=1M")
    try:
        start_detached(fenv, namespace, images["busybox"], "many", "sleep", "3600", extra=box)
        r = exec_(fenv, namespace, "many", "touch", "sh", "-c",
                  "mkdir /d; i=0; while [ $i -lt 1100 ]; do : > /d/f$i; i=$((i+1)); done", check=False)
        assert r.returncode != 0 and "No space left on device" in r.stderr, (r.returncode, r.stderr)
        r = fractal(fenv, "layers", "add", "-a", str(fenv.address), "-n", namespace, "many", images["tools"])
        assert r.returncode != 0
        assert "No space left on device: container many's writable layer" in r.stderr, r.stderr
        assert "0 of 1024 inodes free" in r.stderr and "Traceback" not in r.stderr, r.stderr
        exec_(fenv, namespace, "many", "rm", "rm", "-r", "/d")
        r = fractal(fenv, "layers", "add", "-a", str(fenv.address), "-n", namespace, "many", images["tools"])
        assert r.returncode == 0, r.stderr
        assert exec_(fenv, namespace, "many", "cat", "cat", "/opt/tools/hello.txt").stdout == "hello from tools\n"
    finally:
        remove(fenv, namespace, "many")


def test_scratch_annotation_above_the_operator_limit_is_refused(fenv: FractalEnv, namespace: str,
                                                                images: dict[str, str]) -> None:
    r = fenv.run(images["busybox"], "greedy", "true", namespace=namespace, runtime=RUNTIME,
                 extra=(*VM, "--annotation", "io.fractal.vm.scratch=100G"), check=False, timeout=180)
    assert r.returncode != 0
    assert "io.fractal.vm.scratch" in r.stderr and "vm.scratch_max" in r.stderr, r.stderr


def test_memory_hog_is_oom_killed_and_the_agent_answers(fenv: FractalEnv, namespace: str,
                                                        images: dict[str, str]) -> None:
    box = sandbox("hungry")
    ev = subprocess.Popen(fenv.containerd.ctr_argv("events", namespace=None), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    try:
        start_detached(fenv, namespace, images["busybox"], "calm", "sleep", "3600", extra=box)
        start_detached(fenv, namespace, images["busybox"], "hog", "sh", "-c", HOG, extra=box)
        wait_for(lambda: task_status(fenv, namespace, "hog") == "STOPPED", timeout=240, what="the hog killed")
        fenv.ctr("tasks", "delete", "hog", namespace=namespace)
        assert exec_(fenv, namespace, "calm", "alive", "echo", "alive").stdout == "alive\n"
        # the hog ran into the containers' limit (guest memory minus the reserve), not into the
        # guest's end: the kernel (guest console) reports a memory-cgroup OOM -- in the parent
        # of all containers, which the agent and init are outside of -- and no global one
        console = (vm_dir(fenv, namespace, "hungry") / "console.log").read_text(errors="replace")
        assert "Memory cgroup out of memory: Killed process" in console, console[-3000:]
        assert "\nOut of memory: Killed process" not in console and "] Out of memory: Killed" not in console
        # containers get an OOM score of their own (0), not the agent's -1000
        assert exec_(fenv, namespace, "calm", "adj", "cat", "/proc/self/oom_score_adj").stdout == "0\n"
        ps = fenv.ctr("tasks", "ps", "calm", namespace=namespace, timeout=60)
        assert len(ps.stdout.splitlines()) >= 2, ps.stdout
        r = fenv.run(images["busybox"], "after", "echo", "after", namespace=namespace, runtime=RUNTIME,
                     extra=(*VM, *box), timeout=180)
        assert r.stdout == "after\n"
    finally:
        ev.terminate()
        out, _ = ev.communicate(timeout=10)
        for cid in ("calm", "hog", "after"):
            remove(fenv, namespace, cid)
    hog = [line for line in out.splitlines() if f" {namespace} /tasks/" in line and '"hog"' in line]
    topics = [w for line in hog for w in line.split() if w.startswith("/tasks/")]
    assert "/tasks/oom" in topics, out
    assert topics.index("/tasks/oom") < topics.index("/tasks/exit"), topics
    exit_line = next(line for line in hog if "/tasks/exit" in line)
    assert '"exit_status":137' in exit_line.replace(" ", ""), exit_line


def test_stopped_agent_gives_a_timely_error(fenv: FractalEnv, namespace: str, images: dict[str, str],
                                            tmp_path: Path) -> None:
    """SIGSTOP to the guest's agent (from a container in the guest's pid namespace): `ctr task
    ps` and `ctr task exec` fail with DeadlineExceeded naming the agent, within the configured
    timeout -- they never hang.  The agent is resumed afterwards and everything is cleaned up."""
    cfg = tmp_path / "timeouts.toml"
    cfg.write_text('mode = "vm"\n[timeouts]\ndefault = 5\n')
    box = sandbox("frozen")
    try:
        start_detached(fenv, namespace, images["busybox"], "calm", "sleep", "3600",
                       extra=(*box, "--runtime-config-path", str(cfg)))
        # stop the agent for 60 s, then let it go on
        start_detached(fenv, namespace, images["busybox"], "stopper", "sh", "-c",
                       "a=$(pidof python3.11); kill -STOP $a; sleep 60; kill -CONT $a; sleep 3600",
                       extra=(*box, "--with-ns", "pid:/proc/1/ns/pid"))
        failed = None
        for _ in range(20):  # the stopper may need a moment to find the agent
            r = fenv.ctr("tasks", "ps", "calm", namespace=namespace, check=False, timeout=50)
            if r.returncode != 0:
                failed = r
                break
            time.sleep(0.5)
        assert failed is not None, "the agent never stopped answering"
        assert "DeadlineExceeded" in failed.stderr or "deadline exceeded" in failed.stderr, failed.stderr
        assert "agent" in failed.stderr and "pids" in failed.stderr, failed.stderr
        r = fenv.ctr("tasks", "exec", "--exec-id", "x", "calm", "echo", "hi", namespace=namespace, check=False,
                     timeout=50)
        assert r.returncode != 0
        assert "agent" in r.stderr and "did not answer" in r.stderr, r.stderr
        # once the agent goes on, the sandbox works again
        tries = iter(range(1000))
        wait_for(lambda: fenv.ctr("tasks", "exec", "--exec-id", f"y{next(tries)}", "calm", "echo", "back",
                                  namespace=namespace, check=False, timeout=60).stdout == "back\n",
                 timeout=180, what="the agent answering again")
    finally:
        for cid in ("stopper", "calm"):
            remove(fenv, namespace, cid)
