"""`fractal metrics`: the host's fractal metrics in one Prometheus exposition -- the
snapshotter's (its HTTP endpoint) and every shim's (``fractal.metrics.v1.Metrics/Scrape`` on
its ttrpc socket, found through the sandbox records), each shim's series labelled with its
``namespace`` and ``sandbox``.  Printed once, or served with ``--listen`` for Prometheus (what
kata-monitor does for kata's shims).  Why shims are asked over ttrpc: shim/promexport.py.

A source that does not answer is reported by ``fractal_scrape_up{source,...} 0`` (and a warning
on stderr), never by failing the whole answer.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

SHIM_SCRAPE_TIMEOUT = 5.0


def default_snapshotter_metrics() -> str:
    from ..defaults import DEFAULT_SNAPSHOTTER_ADDRESS

    address = os.environ.get("FRACTAL_SNAPSHOTTER_ADDRESS", DEFAULT_SNAPSHOTTER_ADDRESS)
    base = address[:-len(".sock")] if address.endswith(".sock") else address
    return os.environ.get("FRACTAL_SNAPSHOTTER_METRICS_ADDRESS") or f"unix:{base}-metrics.sock"


@dataclass
class Source:
    """One scraped endpoint: its text, or why there is none; labels added to its series."""

    kind: str  # snapshotter | shim
    labels: dict[str, str] = field(default_factory=dict)
    text: str | None = None
    error: str | None = None


def scrape_shim(address: str, timeout: float = SHIM_SCRAPE_TIMEOUT) -> str:
    import asyncio

    from google.protobuf import empty_pb2, wrappers_pb2

    from ..ttrpc import Client

    async def call() -> str:
        client = await Client.connect(address, timeout=timeout)
        try:
            resp = await client.call("fractal.metrics.v1.Metrics", "Scrape", empty_pb2.Empty(),
                                     wrappers_pb2.StringValue, timeout=timeout)
        finally:
            await client.close()
        return resp.value

    return asyncio.run(call())


def gather(snapshotter: str | None, namespace: str | None = None) -> list[Source]:
    """Scrape the snapshotter and every live shim with a sandbox record (all namespaces, or one)."""
    from .. import promhttp, sandboxes

    out: list[Source] = []
    if snapshotter:
        src = Source("snapshotter")
        try:
            addr = promhttp.parse_address(snapshotter)
            src.text = promhttp.scrape(addr) if addr else None  # type: ignore[arg-type]
        except (OSError, ValueError) as e:
            src.error = f"snapshotter metrics at {snapshotter}: {e}"
        out.append(src)
    base = sandboxes.run_dir() / "sandboxes"
    namespaces = [namespace] if namespace else sorted(p.name for p in base.iterdir() if p.is_dir()) \
        if base.is_dir() else []
    for ns in namespaces:
        for group, rec in sorted(sandboxes.read_all(ns).items()):
            if not rec.alive or not rec.address:
                continue
            src = Source("shim", {"namespace": ns, "sandbox": group})
            try:
                src.text = scrape_shim(rec.address)
            except Exception as e:  # noqa: BLE001 - one shim's failure is one series' 0
                src.error = f"shim of {ns}/{group} at {rec.address}: {type(e).__name__}: {e}"
            out.append(src)
    return out


class Merged:
    """A prometheus-client collector over scraped sources: families of the same name are
    merged (a shim's series gain its labels), plus ``fractal_scrape_up`` per source."""

    def __init__(self, sources: list[Source]) -> None:
        self.sources = sources

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily
        from prometheus_client.parser import text_string_to_metric_families
        from prometheus_client.samples import Sample

        families: dict[str, Any] = {}
        up = GaugeMetricFamily("fractal_scrape_up", "1 if `fractal metrics` could scrape the source",
                               labels=["source", "namespace", "sandbox"])
        for src in self.sources:
            up.add_metric([src.kind, src.labels.get("namespace", ""), src.labels.get("sandbox", "")],
                          0 if src.text is None else 1)
            for fam in text_string_to_metric_families(src.text or ""):
                into = families.setdefault(fam.name, fam if not src.labels else None)
                if into is None:
                    into = families[fam.name] = type(fam)(fam.name, fam.documentation, fam.type, fam.unit)
                if into is not fam:
                    into.samples += [Sample(s.name, {**s.labels, **src.labels}, s.value, s.timestamp,
                                            s.exemplar) for s in fam.samples]
        yield from families.values()
        yield up


def render(sources: list[Source]) -> bytes:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(Merged(sources))
    return generate_latest(registry)


def cmd_metrics(args: argparse.Namespace) -> int:
    snap = None if args.snapshotter in ("", "none") else args.snapshotter
    if not args.listen:
        sources = gather(snap, args.namespace)
        for src in sources:
            if src.error:
                print(f"fractal metrics: {src.error}", file=sys.stderr)
        sys.stdout.write(render(sources).decode())
        return 0
    return serve(args.listen, snap, args.namespace)


def serve(listen: str, snapshotter: str | None, namespace: str | None) -> int:
    import asyncio

    from .. import promhttp

    address = promhttp.parse_address(listen)
    if address is None:
        raise promhttp.AddressError("--listen needs an address")

    async def main() -> None:
        async def answer() -> bytes:
            return await asyncio.to_thread(lambda: render(gather(snapshotter, namespace)))

        server = await promhttp.serve(address, answer)
        print(f"fractal metrics: serving http on {address}/metrics", file=sys.stderr, flush=True)
        async with server:
            await server.serve_forever()

    asyncio.run(main())
    return 0


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("--snapshotter", default=default_snapshotter_metrics(), metavar="ADDR",
                   help="the snapshotter's metrics address (default %(default)s; "
                        "$FRACTAL_SNAPSHOTTER_METRICS_ADDRESS); none to skip it")
    p.add_argument("-n", "--namespace", default=None,
                   help="only the shims of this containerd namespace (default: all)")
    p.add_argument("--listen", default=None, metavar="ADDR",
                   help="serve the union for Prometheus at HOST:PORT or unix:/PATH instead of printing it")
    p.set_defaults(func=cmd_metrics)
