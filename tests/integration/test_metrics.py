"""Prometheus metrics through a real containerd (issue 14 item 7): pull with the fractal
snapshotter, run a container on the fractal shim, scrape the snapshotter's endpoint and the
shim (through `fractal metrics`); RPC histograms moved, the repo is measured."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from ccpu import promhttp
from hack.containerd_env import FractalEnv

REPO = Path(__file__).resolve().parents[2]
RUNTIME = "io.containerd.fractal.v1"


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]


def value(got: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    return sum(v for n, lab, v in got if n == name and all(lab.get(k) == x for k, x in labels.items()))


def snapshotter_metrics(fenv: FractalEnv) -> promhttp.Address:
    addr = promhttp.parse_address(f"unix:{fenv.snapshotter_address.with_name('snap-metrics.sock')}")
    assert addr is not None
    return addr


def fractal_metrics(fenv: FractalEnv, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FRACTAL_RUN_DIR": str(fenv.fractal_run_dir),
           "FRACTAL_SNAPSHOTTER_METRICS_ADDRESS": str(snapshotter_metrics(fenv))}
    return subprocess.run([sys.executable, "-m", "ccpu.cli", "metrics", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=60)


def test_scrape_snapshotter_and_shim(fenv: FractalEnv, registry, namespace: str) -> None:
    before = samples(promhttp.scrape(snapshotter_metrics(fenv)))
    rpc = "fractal_snapshotter_rpc_duration_seconds_count"
    ref = registry.ref("busybox")
    fenv.pull(ref, namespace=namespace)
    fenv.run(ref, "metrics-c", "sleep", "300", rm=False, namespace=namespace, runtime=RUNTIME, extra=["-d"])
    try:
        after = samples(promhttp.scrape(snapshotter_metrics(fenv)))
        for method in ("Prepare", "Commit", "Mounts"):
            assert value(after, rpc, method=method, code="OK") > value(before, rpc, method=method, code="OK"), method
        assert value(after, "fractal_repo_layer_bytes") > 0 and value(after, "fractal_repo_layers") >= 1
        assert value(after, "fractal_repo_snapshots", kind="active") >= 1

        r = fractal_metrics(fenv, "-n", namespace)
        assert r.returncode == 0, r.stderr
        got = samples(r.stdout)
        shim = dict(namespace=namespace, sandbox="metrics-c")
        assert value(got, "fractal_scrape_up", source="shim", **shim) == 1, r.stderr
        assert value(got, "fractal_scrape_up", source="snapshotter") == 1, r.stderr
        create = value(got, "fractal_shim_rpc_duration_seconds_count", method="Create", code="OK", **shim)
        assert create == 1 and value(got, "fractal_shim_rpc_duration_seconds_count", method="Start", **shim) == 1
        assert value(got, "fractal_shim_containers", **shim) == 1
        assert value(got, "fractal_shim_sandbox_info", mode="host", **shim) == 1
        assert value(got, "fractal_repo_layer_bytes") > 0  # the snapshotter's series, in the same answer
        # a second scrape sees the first Scrape call counted: the histogram is live
        again = samples(fractal_metrics(fenv, "-n", namespace).stdout)
        assert value(again, "fractal_shim_rpc_duration_seconds_count", method="Scrape", **shim) >= 1
    finally:
        fenv.ctr("tasks", "kill", "-s", "SIGKILL", "metrics-c", namespace=namespace, check=False)
        for _ in range(50):
            if fenv.ctr("tasks", "delete", "metrics-c", namespace=namespace, check=False).returncode == 0:
                break
            time.sleep(0.1)
        fenv.ctr("containers", "delete", "metrics-c", namespace=namespace, check=False)


def test_unreachable_sources_are_series_not_failures(fenv: FractalEnv, tmp_path: Path) -> None:
    env = {**os.environ, "FRACTAL_RUN_DIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "ccpu.cli", "metrics", "--snapshotter", f"unix:{tmp_path}/no.sock"],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert value(samples(r.stdout), "fractal_scrape_up", source="snapshotter") == 0
    assert "snapshotter metrics at" in r.stderr and "Traceback" not in r.stderr
