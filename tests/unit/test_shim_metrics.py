"""runc `events --stats` JSON -> io.containerd.cgroups.v1.Metrics (what ctr/CRI decode)."""

from __future__ import annotations

from ccpu.api.gen.cgroups.stats.v1 import metrics_pb2 as m
from shim import metrics

RUNC_STATS = {
    "cpu": {"usage": {"total": 5000, "percpu": [2000, 3000], "kernel": 10, "user": 20},
            "throttling": {"periods": 3, "throttledPeriods": 1, "throttledTime": 7}},
    "memory": {"cache": 4096, "usage": {"limit": 1 << 30, "usage": 8192, "max": 9000, "failcnt": 0},
               "swap": {"limit": 2 << 30, "usage": 8192}, "kernel": {"usage": 100},
               "raw": {"cache": 4096, "rss": 1234, "pgpgin": 5, "pgmajfault": 2,
                       "hierarchical_memsw_limit": 99, "total_rss": 4321, "total_pgfault": 8,
                       "unknown_key": 1}},
    "pids": {"current": 2, "limit": 100},
    "blkio": {"ioServiceBytesRecursive": [{"major": 8, "minor": 0, "op": "Read", "value": 512}]},
    "hugetlb": {"2MB": {"usage": 0, "max": 0, "failcnt": 0}},
}


def test_conversion() -> None:
    a = metrics.to_any(RUNC_STATS)
    assert a.type_url == "io.containerd.cgroups.v1.Metrics"
    out = m.Metrics.FromString(a.value)
    assert out.cpu.usage.total == 5000 and list(out.cpu.usage.per_cpu) == [2000, 3000]
    assert out.cpu.throttling.throttled_periods == 1
    assert out.memory.usage.usage == 8192 and out.memory.usage.limit == 1 << 30
    assert out.memory.rss == 1234 and out.memory.total_rss == 4321
    assert out.memory.pg_pg_in == 5 and out.memory.pg_maj_fault == 2
    assert out.memory.total_pg_fault == 8 and out.memory.hierarchical_swap_limit == 99
    assert out.memory.cache == 4096 and out.memory.kernel.usage == 100
    assert out.pids.current == 2 and out.pids.limit == 100
    assert out.blkio.io_service_bytes_recursive[0].value == 512
    assert out.hugetlb[0].pagesize == "2MB"


def test_empty_and_junk_still_has_usage() -> None:
    # ctr dereferences memory.usage and cpu.usage unconditionally
    out = m.Metrics.FromString(metrics.to_any({"memory": None, "cpu": "x", "pids": {"current": -1}}).value)
    assert out.HasField("memory") and out.memory.HasField("usage")
    assert out.HasField("cpu") and out.cpu.HasField("usage")
    assert out.pids.current == 0
