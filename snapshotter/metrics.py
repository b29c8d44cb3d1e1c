"""The snapshotter's Prometheus metrics: RPC latency per method, and the repo's size and sharing.

* RPC latency: one gRPC server interceptor (`RpcTimer`) times every Snapshots call, labelled
  with the method and the gRPC status code it ended with -- no servicer method is touched, so a
  new RPC is measured without anyone remembering to.
* The repo's figures (`repo_figures`, pure) are computed at scrape time from the repo's own
  bookkeeping (`Repo.layers()`, `Repo.list()`), in a worker thread like List: a gauge kept up to
  date by every Commit/Remove would spread metrics through the store.

Everything lives in a per-process `CollectorRegistry` (never prometheus-client's global one,
which would also export the process collector of whichever library imported it first and make
two snapshotters in one test process collide).  Names and meanings: docs/metrics.md.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ccpu.repo import Repo
from ccpu.repo.model import LayerInfo, SnapshotInfo

log = logging.getLogger(__name__)

#: Snapshots calls take from ~100 µs (Stat) to seconds (Commit of a large layer, Cleanup)
RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class RepoFigures:
    layers: int
    layer_bytes: int  # unpacked, once each
    snapshots_by_kind: dict[str, int]
    shared_layers: int  # used by more than one snapshot
    cross_namespace_layers: int  # used by snapshots of more than one containerd namespace
    one_copy_per_snapshot_bytes: int  # what per-snapshot copies (overlayfs snapshotter) would take

    @property
    def saved_bytes(self) -> int:
        return self.one_copy_per_snapshot_bytes - self.layer_bytes


def _namespace(snapshot_name: str) -> str:
    """containerd's proxy keys are ``<namespace>/<n>/<name>``."""
    return snapshot_name.split("/", 1)[0]


def repo_figures(layers: Iterable[LayerInfo], snapshots: Iterable[SnapshotInfo]) -> RepoFigures:
    """The repo's size and sharing, as `fractal repo du` counts them (pins are not users)."""
    n = size = shared = cross = would_be = 0
    for la in layers:
        users = [u for u in la.users if not u.startswith("pin:")]
        n += 1
        size += la.size
        would_be += la.size * max(1, len(users))
        shared += len(users) > 1
        cross += len({_namespace(u) for u in users}) > 1
    kinds: dict[str, int] = {}
    for s in snapshots:
        kind = getattr(s.kind, "name", str(s.kind)).lower()
        kinds[kind] = kinds.get(kind, 0) + 1
    return RepoFigures(n, size, kinds, shared, cross, would_be)


class RepoCollector(Collector):
    """Gauges of the repo, read when scraped."""

    def __init__(self, repo: Repo) -> None:
        self.repo = repo

    def collect(self) -> Iterator[GaugeMetricFamily]:
        f = repo_figures(self.repo.layers(), list(self.repo.list()))
        yield GaugeMetricFamily("fractal_repo_layers", "Unpacked layers in the repo (each stored once)", f.layers)
        yield GaugeMetricFamily("fractal_repo_layer_bytes", "Bytes of the repo's unpacked layers", f.layer_bytes)
        kinds = GaugeMetricFamily("fractal_repo_snapshots", "Snapshots containerd holds in the repo", labels=["kind"])
        for kind in ("committed", "active", "view"):
            kinds.add_metric([kind], f.snapshots_by_kind.get(kind, 0))
        yield kinds
        yield GaugeMetricFamily("fractal_repo_shared_layers", "Layers used by more than one snapshot",
                                f.shared_layers)
        yield GaugeMetricFamily("fractal_repo_cross_namespace_layers",
                                "Layers used by snapshots of more than one containerd namespace",
                                f.cross_namespace_layers)
        yield GaugeMetricFamily("fractal_repo_saved_bytes",
                                "Bytes one copy per snapshot would take beyond what the repo stores",
                                f.saved_bytes)


class Metrics:
    """The snapshotter's registry and what feeds it."""

    def __init__(self, repo: Repo | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.rpc_seconds = Histogram(
            "fractal_snapshotter_rpc_duration_seconds", "Snapshots RPCs served to containerd, by method and status",
            ["method", "code"], buckets=RPC_BUCKETS, registry=self.registry)
        if repo is not None:
            self.registry.register(RepoCollector(repo))

    def observe(self, method: str, code: str, seconds: float) -> None:
        self.rpc_seconds.labels(method, code).observe(seconds)

    async def render(self) -> bytes:
        """The exposition text; in a thread, since the repo collector reads SQLite and takes the repo lock."""
        return await asyncio.to_thread(generate_latest, self.registry)


def _code(context: Any, exc: BaseException | None) -> str:
    """The status a call ended with: what the servicer set or aborted with, else OK / UNKNOWN."""
    code = None
    try:
        code = context.code()
    except Exception:  # noqa: BLE001 - an older grpc without ServicerContext.code()
        pass
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int) and code:
        return next((c.name for c in grpc.StatusCode if c.value[0] == code), str(code))
    if exc is None:
        return "OK"
    return "CANCELLED" if isinstance(exc, asyncio.CancelledError) else "UNKNOWN"


class RpcTimer(grpc.aio.ServerInterceptor):
    """Times every unary and server-streaming call (the Snapshots service has no other kind)."""

    def __init__(self, observe: Callable[[str, str, float], None]) -> None:
        self._observe = observe

    def _record(self, method: str, context: Any, exc: BaseException | None, t0: float) -> None:
        try:
            self._observe(method, _code(context, exc), time.perf_counter() - t0)
        except Exception:  # noqa: BLE001 - metrics never fail a call
            log.debug("metrics: observing %s failed", method, exc_info=True)

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method.rsplit("/", 1)[-1]
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request: Any, context: Any) -> Any:
                t0, exc = time.perf_counter(), None
                try:
                    return await inner(request, context)
                except BaseException as e:
                    exc = e
                    raise
                finally:
                    self._record(method, context, exc, t0)

            return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer,
                                                       handler.response_serializer)
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def stream(request: Any, context: Any) -> Any:
                t0, exc = time.perf_counter(), None
                try:
                    async for item in inner_stream(request, context):
                        yield item
                except BaseException as e:
                    exc = e
                    raise
                finally:
                    self._record(method, context, exc, t0)

            return grpc.unary_stream_rpc_method_handler(stream, handler.request_deserializer,
                                                        handler.response_serializer)
        return handler
