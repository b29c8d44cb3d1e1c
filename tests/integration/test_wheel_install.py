"""The user's install path: the tree -> an sdist -> a wheel (built offline from the sdist alone)
-> `pip install` into a fresh venv without system site-packages.  Then the three console
scripts run from the venv, the generated stubs and the guest's init.sh are inside it, and a
container runs through a private containerd that knows only the venv's shim and snapshotter,
the repo root coming from the fractal config file alone (docs/install.md, docs/config.md).

Nothing here imports from the checkout: every command runs with the venv's python, outside the
repo, with PYTHONPATH removed."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from hack.containerd_env import (ContainerdConfig, DISABLED_PLUGINS, PrivateContainerd, Snapshotter,
                                 kill_processes_mentioning, unmount_all)

REPO = Path(__file__).resolve().parents[2]
#: what a fresh clone has: no generated stubs, no build leftovers, no caches
SKIP = shutil.ignore_patterns(".git", "gen", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                              "*.pyc", "tests")


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FRACTAL_ROOT", "PYTHONHOME")}
    return {**env, **extra}


def _run(argv: list[str], cwd: Path, timeout: float = 300, **env: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(argv, cwd=cwd, env=_clean_env(**env), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{argv}: exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


class Installed:
    def __init__(self, base: Path, wheel: Path, sdist: Path) -> None:
        self.base, self.wheel, self.sdist = base, wheel, sdist
        self.venv = base / "venv"
        self.bin = self.venv / "bin"

    def run(self, name: str, *args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
        return _run([str(self.bin / name), *args], cwd=self.base, timeout=timeout, **env)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    shutil.copytree(REPO, src, ignore=SKIP, symlinks=True)
    t0 = time.monotonic()
    # sdist from the tree (its hook adds the pinned .proto sources), then the wheel from the sdist
    # with every other proto source out of reach: no Debian tree, no Go module cache, no proxy
    _run([sys.executable, "setup.py", "-q", "sdist", "-d", str(base / "sdist")], cwd=src)
    sdist = next((base / "sdist").glob("fractal-*.tar.gz"))
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(base / "dist"), str(sdist)],
         cwd=base, GOPROXY="off", FRACTAL_GOCODE=str(base / "nogocode"), GOMODCACHE=str(base / "nomodcache"))
    wheel = next((base / "dist").glob("fractal-*.whl"))
    t1 = time.monotonic()
    inst = Installed(base, wheel, sdist)
    _run([sys.executable, "-m", "venv", str(inst.venv)], cwd=base)  # no system site-packages
    _run([str(inst.bin / "python"), "-m", "pip", "install", "-q", str(wheel)], cwd=base)
    print(f"sdist+wheel {t1 - t0:.1f}s, venv+install {time.monotonic() - t1:.1f}s")
    return inst


def test_sdist_carries_sources_and_no_generated_code(installed: Installed) -> None:
    with tarfile.open(installed.sdist) as t:
        names = [n.split("/", 1)[1] for n in t.getnames() if "/" in n]
    assert "proto-src/github.com/containerd/containerd/api/services/snapshots/v1/snapshots.proto" in names
    assert "hack/protos/containerd/types/introspection.proto" in names
    assert "ccpu/guest/init.sh" in names
    assert not [n for n in names if "api/gen" in n or n.endswith("_pb2.py")]


def test_wheel_holds_stubs_and_runtime_files(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as z:
        names = set(z.namelist())
    assert "ccpu/guest/init.sh" in names
    assert "ccpu/api/gen/containerd/services/snapshots/v1/snapshots_pb2_grpc.py" in names
    assert "ccpu/api/gen/containerd/runtime/v2/task/shim_pb2.py" in names
    assert "ccpu/api/gen/fractal/layers/v1/layers_pb2.py" in names  # fractal's own API, generated too
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"ccpu", "shim", "snapshotter"}, tops  # no hack/, no tests/


def test_console_scripts_and_imports_from_the_venv(installed: Installed) -> None:
    assert "usage: fractal" in installed.run("fractal", "--help").stdout
    assert "--root" in installed.run("fractal-snapshotter", "--help").stdout
    version = installed.run("python", "-c", "import importlib.metadata as m; print(m.version('fractal'))").stdout.strip()
    shim_v = installed.run("containerd-shim-fractal-v1", "-v").stdout
    assert shim_v.startswith("containerd-shim-fractal-v1") and version in shim_v, shim_v
    probe = installed.run("python", "-c", """
