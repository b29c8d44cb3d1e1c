"""The guest's initramfs: everything the VM runs, in one content-addressed file.

Contents (see docs/vm.md for sizes):
  /init                     ccpu/guest/init.sh (busybox sh)
  /bin/busybox + applets    busybox-static, symlinks from `busybox --list-full`
  /lib/modules/<rel>/...    the modules of `modules.GUEST_MODULES` and their dependencies;
                            /etc/fractal/modules lists those the agent's start needs
                            (modules.BOOT_MODULES), /etc/fractal/modules.later the rest, each in
                            load order
  /usr/bin/python3.X        the distribution's interpreter: /usr/bin/python3 resolved, or
                            $FRACTAL_GUEST_PYTHON (not pyenv's: its libpython is shared and elsewhere)
  /usr/lib/python3.X        the stdlib (asked from that python) minus tests, GUI, installers and
                            modules whose libraries are heavy and useless here (_hashlib, dbm, curses,
                            readline, nis); precompiled as unchecked-hash .pyc, because compiling at
                            every boot costs seconds under TCG and timestamp-checked .pyc would be
                            stale (mtimes are 0)
  /usr/sbin/runc            + the shared libraries of all binaries above (from ldd)
  /usr/bin/tpm2, openssl    when the host has them: the attest op's TPM tools, an attested
                            machine's boot TLS key (docs/hardware.md)
  /usr/lib/python3.X/ccpu   the project's stdlib-only modules (agent, linux, stack)
  /usr/lib/python3X.zip     the agent's ready path (.pyc of the modules it imports before `hello`,
                            whole packages) in one stored zip, first on sys.path (ccpu/guest/pyzip.py)

Two layouts (``build(layout=...)``, ``fractal guest build --layout``; docs/vm.md "The small guest"):
  image      (the default) the initramfs keeps only /init, busybox, the modules and /etc; everything
             under usr/, lib/<multiarch>/ and lib64/ (python, the stdlib + .pyc, the project's
             modules, runc, the libraries) goes into a read-only EROFS image (``erofs.write``,
             system.erofs) that QEMU attaches as a read-only virtio-blk disk; the init mounts it at
             /.image, and symlinks in the initramfs (usr -> /.image/usr, ...) put it in place.
             The guest reads only the pages it uses, and the page cache can drop them again.
  initramfs  everything in the initramfs, unpacked into guest RAM at every boot (the old layout).

The build is cached by an *inputs key* (hash of every source file's path, mode
and content, plus options): the same inputs are never rebuilt and give the
same archive, whose sha256 is the guest's base-stack measurement recorded in
manifest.json next to it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import cpio, erofs, extend, kbuild, modules, pyzip, uki
from .kernel import Kernel, cache_root
from .kernel import fetch as fetch_kernel
from .source import Source

BUILDER_VERSION = 7  # bump when the layout changes without any input changing

PYTHON_DEFAULT = "/usr/bin/python3"  # the distribution's python (not pyenv's first-on-PATH); $FRACTAL_GUEST_PYTHON
BUSYBOX = "/bin/busybox"
RUNC = "/usr/sbin/runc"
#: tpm2-tools' multi-call binary: the agent's ``attest`` op (ccpu/agent/tpm.py) runs it; in the guest
#: when the host has it, with tpm2-tss's TCTI for the kernel's TPM device, which it dlopen()s
#: (ldd cannot see it)
TPM2 = "/usr/bin/tpm2"
TPM2_DLOPEN = ("libtss2-tcti-device.so.0",)
#: openssl's tool: a machine's agent makes its boot TLS key with it (ccpu/agent/tls.py make_boot_key);
#: the agent serves TLS with the stdlib's ssl (_ssl), which needs the same libssl/libcrypto
OPENSSL = "/usr/bin/openssl"
#: the command line built into the UKI: what a machine booting it alone gets (on QEMU, the VM's
#: own command line overrides it and is measured into PCR 12)
UKI_CMDLINE = "console=ttyS0 panic=-1 quiet rdinit=/init fractal.mode=agent"

LAYOUTS = ("image", "initramfs")
DEFAULT_LAYOUT = "image"
LAYOUT_ENV = "FRACTAL_GUEST_LAYOUT"  # overrides DEFAULT_LAYOUT (what the shim's on-demand build uses)
IMAGE_FILE = "system.erofs"
IMAGE_MOUNT = ".image"  # where the init mounts the image (relative to the guest's root)
IMAGE_TOPS = ("usr/", "lib64/", "lib/")  # what goes into the image ...
IMAGE_KEEP = ("lib/modules/",)  # ... except what the init needs before it is mounted
# the image's disk and filesystem: virtio_blk, erofs (+ libcrc32c, which needs a crc32c
# implementation registered first: no modprobe resolves the crypto API's soft dependency)
IMAGE_MODULES = ("virtio_blk", "crc32c_generic", "erofs")

# Top-level stdlib entries never needed in the guest.
STDLIB_EXCLUDE_TOP = frozenset({
    "test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data",
    "site-packages", "dist-packages", "turtle.py", "EXTERNALLY-MANAGED",
})
# Extension modules left out: test modules, and those pulling in large libraries
# (libdb, ncurses/readline, krb5/tirpc) nothing in the guest uses.  _ssl stays: a machine's agent
# serves TLS (docs/hardware.md); its libcrypto is tpm2-tools' anyway.
DYNLOAD_EXCLUDE = re.compile(
    r"^(_test\w*|_ctypes_test|_xxtestfuzz|xxlimited\w*|_xxsubinterpreters|_hashlib|_dbm|_gdbm|nis|readline"
    r"|_curses\w*|ossaudiodev|audioop|_crypt|_tkinter|_sqlite3)\.cpython-")

# The project's stdlib-only files for the guest, relative to the source tree root.
# The agent needs only itself, ccpu.linux (platform helpers) and ccpu.stack (mount plans); the repo and
# its SQLite stay on the host.
PROJECT_FILES = ("ccpu/__init__.py", "ccpu/errdefs.py", "ccpu/stack.py")
PROJECT_DIRS = ("ccpu/agent", "ccpu/linux")


@dataclass(frozen=True)
class Guest:
    """A built guest: kernel + initramfs + their manifest."""

    kernel: Path
    initramfs: Path
    manifest_path: Path
    manifest: dict
    image: Path | None = None  # the read-only system image (layout "image"), attached by QEMU
    uki: Path | None = None  # the unified kernel image (ccpu.guest.uki), when systemd's stub is there

    @property
    def sha256(self) -> str:
        return str(self.manifest["initramfs"]["sha256"])


# ---------------------------------------------------------------------------------------------
# pure helpers


def parse_ldd(text: str) -> list[str]:
    """Absolute library paths from `ldd` output (the vdso, which has no file, is skipped)."""
    libs: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        m = re.match(r"\S+\s+=>\s+(/\S+)\s+\(0x", line) or re.match(r"(/\S+)\s+\(0x", line)
        if m and m.group(1) not in libs:
            libs.append(m.group(1))
        elif "=> not found" in line:
            raise ValueError(f"ldd: missing library: {line}")
    return libs


@dataclass(frozen=True)
class Python:
    """The guest's interpreter, found on the host (not hard-coded: the version and the
    multiarch dir follow the distribution and the architecture)."""

    binary: str  # /usr/bin/python3.11 (symlinks resolved)
    stdlib: str  # /usr/lib/python3.11: the project's package goes there too (the default sys.path)
    cache_tag: str  # cpython-311: the .pyc names

    @property
    def pkg_dir(self) -> str:
        return self.stdlib.strip("/")


def parse_python_probe(binary: str, text: str) -> Python:
    """PYTHON_PROBE's output -> Python.  Pure."""
    fields = text.split()
    if len(fields) != 2 or not fields[0].startswith("/") or not fields[1].startswith("cpython-"):
        raise ValueError(f"{binary}: unexpected probe output {text!r} (a CPython is needed)")
    return Python(binary, fields[0].rstrip("/"), fields[1])


