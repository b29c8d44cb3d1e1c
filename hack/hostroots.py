#!/usr/bin/env python3
"""Clean root filesystems of the hosts docs/install.md walks (Debian 12, Debian 13, Ubuntu 24.04),
and a wheelhouse of fractal's dependencies for each one's Python, cached under ``$FRACTAL_CACHE``.

Why: the install walk-through must be tested on the distribution's *own* python3, with none of
this machine's pyenv, site-packages or caches in reach.  A ``debootstrap --variant=minbase`` tree
with ``python3`` and ``python3-venv`` is exactly what a stock server has before fractal arrives;
``tests/integration/test_distro_install.py`` runs the walk-through in it (``run_in``: an overlay
of the tree, so the cached tree is never written, chroot, no network), installing the wheel and
its dependencies from a local wheelhouse.  Bootstrapping takes about a minute per distribution, so
each tree is built once and kept, keyed (like the test images, ``hack/testimages.py``) by suite,
mirror, package list and recipe version:

    $FRACTAL_CACHE/hostroots/<name>/rootfs     + <name>.stamp (key, python and glibc version)
    $FRACTAL_CACHE/hostroots/wheels/<cpXY-glibc-hash>/   pip download for that python/glibc

Mirrors: Debian's from this machine's apt sources, else deb.debian.org (``$FRACTAL_DEBIAN_MIRROR`` overrides),
Ubuntu's ``http://archive.ubuntu.com/ubuntu`` (``$FRACTAL_UBUNTU_MIRROR``).  Signatures are
checked by debootstrap as usual: Debian's keyring is the host's; Ubuntu's is the host's
``ubuntu-archive-keyring.gpg`` when installed, else taken from the ``ubuntu-keyring`` package
downloaded from the Ubuntu archive and accepted only with its pinned sha256 (Debian 12 does not
package it; the pinned package holds the 2018 archive key F6EC B376 2474 EDA9 D21B 7022 8719 20D1
991B C93C that signs 24.04).  Debian 12's debootstrap has no ``noble`` script: Ubuntu suites use
``gutsy``'s, which every later Ubuntu script is a link to.

    python3 hack/hostroots.py [--cache DIR] build [NAME...]    # default: all three
    python3 hack/hostroots.py [--cache DIR] path NAME | list
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `hack` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hack import testimages  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
#: Bump when what a tree contains changes in a way the key does not see.
RECIPE_VERSION = "2"
#: What a stock host has before fractal: the distribution's python3 and its venv module; and what
#: `fractal guest build` takes from the host besides python3 and the kernel package (which it
#: downloads with apt: hence the tree keeps its apt lists): busybox-static (the guest's init and
#: tools), runc, erofs-utils (the small guest's system image) and zstd (Ubuntu's kernel modules are
#: .ko.zst; Python before 3.14 has no zstd module).  tests/integration/test_distro_guest.py.
PACKAGES = ("python3", "python3-venv", "busybox-static", "runc", "erofs-utils", "zstd")
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
UBUNTU_KEYRING = Path("/usr/share/keyrings/ubuntu-archive-keyring.gpg")
UBUNTU_MIRROR = "http://archive.ubuntu.com/ubuntu"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
#: ubuntu-keyring from noble's main (its Packages index gives this sha256)
UBUNTU_KEYRING_DEB = ("pool/main/u/ubuntu-keyring/ubuntu-keyring_2023.11.28.1_all.deb",
                      "36de43b15853ccae0028e9a767613770c704833f82586f28eb262f0311adb8a8")


class HostRootError(RuntimeError):
    pass


@dataclass(frozen=True)
class Distro:
    name: str  # our name: debian-12, ...
    label: str  # what docs/install.md calls it
    suite: str
    archive: str  # "debian" | "ubuntu"
    components: tuple[str, ...] = ("main",)

    @property
    def script(self) -> str | None:
        """The debootstrap script to name explicitly (None: the suite's own)."""
        return "gutsy" if self.archive == "ubuntu" else None


DISTROS: dict[str, Distro] = {d.name: d for d in (
    Distro("debian-12", "Debian 12 (bookworm)", "bookworm", "debian"),
    Distro("debian-13", "Debian 13 (trixie)", "trixie", "debian"),
    # python3-venv is in universe on Ubuntu (enabled on a stock install)
    Distro("ubuntu-24.04", "Ubuntu 24.04 (noble)", "noble", "ubuntu", ("main", "universe")),
)}


@dataclass(frozen=True)
class HostRoot:
    distro: Distro
    rootfs: Path
    python: str  # "3.11"
    glibc: str  # "2.36"


# --------------------------------------------------------------------------- pure parts


def recipe_key(d: Distro, mirror: str, packages: Sequence[str] = PACKAGES) -> str:
    text = "\n".join([f"recipe={RECIPE_VERSION}", f"suite={d.suite}", f"archive={d.archive}", f"mirror={mirror}",
                      f"components={','.join(d.components)}", f"packages={','.join(sorted(packages))}"])
    return hashlib.sha256(text.encode()).hexdigest()


def dpkg_version(status: str, package: str) -> str | None:
    """The installed version of ``package`` in a dpkg status file's text."""
    for stanza in re.split(r"\n\s*\n", status):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line and line[0] != " ")
        if fields.get("Package") == package and fields.get("Status", "").endswith(" installed"):
            return fields.get("Version")
    return None


