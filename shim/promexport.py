"""A shim daemon's Prometheus metrics, served on its own ttrpc socket (``fractal.metrics.v1.Metrics``).

(Not to be confused with shim/metrics.py, which converts cgroup statistics for containerd's
Task.Stats.)

Why on the ttrpc socket rather than an HTTP socket per shim: a shim is one process per sandbox,
and containerd already gives each a socket, removes it with the shim (``delete`` included,
after a crash) and the sandbox record names it (ccpu/sandboxes.py).  A second socket would be
ours to create and to clean up after every dead shim.  So, as kata-monitor does for kata's
shims, one aggregator gathers them: `fractal metrics` (ccpu/cli/metrics.py) asks each shim
over ttrpc and serves or prints the union, every series labelled with the shim's namespace and
sandbox.  docs/metrics.md has the names.

What a shim measures:

* ``fractal_shim_rpc_duration_seconds{service,method,code}``: every ttrpc call (Task API,
  Layers, this one), through the ttrpc server's observer hook;
* ``fractal_shim_containers``: containers the sandbox runs now;
* ``fractal_shim_sandbox_info{mode,agent}``: 1, naming the sandbox's mode;
* ``fractal_shim_vm_boot_seconds{phase}``: a VM sandbox's boot timeline (guest image ready,
  QEMU started, agent connected, agent ready), seconds from the boot's start.

Start-up stays free: a shim is on the critical path of every ``ctr run``, and importing
prometheus-client costs ~50 ms (its exposition module pulls in http.server, urllib, wsgiref
and ssl, which the daemon keeps out, shim/daemon.py ``skip_ssl``).  So calls are counted into
plain buckets here (`RpcStats`), and the library is imported at the first scrape, which builds
the metric families from those counts into a per-daemon CollectorRegistry (never the global one).
"""

from __future__ import annotations

import bisect
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ccpu.ttrpc.status import Code

log = logging.getLogger(__name__)

SERVICE = "fractal.metrics.v1.Metrics"
#: ttrpc calls take from ~100 µs (State) to a VM boot (the first Create, tens of seconds under TCG)
RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BOOT_PHASES = ("guest", "qemu_started", "connected", "agent_ready")


def code_name(code: int) -> str:
    try:
        return Code(code).name
    except ValueError:
        return str(code)


@dataclass
class Series:
    """One histogram series: per-bucket counts (not cumulative; the last is +Inf), sum."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(RPC_BUCKETS) + 1))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(RPC_BUCKETS, seconds)] += 1
        self.total += seconds

    def cumulative(self) -> list[tuple[str, int]]:
        out, running = [], 0
        for le, n in zip([*map(str, RPC_BUCKETS), "+Inf"], self.counts):
            running += n
            out.append((le, running))
        return out


class RpcStats:
    """ttrpc call durations by (service, method, code): the shim's only metric state."""

    def __init__(self) -> None:
        self.series: dict[tuple[str, str, str], Series] = {}

    def observe(self, service: str, method: str, code: int, seconds: float) -> None:
        key = (service, method, code_name(code))
        s = self.series.get(key)
        if s is None:
            s = self.series[key] = Series()
        s.observe(seconds)


def _allow_ssl() -> None:
    """Lift shim/daemon.py's start-up block on ``import ssl``: prometheus-client's exposition
    module imports it (for its push-gateway TLS), and by the first scrape start-up is over."""
    if "ssl" in sys.modules and sys.modules["ssl"] is None:
        del sys.modules["ssl"]


class Collected:
    """A prometheus-client collector over the daemon and its `RpcStats`, read when scraped."""

    def __init__(self, daemon: Any, stats: RpcStats) -> None:
        self.daemon, self.stats = daemon, stats

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily

        rpc = HistogramMetricFamily("fractal_shim_rpc_duration_seconds",
                                    "ttrpc calls this shim answered, by service, method and status",
                                    labels=["service", "method", "code"])
        for labels, s in sorted(self.stats.series.items()):
            rpc.add_metric(list(labels), s.cumulative(), s.total)
        yield rpc
        service = getattr(self.daemon, "service", None)
        sandbox = getattr(self.daemon, "sandbox", None)
        containers = getattr(getattr(service, "tasks", None), "containers", {}) or {}
        yield GaugeMetricFamily("fractal_shim_containers", "Containers this shim's sandbox runs", len(containers))
        info = GaugeMetricFamily("fractal_shim_sandbox_info", "The sandbox's mode (value 1)", labels=["mode", "agent"])
        info.add_metric([str(getattr(sandbox, "mode", "unknown")), str(getattr(sandbox, "agent_mode", "") or "")], 1)
        yield info
        timings = getattr(sandbox, "timings", None)
        if isinstance(timings, dict) and timings:
            boot = GaugeMetricFamily("fractal_shim_vm_boot_seconds",
                                     "VM boot timeline: seconds from the boot's start to each phase",
                                     labels=["phase"])
            for phase in BOOT_PHASES:
                if isinstance(timings.get(phase), (int, float)):
                    boot.add_metric([phase], float(timings[phase]))
            yield boot


class ShimMetrics:
    def __init__(self, daemon: Any = None) -> None:
        self.daemon = daemon
        self.stats = RpcStats()
        self._registry: Any = None

    def observe(self, service: str, method: str, code: int, seconds: float) -> None:
        self.stats.observe(service, method, code, seconds)

    def text(self) -> str:
        """The exposition text (prometheus-client imported on the first call)."""
        _allow_ssl()
        from prometheus_client import CollectorRegistry, generate_latest

        if self._registry is None:
            self._registry = CollectorRegistry()
            self._registry.register(Collected(self.daemon, self.stats))
        return generate_latest(self._registry).decode()

    def methods(self) -> dict[str, tuple[type, Any]]:
        from google.protobuf import empty_pb2, wrappers_pb2

        async def scrape(_req: Any, _ctx: Any) -> Any:
            return wrappers_pb2.StringValue(value=self.text())

        return {"Scrape": (empty_pb2.Empty, scrape)}


def install(daemon: Any) -> ShimMetrics | None:
    """Measure ``daemon.server``'s calls and serve ``Scrape`` on it.  Never fails the daemon:
    on any error the shim runs without metrics."""
    try:
        from shim.errors import at_edge  # errors answered like every other shim service's

        metrics = ShimMetrics(daemon)
        daemon.server.register(SERVICE, at_edge(metrics.methods()))
        daemon.server.observer = metrics.observe
        return metrics
    except Exception as exc:  # noqa: BLE001 - metrics are optional, the sandbox is not
        log.warning("metrics off: %s", exc)
        return None
