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

MAX_PROCESSES = 64


def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(4096).decode(errors="replace")
    except OSError:
        return ""


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(ppid, state, start time in clock ticks) of ``pid``."""
    raw = _read(f"/proc/{pid}/stat")
    if ")" not in raw:
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    return int(fields[1]), fields[0], int(fields[19])


def processes(root: int) -> list[dict[str, Any]]:
    """The descendants of ``root`` (not ``root`` itself), oldest first."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None:
                table[int(entry)] = st
    mine, todo = [], [root]
    while todo and len(mine) < MAX_PROCESSES:
        parent = todo.pop()
        for pid, (ppid, _, _) in table.items():
            if ppid == parent and pid not in mine:
                mine.append(pid)
                todo.append(pid)
    try:
        ticks, uptime = os.sysconf("SC_CLK_TCK"), float(_read("/proc/uptime").split()[0])
    except (ValueError, IndexError, OSError):
        ticks, uptime = 100, 0.0
    out = []
    for pid in sorted(mine, key=lambda p: table[p][2])[:MAX_PROCESSES]:
        ppid, state, start = table[pid]
        out.append({"pid": pid, "ppid": ppid, "state": state, "wchan": _read(f"/proc/{pid}/wchan"),
                    "age_s": round(max(0.0, uptime - start / ticks), 1),
                    "cmd": _read(f"/proc/{pid}/cmdline").replace("\0", " ").strip()[:200]})
    return out


async def diagnose_op(args: Mapping[str, Any]) -> dict[str, Any]:
    return {"processes": processes(os.getpid())}
