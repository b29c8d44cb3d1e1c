"""ccpu.agent.diagnose: the agent's descendants with state and wait channel (read from /proc)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess

from ccpu.agent import diagnose


def test_lists_descendants_with_state_and_wchan() -> None:
    child = subprocess.Popen(["sh", "-c", "sleep 30 & wait"], start_new_session=True)
    try:
        for _ in range(100):
            procs = diagnose.processes(os.getpid())
            if any(p["cmd"].startswith("sleep 30") for p in procs):
                break
            asyncio.run(asyncio.sleep(0.02))
        by_cmd = {p["cmd"]: p for p in procs}
        sleep = by_cmd["sleep 30"]
        assert sleep["ppid"] == child.pid and by_cmd["sh -c sleep 30 & wait"]["pid"] == child.pid
        assert sleep["state"] in ("S", "R") and sleep["age_s"] >= 0
        assert all(p["pid"] != os.getpid() for p in procs)
        answer = asyncio.run(diagnose.diagnose_op({}))
        assert any(p["pid"] == sleep["pid"] for p in answer["processes"])
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
