"""A guest kernel built for the guest (opt-in): Debian's own kernel source, our config fragments.

Why: Debian's generic kernel is built for every machine -- NR_CPUS=8192, a 17 MB bss, every
driver as a module -- so the guest reserves ~54 MB of its RAM for the kernel alone and the init
spends boot time on insmod (docs/vm.md "Host memory", "A kernel built for the guest").  Kata's
model is followed: upstream-style source + small config fragments kept in the repo
(``ccpu/guest/kconfig/*.config``), everything the guest uses built in, no modules.

Why Debian's source (``linux-source-<major.minor>``, the same release as the stock kernel): the
patches and security fixes the host distribution ships, fetched with apt like the stock kernel.

Opt-in: ``fractal guest kernel`` builds it (minutes: a compiler run), ``fractal guest build
--kernel built`` (or ``FRACTAL_GUEST_KERNEL=built``) boots it; Debian's kernel stays the default
and nothing else needs the build tools.  The result is cached under
``$FRACTAL_CACHE/guest/kernel/built-<key>/`` where the key hashes the source package, the
fragments and BUILDER_VERSION; the build is reproducible (KBUILD_BUILD_TIMESTAMP/USER/HOST fixed).

Pure functions (config parsing, the fragment check, the key, modules.builtin from the build's
``.modinfo``) carry the logic; ``build``/``find`` are the thin I/O around them.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .kernel import Kernel, KernelError, cache_root, parse_policy_candidate, pvh_image

#: bump when the build's steps change in a way the fragments do not show (a new key, a new build)
BUILDER_VERSION = 1
FRAGMENTS_DIR = Path(__file__).resolve().parent / "kconfig"
ARCH = "x86_64"
#: the base configuration the fragments are merged into: every option off (no modules, no debug)
BASE_TARGET = "allnoconfig"
#: reproducible builds: the kernel's version string and build stamp do not depend on who built it when
BUILD_ENV = {"KBUILD_BUILD_TIMESTAMP": "1970-01-01 00:00:00 UTC", "KBUILD_BUILD_USER": "fractal",
             "KBUILD_BUILD_HOST": "fractal", "KBUILD_BUILD_VERSION": "1", "LC_ALL": "C"}
#: what the build needs beyond make and a C compiler, as (what is checked, the Debian package)
BUILD_TOOLS = (("flex", "flex"), ("bison", "bison"), ("bc", "bc"), ("make", "make"), ("gcc", "gcc"),
               ("/usr/include/libelf.h", "libelf-dev"))
#: the option that builds in each module the guest builder asks for (ccpu.guest.modules.GUEST_MODULES,
#: initramfs.IMAGE_MODULES): a unit test holds the fragments to it, so a module added there without
#: its option here fails in CI rather than at the first boot of a built kernel
MODULE_OPTIONS = {
    "virtio_pci": "CONFIG_VIRTIO_PCI", "virtio_mmio": "CONFIG_VIRTIO_MMIO",
    "virtio_console": "CONFIG_VIRTIO_CONSOLE", "virtio_rng": "CONFIG_HW_RANDOM_VIRTIO",
    "virtio_balloon": "CONFIG_VIRTIO_BALLOON", "virtio_net": "CONFIG_VIRTIO_NET",
    "9pnet_virtio": "CONFIG_NET_9P_VIRTIO", "9p": "CONFIG_9P_FS", "fuse": "CONFIG_FUSE_FS",
    "virtiofs": "CONFIG_VIRTIO_FS", "overlay": "CONFIG_OVERLAY_FS", "bridge": "CONFIG_BRIDGE",
    "virtio_blk": "CONFIG_VIRTIO_BLK", "crc32c_generic": "CONFIG_CRYPTO_CRC32C", "erofs": "CONFIG_EROFS_FS",
}
KERNEL_ENV = "FRACTAL_GUEST_KERNEL"
KERNELS = ("debian", "built")
PREFIX = "built-"
META = "built.json"  # not kernel.json: kernel.fetch's offline fallback globs */kernel.json


def kernel_choice(value: str | None = None) -> str:
    """``value``, else $FRACTAL_GUEST_KERNEL, else "debian"; anything else is a one-line error."""
    choice = value or os.environ.get(KERNEL_ENV) or "debian"
    if choice not in KERNELS:
        source = "" if value else f" (${KERNEL_ENV})"
        raise KernelError(f"guest kernel {choice!r}{source}: expected one of {', '.join(KERNELS)}")
    return choice


def source_package(image_version: str) -> str:
    """A kernel package version (``6.1.192-3``) -> Debian's source package of that release
    (``linux-source-6.1``).  Pure."""
    m = re.match(r"(\d+)\.(\d+)", image_version)
    if not m:
        raise KernelError(f"kernel version {image_version!r}: no major.minor")
    return f"linux-source-{m.group(1)}.{m.group(2)}"


def parse_config(text: str) -> dict[str, str]:
    """Kconfig text (a .config or a fragment) -> {CONFIG_X: value}; ``# CONFIG_X is not set`` is
    "n".  Later lines win, as in the kernel's own merge.  Pure."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if m := re.fullmatch(r"(CONFIG_\w+)=(.*)", line):
            out[m.group(1)] = m.group(2)
        elif m := re.fullmatch(r"# (CONFIG_\w+) is not set", line):
            out[m.group(1)] = "n"
    return out


