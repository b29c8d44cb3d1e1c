"""``diagnose``: what the agent's processes are doing, for a shim that waits too long.

Why: a request that hangs inside the guest (runc stuck on a mount, a filesystem that does not
answer) leaves no trace on the host; the shim asks this (the agent serves requests concurrently,
so it answers while the other one hangs) and logs the answer.  Read-only, from /proc: for every
descendant of the agent, its pid, state, kernel wait channel, age and command line.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ccpu.linux.proc import ProcStat, stat

MAX_PROCESSES = 64


def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(4096).decode(errors="replace")
    except OSError:
        return ""


def processes(root: int) -> list[dict[str, Any]]:
    """The descendants of ``root`` (not ``root`` itself), oldest first."""
    table: dict[int, ProcStat] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = stat(int(entry))
            if st is not None:
                table[st.pid] = st
    mine, todo = [], [root]
    while todo and len(mine) < MAX_PROCESSES:
        parent = todo.pop()
        for pid, st in table.items():
            if st.ppid == parent and pid not in mine:
                mine.append(pid)
                todo.append(pid)
    try:
        ticks, uptime = os.sysconf("SC_CLK_TCK"), float(_read("/proc/uptime").split()[0])
    except (ValueError, IndexError, OSError):
        ticks, uptime = 100, 0.0
    out = []
    for pid in sorted(mine, key=lambda p: table[p].start_time)[:MAX_PROCESSES]:
        st = table[pid]
        out.append({"pid": pid, "ppid": st.ppid, "state": st.state, "wchan": _read(f"/proc/{pid}/wchan"),
                    "age_s": round(max(0.0, uptime - st.start_time / ticks), 1),
                    "cmd": _read(f"/proc/{pid}/cmdline").replace("\0", " ").strip()[:200]})
    return out


async def diagnose_op(args: Mapping[str, Any]) -> dict[str, Any]:
    return {"processes": processes(os.getpid())}