PYTHON_PROBE = "import sys, sysconfig; print(sysconfig.get_path('stdlib'), sys.implementation.cache_tag)"


def find_python() -> Python:
    """The distribution's python3 ($FRACTAL_GUEST_PYTHON overrides), asked for its stdlib and tag."""
    binary = os.path.realpath(os.environ.get("FRACTAL_GUEST_PYTHON") or PYTHON_DEFAULT)
    if not os.path.exists(binary):
        raise RuntimeError(f"{binary} is missing (hack/setup.sh installs the distribution's python3)")
    out = subprocess.run([binary, "-I", "-S", "-c", PYTHON_PROBE], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{binary}: {out.stderr.strip()[-300:]}")
    return parse_python_probe(binary, out.stdout)


def keep_stdlib(rel: str) -> bool:
    """Whether a path relative to the stdlib dir (/usr/lib/python3.X) goes into the guest."""
    parts = rel.split("/")
    if parts[0] in STDLIB_EXCLUDE_TOP or parts[0].startswith("config-") or "__pycache__" in parts \
            or "tests" in parts[1:-1]:
        return False
    if parts[0] == "lib-dynload" and len(parts) == 2:
        return not DYNLOAD_EXCLUDE.match(parts[1])
    return not rel.endswith((".pyc", ".exe", ".whl"))


def applet_links(list_full: str, taken: Iterable[str]) -> list[Source]:
    """Symlinks to /bin/busybox for `busybox --list-full` output, skipping paths already taken."""
    busy = set(taken)
    out = []
    for line in sorted(set(list_full.split())):
        path = line.strip("/")
        if path and path not in busy and path != "bin/busybox":
            out.append(Source(path, stat.S_IFLNK | 0o777, link="/bin/busybox"))
    return out


def inputs_key(sources: Sequence[Source], options: dict) -> str:
    """Hash of everything that determines the archive: options and each source's dest, mode, content."""
    h = hashlib.sha256(json.dumps({"builder": BUILDER_VERSION, **options}, sort_keys=True).encode())
    for s in sorted(sources, key=lambda s: s.dest):
        h.update(f"{s.dest}\0{s.mode:o}\0".encode())
        h.update(hashlib.sha256(s.read()).digest())
    return h.hexdigest()


def in_image(dest: str) -> bool:
    """Whether a file goes into the read-only image (layout "image") rather than the initramfs."""
    return dest.startswith(IMAGE_TOPS) and not dest.startswith(IMAGE_KEEP)


def split_layout(sources: Sequence[Source], also: Iterable[str] = ()) -> tuple[list[Source], list[Source]]:
    """(initramfs, image) for layout "image": the image's files, and in the initramfs a symlink
    for each highest image directory the initramfs does not have itself (usr ->
    /.image/usr, lib/x86_64-linux-gnu -> /.image/lib/x86_64-linux-gnu), plus the mount point.

    ``also``: more paths for the image (the modules the init loads only once the image is mounted,
    /etc/fractal/modules.later): the initramfs keeps what runs before the mount, and under TCG the
    kernel unpacks every byte of it before the init's first line."""
    extra = frozenset(also)
    image = [s for s in sources if in_image(s.dest) or s.dest in extra]
    initrd = [s for s in sources if not (in_image(s.dest) or s.dest in extra)]
    init_dirs = {s.dest for s in initrd if stat.S_ISDIR(s.mode)}
    for s in initrd:
        parts = s.dest.split("/")
        init_dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
    links: dict[str, Source] = {}
    for s in image:
        parts = s.dest.split("/")
        for i in range(1, len(parts) + 1):
            prefix = "/".join(parts[:i])
            if prefix not in init_dirs:
                links.setdefault(prefix, Source(prefix, stat.S_IFLNK | 0o777, link=f"/{IMAGE_MOUNT}/{prefix}"))
                break
    return initrd + [Source(IMAGE_MOUNT, stat.S_IFDIR | 0o755), *links.values()], image


def image_marker(sha256: str) -> Source:
    """/etc/fractal/image: tells the init to mount the image, and names the image's hash, so the
    initramfs's hash (the guest's measurement) covers the image too."""
    return Source("etc/fractal/image", stat.S_IFREG | 0o644, data=f"erofs {sha256}\n".encode())


def image_files(sources: Sequence[Source]) -> list[erofs.File]:
    return [erofs.File(s.dest, s.mode, s.read) for s in sources]


def default_layout() -> str:
    """``$FRACTAL_GUEST_LAYOUT``, else the small guest ("image") when mkfs.erofs is there to build
    its system image, else everything in the initramfs (works everywhere, costs guest RAM)."""
    layout = os.environ.get(LAYOUT_ENV) or (DEFAULT_LAYOUT if erofs.available() else "initramfs")
    if layout not in LAYOUTS:
        raise ValueError(f"{LAYOUT_ENV}={layout}: expected one of {LAYOUTS}")
    return layout


# ---------------------------------------------------------------------------------------------
# collecting the sources (reads the host)


def _ldd(binary: str) -> list[str]:
    out = subprocess.run(["ldd", binary], capture_output=True, text=True)
    if out.returncode != 0:
        if "not a dynamic executable" in (out.stdout + out.stderr):
            return []
        raise RuntimeError(f"ldd {binary}: {out.stderr.strip()}")
    return parse_ldd(out.stdout)


def _file(dest: str, src: str, perm: int | None = None) -> Source:
    st = os.stat(src)
    return Source(dest.strip("/"), stat.S_IFREG | (perm if perm is not None else stat.S_IMODE(st.st_mode)), path=src)


def _tree(src_root: str, dest_root: str, keep: Callable[[str], bool]) -> list[Source]:
    out = []
    for dirpath, dirnames, filenames in os.walk(src_root):
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, src_root)
            if not keep(rel):
                continue
            dest = f"{dest_root}/{rel}"
            if os.path.islink(full):
                out.append(Source(dest, stat.S_IFLNK | 0o777, link=os.readlink(full)))
            elif os.path.isfile(full):
                out.append(_file(dest, full))
    return out