def lost_options(fragment: Mapping[str, str], config: Mapping[str, str]) -> list[tuple[str, str, str]]:
    """(option, wanted, got) for each fragment option the resulting .config does not have as asked
    (an option absent from .config is "n").  Kconfig drops a setting silently when a dependency is
    off (EROFS needs MISC_FILESYSTEMS): this is how the build notices.  Pure."""
    return [(k, v, config.get(k, "n")) for k, v in fragment.items() if config.get(k, "n") != v]


def read_fragments(directory: Path = FRAGMENTS_DIR) -> dict[str, str]:
    """{file name: text} of the fragments, in name order (the merge order)."""
    found = {p.name: p.read_text() for p in sorted(directory.glob("*.config"))}
    if not found:
        raise KernelError(f"no kernel config fragments in {directory}")
    return found


def merged_fragments(fragments: Mapping[str, str]) -> str:
    """The fragments as one file, in name order.  Pure."""
    return "".join(f"# --- {name}\n{text.rstrip()}\n" for name, text in sorted(fragments.items()))


def cache_key(source_sha256: str, fragments: Mapping[str, str], arch: str = ARCH,
              builder: int = BUILDER_VERSION) -> str:
    """The built kernel's identity: the source package's sha256, the fragments (names and text),
    the architecture, the builder's version.  Pure."""
    doc = {"source": source_sha256, "fragments": dict(sorted(fragments.items())), "arch": arch,
           "base": BASE_TARGET, "env": BUILD_ENV, "builder": builder}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def builtin_modules(modinfo: bytes) -> list[str]:
    """``modules.builtin.modinfo`` (NUL-separated ``module.key=value`` records the build extracts
    from vmlinux's .modinfo) -> the names of the modules built into the kernel, sorted.  The
    guest builder needs them as ``modules.builtin`` (modules.load_order skips built-in names);
    a kernel without CONFIG_MODULES gets no modules.builtin from kbuild.  Pure."""
    names = set()
    for rec in modinfo.split(b"\0"):
        key, sep, _ = rec.partition(b"=")
        mod, dot, _ = key.partition(b".")
        if sep and dot and mod:
            names.add(mod.decode(errors="replace").replace("-", "_"))
    return sorted(names)


def missing_tools(which: Callable[[str], str | None] = shutil.which,
                  exists: Callable[[str], bool] = os.path.exists) -> list[str]:
    """The Debian packages whose tool or header the build lacks."""
    return [pkg for what, pkg in BUILD_TOOLS if not (exists(what) if what.startswith("/") else which(what))]


@dataclass(frozen=True)
class Source:
    package: str
    version: str
    deb: Path
    sha256: str


def _run(cmd: list[str], cwd: Path | None = None, env: Mapping[str, str] | None = None) -> str:
    try:
        return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True,
                              env={**os.environ, **env} if env else None).stdout
    except FileNotFoundError as exc:
        raise KernelError(f"{cmd[0]} not found") from exc
    except subprocess.CalledProcessError as exc:
        raise KernelError(f"{' '.join(cmd[:3])} failed: {exc.stderr.strip()[-500:]}") from exc


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def root() -> Path:
    return cache_root() / "kernel"


