"""A pooled VM boots at a low priority (shim/poold.py POOL_BOOT_NICE) and is set back once ready:
``ccpu.vm.qemu.spawn(nice=)`` before exec, so every thread inherits it, and
``ccpu.linux.proc.renice`` for every thread (nice is per thread on Linux)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from ccpu.linux import proc
from ccpu.vm import qemu

# the main thread and one started after exec (as QEMU starts its vCPU threads)
CHILD = "import threading, time; threading.Thread(target=time.sleep, args=(60,)).start(); print(flush=True); time.sleep(60)"


def _threads(pid: int, n: int) -> dict[int, int]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        nices = proc.thread_nices(pid)
        if len(nices) >= n:
            return nices
        time.sleep(0.05)
    raise AssertionError(f"pid {pid} has threads {proc.thread_nices(pid)}")


@pytest.mark.skipif(os.geteuid() != 0, reason="lowering a nice value needs CAP_SYS_NICE")
def test_spawned_at_a_nice_value_every_thread_then_all_set_back() -> None:
    p = qemu.spawn([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, nice=10)
    try:
        assert p.stdout is not None
        p.stdout.readline()  # the second thread exists
        assert set(_threads(p.pid, 2).values()) == {10}
        assert proc.renice(p.pid, 0) == 2
        assert set(proc.thread_nices(p.pid).values()) == {0}
    finally:
        p.kill()
        p.wait()
    assert proc.renice(p.pid, 0) == 0  # gone: nothing to set, no error


def test_default_spawn_keeps_our_nice_value() -> None:
    p = qemu.spawn([sys.executable, "-c", CHILD], stdout=subprocess.PIPE)
    try:
        assert p.stdout is not None
        p.stdout.readline()
        assert set(_threads(p.pid, 2).values()) == {os.getpriority(os.PRIO_PROCESS, 0)}
    finally:
        p.kill()
        p.wait()