def upstream_minor(version: str) -> str:
    """``2.36-9+deb12u10`` -> ``2.36``; ``3.12.3-0ubuntu2`` -> ``3.12``."""
    m = re.match(r"(?:\d+:)?(\d+)\.(\d+)", version)
    if not m:
        raise HostRootError(f"cannot read a version from {version!r}")
    return f"{m.group(1)}.{m.group(2)}"


def manylinux_platforms(glibc: str, machine: str) -> list[str]:
    """Every manylinux tag a system with ``glibc`` runs, newest first (PEP 600, and the legacy
    names of 2.17/2.12/2.5).  Spelled out because pip widens only the legacy ``manylinux2014``
    given to ``--platform``, never ``manylinux_2_N``."""
    major, minor = (int(x) for x in glibc.split("."))
    if major != 2:
        raise HostRootError(f"glibc {glibc}: not a 2.x")
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    out = []
    for n in range(minor, 4, -1):
        out.append(f"manylinux_2_{n}_{machine}")
        if n in legacy:
            out.append(f"{legacy[n]}_{machine}")
    return out


def wheel_tags(python: str, glibc: str, machine: str) -> list[str]:
    """``pip download`` options selecting binary wheels for CPython ``python`` on ``glibc``."""
    cp = "cp" + python.replace(".", "")
    argv = ["--only-binary=:all:", "--implementation", "cp", "--python-version", python,
            "--abi", cp, "--abi", "abi3", "--abi", "none"]
    for plat in [*manylinux_platforms(glibc, machine), "any"]:
        argv += ["--platform", plat]
    return argv


def project_requirements(pyproject: Path = REPO / "pyproject.toml") -> list[str]:
    return list(tomllib.loads(pyproject.read_text())["project"]["dependencies"])


# --------------------------------------------------------------------------- I/O


def cache_dir(cache: Path | str | None = None) -> Path:
    return testimages.cache_dir(cache) / "hostroots"


def mirror_of(d: Distro) -> str:
    if d.archive == "ubuntu":
        return os.environ.get("FRACTAL_UBUNTU_MIRROR") or UBUNTU_MIRROR
    if os.environ.get("FRACTAL_DEBIAN_MIRROR"):
        return os.environ["FRACTAL_DEBIAN_MIRROR"]
    try:
        return testimages.apt_mirror()
    except testimages.ImageBuildError:  # no bookworm source on this machine: Debian's redirector
        return DEBIAN_MIRROR


def _run(argv: list[str], what: str, timeout: float = 1800) -> None:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:  # a slow mirror: the callers' HostRootError path (a skip for Ubuntu)
        raise HostRootError(f"{what} took longer than {timeout:.0f}s: {' '.join(argv)}") from None
    if r.returncode != 0:
        raise HostRootError(f"{what} failed ({r.returncode}): {' '.join(argv)}\n{(r.stdout + r.stderr)[-3000:]}")


def keyring_of(d: Distro, cache: Path) -> Path:
    if d.archive == "debian":
        return DEBIAN_KEYRING
    if UBUNTU_KEYRING.is_file():
        return UBUNTU_KEYRING
    path, sha = UBUNTU_KEYRING_DEB
    dst = cache / "ubuntu-keyring" / sha[:16] / "ubuntu-archive-keyring.gpg"
    if dst.is_file():
        return dst
    url = f"{mirror_of(d).rstrip('/')}/{path}"
    with urllib.request.urlopen(url, timeout=60) as resp:
        data = resp.read()
    got = hashlib.sha256(data).hexdigest()
    if got != sha:
        raise HostRootError(f"{url}: sha256 {got}, pinned {sha}: refusing this keyring")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        deb = Path(tmp) / "k.deb"
        deb.write_bytes(data)
        _run(["dpkg-deb", "-x", str(deb), f"{tmp}/x"], "dpkg-deb -x ubuntu-keyring")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(tmp) / "x" / str(UBUNTU_KEYRING).lstrip("/"), dst)
    return dst


