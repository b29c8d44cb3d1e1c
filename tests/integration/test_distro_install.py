"""docs/install.md's walk-through on clean Debian 12, Debian 13 and Ubuntu 24.04 hosts: the
distribution's own python3 (no pyenv, no site-packages of this machine, no caches), a venv in
/opt/fractal, the wheel built from the tree installed into it, then `fractal --version`,
`fractal install --print` and `fractal doctor` as the page shows them.

Each host is a cached debootstrap minbase tree with python3 + python3-venv (hack/hostroots.py,
built once per suite and package list), entered by ``hostroots.run_in``: a throw-away overlay of
the tree (never written), new mount/pid/network namespaces (no network), chroot, an empty
environment.  The wheel's dependencies come from a wheelhouse downloaded on this machine for the
tree's python and glibc.  The hosts have no
containerd, so `fractal doctor` must say exactly that in its containerd line and exit 1.
~15 s per host once the trees are cached (~1 min each to build them)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from hack import hostroots
from tests.harness import _unavailable

REPO = Path(__file__).resolve().parents[2]
SKIP = shutil.ignore_patterns(".git", "gen", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                              "*.pyc", "tests", ".venv")

#: the walk-through of docs/install.md ("Getting fractal onto a host"), minus apt-get (the tree
#: has python3-venv; containerd is deliberately absent) and systemd; each step's output and exit
#: status go to /mnt/out/<step>.{out,rc}
WALK = r"""
step() { name=$1; shift; "$@" >"/mnt/out/$name.out" 2>&1; echo $? >"/mnt/out/$name.rc"; }
step venv python3 -m venv /opt/fractal
step pip /opt/fractal/bin/pip install --no-index --find-links /mnt/wheels --disable-pip-version-check /mnt/dist/*.whl
ln -s /opt/fractal/bin/fractal /usr/local/bin/fractal
step version fractal --version
step print fractal install --print
step doctor fractal doctor --json
step python python3 -c 'import sys; print(sys.version.split()[0], sys.prefix)'
step where sh -c 'command -v containerd; ls /opt/fractal/lib'
"""


@dataclass
class Walk:
    distro: hostroots.Distro
    python: str
    out: dict[str, str]
    rc: dict[str, int]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from a copy of the tree (the dev environment's build tools: the offline
    sdist -> wheel path is test_wheel_install.py's job)."""
    base = tmp_path_factory.mktemp("distro-wheel")
    shutil.copytree(REPO, base / "src", ignore=SKIP, symlinks=True)
    # the dev environment's setuptools + grpcio-tools when it has them (seconds), else pip's
    # isolated build environment (a download of both)
    local = all(importlib.util.find_spec(m) for m in ("setuptools", "grpc_tools"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                        *(["--no-build-isolation"] if local else []),
                        "-w", str(base / "dist"), str(base / "src")], capture_output=True, text=True, timeout=300,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return next((base / "dist").glob("fractal-*.whl"))


def walk(name: str, wheel: Path, base: Path) -> Walk:
    if shutil.which("debootstrap") is None:
        _unavailable("debootstrap not installed (hack/setup.sh installs it)")
    try:
        root = hostroots.build(name)
        wheels = hostroots.wheelhouse(root, hostroots.project_requirements())
    except (hostroots.HostRootError, OSError) as exc:
        if hostroots.DISTROS[name].archive != "debian":
            # Ubuntu's archive is not among the registries promised to this project's machines
            # (Debian, PyPI, the Go proxy, crates.io, npm): reachable here, but not a CI prerequisite
            pytest.skip(f"no {name} tree (its archive is not a promised registry): {exc}")
        _unavailable(f"no {name} tree: {exc}")
    out = base / "out"
    out.mkdir(parents=True)
    r = hostroots.run_in(root, WALK, [hostroots.Bind(wheel.parent, "/mnt/dist"), hostroots.Bind(wheels, "/mnt/wheels"),
                                      hostroots.Bind(out, "/mnt/out", readonly=False)], base / "scratch")
    assert r.returncode == 0, f"{name}: {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    texts = {p.stem: p.read_text(errors="replace") for p in out.glob("*.out")}
    rcs = {p.stem: int(p.read_text()) for p in out.glob("*.rc")}
    return Walk(root.distro, root.python, texts, rcs)


@pytest.mark.parametrize("name", list(hostroots.DISTROS))
def test_the_walk_through_on_a_clean_host(name: str, wheel: Path, tmp_path: Path) -> None:
    w = walk(name, wheel, tmp_path)
    for step in ("venv", "pip", "version", "print", "python"):
        assert w.rc.get(step) == 0, f"{w.distro.label}: {step} exited {w.rc.get(step)}:\n{w.out.get(step)}"
    # the distribution's own python, and fractal in the venv, not in it
    version, prefix = w.out["python"].split()
    assert version.startswith(w.python + ".") and prefix == "/usr", w.out["python"]
    assert w.out["where"].split() == [f"python{w.python}"], w.out["where"]  # no containerd; the venv's python
    assert w.out["version"].strip() == f"fractal {wheel.name.split('-')[1]}"
    # --print: containerd unknown here, so each version's config, labelled; absolute venv paths
    p = w.out["print"]
    assert p.count("containerd's version could not be detected") == 3 and p.count("[proxy_plugins.fractal]") == 3
    assert "ExecStart=/opt/fractal/bin/fractal-snapshotter" in p
    assert "containerd-shim-fractal-v1 -> /opt/fractal/bin/containerd-shim-fractal-v1 ---" in p
    assert "Traceback" not in p
    # doctor: the missing containerd is one check saying so, exit status 1, no traceback
    assert w.rc["doctor"] == 1, w.out["doctor"]
    checks = {c["name"]: c for c in json.loads(w.out["doctor"])}
    assert checks["containerd"]["status"] == "fail", checks["containerd"]
    assert checks["containerd"]["detail"] == "containerd not found on PATH"
    assert "apt-get install containerd" in checks["containerd"]["fix"]