def deb_sha256(deb: Path) -> str:
    """The .deb's sha256, remembered beside it (``<deb>.sha256``, trusted while not older than the
    .deb): the shim's guest build runs before every VM start, and hashing 140 MB each time would
    cost ~0.4 s of it."""
    side = deb.with_name(deb.name + ".sha256")
    try:
        if side.stat().st_mtime >= deb.stat().st_mtime:
            known = side.read_text().strip()
            if re.fullmatch(r"[0-9a-f]{64}", known):
                return known
    except OSError:
        pass
    digest = _sha256(deb)
    try:
        side.write_text(digest + "\n")
    except OSError:  # a cache this user cannot write: hashed each time
        pass
    return digest


def cached_source() -> Source | None:
    """The newest source package already downloaded (``kernel/src/*.deb``), or None."""
    debs = sorted((root() / "src").glob("linux-source-*_all.deb")) if (root() / "src").is_dir() else []
    if not debs:
        return None
    deb = debs[-1]
    package, version, _ = deb.name.split("_", 2)
    return Source(package, version, deb, deb_sha256(deb))


def fetch_source(progress: Callable[[str], None]) -> Source:
    """Debian's kernel source of the release the stock guest kernel is (apt-get download, once)."""
    from .kernel import resolve_package
    _, image_version = resolve_package()
    package = source_package(image_version)
    version = parse_policy_candidate(_run(["apt-cache", "policy", package]))
    src = root() / "src"
    deb = src / f"{package}_{version}_all.deb"
    if not deb.exists():
        progress(f"downloading {package} {version} (~140 MB)")
        src.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=src, prefix=".fetch-") as tmp:
            os.chmod(tmp, 0o755)  # apt's _apt sandbox user writes here
            _run(["apt-get", "download", "-q", f"{package}={version}"], cwd=Path(tmp))
            got = list(Path(tmp).glob("*.deb"))
            if len(got) != 1:
                raise KernelError(f"apt-get download {package} produced {len(got)} .deb files")
            os.replace(got[0], deb)
    return Source(package, version, deb, deb_sha256(deb))


def _tree(source: Source, progress: Callable[[str], None]) -> Path:
    """The unpacked source tree (kept: a rebuild with other fragments recompiles only what changed)."""
    tree = root() / "src" / f"{source.package}_{source.version}"
    if (tree / "Makefile").exists():
        return tree
    progress(f"unpacking {source.deb.name}")
    with tempfile.TemporaryDirectory(dir=tree.parent, prefix=".unpack-") as tmp:
        t = Path(tmp)
        _run(["dpkg-deb", "-x", str(source.deb), str(t / "deb")])
        tars = list((t / "deb" / "usr" / "src").glob("linux-source-*.tar.*"))
        if len(tars) != 1:
            raise KernelError(f"{source.deb.name}: expected one linux-source tarball, found {len(tars)}")
        _run(["tar", "-xf", str(tars[0]), "-C", str(t)])
        top = [p for p in t.iterdir() if p.name.startswith("linux-source-") and p.is_dir()]
        if len(top) != 1 or not (top[0] / "Makefile").exists():
            raise KernelError(f"{tars[0].name}: no kernel tree inside")
        shutil.rmtree(tree, ignore_errors=True)
        os.rename(top[0], tree)
    return tree


def find(source: Source | None = None) -> Kernel:
    """The built kernel for the cached source and the current fragments, without building (what a
    guest build with ``--kernel built`` uses): a clear error when there is none."""
    source = source or cached_source()
    hint = "build it with `fractal guest kernel` (needs flex bison libelf-dev bc; minutes)"
    if source is None:
        raise KernelError(f"no built guest kernel (no kernel source in {root() / 'src'}): {hint}")
    key = cache_key(source.sha256, read_fragments())
    dest = root() / f"{PREFIX}{key[:16]}"
    if not (dest / META).exists():
        raise KernelError(f"no built guest kernel for {source.package} {source.version} and these "
                          f"fragments ({dest.name}): {hint}")
    return load(dest)


def load(dest: Path) -> Kernel:
    meta = json.loads((dest / META).read_text())
    return Kernel(release=meta["release"], package=f"{meta['source']['package']} (built)",
                  package_version=meta["source"]["version"], deb_sha256=meta["key"],
                  vmlinuz=dest / "vmlinuz", modules_dir=dest / "modules", vmlinux=pvh_image(dest / "vmlinux"))