def _dlopened(libs: Sequence[str], name: str) -> str:
    """A library loaded with dlopen(): looked up beside the libraries ldd found (the same multiarch dir)."""
    for d in dict.fromkeys(os.path.dirname(lib) for lib in libs):
        if os.path.exists(os.path.join(d, name)):
            return os.path.join(d, name)
    raise RuntimeError(f"{name} is missing (hack/setup.sh installs tpm2-tools and its libraries)")


def project_root() -> Path:
    return Path(__file__).resolve().parents[2]


def collect(kernel: Kernel, root: Path | None = None, layout: str = "initramfs",
            added: Sequence[Source] = ()) -> tuple[list[Source], dict]:
    """Every file of the guest (without .pyc) and a description of where they came from.

    ``added``: the user's additions (ccpu.guest.extend); they may shadow busybox applets, nothing else."""
    root = root or project_root()
    py = find_python()
    for tool in (BUSYBOX, RUNC):
        if not os.path.exists(tool):
            raise RuntimeError(f"{tool} is missing (hack/setup.sh installs busybox-static and runc)")
    here = Path(__file__).resolve().parent
    srcs: list[Source] = [
        _file("init", str(here / "init.sh"), 0o755),
        _file("bin/busybox", BUSYBOX, 0o755),
        _file(py.binary, py.binary, 0o755),
        # the init runs the agent with it (the process keeps its name: `pidof python3.11`)
        Source("etc/fractal/python", stat.S_IFREG | 0o644, data=f"{py.binary}\n".encode()),
        _file("usr/sbin/runc", RUNC, 0o755),
        Source("etc/passwd", stat.S_IFREG | 0o644, data=b"root:x:0:0:root:/root:/bin/sh\n"),
        Source("etc/group", stat.S_IFREG | 0o644, data=b"root:x:0:\ntty:x:5:\n"),
        Source("etc/hostname", stat.S_IFREG | 0o644, data=b"fractal\n"),
    ]
    # mount points (the kernel's built-in initramfs already provides /dev/console and /root)
    srcs += [Source(d, stat.S_IFDIR | (0o1777 if d == "tmp" else 0o755))
             for d in ("proc", "sys", "dev", "run", "tmp", "repo", "work", "mnt", "root")]
    # shared libraries of everything dynamic (python, its extension modules, runc)
    py_tree = _tree(py.stdlib, py.pkg_dir, keep_stdlib)
    dynamic = [py.binary, RUNC] + [s.path for s in py_tree if s.path and s.dest.endswith(".so")]
    tpm2 = os.path.exists(TPM2)
    if tpm2:
        srcs.append(_file("usr/bin/tpm2", TPM2, 0o755))
        dynamic.append(TPM2)
    openssl = os.path.exists(OPENSSL)
    if openssl:
        srcs.append(_file("usr/bin/openssl", OPENSSL, 0o755))
        dynamic.append(OPENSSL)
    libs: list[str] = []
    for b in dynamic:
        for lib in _ldd(b):
            if lib not in libs:
                libs.append(lib)
    if tpm2:
        for name in TPM2_DLOPEN:
            lib = _dlopened(libs, name)
            for dep in [lib, *_ldd(lib)]:
                if dep not in libs:
                    libs.append(dep)
    srcs += [_file(lib, os.path.realpath(lib), 0o755) for lib in sorted(libs)]
    srcs += py_tree
    # kernel modules in load order
    deps = modules.parse_modules_dep((kernel.modules_dir / "modules.dep").read_text())
    builtin_file = kernel.modules_dir / "modules.builtin"
    builtin = builtin_file.read_text().split() if builtin_file.exists() else []
    image_modules = IMAGE_MODULES if layout == "image" else ()
    first, later = modules.split_order(deps, modules.BOOT_MODULES + image_modules,
                                       modules.GUEST_MODULES + image_modules, builtin)
    order = first + later
    for ko in order:
        data = (kernel.modules_dir / ko).read_bytes()
        if ko.endswith(".xz"):  # busybox insmod cannot decompress
            import lzma
            data, ko = lzma.decompress(data), ko[:-3]
        srcs.append(Source(f"lib/modules/{kernel.release}/{ko}", stat.S_IFREG | 0o644, data=data))
    # busybox modprobe -a loads a list in one process with it (ccpu/guest/init.sh load_modules)
    srcs.append(Source(f"lib/modules/{kernel.release}/modules.dep", stat.S_IFREG | 0o644,
                       data=modules.shipped_modules_dep(deps, order).encode()))
    # before the agent starts / while it starts (ccpu/guest/init.sh load_modules, finish_boot)
    srcs.append(Source("etc/fractal/modules", stat.S_IFREG | 0o644,
                       data="".join(k.removesuffix(".xz") + "\n" for k in first).encode()))
    srcs.append(Source("etc/fractal/modules.later", stat.S_IFREG | 0o644,
                       data="".join(k.removesuffix(".xz") + "\n" for k in later).encode()))
    # the project's files
    project: list[str] = []
    for rel in PROJECT_FILES:
        if (root / rel).exists():
            srcs.append(_file(f"{py.pkg_dir}/{rel}", str(root / rel), 0o644))
            project.append(rel)
    for d in PROJECT_DIRS:
        if (root / d).is_dir():
            tree = _tree(str(root / d), f"{py.pkg_dir}/{d}",
                         lambda r: "__pycache__" not in r.split("/") and not r.endswith(".pyc"))
            srcs += tree
            project += [s.dest.removeprefix(py.pkg_dir + "/") for s in tree]
    extend.check_conflicts(srcs, added)
    srcs += added
    # busybox applets last: they must not shadow real files
    listing = subprocess.run([BUSYBOX, "--list-full"], check=True, capture_output=True, text=True).stdout
    srcs += applet_links(listing, {s.dest for s in srcs})
    described = {
        "kernel": {"release": kernel.release, "package": kernel.package, "version": kernel.package_version,
                   "deb_sha256": kernel.deb_sha256},
        "modules": order,
        "modules_later": later,
        "binaries": {"busybox": BUSYBOX, "python": py.binary, "runc": RUNC, **({"tpm2": TPM2} if tpm2 else {}),
                     **({"openssl": OPENSSL} if openssl else {})},
        "python": {"stdlib": py.stdlib, "cache_tag": py.cache_tag},
        "libraries": sorted(libs),
        "project_files": project,
    }
    return srcs, described


