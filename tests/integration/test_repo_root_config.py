"""The repo root from the fractal config file alone (issue 14): a snapshotter on a non-default
--root, a config file naming it, containerd's environment without FRACTAL_ROOT -> `ctr run`
through the fractal shim works.  With the file not naming it, the shim's error says where its
root came from and how to set it."""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

import pytest

from hack.containerd_env import (CommandError, ContainerdConfig, DISABLED_PLUGINS, PrivateContainerd,
                                 Snapshotter, kill_processes_mentioning, unmount_all)

RUNTIME = "io.containerd.fractal.v1"


def test_root_from_the_config_file_reaches_the_shim(tmp_path: Path, registry) -> None:
    run = Path("/run/fractal-test") / f"root-{secrets.token_hex(3)}"
    run.mkdir(parents=True)
    snap_root, snap_sock = tmp_path / "srv" / "x", run / "snap.sock"
    fconf = tmp_path / "fractal.toml"
    fconf.write_text(f'mode = "host"\nroot = "{snap_root}"\n')
    cfg = ContainerdConfig(root=tmp_path / "croot", state=run / "st", address=run / "c.sock", temp=tmp_path / "ctmp",
                           opt_path=tmp_path / "opt", snapshotter_address=snap_sock, disabled_plugins=DISABLED_PLUGINS)
    snap = Snapshotter(snap_root, snap_sock, tmp_path / "snapshotter.log")
    cd = PrivateContainerd(cfg, tmp_path / "containerd.toml", tmp_path / "containerd.log",
                           extra_env={"FRACTAL_ROOT": "", "FRACTAL_CONFIG": str(fconf),
                                      "FRACTAL_RUN_DIR": str(run / "fractal")})
    assert not os.environ.get("FRACTAL_ROOT")
    try:
        snap.start()
        cd.start()
        ref = registry.ref("busybox")
        cd.ctr("images", "pull", "--plain-http", "--snapshotter", "fractal", ref, timeout=300)
        out = cd.ctr("run", "--rm", "--snapshotter", "fractal", "--fifo-dir", str(run / "fifo"),
                     "--runtime", RUNTIME, ref, "root1", "echo", "rooted", timeout=120)
        assert out.stdout.strip() == "rooted"

        fconf.write_text('mode = "host"\n')  # the next sandbox's shim falls back to the default root
        with pytest.raises(CommandError) as failed:
            cd.ctr("run", "--rm", "--snapshotter", "fractal", "--fifo-dir", str(run / "fifo"),
                   "--runtime", RUNTIME, ref, "root2", "true", timeout=120)
        msg = str(failed.value)
        assert "outside the agent's roots" in msg, msg
        assert f"the shim's repo root is /var/lib/fractal (the default: no root in {fconf}" in msg, msg
        assert f'set root = \\"...\\" in {fconf}' in msg or f'set root = "..." in {fconf}' in msg, msg
        cd.ctr("containers", "rm", "root2", check=False)
    finally:
        cd.stop()
        kill_processes_mentioning(str(run), str(tmp_path), exclude=[p for p in (snap.pid,) if p])
        snap.stop()
        unmount_all(run, tmp_path)
        shutil.rmtree(run, ignore_errors=True)
