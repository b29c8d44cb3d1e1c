"""What a dead shim's VM leaves behind, and its removal by the ``delete`` verb.

A shim SIGKILLed (or crashed) takes its QEMU and virtiofsd with it in the normal case
(PR_SET_PDEATHSIG), but not always: a child that was being set up, a process in D state.  So the
VM sandbox records its processes in ``<run dir>/pids`` (``name pid start-time`` per line) and
containerd's ``delete`` (a fresh shim process, after the daemon is gone) kills exactly those
whose pid AND start time still match -- pids are reused, a (pid, start time) pair is not -- then
undoes the recorded mounts and removes the run dir.

Kept light: ``delete`` imports this, and it must answer containerd quickly.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Iterable

from ccpu.linux.proc import start_time
from shim.layerview import undo_recorded
from shim.mountrecord import MountRecordError, remove_run_dir

log = logging.getLogger("shim.leftovers")

PIDS_FILE = "pids"


def record(run_dir: str, procs: Iterable[tuple[str, int]]) -> None:
    """Write ``run_dir``'s record of ``(name, pid)``: atomically, with each live one's start time."""
    lines = []
    for name, pid in procs:
        start = start_time(pid)
        if start is not None:
            lines.append(f"{name} {pid} {start}\n")
    tmp = os.path.join(run_dir, PIDS_FILE + ".tmp")
    with open(tmp, "w") as f:
        f.writelines(lines)
    os.replace(tmp, os.path.join(run_dir, PIDS_FILE))


def read_pids(run_dir: str) -> list[tuple[str, int, int]]:
    """(name, pid, start time) of each well-formed line of the record (none if there is none)."""
    out = []
    try:
        with open(os.path.join(run_dir, PIDS_FILE)) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                    out.append((parts[0], int(parts[1]), int(parts[2])))
    except OSError:
        pass
    return out


def cleanup_dead(run_dir: str) -> list[int]:
    """Kill the QEMU/virtiofsd recorded in ``run_dir`` (only if pid AND start time still
    match: pids get reused) and remove the dir.  Returns the pids killed."""
    killed = []
    for _name, pid, start in read_pids(run_dir):
        if start_time(pid) == start:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 3
    while killed and time.monotonic() < deadline and any(start_time(p) is not None for p in killed):
        time.sleep(0.02)
    problems = undo_recorded(run_dir)  # the layer view: exactly the mounts its record names
    if problems:
        log.error("layer view of %s: %s", run_dir, "; ".join(problems))
    try:
        remove_run_dir(run_dir)  # the recorded volume binds are unmounted first: host data is never removed
    except MountRecordError as exc:  # VolumeError too
        log.error("%s", exc)
    try:
        os.rmdir(os.path.dirname(run_dir))  # the namespace dir, if now empty
    except OSError:
        pass
    return killed
