"""Where the time of one ``ctr run --rm`` goes, from the logs (issue 12: the pool's figure).

A run is timed by the benchmark (wall clock at ``ctr run``'s start and exit); the rest comes from
what the shim and the pool log anyway, each record stamped with the wall clock:

* containerd's log (the shim's records, ccpu/logfmt.py, copied with the fields after the message:
  ``time="2026-12-07T13:59:42.686439000Z" level=info msg="..." namespace=bench sandbox=p1 ...``):
  ``serving ... for group G`` (the new shim's daemon is up), ``VM adopted from the pool`` (the
  pooled VM is the sandbox's, its agent link taken over), ``created C``, ``started C``,
  ``C exited with N``, ``shutdown requested (C)`` (containerd deleted the task: its Shutdown
  follows Delete), ``shim exiting`` (the sandbox's VM is stopped: the daemon's last record);
* the pool's log (``2026-12-07 13:59:53,644 shim.poold INFO ...``, local time): ``handed over
  to`` and ``ready (QEMU pid`` -- a refill boots from one handover to the next ``ready``.

Pure functions over the texts: hack/bench/vm.py reads the files, tests/unit/test_bench_phases.py
feeds them lines.
"""

from __future__ import annotations

import calendar
import re
import statistics
import time
from dataclasses import dataclass, field

_TIME = re.compile(r'^time="(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?Z"')
_MSG = re.compile(r'\bmsg="((?:[^"\\]|\\.)*)"')
_POOL_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")

#: the marks of a run, in path order, and the label of the phase that ENDS at each
MARKS = ("shim_up", "adopted", "created", "started", "exited", "deleted", "ctr_exit")
LABELS = {
    "shim_up": "ctr run -> the new shim serves",
    "adopted": "-> pooled VM adopted (agent link)",
    "created": "-> container created",
    "started": "-> started",
    "exited": "-> exited",
    "deleted": "-> task deleted (Shutdown asked)",
    "ctr_exit": "-> ctr exits",
}


@dataclass
class Run:
    """One timed ``ctr run``: its container id, its sandbox (group), wall-clock start and end."""

    kind: str
    cid: str
    sandbox: str
    start: float
    end: float
    marks: dict[str, float] = field(default_factory=dict)  # mark -> seconds from start
    vm_stopped: float | None = None  # its QEMU exited (the pool reaps it), seconds from start
    qemu_pid: int | None = None  # the pooled VM adopted
    refill_overlap: float = 0.0  # seconds of the run during which the pool booted a VM


