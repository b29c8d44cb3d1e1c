"""The harness itself (hack/containerd_env.py) works -- without the fractal snapshotter.

These tests use containerd's built-in overlayfs snapshotter so they can pass before
snapshotter/server.py exists, and they check that teardown leaves no mounts or processes behind.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from hack.containerd_env import (
    CommandError,
    ContainerdConfig,
    FractalEnv,
    HarnessError,
    Snapshotter,
    _proc_table,
    mounts_under,
    shim_sockets_for,
)


def _procs_mentioning(*paths: Path) -> list[str]:
    return [f"{pid} {cmd}" for pid, (_, cmd) in _proc_table().items()
            if pid != os.getpid() and any(str(p) in cmd for p in paths)]


def test_overlayfs_pull_and_run(plain_env: FractalEnv, plain_namespace: str, registry) -> None:
    ref = registry.ref("busybox")
    plain_env.pull(ref, namespace=plain_namespace, snapshotter="overlayfs")
    r = plain_env.run(ref, "hello", "echo", "hello", snapshotter="overlayfs", namespace=plain_namespace)
    assert r.stdout.strip() == "hello"
    # --rm really removed the container and its active snapshot
    assert plain_env.ctr("containers", "ls", "-q", namespace=plain_namespace).stdout.strip() == ""


def test_ctr_failure_carries_output(plain_env: FractalEnv) -> None:
    with pytest.raises(CommandError) as info:
        plain_env.ctr("images", "pull", "--plain-http", "127.0.0.1:1/nope/nope:latest", timeout=30)
    assert "nope" in str(info.value) and "stderr" in str(info.value)


def test_teardown_leaves_nothing(registry) -> None:
    """A running container + a crashed containerd must still be cleaned up completely."""
    env = FractalEnv(snapshotter=False)
    with env:
        ns = env.new_namespace()
        ref = registry.ref("busybox")
        env.pull(ref, namespace=ns, snapshotter="overlayfs")
        env.run(ref, "sleeper", "sleep", "600", snapshotter="overlayfs", rm=False,
                namespace=ns, extra=["-d"])
        assert mounts_under(env.run_dir, env.root_dir), "a running container should have a rootfs mount"
        assert any("containerd-shim" in p for p in _procs_mentioning(env.run_dir)), "expected a shim"
        shim_socks = shim_sockets_for(env.address)
        assert shim_socks and all(p.exists() for p in shim_socks), shim_socks
        env.containerd.kill9()  # worst case: containerd gone, shim + container + mount left
    assert mounts_under(env.run_dir, env.root_dir) == []
    assert _procs_mentioning(env.run_dir, env.root_dir) == []
    assert not env.run_dir.exists() and not env.root_dir.exists()
    assert not any(p.exists() for p in shim_socks), "shim sockets left in /run/containerd/s"
    env.close()  # idempotent


def test_teardown_after_failed_start(tmp_path: Path) -> None:
    """A snapshotter that dies at start-up gives an error with its log, and nothing is left."""
    fake = tmp_path / "fake-python"
    fake.write_text("#!/bin/sh\necho 'boom: snapshotter exploded' >&2\nexit 3\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    env = FractalEnv(snapshotter=True, ready_timeout=5)
    assert env.snapshotter is not None
    env.snapshotter.python = str(fake)
    with pytest.raises(HarnessError) as info:
        env.start()
    assert "boom: snapshotter exploded" in str(info.value)
    assert not env.containerd.running()
    assert not env.run_dir.exists() and not env.root_dir.exists()


def test_config_wires_proxy_snapshotter(tmp_path: Path) -> None:
    cfg = ContainerdConfig(root=tmp_path / "r", state=tmp_path / "s", address=tmp_path / "c.sock",
                           snapshotter_address=tmp_path / "snap.sock")
    text = cfg.render()
    assert "version = 2" in text
    assert "[proxy_plugins.fractal]" in text and 'type = "snapshot"' in text
    assert f'address = "{tmp_path / "snap.sock"}"' in text
    assert '"io.containerd.grpc.v1.cri"' in text
    assert "/run/containerd" not in text and "/var/lib/containerd" not in text


def test_paths_are_short() -> None:
    """Shim/VM sockets may live in the bundle dir: keep room below the ~106 byte sun_path limit.

    containerd itself adds "io.containerd.runtime.v2.task/<ns>/<id>/", so our prefix must be tiny;
    with test-sized names (namespace "t" + 6 hex, a 16-char id) a socket name still fits.
    """
    env = FractalEnv(snapshotter=False)
    assert len(str(env.containerd.config.state)) <= 30
    assert len(str(env.address)) <= 45
    bundle = env.containerd.config.state / "io.containerd.runtime.v2.task" / env.new_namespace() / ("c" * 16)
    assert len(str(bundle / "shim.sock")) < 100, bundle
