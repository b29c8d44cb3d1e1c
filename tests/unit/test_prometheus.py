"""Prometheus metrics: the exposition server (ccpu/promhttp.py), the snapshotter's figures and
RPC timing (snapshotter/metrics.py) through a real `fractal-snapshotter` serve() loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ccpu import promhttp
from ccpu.api.gen.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from ccpu.api.gen.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from ccpu.repo.model import Kind, LayerInfo, SnapshotInfo
from snapshotter import metrics as M
from snapshotter import server


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


@pytest.mark.parametrize("text,want", [
    ("unix:/run/x.sock", promhttp.Address(unix=Path("/run/x.sock"))),
    ("/run/x.sock", promhttp.Address(unix=Path("/run/x.sock"))),
    ("127.0.0.1:9595", promhttp.Address(host="127.0.0.1", port=9595)),
    ("[::1]:9595", promhttp.Address(host="::1", port=9595)),
    ("none", None), ("", None), (None, None),
])
def test_parse_address(text, want) -> None:  # noqa: ANN001
    assert promhttp.parse_address(text) == want


@pytest.mark.parametrize("bad", ["unix:run/x", "localhost", "h:99999", ":80", "h:x"])
def test_parse_address_refuses(bad: str) -> None:
    with pytest.raises(promhttp.AddressError):
        promhttp.parse_address(bad)


def _layer(lid: int, size: int, *users: str) -> LayerInfo:
    return LayerInfo(lid, f"sha256:{lid}", None, size, 1, 0, tuple(users), f"/r/layers/{lid}")


def test_repo_figures_count_sharing_like_repo_du() -> None:
    layers = [_layer(1, 100, "a/1/x", "b/2/x", "pin:c"), _layer(2, 10, "a/3/y", "a/4/y"), _layer(3, 5)]
    snaps = [SnapshotInfo("a/1/x", Kind.COMMITTED), SnapshotInfo("a/9/w", Kind.ACTIVE),
             SnapshotInfo("a/8/v", Kind.ACTIVE)]
    f = M.repo_figures(layers, snaps)
    assert (f.layers, f.layer_bytes, f.shared_layers, f.cross_namespace_layers) == (3, 115, 2, 1)
    assert f.snapshots_by_kind == {"committed": 1, "active": 2}
    assert f.one_copy_per_snapshot_bytes == 200 + 20 + 5 and f.saved_bytes == 110


def test_http_server_answers_get_metrics_only(tmp_path: Path) -> None:
    async def main() -> None:
        addr = promhttp.Address(unix=tmp_path / "m.sock")
        srv = await promhttp.serve(addr, lambda: asyncio.sleep(0, b"x_total 1\n"))
        try:
            assert (tmp_path / "m.sock").stat().st_mode & 0o777 == 0o600
            assert await asyncio.to_thread(promhttp.scrape, addr) == "x_total 1\n"
            r, w = await asyncio.open_unix_connection(str(tmp_path / "m.sock"))
            w.write(b"GET /other HTTP/1.1\r\n\r\n")
            assert (await r.read()).startswith(b"HTTP/1.1 404")
        finally:
            srv.close()

    asyncio.run(main())


class Snapshotter:
    """`snapshotter.server.serve` on a temporary repo, in a thread with its own event loop."""

    def __init__(self, tmp_path: Path) -> None:
        self.address = tmp_path / "snap.sock"
        self.metrics = promhttp.parse_address(server.default_metrics_address(self.address))
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        async def run() -> None:
            self.ready = asyncio.Event()
            self.task = asyncio.current_task()
            waiter = asyncio.ensure_future(self.ready.wait())
            waiter.add_done_callback(lambda _: ready.set())
            await server.serve(tmp_path / "repo", self.address, ready=self.ready)

        self.thread = threading.Thread(target=self._run, args=(run(),))
        self.thread.start()
        assert ready.wait(20), "snapshotter did not start"

    def _run(self, coro) -> None:  # noqa: ANN001
        try:
            self.loop.run_until_complete(coro)
        except asyncio.CancelledError:
            pass

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.stops[0])
        self.thread.join(20)
        assert not self.thread.is_alive(), "snapshotter did not stop"
        self.loop.close()
        assert not (self.address.parent / "snap-metrics.sock").exists(), "metrics socket left behind"


@pytest.fixture
def snapshotter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Snapshotter]:
    # serve() stops on SIGTERM; a loop outside the main thread takes no signal handler, so keep
    # the callback and call it as the signal would
    stops: list = []
    monkeypatch.setattr(asyncio.unix_events._UnixSelectorEventLoop, "add_signal_handler",
                        lambda self, sig, cb, *a: stops.append(cb))
    s = Snapshotter(tmp_path)
    s.stops = stops
    yield s
    s.close()


def test_snapshotter_rpcs_and_repo_are_scraped(snapshotter: Snapshotter) -> None:
    assert str(snapshotter.metrics) == f"unix:{snapshotter.address.parent}/snap-metrics.sock"
    with grpc.insecure_channel(f"unix:{snapshotter.address}") as ch:
        stub = pb_grpc.SnapshotsStub(ch)
        stub.Prepare(pb.PrepareSnapshotRequest(key="default/1/c1"), timeout=10)
        with pytest.raises(grpc.RpcError) as e:
            stub.Stat(pb.StatSnapshotRequest(key="default/nope"), timeout=10)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert [i.name for r in stub.List(pb.ListSnapshotsRequest(), timeout=10) for i in r.info] == ["default/1/c1"]
    got = samples(promhttp.scrape(snapshotter.metrics))
    hist = "fractal_snapshotter_rpc_duration_seconds_count"
    assert got[(hist, (("code", "OK"), ("method", "Prepare")))] == 1
    assert got[(hist, (("code", "NOT_FOUND"), ("method", "Stat")))] == 1
    assert got[(hist, (("code", "OK"), ("method", "List")))] == 1
    assert got[("fractal_repo_snapshots", (("kind", "active"),))] == 1
    assert got[("fractal_repo_layers", ())] == 0
    assert not any(name.startswith("process_") or name.startswith("python_") for name, _ in got), \
        "the global registry's collectors leaked in"


def test_shim_metrics_cost_nothing_at_start_and_count_calls() -> None:
    import subprocess
    import sys

    code = ("import sys; sys.modules['ssl'] = None; import shim.promexport as P; "
            "assert 'prometheus_client' not in sys.modules; m = P.ShimMetrics(); "
            "m.observe('containerd.task.v2.Task', 'Create', 0, 0.004); "
            "m.observe('containerd.task.v2.Task', 'Create', 5, 0.0005); print(m.text())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0, r.stderr  # prometheus-client imported at the scrape, ssl block lifted
    got = samples(r.stdout)
    base = (("method", "Create"), ("service", "containerd.task.v2.Task"))
    assert got[("fractal_shim_rpc_duration_seconds_count", (("code", "OK"), *base))] == 1
    assert got[("fractal_shim_rpc_duration_seconds_bucket", (("code", "OK"), ("le", "0.0025"), *base))] == 0
    assert got[("fractal_shim_rpc_duration_seconds_bucket", (("code", "OK"), ("le", "0.005"), *base))] == 1
    assert got[("fractal_shim_rpc_duration_seconds_bucket", (("code", "NOT_FOUND"), ("le", "0.0005"), *base))] == 1


def test_merge_labels_shim_series_and_reports_dead_sources() -> None:
    from ccpu.cli import metrics as CM

    shim_text = 'fractal_shim_containers 2.0\n'
    srcs = [CM.Source("snapshotter", text="fractal_repo_layers 3.0\n"),
            CM.Source("shim", {"namespace": "ns", "sandbox": "a"}, text=shim_text),
            CM.Source("shim", {"namespace": "ns", "sandbox": "b"}, text=shim_text),
            CM.Source("shim", {"namespace": "ns", "sandbox": "c"}, error="gone")]
    got = samples(CM.render(srcs).decode())
    assert got[("fractal_repo_layers", ())] == 3
    assert got[("fractal_shim_containers", (("namespace", "ns"), ("sandbox", "a")))] == 2
    assert got[("fractal_shim_containers", (("namespace", "ns"), ("sandbox", "b")))] == 2
    assert got[("fractal_scrape_up", (("namespace", "ns"), ("sandbox", "c"), ("source", "shim")))] == 0
