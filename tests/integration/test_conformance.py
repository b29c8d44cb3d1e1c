"""containerd's own conformance checks against the fractal snapshotter, through Go.

hack/conformance/ is a small Go module that imports containerd v1.6 as a library
(the version Debian 12 ships) and runs:

* ``TestSnapshotterSuite``: containerd's snapshotter testsuite
  (snapshots/testsuite.SnapshotterSuite) through containerd's own proxy client,
  one ``python3 -m snapshotter.server`` per subtest; no containerd daemon.
* ``TestRemoteSnapshotUnpack``: containerd's client-side unpacker (the one nerdctl
  and CRI use, which sends ``containerd.io/snapshot.ref``) pulling one image into
  two namespaces of the session's containerd; the second must extract nothing.

The first run downloads containerd's Go dependencies into the module cache and
builds them (about a minute and a half on a 2-core machine); later runs reuse
GOMODCACHE and GOCACHE.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from hack.containerd_env import FractalEnv

REPO = Path(__file__).resolve().parents[2]
ON_CI = os.environ.get("CI", "").lower() not in ("", "0", "false")  # as in conftest.py
MODULE = REPO / "hack" / "conformance"
GO_TIMEOUT = 1800.0  # first build fetches and compiles containerd's dependencies
TAIL_LINES = 120


def _go() -> str:
    go = shutil.which("go") or next((p for p in ("/usr/local/go/bin/go", "/usr/lib/go/bin/go") if os.access(p, os.X_OK)), None)
    if go is None:
        reason = "`go` is not on PATH: containerd's conformance suite runs as a Go test"
        if ON_CI:
            pytest.fail(f"integration prerequisite missing on CI: {reason}", pytrace=False)
        pytest.skip(reason)
    return go


def _go_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    # -mod=mod: go.sum may need entries for the host's Go version; the module cache and
    # build cache stay in their default, persistent locations.
    env["GOFLAGS"] = "-mod=mod -buildvcs=false"
    env["FRACTAL_SRC"] = str(REPO)
    env.update(extra)
    return env


def _tail(text: str, lines: int = TAIL_LINES) -> str:
    # The suite dumps whole directory trees on failure: keep the lines that say why.
    kept = [ln for ln in text.splitlines() if not re.search(r"helpers(_unix)?\.go:\d+: (unmount |[-dlS][rwx-]{9})", ln)]
    return "\n".join(kept[-lines:])


def _run_go(args: list[str], env: dict[str, str], timeout: float = GO_TIMEOUT) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run([_go(), *args], cwd=MODULE, env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"`go {' '.join(args)}` timed out after {timeout:.0f}s\n{_tail(out)}", pytrace=False)


@pytest.fixture(scope="module")
def go_built() -> float:
    """Compile the test binary once (downloads dependencies on a fresh machine); returns seconds."""
    t0 = time.monotonic()
    proc = _run_go(["test", "-count=1", "-run", "^$", "./..."], _go_env())
    took = time.monotonic() - t0
    print(f"hack/conformance: go build of the containerd test binary took {took:.1f}s", file=sys.stderr)
    assert proc.returncode == 0, f"building hack/conformance failed ({took:.0f}s):\n{_tail(proc.stdout)}"
    return took


def _failed_subtests(output: str) -> list[str]:
    return re.findall(r"--- FAIL: (\S+)", output)


def _check(proc: subprocess.CompletedProcess[str], test: str) -> None:
    out = proc.stdout
    failed = _failed_subtests(out)
    assert proc.returncode == 0, (
        f"go test {test} failed (exit {proc.returncode}); failing: {', '.join(failed) or '?'}\n{_tail(out)}"
    )
    if re.search(rf"--- SKIP: {test} ", out):
        reason = re.search(rf"--- SKIP: {test} .*\n\s+\S+\.go:\d+: (.*)", out)
        pytest.fail(f"go test skipped {test}: {reason.group(1) if reason else '?'}", pytrace=False)
    assert re.search(rf"--- PASS: {test} ", out), f"go test did not run {test}:\n{_tail(out)}"


def test_containerd_snapshotter_testsuite(go_built: float) -> None:
    """containerd's snapshots/testsuite, all subtests, against fractal via the proxy client."""
    # A short TMPDIR: each subtest's snapshotter socket lives under it (108-byte limit).
    tmp = Path(tempfile.mkdtemp(prefix="fractal-conf-", dir="/tmp"))
    try:
        proc = _run_go(["test", "-count=1", "-v", "-run", "^TestSnapshotterSuite$", "./..."],
                       _go_env(TMPDIR=str(tmp)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _check(proc, "TestSnapshotterSuite")


def test_containerd_unpacker_skips_known_layers(go_built: float, fenv: FractalEnv, registry: Any) -> None:
    """containerd's client unpacker: a second namespace's pull finds every layer and extracts none."""
    proc = _run_go(["test", "-count=1", "-v", "-run", "^TestRemoteSnapshotUnpack$", "./..."], _go_env(
        FRACTAL_CONTAINERD_ADDRESS=str(fenv.address),
        FRACTAL_TEST_IMAGE=registry.ref("edge"),
        FRACTAL_REPO_ROOT=str(fenv.snapshotter_root),
    ))
    for line in proc.stdout.splitlines():
        if "layer dirs:" in line or "namespace" in line:
            print(line.strip())
    _check(proc, "TestRemoteSnapshotUnpack")