@contextlib.contextmanager
def _lock(cache: Path, name: str) -> Iterator[None]:
    """One build of a thing at a time (CI and a developer shell may share the cache); different
    trees build side by side."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f".{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _facts(d: Distro, rootfs: Path) -> tuple[str, str]:
    status = (rootfs / "var/lib/dpkg/status").read_text(errors="replace")
    glibc = dpkg_version(status, "libc6")
    py = os.readlink(rootfs / "usr/bin/python3") if (rootfs / "usr/bin/python3").is_symlink() else ""
    m = re.fullmatch(r"python(\d+\.\d+)", py)
    if glibc is None or m is None:
        raise HostRootError(f"{d.name}: {rootfs} has no libc6 ({glibc}) or python3 -> pythonX.Y ({py!r})")
    return m.group(1), upstream_minor(glibc)


def _stamp(cache: Path, name: str) -> Path:
    return cache / f"{name}.stamp"


def find(name: str, cache: Path | str | None = None) -> HostRoot | None:
    """The cached tree of ``name`` if it is current, else None (nothing is built)."""
    d, base = DISTROS[name], cache_dir(cache)
    try:
        stamp = json.loads(_stamp(base, name).read_text())
    except (OSError, ValueError):
        return None
    rootfs = base / name / "rootfs"
    if stamp.get("key") != recipe_key(d, mirror_of(d)) or not (rootfs / "usr/bin/python3").exists():
        return None
    return HostRoot(d, rootfs, stamp["python"], stamp["glibc"])


def build(name: str, cache: Path | str | None = None, force: bool = False,
          progress=lambda s: print(f"hostroots: {s}", flush=True)) -> HostRoot:  # noqa: ANN001
    d, base = DISTROS[name], cache_dir(cache)
    with _lock(base, name):
        if not force and (found := find(name, cache)):
            progress(f"{name} up to date ({found.rootfs}, python {found.python})")
            return found
        mirror, t0 = mirror_of(d), time.monotonic()
        keyring = keyring_of(d, base)
        progress(f"debootstrap --variant=minbase {d.suite} + {','.join(PACKAGES)} from {mirror} (~1 min)")
        with tempfile.TemporaryDirectory(prefix=f".build-{name}-", dir=base) as tmp:
            rootfs = Path(tmp) / "rootfs"
            argv = ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
                    f"--components={','.join(d.components)}", f"--keyring={keyring}", d.suite, str(rootfs), mirror]
            if d.script:
                argv.append(f"/usr/share/debootstrap/scripts/{d.script}")
            _run(argv, f"debootstrap {d.suite}")
            for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for p in (rootfs / junk).glob("*"):
                    if p.is_file() and p.name != "lock":
                        p.unlink()
            # apt lists, so that `apt-get download` (the guest kernel) works in the tree later
            _run(["chroot", str(rootfs), "/usr/bin/env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                  "apt-get", "update", "-qq"], f"apt-get update in the {d.suite} tree")
            python, glibc = _facts(d, rootfs)
            _stamp(base, name).unlink(missing_ok=True)
            dst = base / name
            if dst.exists():
                dst.rename(Path(tmp) / "old")
            dst.mkdir()
            rootfs.rename(dst / "rootfs")
        _stamp(base, name).write_text(json.dumps({"key": recipe_key(d, mirror), "python": python, "glibc": glibc,
                                                   "built": time.time()}) + "\n")
        progress(f"built {name} in {time.monotonic() - t0:.0f}s: python {python}, glibc {glibc}")
        return HostRoot(d, dst / "rootfs", python, glibc)


def wheelhouse(root: HostRoot, requirements: Sequence[str], cache: Path | str | None = None,
               progress=lambda s: print(f"hostroots: {s}", flush=True)) -> Path:  # noqa: ANN001
    """Binary wheels of ``requirements`` (and theirs) for ``root``'s python and glibc, downloaded by
    this machine's pip: the container then installs with ``--no-index`` and no network."""
    base = cache_dir(cache) / "wheels"
    key = hashlib.sha256("\n".join([root.python, root.glibc, *sorted(requirements)]).encode()).hexdigest()[:16]
    dst = base / f"cp{root.python.replace('.', '')}-glibc{root.glibc}-{key}"
    with _lock(base, dst.name):
        if (dst / ".ok").is_file():
            return dst
        progress(f"pip download for python {root.python}, glibc {root.glibc} -> {dst}")
        with tempfile.TemporaryDirectory(prefix=".wheels-", dir=base) as tmp:
            _run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "-d", tmp,
                  *wheel_tags(root.python, root.glibc, platform.machine()), *requirements], "pip download")
            shutil.rmtree(dst, ignore_errors=True)
            Path(tmp).rename(dst)
            os.chmod(dst, 0o755)
            (dst / ".ok").touch()
    return dst