def build(progress: Callable[[str], None] = lambda s: None, *, force: bool = False,
          jobs: int | None = None) -> tuple[Kernel, dict]:
    """Build (or reuse) the guest kernel: (the Kernel, its built.json)."""
    source = fetch_source(progress)
    fragments = read_fragments()
    key = cache_key(source.sha256, fragments)
    dest = root() / f"{PREFIX}{key[:16]}"
    if (dest / META).exists() and not force:
        progress(f"up to date ({dest})")
        return load(dest), json.loads((dest / META).read_text())
    if missing := missing_tools():
        raise KernelError(f"building the guest kernel needs {' '.join(missing)} "
                          f"(apt-get install {' '.join(missing)})")
    with open(root() / ".build.lock", "w") as lock:  # one build at a time in the shared source tree
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (dest / META).exists() and not force:  # another process built it while we waited
            return load(dest), json.loads((dest / META).read_text())
        out = Path(tempfile.mkdtemp(dir=root(), prefix=f".{PREFIX}"))
        try:
            meta = _compile(source, fragments, key, out, progress, jobs)
        except BaseException:
            failed = root() / "build-failed.log"
            if (out / "build.log").exists():
                os.replace(out / "build.log", failed)  # kept for the error message's reader
            shutil.rmtree(out, ignore_errors=True)
            raise
        shutil.rmtree(dest, ignore_errors=True)
        os.rename(out, dest)
    progress(f"built {meta['release']} in {meta['build']['seconds']:.0f}s")
    return load(dest), meta


def _compile(source: Source, fragments: Mapping[str, str], key: str, out: Path,
             progress: Callable[[str], None], jobs: int | None) -> dict:
    """Configure and compile in the kept source tree; the results into ``out``; built.json's dict."""
    tree = _tree(source, progress)
    make = ["make", f"ARCH={ARCH}"]
    progress(f"configuring ({BASE_TARGET} + {', '.join(fragments)})")
    _run([*make, BASE_TARGET], cwd=tree, env=BUILD_ENV)
    frag_file = tree / ".fractal-fragments.config"
    frag_file.write_text(merged_fragments(fragments))
    _run(["scripts/kconfig/merge_config.sh", "-m", ".config", str(frag_file)], cwd=tree, env=BUILD_ENV)
    _run([*make, "olddefconfig"], cwd=tree, env=BUILD_ENV)
    config_text = (tree / ".config").read_text()
    lost = lost_options(parse_config(merged_fragments(fragments)), parse_config(config_text))
    if lost:
        raise KernelError("kernel config fragments did not survive olddefconfig (a dependency is off): "
                          + ", ".join(f"{k}={v} -> {got}" for k, v, got in lost))
    jobs = jobs or os.cpu_count() or 1
    progress(f"compiling with {jobs} jobs (minutes)")
    t0 = time.monotonic()
    load0 = os.getloadavg()[0]
    with open(out / "build.log", "wb") as log:
        rc = subprocess.run([*make, f"-j{jobs}", "bzImage"], cwd=tree, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, **BUILD_ENV}).returncode
    seconds = time.monotonic() - t0
    if rc != 0:
        tail = (out / "build.log").read_text(errors="replace").strip().splitlines()[-5:]
        raise KernelError(f"kernel build failed (exit {rc}; log: {root() / 'build-failed.log'}): {' | '.join(tail)}")
    release = _run([*make, "-s", "kernelrelease"], cwd=tree, env=BUILD_ENV).strip()
    shutil.copyfile(tree / "vmlinux", out / "vmlinux")
    shutil.copyfile(tree / "arch" / "x86" / "boot" / "bzImage", out / "vmlinuz")
    (out / "config").write_text(config_text)
    mods = out / "modules"
    mods.mkdir()
    modinfo = tree / "modules.builtin.modinfo"
    builtin = builtin_modules(modinfo.read_bytes()) if modinfo.exists() else []
    (mods / "modules.builtin").write_text("".join(f"kernel/{n}.ko\n" for n in builtin))
    (mods / "modules.dep").write_text("")  # nothing to load: everything is built in
    meta = {"key": key, "release": release, "arch": ARCH, "builder": BUILDER_VERSION,
            "source": {"package": source.package, "version": source.version, "sha256": source.sha256},
            "fragments": {n: hashlib.sha256(t.encode()).hexdigest() for n, t in fragments.items()},
            "build": {"seconds": round(seconds, 1), "jobs": jobs, "loadavg_start": round(load0, 2),
                      "loadavg_end": round(os.getloadavg()[0], 2)},
            "vmlinux_sha256": _sha256(out / "vmlinux"), "builtin_modules": len(builtin)}
    (out / META).write_text(json.dumps(meta, indent=2) + "\n")
    os.chmod(out, 0o755)
    return meta