import importlib.resources, os, ccpu, shim, snapshotter
from ccpu.api.gen.containerd.services.snapshots.v1 import snapshots_pb2_grpc
from ccpu.api.gen.containerd.services.containers.v1 import containers_pb2
from ccpu import layersmsg
print(os.path.dirname(ccpu.__file__)); print(os.path.dirname(shim.__file__))
print(importlib.resources.files("ccpu.guest").joinpath("init.sh").is_file())
print(containers_pb2.DESCRIPTOR.package)
print(layersmsg.Stack.DESCRIPTOR.full_name)
""").stdout.split()
    site = str(installed.venv)
    assert probe[0].startswith(site) and probe[1].startswith(site), probe
    assert probe[2:] == ["True", "containerd.services.containers.v1", "fractal.layers.v1.Stack"]


class _VenvSnapshotter(Snapshotter):
    """The venv's ``fractal-snapshotter`` console script, without --root (the config file
    names it) and without the checkout on PYTHONPATH."""

    def __init__(self, script: Path, config: Path, root: Path, address: Path, log: Path) -> None:
        super().__init__(root, address, log)
        self.script, self.config = script, config

    def command(self) -> list[str]:
        return ["env", "-u", "PYTHONPATH", "-u", "FRACTAL_ROOT", f"FRACTAL_CONFIG={self.config}",
                str(self.script), "--address", str(self.address)]


def test_a_container_runs_on_the_venvs_shim_and_snapshotter(installed: Installed, tmp_path: Path, registry) -> None:
    run = Path("/run/fractal-test") / f"whl-{secrets.token_hex(3)}"
    run.mkdir(parents=True)
    snap_root, snap_sock = tmp_path / "repo", run / "snap.sock"
    fconf = tmp_path / "fractal.toml"
    fconf.write_text(f'mode = "host"\nroot = "{snap_root}"\n')
    cfg = ContainerdConfig(root=tmp_path / "croot", state=run / "st", address=run / "c.sock", temp=tmp_path / "ctmp",
                           opt_path=tmp_path / "opt", snapshotter_address=snap_sock, disabled_plugins=DISABLED_PLUGINS)
    snap = _VenvSnapshotter(installed.bin / "fractal-snapshotter", fconf, snap_root, snap_sock,
                            tmp_path / "snapshotter.log")
    # the venv's bin first on containerd's PATH: it finds the venv's shim before the checkout's
    cd = PrivateContainerd(cfg, tmp_path / "containerd.toml", tmp_path / "containerd.log",
                           path_prepend=[installed.bin],
                           extra_env={"PYTHONPATH": "", "FRACTAL_ROOT": "", "FRACTAL_CONFIG": str(fconf),
                                      "FRACTAL_RUN_DIR": str(run / "fractal")})
    try:
        snap.start()
        cd.start()
        ref = registry.ref("busybox")
        cd.ctr("images", "pull", "--plain-http", "--snapshotter", "fractal", ref, timeout=300)
        assert any(snap_root.iterdir()), "the snapshotter did not use the config file's root"
        cd.ctr("run", "-d", "--snapshotter", "fractal", "--fifo-dir", str(run / "fifo"),
               "--runtime", "io.containerd.fractal.v1", ref, "whl1", "sleep", "60", timeout=120)
        ps = installed.run("fractal", "ps", "-a", str(cfg.address), "-n", "default", "--json",
                           FRACTAL_RUN_DIR=str(run / "fractal"))
        boxes = json.loads(ps.stdout)
        assert [c["id"] for b in boxes for c in b["containers"]] == ["whl1"], boxes
        shim_cmd = Path(f"/proc/{boxes[0]['shim_pid']}/cmdline").read_bytes().split(b"\0")
        assert shim_cmd[0].decode().startswith(str(installed.venv)), shim_cmd  # the venv's python
    finally:
        cd.stop()
        kill_processes_mentioning(str(run), str(tmp_path), exclude=[p for p in (snap.pid,) if p])
        snap.stop()
        unmount_all(run, tmp_path)
        shutil.rmtree(run, ignore_errors=True)