def _containerd_time(line: str) -> float | None:
    m = _TIME.match(line)
    if not m:
        return None
    frac = (m.group(2) or "0")[:6].ljust(6, "0")
    return calendar.timegm(time.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S")) + int(frac) / 1e6


def _field(line: str, name: str) -> str | None:
    m = re.search(rf"\b{name}=(\S+)", line)
    return m.group(1) if m else None


def mark_runs(containerd_log: str, runs: list[Run]) -> None:
    """Fill each run's ``marks`` (and ``vm_stopped``) from containerd's log: the first record of
    each kind for its container/sandbox inside the run's window (the VM's stop may come after
    ``ctr`` exited: looked for up to 60 s later)."""
    by_cid = {r.cid: r for r in runs}
    by_sandbox = {r.sandbox: r for r in runs if r.sandbox == r.cid}  # a new sandbox per run
    for line in containerd_log.splitlines():
        t = _containerd_time(line)
        m = _MSG.search(line)
        if t is None or m is None:
            continue
        msg = m.group(1)
        cid, sb = _field(line, "container"), _field(line, "sandbox")
        run = by_cid.get(cid or "") or by_sandbox.get(sb or "")
        if run is None or not run.start <= t <= run.end + 60:
            continue
        dt = t - run.start
        kind = None
        if msg.startswith("serving ") and sb == run.sandbox:
            kind = "shim_up"
        elif msg.startswith("VM adopted from the pool") and sb == run.sandbox:
            kind = "adopted"
        elif cid == run.cid and msg.startswith(f"created {run.cid} "):
            kind = "created"
        elif cid == run.cid and msg.startswith(f"started {run.cid} "):
            kind = "started"
        elif cid == run.cid and msg.startswith(f"{run.cid} exited with"):
            kind = "exited"
        elif cid == run.cid and msg.startswith(f"shutdown requested ({run.cid})"):
            kind = "deleted"
        elif msg.startswith("adopted pooled VM ") and sb == run.sandbox:
            pid = re.search(r"\(QEMU pid (\d+)", msg)
            run.qemu_pid = int(pid.group(1)) if pid else None
            continue
        if kind is not None and kind not in run.marks and t <= run.end + 1:
            run.marks[kind] = dt
    for run in runs:
        run.marks["ctr_exit"] = run.end - run.start


def _pool_time(line: str) -> float | None:
    m = _POOL_TIME.match(line)
    if not m:
        return None
    return time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000


def vm_stops(pool_log: str, runs: list[Run]) -> None:
    """Each new sandbox's VM stop: its QEMU's exit, which the pool (QEMU's parent) logs
    (``QEMU pid N exited with S``; 137: SIGKILLed)."""
    by_pid = {r.qemu_pid: r for r in runs if r.qemu_pid is not None}
    for line in pool_log.splitlines():
        m = re.search(r" QEMU pid (\d+) exited", line)
        t = _pool_time(line)
        if m and t is not None and int(m.group(1)) in by_pid:
            run = by_pid[int(m.group(1))]
            run.vm_stopped = t - run.start


def refills(pool_log: str) -> list[tuple[float, float]]:
    """The pool's refill boots as (start, end) wall-clock intervals: from each ``booting a
    refill`` to the next ``ready``.  The pool logs in local time (logging's asctime)."""
    out: list[tuple[float, float]] = []
    started: float | None = None
    for line in pool_log.splitlines():
        t = _pool_time(line)
        if t is None:
            continue
        if " booting a refill" in line and started is None:
            started = t
        elif " ready (QEMU pid " in line and started is not None:
            out.append((started, t))
            started = None
    if started is not None:
        out.append((started, float("inf")))
    return out


def overlap(runs: list[Run], intervals: list[tuple[float, float]]) -> None:
    for run in runs:
        run.refill_overlap = sum(max(0.0, min(run.end, b) - max(run.start, a)) for a, b in intervals)


def table(runs: list[Run], kinds: tuple[str, str] = ("pooled", "nth"),
          labels: tuple[str, str] = ("new sandbox", "Nth")) -> list[str]:
    """Per phase, the median duration for each kind (the phase from the previous mark present
    in that run to this one), their difference, and where the VM's stop and the refill fell."""
    lines = [f"  {'phase (median s)':<38}{labels[0]:>12}{labels[1]:>10}{'diff':>8}"]

    def phase(run: Run, mark: str) -> float | None:
        if mark not in run.marks:
            return None
        prev = 0.0
        for m in MARKS[:MARKS.index(mark)]:
            if m in run.marks:
                prev = run.marks[m]
        return run.marks[mark] - prev

    def med(kind: str, fn) -> float | None:  # noqa: ANN001
        vals = [v for v in (fn(r) for r in runs if r.kind == kind) if v is not None]
        return statistics.median(vals) if vals else None

    def cell(v: float | None, width: int) -> str:
        return f"{v:>{width}.3f}" if v is not None else f"{'-':>{width}}"

    for mark in MARKS:
        a, b = med(kinds[0], lambda r, m=mark: phase(r, m)), med(kinds[1], lambda r, m=mark: phase(r, m))
        if a is None and b is None:
            continue
        d = (a or 0.0) - (b or 0.0)
        lines.append(f"  {LABELS[mark]:<38}{cell(a, 12)}{cell(b, 10)}{d:>+8.3f}")
    stop = med(kinds[0], lambda r: None if r.vm_stopped is None else r.vm_stopped - r.marks["ctr_exit"])
    if stop is not None:
        lines.append(f"  {'VM stopped, after ctr exited':<38}{stop:>+12.3f}   (negative: on ctr's path)")
    for k, label in zip(kinds, labels):
        ov, tot = med(k, lambda r: r.refill_overlap), med(k, lambda r: r.marks["ctr_exit"])
        if ov is not None and tot:
            lines.append(f"  {'refill boot running during ' + label:<38}{ov:>12.3f}   of {tot:.3f} s")
    return lines
