"""hack/bench/phases.py: the per-phase table of the pool benchmark, from log lines."""

from __future__ import annotations

import calendar
import time

from hack.bench import phases


def _t(hms: str) -> float:
    return calendar.timegm(time.strptime(f"2026-12-07 {hms}", "%Y-%m-%d %H:%M:%S"))


def _line(hms_frac: str, msg: str, **fields: str) -> str:
    extra = " ".join(f"{k}={v}" for k, v in fields.items())
    return f'time="2026-12-07T{hms_frac}000Z" level=info msg="{msg}" namespace=bench {extra} logger=shim pid=1'


CONTAINERD = "\n".join([
    _line("10:00:00.500000", "serving /run/containerd/s/ab for group p0 (first container p0, agent vm)", sandbox="p0"),
    _line("10:00:00.600000", "adopted pooled VM v1 (QEMU pid 4242, booted in 9.00s, warmed in 1.2s) in 0.004s",
          sandbox="p0"),
    _line("10:00:00.700000", "VM adopted from the pool: QEMU pid 4242, accel tcg", sandbox="p0"),
    _line("10:00:01.700000", "created p0 (pid 156, rootfs layers)", sandbox="p0", container="p0"),
    _line("10:00:01.900000", "started p0 (pid 156)", sandbox="p0", container="p0"),
    _line("10:00:02.000000", "p0 exited with 0", sandbox="p0", container="p0"),
    _line("10:00:02.400000", "shutdown requested (p0): no containers left, exiting", sandbox="p0", container="p0"),
    # the Nth container in another sandbox, and a record of another run outside the window
    _line("10:00:10.900000", "created pn0 (pid 200, rootfs layers)", sandbox="pnth", container="pn0"),
    _line("10:00:11.000000", "started pn0 (pid 200)", sandbox="pnth", container="pn0"),
    _line("10:00:11.100000", "pn0 exited with 0", sandbox="pnth", container="pn0"),
    _line("10:00:11.300000", "shutdown requested (pn0): 1 containers remain, staying", sandbox="pnth", container="pn0"),
    _line("10:05:00.000000", "created p0 (pid 999, rootfs layers)", sandbox="p0", container="p0"),
])


def _pool_line(hms_ms: str, msg: str) -> str:
    return f"2026-12-07 {hms_ms} shim.poold INFO {msg}"


def test_marks_phases_vm_stop_and_refill() -> None:
    runs = [phases.Run("pooled", "p0", "p0", _t("10:00:00"), _t("10:00:03")),
            phases.Run("nth", "pn0", "pnth", _t("10:00:10"), _t("10:00:11") + 0.5)]
    phases.mark_runs(CONTAINERD, runs)
    p0, pn0 = runs
    assert p0.qemu_pid == 4242
    assert {k: round(v, 3) for k, v in p0.marks.items()} == {
        "shim_up": 0.5, "adopted": 0.7, "created": 1.7, "started": 1.9, "exited": 2.0, "deleted": 2.4, "ctr_exit": 3.0}
    assert {k: round(v, 3) for k, v in pn0.marks.items()} == {
        "created": 0.9, "started": 1.0, "exited": 1.1, "deleted": 1.3, "ctr_exit": 1.5}
    # the pool logs in local time: build its lines from the runs' own clock
    loc = lambda t: time.strftime("%H:%M:%S", time.localtime(t))  # noqa: E731
    pool_log = "\n".join([
        _pool_line(f"{loc(_t('10:00:01'))},900", "booting a refill (0 ready, 0 booting, 0 held)"),
        _pool_line(f"{loc(_t('10:00:03'))},200", "ccpu.vm.machine INFO QEMU pid 4242 exited with 137"),
        _pool_line(f"{loc(_t('10:00:10'))},500", "pooled VM v2 ready (QEMU pid 5000) in 8.6s; 1 ready"),
    ])
    phases.overlap(runs, phases.refills(pool_log))
    phases.vm_stops(pool_log, runs)
    assert round(p0.refill_overlap, 3) == 1.1  # 01.9 .. 03.0
    assert round(pn0.refill_overlap, 3) == 0.5  # 10.0 .. 10.5
    assert round(p0.vm_stopped or 0, 3) == 3.2
    rows = phases.table(runs)
    created = next(r for r in rows if "container created" in r)
    assert created.split()[-3:] == ["1.000", "0.900", "+0.100"]  # from the adoption / from ctr's start
    assert any("VM stopped" in r and "+0.200" in r for r in rows)