def compile_pyc(sources: Sequence[Source], progress: Callable[[str], None],
                py: Python | None = None) -> list[Source]:
    """Unchecked-hash .pyc for every .py, compiled by the guest's own interpreter.

    Unchecked-hash pycs are never compared with the source's mtime (which is 0
    in the archive), so Python neither recompiles nor rewrites them at boot.
    """
    py = py or find_python()
    todo = [s for s in sources if s.dest.endswith(".py") and s.link is None]
    with tempfile.TemporaryDirectory(prefix="fractal-pyc-") as tmp:
        for s in todo:
            p = Path(tmp, s.dest)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(s.read())
        progress(f"compiling {len(todo)} modules to .pyc")
        script = (
            "import sys, py_compile, concurrent.futures as cf\n"
            "tmp, files = sys.argv[1], sys.argv[2:]\n"
            "def one(dest):\n"
            "    try:\n"
            "        py_compile.compile(f'{tmp}/{dest}', cfile=None, dfile='/' + dest, doraise=True,\n"
            "            invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)\n"
            "    except py_compile.PyCompileError:\n"
            "        pass\n"  # a few stdlib files are deliberately invalid (e.g. bad-syntax test data)
            "with cf.ProcessPoolExecutor() as ex: list(ex.map(one, files, chunksize=64))\n"
        )
        subprocess.run([py.binary, "-I", "-S", "-c", script, tmp, *[s.dest for s in todo]], check=True,
                       env={"PATH": "/usr/bin:/bin", "SOURCE_DATE_EPOCH": "0"})
        out = []
        for s in todo:
            d, name = os.path.split(s.dest)
            cache = f"{d}/__pycache__/{name[:-3]}.{py.cache_tag}.pyc"
            if Path(tmp, cache).exists():
                out.append(Source(cache, stat.S_IFREG | 0o644, data=Path(tmp, cache).read_bytes()))
        return out


