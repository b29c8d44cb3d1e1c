"""The snapshotter, shim and nerdctl integration suites again, on containerd 2.x (docs/compat.md).

containerd 2.x is built by hack/peers.sh (setup step 6) into $FRACTAL_CACHE/peers.  The suites run
in a child pytest with FRACTAL_CONTAINERD_VERSION=2, so every FractalEnv there starts the 2.x
daemon with a ``version = 3`` config.  Without the 2.x build this module skips -- except under CI,
where setup is supposed to have built it.

Plus two checks of 2.x specifics the suites rely on: the config the harness renders is accepted
as-is (no migration from an older version), and ``ctr images pull`` through the 2.x *transfer
service* (its default) unpacks into ``--snapshotter fractal`` with the ``snapshot.ref`` label and
honours ``--plain-http``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hack.containerd_env import FractalEnv, peer_missing, tail

REPO = Path(__file__).resolve().parents[2]
ON_CI = os.environ.get("CI", "").lower() not in ("", "0", "false")
SUITES = ("tests/integration/test_snapshotter.py", "tests/integration/test_shim.py",
          "tests/integration/test_nerdctl.py")  # nerdctl in host and VM mode, on 2.x too


@pytest.fixture(scope="module")
def containerd2() -> None:
    why = peer_missing("containerd2")
    if why:
        if ON_CI:
            pytest.fail(f"containerd 2.x should have been built by hack/setup.sh: {why}", pytrace=False)
        pytest.skip(why)


@pytest.fixture(scope="module")
def env2(containerd2: None) -> FractalEnv:
    with FractalEnv(containerd="2") as env:
        yield env


def test_containerd2_env_starts_with_v3_config(env2: FractalEnv) -> None:
    r = env2.ctr("version", namespace=None)
    server = r.stdout.split("Server:", 1)[1]
    assert re.search(r"Version:\s+v?2\.", server), r.stdout
    assert re.match(r"version = [34]\n", env2.containerd.config_path.read_text())
    log = env2.containerd.log_path.read_text(errors="replace")
    # 2.x migrates older config versions with a warning: ours must need no migration
    assert "Configuration migrated" not in log, tail(env2.containerd.log_path)
    plugins = env2.ctr("plugins", "ls", namespace=None).stdout
    assert re.search(r"io\.containerd\.snapshotter\.v1\s+fractal\s+.*\bok\b", plugins), plugins
    assert "io.containerd.nri.v1" not in plugins or not re.search(r"nri\s+.*\bok\b", plugins), plugins


def test_transfer_service_pull_unpacks_into_fractal(env2: FractalEnv, registry) -> None:  # noqa: ANN001
    """2.x's `ctr images pull` (transfer service, no --local) + --plain-http + --snapshotter fractal."""
    ns = env2.new_namespace()
    try:
        ref = registry.ref("busybox")
        env2.pull(ref, namespace=ns)  # --plain-http --snapshotter fractal, transfer service
        snaps = env2.ctr("snapshots", "--snapshotter", "fractal", "ls", namespace=ns).stdout
        assert "Committed" in snaps, snaps
        # the unpacker labels every layer with containerd.io/snapshot.ref (our skip-unpack key)
        key = [line.split()[0] for line in snaps.splitlines()[1:] if line.strip()][0]
        info = env2.ctr("snapshots", "--snapshotter", "fractal", "info", key, namespace=ns).stdout
        assert "containerd.io/snapshot.ref" in info, info
        r = env2.run(ref, "c2", "echo", "hello-from-2x", namespace=ns,
                     runtime="io.containerd.fractal.v1")
        assert "hello-from-2x" in r.stdout
    finally:
        problems = env2.remove_namespace(ns)
        assert not problems, problems


def test_snapshotter_and_shim_suites_on_containerd2(containerd2: None) -> None:
    """`pytest test_snapshotter.py test_shim.py test_nerdctl.py` with FRACTAL_CONTAINERD_VERSION=2
    passes."""
    env = dict(os.environ, FRACTAL_CONTAINERD_VERSION="2")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", *SUITES, "-q", "-p", "no:cacheprovider",
                           "-o", "addopts=", "-rfEs", "--tb=short"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    took = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    summary = out.strip().splitlines()[-1] if out.strip() else "(no output)"
    print(f"containerd 2.x suites: {summary} in {took:.0f}s")
    if proc.returncode != 0:
        pytest.fail(f"snapshotter/shim suites fail on containerd 2.x ({took:.0f}s):\n"
                    + out[-12000:], pytrace=False)
    assert " passed" in summary and "skipped" not in summary, out[-4000:]


@pytest.mark.parametrize("peer,binary,version_args", [
    ("containerd2", "containerd", ("--version",)),
    ("containerd2", "ctr", ("--version",)),
    ("nerdctl", "nerdctl", ("--version",)),
    ("cri-tools", "crictl", ("--version",)),
    ("cri-tools", "critest", ("--version",)),
])
def test_peer_binaries_run(peer: str, binary: str, version_args: tuple[str, ...]) -> None:
    """Each peer hack/peers.sh built starts and names its pinned version."""
    from hack.containerd_env import peer_bin_dir

    why = peer_missing(peer)
    if why:
        if ON_CI:
            pytest.fail(f"{peer} should have been built by hack/setup.sh: {why}", pytrace=False)
        pytest.skip(why)
    d = peer_bin_dir(peer)
    pinned = d.parent.name.rsplit("-", 1)[1].lstrip("v")  # <name>-v<version>
    r = subprocess.run([str(d / binary), *version_args], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and pinned in r.stdout + r.stderr, (r.returncode, r.stdout, r.stderr)
