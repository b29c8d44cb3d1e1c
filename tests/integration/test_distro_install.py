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
~15 s per host once the trees are cached (~1 min each to build them).

The same trees then build the VM guest (`fractal guest build` from the installed wheel): the
distribution's own kernel package (fetched by the tree's apt, with network: the only step that
needs it, cached in the tree's dir after the first run), python, busybox and runc; the result is
booted here with QEMU and must run the distribution's python."""

from __future__ import annotations

import hashlib
import importlib.util
import io
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


def tree(name: str) -> tuple[hostroots.HostRoot, Path]:
    """The cached tree of ``name`` and its wheelhouse (built when missing)."""
    if shutil.which("debootstrap") is None:
        _unavailable("debootstrap not installed (hack/setup.sh installs it)")
    try:
        root = hostroots.build(name)
        return root, hostroots.wheelhouse(root, hostroots.project_requirements())
    except (hostroots.HostRootError, OSError) as exc:
        if hostroots.DISTROS[name].archive != "debian":
            # Ubuntu's archive is not among the registries promised to this project's machines
            # (Debian, PyPI, the Go proxy, crates.io, npm): reachable here, but not a CI prerequisite
            pytest.skip(f"no {name} tree (its archive is not a promised registry): {exc}")
        _unavailable(f"no {name} tree: {exc}")
        raise  # unreachable: _unavailable skips or fails


def walk(name: str, wheel: Path, base: Path) -> Walk:
    root, wheels = tree(name)
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
    # the shim as install writes it: the venv python's `-S` launcher with the venv's site-packages
    assert "containerd-shim-fractal-v1 (mode 0755) ---\n#!/opt/fractal/bin/python" in p, p[-1500:]
    assert " -S\n" in p and "'/opt/fractal/lib/python" in p and "from shim.main import main" in p
    assert "Traceback" not in p
    # doctor: the missing containerd is one check saying so, exit status 1, no traceback
    assert w.rc["doctor"] == 1, w.out["doctor"]
    checks = {c["name"]: c for c in json.loads(w.out["doctor"])}
    assert checks["containerd"]["status"] == "fail", checks["containerd"]
    assert checks["containerd"]["detail"] == "containerd not found on PATH"
    assert "apt-get install containerd" in checks["containerd"]["fix"]


