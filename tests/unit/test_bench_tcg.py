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
    return {"rss_mb": 300.0, "pss_mb": 280.0, "detail": {"qemu:1": {"rss_kb": 300 << 10, "parts": parts}}}


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
    assert "idle (20 s later): host RSS 300 MB (PSS 280); QEMU's guest RAM 132.5 /" in text
    assert ("guest: reserved 54.4 + not free (MemTotal-MemFree) 78.0 MB (page cache 20.0, anon in THPs 4.0); "
            "page_reporting_order 0") in text
