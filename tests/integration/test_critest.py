"""cri-tools' critest (CRI validation, built by hack/peers.sh) through hack/critest.py on a handful
of core specs, so the CRI path of the shim stays covered: runtime version/conditions, pod sandbox
lifecycle, container lifecycle and exec, exec streaming, multiple containers in one pod over a CNI
bridge (host mode).  The full suite is ``python3 hack/critest.py`` (docs/cri.md has its report).

Runs on containerd 1.6 and 2.x (~10 s each here).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hack.containerd_env import CNI_PLUGIN_DIR, peer_missing

REPO = Path(__file__).resolve().parents[2]
ON_CI = os.environ.get("CI", "").lower() not in ("", "0", "false")

#: ginkgo focus regexes (one spec group each; all run in one critest invocation)
FOCUS = [
    r"Runtime info runtime should support returning runtime info",
    r"PodSandbox runtime should support basic operations on PodSandbox runtime should support (running|stopping|removing) PodSandbox",
    r"Container runtime should support basic operations on container runtime should support (creating|starting|stopping|removing running) container",
    r"Container runtime should support basic operations on container runtime should support execSync \[",
    r"Streaming runtime should support streaming interfaces runtime should support exec with tty=false",
    r"Multiple Containers \[Conformance\] when running multiple containers in a pod should support network",
]
#: specs the focus above selects (a typo in a regex must not turn the test into a no-op)
EXPECTED_SPECS = 12


def _need(why: str | None, ci_note: str) -> None:
    if why:
        if ON_CI:
            pytest.fail(f"{ci_note}: {why}", pytrace=False)
        pytest.skip(why)


@pytest.mark.parametrize("version", ["1", "2"], ids=["containerd1", "containerd2"])
def test_critest_core_specs(version: str, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        _need("needs root (containerd, CNI)", "CI runs as root")
    _need(peer_missing("cri-tools"), "cri-tools should have been built by hack/setup.sh")
    if version == "2":
        _need(peer_missing("containerd2"), "containerd 2.x should have been built by hack/setup.sh")
    for tool in ("umoci", "skopeo", "docker-registry", "gcc"):
        _need(None if shutil.which(tool) else f"{tool} not on PATH", "hack/setup.sh installs it")
    _need(None if (CNI_PLUGIN_DIR / "bridge").is_file() else f"no CNI plugins in {CNI_PLUGIN_DIR}",
          "hack/setup.sh installs containernetworking-plugins")
    report = tmp_path / "report.json"
    cmd = [sys.executable, str(REPO / "hack" / "critest.py"), "--containerd", version, "--parallel", "1",
           "--timeout", "240", "--json", str(report)]
    for f in FOCUS:
        cmd += ["--focus", f]
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=420)
    took = time.monotonic() - t0
    print(f"critest core specs on containerd {version}: {took:.1f}s\n{r.stdout[-3000:]}")
    assert report.is_file(), f"no report (exit {r.returncode}):\n{r.stderr[-4000:]}\n{r.stdout[-2000:]}"
    s = json.loads(report.read_text())["summary"]
    failed = "\n".join(f"{n}: {why[:500]}" for n, why, _ in s["failed"])
    assert not s["failed"], f"critest failures:\n{failed}\n--- stderr ---\n{r.stderr[-2000:]}"
    assert len(s["passed"]) == EXPECTED_SPECS, s["passed"]
    assert r.returncode == 0, r.stderr[-2000:]