#: `fractal guest build` in the tree, from the installed wheel, with the tree's apt (its lists are
#: part of the cached tree) and a cache dir kept next to the tree (/mnt/cache: the kernel is
#: downloaded once); --force, so that the build itself runs every time
GUEST = r"""
step() { name=$1; shift; "$@" >"/mnt/out/$name.out" 2>&1; echo $? >"/mnt/out/$name.rc"; }
step venv python3 -m venv /opt/fractal
step pip /opt/fractal/bin/pip install --no-index --find-links /mnt/wheels --disable-pip-version-check /mnt/dist/*.whl
step build env FRACTAL_CACHE=/mnt/cache /opt/fractal/bin/fractal guest build --force
step python readlink -f /usr/bin/python3
"""


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs qemu-system-x86_64")
@pytest.mark.parametrize("name", [n for n in hostroots.DISTROS if n != "debian-12"])
def test_the_guest_builds_and_boots_on_other_distributions(name: str, wheel: Path, tmp_path: Path) -> None:
    """Debian 12 builds the guest everywhere else in the suite; Debian 13 (python 3.13, kernel 6.12,
    .ko.xz) and Ubuntu 24.04 (python 3.12, the "generic" kernel with its modules in separate
    linux-modules packages, .ko.zst) must find their own python and kernel packages."""
    from ccpu.guest.initramfs import Guest
    from ccpu.vm import run as vmrun

    root, wheels = tree(name)
    cache = root.rootfs.parent / "guest-cache"  # next to the tree: goes when the tree is rebuilt
    cache.mkdir(exist_ok=True)
    out = tmp_path / "out"
    out.mkdir()
    r = hostroots.run_in(root, GUEST, [hostroots.Bind(wheel.parent, "/mnt/dist"), hostroots.Bind(wheels, "/mnt/wheels"),
                                       hostroots.Bind(out, "/mnt/out", readonly=False),
                                       hostroots.Bind(cache, "/mnt/cache", readonly=False)],
                         tmp_path / "scratch", timeout=1200, network=True)
    assert r.returncode == 0, f"{name}: {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    texts = {p.stem: p.read_text(errors="replace") for p in out.glob("*.out")}
    rcs = {p.stem: int(p.read_text()) for p in out.glob("*.rc")}
    for step in ("venv", "pip", "python"):
        assert rcs.get(step) == 0, f"{name}: {step} exited {rcs.get(step)}:\n{texts.get(step)}"
    if rcs["build"] != 0 and "apt-get download" in texts["build"] and root.distro.archive != "debian":
        pytest.skip(f"{name}: its archive did not serve the kernel (not a promised registry): {texts['build'][-500:]}")
    assert rcs["build"] == 0, f"{name}: fractal guest build:\n{texts['build'][-3000:]}"

    # the manifest: the distribution's python and kernel, and hashes that match the files
    current = json.loads((cache / "guest" / "current.json").read_text())["build"]
    build_dir = cache / "guest" / "build" / Path(current).name
    m = json.loads((build_dir / "manifest.json").read_text())
    python = texts["python"].strip()
    assert python == f"/usr/bin/python{root.python}", texts["python"]
    assert m["binaries"]["python"] == python and m["python"]["cache_tag"] == f"cpython-{root.python.replace('.', '')}"
    flavour = "generic" if root.distro.archive == "ubuntu" else "amd64"
    assert m["kernel"]["package"].startswith("linux-image-") and m["kernel"]["package"].endswith(f"-{flavour}"), m["kernel"]
    status = (root.rootfs / "var/lib/apt/lists").glob("*_Packages")
    assert any(f"Package: {m['kernel']['package']}\n" in p.read_text(errors="replace") for p in status), \
        f"{m['kernel']['package']} is not in the {name} tree's own package lists"
    wanted = {"9p", "virtiofs", "overlay", "virtio_console"}
    loaded = {Path(k).name.split(".ko")[0].replace("-", "_") for k in m["modules"]}
    builtin = (cache / "guest" / "kernel").glob(f"{m['kernel']['release']}_*/modules/modules.builtin")
    builtin_names = {Path(x).name.split(".ko")[0].replace("-", "_") for b in builtin for x in b.read_text().split()}
    assert wanted <= loaded | builtin_names, f"missing guest modules: {wanted - loaded - builtin_names}"
    initramfs = build_dir / m["initramfs"]["file"]
    assert hashlib.sha256(initramfs.read_bytes()).hexdigest() == m["initramfs"]["sha256"]
    image = build_dir / m["image"]["file"]
    assert hashlib.sha256(image.read_bytes()).hexdigest() == m["image"]["sha256"]
    kernel = cache / Path(m["kernel_image"]["path"]).relative_to("/mnt/cache")
    assert hashlib.sha256(kernel.read_bytes()).hexdigest() == m["kernel_image"]["sha256"]

    # it boots here, and the command runs under the distribution's kernel and python
    guest = Guest(kernel, initramfs, build_dir / "manifest.json", m, image)
    stdout, stderr = io.BytesIO(), io.BytesIO()
    res = vmrun.run(guest, ["sh", "-c", f"uname -r; {python} -c 'import sys; print(sys.version.split()[0])'"],
                    stdout=stdout, stderr=stderr, timeout=300, console_log=str(tmp_path / "console.log"))
    lines = stdout.getvalue().decode(errors="replace").split()
    assert res.exit_code == 0 and len(lines) == 2, (res.exit_code, stdout.getvalue(), stderr.getvalue())
    assert lines[0] == m["kernel"]["release"] and lines[1].startswith(root.python + "."), lines
