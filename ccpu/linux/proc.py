"""``/proc/<pid>/stat``: a process's state, parent and start time, read once for everyone.

The start time (clock ticks since boot, field 22) is what makes a recorded pid safe to signal
later: pids are reused, a (pid, start time) pair is not.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ProcStat:
    pid: int
    state: str  # R, S, D, Z, X, ...
    ppid: int
    start_time: int  # clock ticks after boot

    @property
    def alive(self) -> bool:
        """Running or sleeping, not a zombie or dead entry."""
        return self.state not in ("Z", "X")


def parse_stat(pid: int, raw: str) -> ProcStat | None:
    """Parse the text of ``/proc/<pid>/stat`` (the command name may hold spaces and parens:
    the fields start after the LAST ``)``)."""
    if ")" not in raw:
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    if len(fields) < 20:
        return None
    try:
        return ProcStat(pid=pid, state=fields[0], ppid=int(fields[1]), start_time=int(fields[19]))
    except ValueError:
        return None


def stat(pid: int) -> ProcStat | None:
    """``pid``'s stat line, or None if there is no such process (or /proc is unreadable)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read(4096).decode(errors="replace")
    except OSError:
        return None
    return parse_stat(pid, raw)


def start_time(pid: int) -> int | None:
    """The start time of a live ``pid`` (None when it is gone or a zombie)."""
    st = stat(pid)
    return st.start_time if st is not None and st.alive else None


def renice(pid: int, value: int) -> int:
    """Set every thread of ``pid`` to nice ``value``; the number of threads set.  Nice is per
    thread on Linux (a thread keeps the value it was created with), so the process's own value
    alone would leave e.g. QEMU's vCPU threads where they were.  Threads that end meanwhile are
    skipped; lowering the value needs CAP_SYS_NICE."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    n = 0
    for tid in tids:
        try:
            os.setpriority(os.PRIO_PROCESS, int(tid), value)
        except ProcessLookupError:
            continue
        n += 1
    return n


def thread_nices(pid: int) -> dict[int, int]:
    """tid -> nice value of each thread of ``pid`` (empty when it is gone)."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return {}
    for tid in tids:
        try:
            out[int(tid)] = os.getpriority(os.PRIO_PROCESS, int(tid))
        except ProcessLookupError:
            continue
    return out