@dataclass(frozen=True)
class Bind:
    host: Path
    guest: str  # absolute path in the tree
    readonly: bool = True


#: runs as root in new mount, network, pid, ipc and uts namespaces (unshare): the tree as the
#: lower layer of an overlay (the cached tree is never written), binds, /proc, /dev, a tmpfs /tmp,
#: then chroot with an empty environment.  $1 tree, $2 scratch dir, $3 script, then host:guest:ro|rw.
_ENTER = r"""
set -eu
tree=$1 scratch=$2 script=$3; shift 3
mount --make-rprivate /
mkdir -p "$scratch/upper" "$scratch/work" "$scratch/merged"
mount -t overlay overlay -o "lowerdir=$tree,upperdir=$scratch/upper,workdir=$scratch/work" "$scratch/merged"
m=$scratch/merged
for b in "$@"; do
  host=${b%%:*}; rest=${b#*:}; guest=${rest%:*}; mode=${rest##*:}
  mkdir -p "$m$guest"; mount --bind "$host" "$m$guest"
  [ "$mode" = ro ] && mount -o remount,bind,ro "$m$guest"
done
mount -t proc proc "$m/proc"
mount --rbind /dev "$m/dev"
mount -t tmpfs tmpfs "$m/tmp"
exec chroot "$m" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  HOME=/root LANG=C.UTF-8 /bin/sh -c "$script"
"""


def run_in(root: HostRoot, script: str, binds: Sequence[Bind], scratch: Path,
           timeout: float = 600, network: bool = False) -> subprocess.CompletedProcess[str]:
    """``sh -c script`` as root on a throw-away overlay of ``root``'s tree, with no network (a new,
    empty network namespace), no environment but PATH/HOME/LANG, and ``binds``.  What podman
    ``--rootfs DIR:O --network=none`` does, without its rlimit defaults (podman 4.3 fails to set
    them in a container whose hard limits are lower) or its storage.  ``network``: the host's
    network instead (the guest build's apt download of the distribution's kernel)."""
    scratch.mkdir(parents=True, exist_ok=True)
    specs = [f"{b.host}:{b.guest}:{'ro' if b.readonly else 'rw'}" for b in binds]
    net = [] if network else ["--net"]
    return subprocess.run(["unshare", "--mount", *net, "--pid", "--fork", "--ipc", "--uts", "sh", "-c", _ENTER,
                           "enter", str(root.rootfs), str(scratch), script, *specs],
                          capture_output=True, text=True, timeout=timeout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=None, help="cache dir (default $FRACTAL_CACHE or /var/cache/fractal)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the trees (and wheelhouses) that are not current")
    b.add_argument("names", nargs="*", metavar="NAME", help=f"default: all of {', '.join(DISTROS)}")
    b.add_argument("--force", action="store_true")
    p = sub.add_parser("path", help="print a current tree's rootfs dir")
    p.add_argument("name", choices=list(DISTROS))
    sub.add_parser("list", help="the distributions and whether each is built")
    args = ap.parse_args(argv)
    if args.cmd == "build" and (unknown := [n for n in args.names if n not in DISTROS]):
        ap.error(f"unknown distribution {', '.join(unknown)} (choose from {', '.join(DISTROS)})")
    try:
        if args.cmd == "build":
            for name in args.names or DISTROS:
                wheelhouse(build(name, args.cache, args.force), project_requirements(), args.cache)
        elif args.cmd == "path":
            found = find(args.name, args.cache)
            if not found:
                print(f"hostroots: {args.name} not built (hack/hostroots.py build {args.name})", file=sys.stderr)
                return 1
            print(found.rootfs)
        else:
            for name, d in DISTROS.items():
                found = find(name, args.cache)
                print(f"{name:14s} {d.label:22s} {f'python {found.python}' if found else 'not built'}")
    except (HostRootError, OSError, subprocess.TimeoutExpired) as exc:
        print(f"hostroots: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
