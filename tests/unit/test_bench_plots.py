"""hack/bench/plots.py: results -> plot data (pure), and the SVGs are reproducible text."""

from __future__ import annotations

from pathlib import Path

import pytest

from hack.bench import plots
from hack.bench.plots import MiB, PlotError, disk_series, ecdf, start_series, timeline_rows


def _disk() -> dict:
    return {"namespaces": 3,
            "fractal": {"empty_bytes": 0, "usage_bytes": [100 * MiB, 101 * MiB, 102 * MiB]},
            "overlayfs": {"empty_bytes": MiB, "usage_bytes": [100 * MiB, 200 * MiB, 300 * MiB]}}


def test_disk_series_starts_at_the_empty_store() -> None:
    s = disk_series(_disk())
    assert s["fractal"] == [(0, 0.0), (1, 100.0), (2, 101.0), (3, 102.0)]
    assert s["overlayfs"][0] == (0, 1.0) and s["overlayfs"][-1] == (3, 300.0)


def test_disk_series_of_an_old_result_says_what_is_missing() -> None:
    old = {"fractal": {"empty_bytes": 0, "one_ns_bytes": 1, "n_ns_bytes": 2},
           "overlayfs": {"empty_bytes": 0, "one_ns_bytes": 1, "n_ns_bytes": 2}}
    with pytest.raises(PlotError, match="usage_bytes"):
        disk_series(old)


def test_ecdf_is_sorted_and_ends_at_one() -> None:
    xs, ys = ecdf([0.3, 0.1, 0.2, 0.2])
    assert xs == [0.1, 0.2, 0.2, 0.3] and ys == [0.25, 0.5, 0.75, 1.0]


def test_start_series_needs_raw_times() -> None:
    assert start_series({"raw": {"fractal/fractal": [0.4, 0.5]}}) == {"fractal/fractal": [0.4, 0.5]}
    with pytest.raises(PlotError):
        start_series({"runs": 3})


TIMELINE = {"host": {"guest": 0.1, "qemu_started": 0.3, "connected": 0.31, "agent_ready": 4.8},
            "guest": [(2.9, "exec agent on /dev/vport2p1"), (1.5, "init started (mode=agent)")],
            "first_output": 6.0}


def test_timeline_rows_keep_each_clock_in_its_own_row() -> None:
    rows = dict(timeline_rows(TIMELINE))
    assert rows["shim (host clock)"] == [(0.0, 0.1, "find guest"), (0.1, 0.3, "spawn QEMU"),
                                         (0.3, 4.8, "firmware, kernel, init, agent start")]
    # milestones sorted by uptime; each phase is named after the milestone that starts it
    assert rows["guest (uptime clock)"] == [(0.0, 1.5, "kernel"), (1.5, 2.9, "init")]
    assert rows["ctr run -> first output"] == [(0.0, 6.0, "ctr run (new sandbox)")]


def test_timeline_without_milestones_or_first_output_has_the_shim_row_only() -> None:
    rows = timeline_rows({"host": TIMELINE["host"], "guest": [], "first_output": None})
    assert [name for name, _ in rows] == ["shim (host clock)"]


def test_figures_are_reproducible_svg_text(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    a = plots.plot_disk(disk_series(_disk()), "busybox", tmp_path / "a.svg").read_bytes()
    b = plots.plot_disk(disk_series(_disk()), "busybox", tmp_path / "b.svg").read_bytes()
    assert a == b  # no date, fixed ids: a committed figure changes only with its data
    assert b"<svg" in a and b"namespaces that pulled the image" in a  # text stays text
    t = plots.plot_timeline(timeline_rows(TIMELINE), tmp_path / "t.svg", "VM boot").read_text()
    assert "spawn QEMU" in t and "kernel" in t
    s = plots.plot_start_latency({"fractal/fractal": [0.4, 0.5], "runc/fractal": [0.2, 0.25]},
                                 tmp_path / "s.svg", "start").read_text()
    assert "runc shim, fractal snapshotter" in s


def test_boot_phases_from_containerds_copy_of_the_shims_log() -> None:
    from hack.bench.vm import boot_phases_by_sandbox

    log = ('time="2026-12-07T02:16:51.270607000Z" level=info msg="VM agent up in 13.01s (guest 0.61s, qemu 0.67s, '
           "connected 0.67s): {'version': 1, 'agent_pid': 141}\" namespace=t1 sandbox=vm-uname logger=shim.vm "
           'runtime=io.containerd.fractal.v1 pid=4337\n'
           'time="2026-12-07T02:16:52Z" level=info msg="VM agent up soon" sandbox=other\n')
    assert boot_phases_by_sandbox(log) == {
        "vm-uname": {"guest": 0.61, "qemu_started": 0.67, "connected": 0.67, "agent_ready": 13.01}}


def test_redraw_from_a_saved_result(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    import json

    res = tmp_path / "r.json"
    res.write_text(json.dumps({"args": {"image": "busybox"}, "disk": _disk()}))
    assert plots.main(["disk", str(res), str(tmp_path / "d.svg")]) == 0 and (tmp_path / "d.svg").is_file()
    assert plots.main(["boot", str(res), str(tmp_path / "b.svg")]) == 1  # a snapshotter result has no timeline
    assert "has no boot figure's data" in capsys.readouterr().err and not (tmp_path / "b.svg").exists()
