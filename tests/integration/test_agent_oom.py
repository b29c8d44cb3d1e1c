"""The agent notices OOM kills in a memory cgroup (what becomes containerd's /tasks/oom)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from ccpu.agent.oom import CGROUP_ROOT, OomWatcher, memory_cgroup

HOG = "import time\nx = []\nwhile True:\n    x.append(bytearray(1 << 20))\n"


def _make_cgroup(limit: int) -> tuple[Path, str]:
    v1 = CGROUP_ROOT / "memory"
    name = f"fractal-oomtest-{uuid.uuid4().hex[:8]}"
    if (v1 / "memory.oom_control").exists() or (v1 / "cgroup.procs").exists():
        d = v1 / name
        d.mkdir()
        (d / "memory.limit_in_bytes").write_text(str(limit))
        return d, "v1"
    d = CGROUP_ROOT / name
    d.mkdir()
    (d / "memory.max").write_text(str(limit))
    return d, "v2"


def test_oom_kill_is_reported() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to create a memory cgroup")
    cg, kind = _make_cgroup(32 << 20)
    seen: list[str] = []

    async def scenario() -> int:
        loop = asyncio.get_running_loop()
        watcher = OomWatcher(loop, seen.append)
        # the hog joins the cgroup before it allocates: a shell writes its own pid, then execs python
        proc = subprocess.Popen(["sh", "-c", f"echo $$ > {cg}/cgroup.procs; exec {sys.executable} -c \"$0\"", HOG])
        try:
            for _ in range(100):
                found = memory_cgroup(proc.pid)
                if found is not None and found[1] == cg:
                    break
                await asyncio.sleep(0.02)
            assert watcher.watch("c1", proc.pid)
            status = await asyncio.wait_for(loop.run_in_executor(None, proc.wait), 60)
            watcher.check_exit("c1")
            for _ in range(50):
                if seen:
                    break
                await asyncio.sleep(0.02)
            return status
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            watcher.close()

    try:
        status = asyncio.run(scenario())
    finally:
        cg.rmdir()
    assert status == -9, f"the hog was not OOM-killed ({kind}): {status}"
    assert seen and set(seen) == {"c1"}
