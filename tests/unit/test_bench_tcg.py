"""hack/bench/tcg.py and hack/bench/vm.py's memory report: the A/B knobs issue 12's RSS levers are
measured with parse as documented, and a bad one is an error that says what is expected."""

from __future__ import annotations

import argparse

import pytest

from hack.bench import tcg, vm


def test_config_extras_parse() -> None:
    c = tcg.parse_config("pr9:1:tb-size=128:pr=9,drop,env.MALLOC_ARENA_MAX=1")
    assert (c.label, c.cpus, c.tcg, c.balloon) == ("pr9", 1, "tb-size=128", True)
    assert (c.report_order, c.drop_caches, c.env) == (9, True, (("MALLOC_ARENA_MAX", "1"),))
    plain = tcg.parse_config("ship:1:")
    assert (plain.report_order, plain.drop_caches, plain.env, plain.balloon) == (None, False, (), True)
    assert tcg.parse_config("nb:2:thread=multi:noballoon").balloon is False


@pytest.mark.parametrize("bad", ["x:1", "x:one:", "x:1::pr=100", "x:1::env.lower=1", "x:1::env.A=b c",
                                 "x:1::bogus", "x:1::pr=0:extra"])
def test_bad_config_is_refused(bad: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="expected LABEL:CPUS:FRACTAL_TCG"):
        tcg.parse_config(bad)


def _host(guest_ram_mb: float) -> dict:
    parts = {k: {"rss_kb": 0, "pss_kb": 0} for k in ("guest_ram", "tcg_buffer", "file", "heap_anon")}
    parts["guest_ram"]["rss_kb"] = int(guest_ram_mb * 1024)
    return {"rss_mb": 300.0, "pss_mb": 280.0, "detail": {"qemu:1": {"rss_kb": 300 << 10, "pss_kb": 280 << 10, "parts": parts}}}


def test_memory_report_shows_the_idle_sandbox_beside_the_guests_view() -> None:
    mem = {"extra": 2, "host_1": _host(130), "host_n": _host(135), "settle_s": 20,
           "idle": {"host": _host(132.5), "page_reporting_order": 0, "guest_not_free_mb": 78.0, "guest_cached_mb": 20.0, "guest_anon_huge_mb": 4.0,
                    "guest_reserved_mb": 54.4},
           "host_per_container_mb": 2.5, "guest_memtotal_mb": 457.6, "guest_used_1_mb": 50.0,
           "guest_used_n_mb": 51.0, "guest_shmem_delta_mb": 0.0, "guest_per_container_mb": 0.5,
           "guest_nonfree_per_container_mb": 0.6}
    machine = {k: "x" for k in ("nproc", "cpu", "mem_total", "kernel", "containerd", "python")}
    text, _goals = vm.report({"memory": mem, "machine": machine, "command": "vm.py", "image_ref": "busybox",
                              "accel": "tcg", "accel_reason": "test", "share": "virtiofs"})
    assert "idle (20 s later, load ?): QEMU + virtiofsd 300 MB (PSS 280); QEMU's guest RAM 132.5 /" in text
    assert ("guest: reserved 54.4 + not free (MemTotal-MemFree) 78.0 MB (page cache 20.0, anon in THPs 4.0); "
            "page_reporting_order 0") in text


def test_everything_per_vm_counts_the_shim_daemon_beside_the_vms_own_total() -> None:
    detail = {"qemu:1": {"rss_kb": 300 << 10, "pss_kb": 290 << 10},
              "virtiofsd:2": {"rss_kb": 10 << 10, "pss_kb": 6 << 10},
              "shim:3": {"rss_kb": 40 << 10, "pss_kb": 20 << 10}}
    t = vm.host_totals(detail)
    assert (t["rss_mb"], t["pss_mb"], t["all_rss_mb"], t["all_pss_mb"]) == (310, 296, 350, 316)
    host = {**t, "detail": detail, "load_average": (1.5, 2.0, 2.5)}
    mem = {"extra": 1, "host_1": host, "host_n": host, "settle_s": 20, "host_per_container_mb": 0.0,
           "host_all_per_container_mb": 1.0, "guest_memtotal_mb": 457.6, "guest_used_1_mb": 50.0,
           "guest_used_n_mb": 51.0, "guest_shmem_delta_mb": 0.0, "guest_per_container_mb": 0.5,
           "guest_nonfree_per_container_mb": 0.6}
    machine = {k: "x" for k in ("nproc", "cpu", "mem_total", "kernel", "containerd", "python")}
    text, _goals = vm.report({"memory": mem, "machine": machine, "command": "vm.py", "image_ref": "busybox",
                              "accel": "tcg", "accel_reason": "test", "share": "virtiofs"})
    assert ("host RSS with 1 container(s): QEMU + virtiofsd 310 MB (PSS 296); everything per VM "
            "(+ the shim daemon) 350 MB (PSS 316); load 1.5 2.0 2.5 [qemu:1 300 (PSS 290), virtiofsd:2 10 (PSS 6), "
            "shim:3 40 (PSS 20)]") in text
    assert "growth per extra container: 0.0 MB (with the shim daemon: 1.0 MB)" in text


def test_nth_against_runc_run_in_the_same_guest_is_reported_with_its_goal() -> None:
    def st(m: float) -> dict:
        return {"median": m, "p90": m, "min": m, "max": m}

    gr = {"nth": st(2.6), "runc": st(2.0), "exec_wall": st(5.0), "runs": 2, "load_1min": [3.0, 4.5], "ratio": 1.3,
          "ratio_min": 1.25, "ratio_paired": 1.1}
    machine = {k: "x" for k in ("nproc", "cpu", "mem_total", "kernel", "containerd", "python")}
    text, goals = vm.report({"guest_runc": gr, "machine": machine, "command": "vm.py", "image_ref": "busybox",
                             "accel": "tcg", "accel_reason": "test", "share": "virtiofs"})
    assert "(2 rounds, alternating; load average per round 3.0 4.5)" in text
    assert "(of the minima: 1.25; median of the rounds' own ratios: 1.10)" in text and "runc run, same bundle, in the guest" in text
    assert goals == [("Nth container / runc run in the same guest <= 1.3", True, "1.30x")]
    _text, goals = vm.report({"guest_runc": {**gr, "ratio": 1.31}, "machine": machine, "command": "vm.py",
                              "image_ref": "busybox", "accel": "tcg", "accel_reason": "test", "share": "virtiofs"})
    assert goals[0][1] is False