def ready_zip(pycs: Sequence[Source], progress: Callable[[str], None], py: Python | None = None,
              root: Path | None = None) -> tuple[Source, dict]:
    """The agent's ready path as one stored zip at the interpreter's zip entry of sys.path
    (ccpu/guest/pyzip.py), and its manifest entry (path, sha256, members, the probed modules)."""
    py = py or find_python()
    ready = pyzip.probe(py.binary, str(root or project_root()))
    prefix = py.pkg_dir + "/"
    pairs = [(s.dest[len(prefix):], s.read()) for s in pycs if s.dest.startswith(prefix)]
    blob, names = pyzip.build(pairs, ready, py.cache_tag)
    dest = pyzip.zip_path(py.stdlib)
    progress(f"ready-path zip /{dest}: {len(names)} .pyc ({len(blob) / 1e3:.0f} kB) for {len(ready.modules)} modules")
    desc = {"ready_zip": {"path": "/" + dest, "sha256": hashlib.sha256(blob).hexdigest(), "size": len(blob),
                          "members": len(names), "modules": list(ready.modules)}}
    return Source(dest, stat.S_IFREG | 0o644, data=blob), desc


# ---------------------------------------------------------------------------------------------
# build


def build(force: bool = False, progress: Callable[[str], None] = lambda s: None, *, pyc: bool = True,
          compression: str = "none", level: int = 6, offline: bool = False, layout: str | None = None,
          extensions: extend.Extensions | None = None, kernel: str | None = None) -> Guest:
    """Build (or reuse) the guest for the current Debian kernel and this tree's project files.

    ``kernel``: "debian" (the stock kernel, ccpu.guest.kernel) or "built" (the one built for the
    guest, ccpu.guest.kbuild: must have been built with `fractal guest kernel`); None:
    $FRACTAL_GUEST_KERNEL, else "debian".

    ``extensions``: the user's additions and run-at-boot commands; None: the recorded ones
    (``$FRACTAL_CACHE/guest/extensions.json``, ccpu.guest.extend), so every build makes the same guest.

    ``layout``: "image" or "initramfs" (module docstring); None: $FRACTAL_GUEST_LAYOUT or DEFAULT_LAYOUT.

    ``offline``: use the newest kernel already in the cache without asking apt (saves ~1.3 s;
    what the shim does before every VM start), falling back to apt when none is cached."""
    t0 = time.monotonic()
    kern = kbuild.find() if kbuild.kernel_choice(kernel) == "built" else fetch_kernel(progress, offline=offline)
    progress(f"kernel {kern.release} ({kern.package} {kern.package_version})")
    layout = layout or default_layout()
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}: expected one of {LAYOUTS}")
    ext = extend.load(cache_root()) if extensions is None else extensions
    added = extend.sources(ext)
    sources, described = collect(kern, layout=layout, added=added)
    if ext:
        described["extensions"] = extend.describe(ext, added)
    options = {"layout": layout, "pyc": pyc, "compression": compression, "level": level, "kernel": kern.deb_sha256,
               "boot_image": kern.boot_image.name,
               "uki_stub": _sha256(Path(uki.STUB)) if uki.available() else None, "uki_format": uki.FORMAT}
    key = inputs_key(sources, options)
    roots = build_roots(cache_root(), user_cache())
    for root in roots:
        out_dir = root / key[:32]
        manifest_path = out_dir / "manifest.json"
        if manifest_path.exists() and not force:
            manifest = json.loads(manifest_path.read_text())
            progress(f"up to date (inputs {key[:16]}{'' if root == roots[0] else f', in {root}'})")
            return _guest(kern.boot_image, out_dir, manifest)
    out_root = writable_root(roots)
    if out_root is None:
        raise PermissionError(f"cannot write a guest build: neither {roots[0]} nor {roots[-1]} is writable "
                              "(set FRACTAL_CACHE to a directory of yours, or XDG_CACHE_HOME/HOME)")
    out_dir = out_root / key[:32]
    progress(f"collected {len(sources)} files (inputs {key[:16]})")
    extra: list[Source] = compile_pyc(sources, progress) if pyc else []
    zip_desc: dict = {}
    if pyc:  # the agent's ready path in one file (ccpu/guest/pyzip.py)
        extra_zip, zip_desc = ready_zip(extra, progress)
        extra.append(extra_zip)
    initrd = sources + extra
    image_blob: bytes | None = None
    image_desc: dict = {}
    if layout == "image":
        later = [f"lib/modules/{kern.release}/{ko.removesuffix('.xz')}" for ko in described["modules_later"]]
        initrd, in_img = split_layout(initrd, later)
        progress(f"writing the read-only image ({len(in_img)} files, erofs)")
        image_blob = erofs.write(image_files(in_img))
        image_sha = hashlib.sha256(image_blob).hexdigest()
        initrd.append(image_marker(image_sha))
        image_desc = {"image": {"file": IMAGE_FILE, "sha256": image_sha,
                                "size": len(image_blob), "files": len(in_img), "format": "erofs",
                                "mount": "/" + IMAGE_MOUNT}}
    progress("writing cpio")
    entries = [cpio.Entry(s.dest, s.mode, s.read()) for s in initrd]
    archive = cpio.write(entries)
    name = "initramfs.cpio"
    if compression == "gzip":
        progress(f"compressing {len(archive) / 1e6:.1f} MB (gzip -{level})")
        blob = cpio.compress(archive, level)
        name += ".gz"
    elif compression == "none":
        blob = archive
    else:
        raise ValueError(f"unknown compression {compression}")
    sha = hashlib.sha256(blob).hexdigest()
    manifest = {
        "initramfs": {"file": name, "sha256": sha, "size": len(blob), "uncompressed_size": len(archive),
                      "entries": len(cpio.normalize(entries)), "compression": compression},
        "kernel_image": {"path": str(kern.boot_image), "sha256": _sha256(kern.boot_image),
                         "format": "vmlinux-pvh" if kern.vmlinux else "bzimage",
                         "vmlinuz_sha256": _sha256(kern.vmlinuz)},
        **image_desc,
        **zip_desc,
        "layout": layout,
        "inputs_key": key,
        "options": options,
        "builder_version": BUILDER_VERSION,
        "build_python": sys.version.split()[0],
        **described,
    }
    tmp_dir = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    (tmp_dir / name).write_bytes(blob)
    if uki.available() and not uki.efi_kernel(kern.vmlinuz):
        manifest["uki_missing"] = uki.NOT_EFI
    elif uki.available():  # the EFI image (docs/hardware.md): ~0.3 s and the initramfs's size again
        progress("writing the unified kernel image (systemd-stub + kernel + initramfs)")
        made = uki.build(tmp_dir / uki.FILE, kernel=kern.vmlinuz, initramfs=tmp_dir / name, cmdline=UKI_CMDLINE,
                         osrel=uki.os_release(kern.release, sha))
        manifest["uki"] = made.describe()
    if image_blob is not None:
        (tmp_dir / IMAGE_FILE).write_bytes(image_blob)
    (tmp_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.rename(tmp_dir, out_dir)
    if out_root == roots[0]:  # the shared cache's pointer; a per-user build leaves it alone
        (cache_root() / "current.json").write_text(json.dumps({"build": str(out_dir)}) + "\n")
    progress(f"built in {time.monotonic() - t0:.1f}s")
    return _guest(kern.boot_image, out_dir, manifest)


def user_cache() -> Path | None:
    """A user's own guest builds ($XDG_CACHE_HOME, else ~/.cache, + fractal/guest/build); None
    without a usable home (the user `nobody`)."""
    base = os.environ.get("XDG_CACHE_HOME") or ""
    if not base:
        home = os.environ.get("HOME") or ""
        if not home or home == "/nonexistent" or not os.path.isdir(home):
            return None
        base = os.path.join(home, ".cache")
    return Path(base) / "fractal" / "guest" / "build"


def build_roots(cache: Path, user: Path | None) -> list[Path]:
    """Where builds are looked up, in order: the shared cache (``$FRACTAL_CACHE/guest/build``: a
    user without write access reads root's builds there, read-only), then the user's own."""
    return [cache / "build"] + ([user] if user is not None and user != cache / "build" else [])


def writable_root(roots: Sequence[Path]) -> Path | None:
    """The first root this process may create builds in (its nearest existing ancestor writable)."""
    for root in roots:
        p = root
        while not p.exists() and p.parent != p:
            p = p.parent
        if os.access(p, os.W_OK | os.X_OK):
            return root
    return None


def _guest(kernel: Path, out_dir: Path, manifest: dict) -> Guest:
    image = manifest.get("image")
    efi = manifest.get("uki")
    return Guest(kernel, out_dir / manifest["initramfs"]["file"], out_dir / "manifest.json", manifest,
                 out_dir / image["file"] if image else None, out_dir / efi["file"] if efi else None)


def current() -> Guest | None:
    """The most recently built guest, without rebuilding (None if there is none)."""
    ptr = cache_root() / "current.json"
    try:
        out_dir = Path(json.loads(ptr.read_text())["build"])
        manifest = json.loads((out_dir / "manifest.json").read_text())
    except (OSError, ValueError, KeyError):
        return None
    return _guest(Path(manifest["kernel_image"]["path"]), out_dir, manifest)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
