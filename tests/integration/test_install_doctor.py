"""`fractal install` into a scratch containerd config, then a private containerd started from
exactly that config: the proxy snapshotter is there and a container runs through the shim found
via the installed launcher.  And `fractal doctor` against the session's containerd."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hack.containerd_env import (ContainerdConfig, DISABLED_PLUGINS, PrivateContainerd, Snapshotter,
                                 kill_processes_mentioning, unmount_all)

REPO = Path(__file__).resolve().parents[2]


def fractal(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ccpu.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **(env or {})}, timeout=timeout)


class _InstalledConfig(ContainerdConfig):
    """PrivateContainerd writes ``render()`` to its config path: keep what install wrote."""

    def __init__(self, path: Path, **kw) -> None:  # noqa: ANN003
        super().__init__(**kw)
        self._path = path

    def render(self) -> str:
        return self._path.read_text()


def test_install_then_private_containerd_uses_it(tmp_path: Path, registry) -> None:
    run = Path("/run/fractal-test") / f"inst-{secrets.token_hex(3)}"
    run.mkdir(parents=True)
    cfg = tmp_path / "etc" / "config.toml"
    cfg.parent.mkdir()
    base = ContainerdConfig(root=tmp_path / "croot", state=run / "st", address=run / "c.sock",
                            temp=tmp_path / "ctmp", opt_path=tmp_path / "opt", disabled_plugins=DISABLED_PLUGINS)
    user_text = base.render()
    cfg.write_text(user_text)
    snap_sock, snap_root = run / "snap.sock", tmp_path / "repo"
    args = ["install", "--containerd-config", str(cfg), "--systemd", "--systemd-dir", str(tmp_path / "units"),
            "--bin-dir", str(tmp_path / "bin"), "--address", str(snap_sock), "--root", str(snap_root),
            "--fractal-config", str(tmp_path / "fractal.toml")]  # never /etc/fractal
    t0 = time.monotonic()
    r = fractal(*args)
    assert r.returncode == 0, r.stderr
    print(f"install: {time.monotonic() - t0:.2f}s\n{r.stdout}")
    assert "created" in r.stdout and "restart containerd" in r.stdout
    assert (tmp_path / "etc" / "config.toml.fractal-bak").read_text() == user_text
    # the CRI runtime handler (RuntimeClass handler "fractal") lets io.fractal.* pod annotations
    # through to the shim
    import tomllib

    handler = tomllib.loads(cfg.read_text())["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]["fractal"]
    assert handler == {"runtime_type": "io.containerd.fractal.v1", "pod_annotations": ["io.fractal.*"]}, handler
    unit = (tmp_path / "units" / "fractal-snapshotter.service").read_text()
    assert f"--address {snap_sock}\n" in unit and "--root" not in unit and "Restart=always" in unit
    assert f"Environment=FRACTAL_CONFIG={tmp_path / 'fractal.toml'}" in unit
    # the shim on containerd's PATH: the launcher (python -S, ccpu/cli/launcher.py)
    shim_bin = tmp_path / "bin" / "containerd-shim-fractal-v1"
    assert not shim_bin.is_symlink() and os.access(shim_bin, os.X_OK)
    assert shim_bin.read_text().splitlines()[0].endswith(" -S")
    r2 = fractal(*args)
    assert r2.returncode == 0 and "nothing to do" in r2.stdout and "created" not in r2.stdout

    snap = Snapshotter(snap_root, snap_sock, tmp_path / "snapshotter.log")
    fconf = tmp_path / "fractal.toml"
    assert tomllib.loads(fconf.read_text())["root"] == str(snap_root)
    fconf.write_text(fconf.read_text() + 'mode = "host"\n')
    # PATH without this Python's scripts dir: containerd must find the shim through the symlink
    path = os.pathsep.join([str(tmp_path / "bin"), "/usr/local/sbin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"])
    cd = PrivateContainerd(_InstalledConfig(cfg, root=base.root, state=base.state, address=base.address),
                           cfg, tmp_path / "containerd.log",
                           extra_env={"PATH": path, "FRACTAL_ROOT": str(snap_root), "FRACTAL_CONFIG": str(fconf),
                                      "FRACTAL_RUN_DIR": str(run / "fractal")})
    try:
        snap.start()
        cd.start()
        plugins = cd.ctr("plugins", "ls", namespace=None).stdout
        row = [ln.split() for ln in plugins.splitlines() if " fractal " in f" {ln} "]
        assert row and row[0][0] == "io.containerd.snapshotter.v1" and row[0][-1] == "ok", plugins
        ref = registry.ref("busybox")
        cd.ctr("images", "pull", "--plain-http", "--snapshotter", "fractal", ref, timeout=300)
        out = cd.ctr("run", "--rm", "--snapshotter", "fractal", "--fifo-dir", str(run / "fifo"),
                     "--runtime", "io.containerd.fractal.v1", ref, "inst1", "echo", "installed", timeout=120)
        assert out.stdout.strip() == "installed"
        # doctor against this containerd: everything containerd-side is ok, the shim included
        d = fractal("doctor", "-a", str(base.address), "--root", str(snap_root), "--snapshotter-address",
                    str(snap_sock), "--json", env={"PATH": path})
        checks = {c["name"]: c for c in json.loads(d.stdout)}
        for name in ("containerd", "containerd socket", "proxy plugin", "snapshotter socket"):
            assert checks[name]["status"] == "ok", checks[name]
    finally:
        cd.stop()
        kill_processes_mentioning(str(run), str(tmp_path), exclude=[p for p in (snap.pid,) if p])
        snap.stop()
        unmount_all(run, tmp_path)
        shutil.rmtree(run, ignore_errors=True)


def test_doctor_against_the_session_containerd(fenv) -> None:
    t0 = time.monotonic()
    r = fractal("doctor", "-a", str(fenv.address), "--root", str(fenv.snapshotter_root), "--json")
    took = time.monotonic() - t0
    checks = {c["name"]: c for c in json.loads(r.stdout)}
    for name in ("containerd", "containerd socket", "proxy plugin", "snapshotter socket", "runc", "shim",
                 "overlayfs", "repo dir"):
        assert checks[name]["status"] == "ok", checks[name]
    assert checks["snapshotter socket"]["detail"].startswith(str(fenv.snapshotter_address))
    assert r.returncode == 0, r.stdout
    human = fractal("doctor", "-a", str(fenv.address), "--root", str(fenv.snapshotter_root))
    assert human.returncode == 0 and "[ok  ] proxy plugin" in human.stdout
    print(f"doctor: {took:.2f}s\n{human.stdout}")


def test_doctor_bogus_address_fails_with_a_fix(tmp_path: Path) -> None:
    r = fractal("doctor", "-a", str(tmp_path / "nope.sock"))
    assert r.returncode == 1, r.stdout
    assert "[FAIL] containerd socket" in r.stdout
    i = r.stdout.splitlines().index(next(ln for ln in r.stdout.splitlines() if "[FAIL] containerd socket" in ln))
    assert "fix: start containerd" in r.stdout.splitlines()[i + 1]
    assert "Traceback" not in r.stderr
