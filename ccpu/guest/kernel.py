"""The guest kernel: Debian's signed-off stock kernel, fetched with apt, cached.

Why Debian's: it is what the host distribution already trusts and updates, it
boots under TCG in a few seconds, and every driver we need exists as a module.
We download the .deb with `apt-get download` (no install, no postinst: the
host's /boot is never touched) and unpack it with `dpkg-deb -x` under
``$FRACTAL_CACHE/guest/kernel/<version>/``.  Because the postinst never ran,
there is no modules.dep; we write one from the modules' own `.modinfo`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import modules

log = logging.getLogger(__name__)

DEFAULT_CACHE = "/var/cache/fractal"
#: (distribution family, Debian architecture) -> the flavour of its default kernel (the meta package is
#: linux-image-<flavour>, the versioned one linux-image-<abi>-<flavour>).  Debian names the flavour after
#: the architecture, Ubuntu calls it "generic".  Only amd64 is booted today (q35/microvm, PVH); arm64
#: resolves and unpacks but needs QEMU's `virt` machine and an Image boot (docs/vm.md).
KERNEL_FLAVOURS = {("debian", "amd64"): "amd64", ("debian", "arm64"): "arm64",
                   ("ubuntu", "amd64"): "generic", ("ubuntu", "arm64"): "generic"}
#: Packages of the same kernel release that hold modules too (Ubuntu splits them off the image:
#: linux-modules-<release> has the common ones, -extra the rest); fetched when apt knows them.
COMPANION_PACKAGES = ("linux-modules-{release}", "linux-modules-extra-{release}")
OS_RELEASE = "/etc/os-release"


def kernel_flavour(arch: str, family: str = "debian") -> str:
    """Debian architecture (``dpkg --print-architecture``) -> its kernel flavour.  Pure."""
    try:
        return KERNEL_FLAVOURS[(family, arch)]
    except KeyError:
        known = ", ".join(f"{f}/{a}" for f, a in sorted(KERNEL_FLAVOURS))
        raise KernelError(f"no guest kernel flavour known for {family} on architecture {arch!r} "
                          f"(known: {known})") from None


def distro_family(os_release: str) -> str:
    """``/etc/os-release`` text -> "ubuntu" or "debian" (ID, then ID_LIKE).  Pure.

    Ubuntu and its derivatives ship the generic flavour and split modules into companion packages;
    everything else with apt is taken for Debian-like."""
    fields = {}
    for line in os_release.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip()] = value.strip().strip('"').strip("'")
    ids = [fields.get("ID", ""), *fields.get("ID_LIKE", "").split()]
    return "ubuntu" if "ubuntu" in ids else "debian"


def host_family() -> str:
    try:
        return distro_family(Path(OS_RELEASE).read_text())
    except OSError:
        return "debian"


def host_arch() -> str:
    """The host's Debian architecture, from dpkg (the guest runs the host's binaries)."""
    return _run(["dpkg", "--print-architecture"]).strip()


class KernelError(RuntimeError):
    """The kernel could not be resolved, downloaded or unpacked."""


@dataclass(frozen=True)
class Kernel:
    """An unpacked kernel: its release (`6.1.0-56-amd64`), package version, vmlinuz and modules dir."""

    release: str
    package: str
    package_version: str
    deb_sha256: str
    vmlinuz: Path
    modules_dir: Path  # .../lib/modules/<release>
    # uncompressed ELF with a PVH entry note, when extractable (vmlinux-pvh: trim_zero_tails)
    vmlinux: Path | None = None

    @property
    def boot_image(self) -> Path:
        """What QEMU's -kernel gets: the PVH vmlinux when we have one.

        Debian's bzImage is xz-compressed (Ubuntu's zstd); decompressing 66 MB under TCG takes
        ~3 s before the kernel even starts.  QEMU boots an ELF vmlinux with a
        PVH note directly (measured: first output 3.1 s instead of 6.4 s).
        """
        return self.vmlinux if self.vmlinux is not None else self.vmlinuz


def cache_root() -> Path:
    return Path(os.environ.get("FRACTAL_CACHE", DEFAULT_CACHE)) / "guest"


def parse_depends(apt_cache_depends: str, flavour: str = "amd64") -> str:
    """`apt-cache depends linux-image-<flavour>` output -> the versioned image package name."""
    for line in apt_cache_depends.splitlines():
        m = re.match(rf"\s*\|?Depends:\s*(linux-image-\d[^\s]*-{re.escape(flavour)})\s*$", line)
        if m:
            return m.group(1)
    raise KernelError(f"apt-cache depends linux-image-{flavour} names no linux-image-<version>-{flavour}")


def parse_policy_candidate(apt_cache_policy: str) -> str:
    """`apt-cache policy PKG` output -> its candidate version."""
    m = re.search(r"^\s*Candidate:\s*(\S+)", apt_cache_policy, re.M)
    if not m or m.group(1) == "(none)":
        raise KernelError("apt-cache policy shows no candidate version")
    return m.group(1)


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    try:
        return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True).stdout
    except FileNotFoundError as exc:
        raise KernelError(f"{cmd[0]} not found (a Debian host with apt is needed)") from exc
    except subprocess.CalledProcessError as exc:
        raise KernelError(f"{' '.join(cmd)} failed: {exc.stderr.strip()[-500:]}") from exc


def resolve_package() -> tuple[str, str]:
    """(package, version) of the kernel the distribution currently ships, e.g.
    (linux-image-6.1.0-56-amd64, 6.1.192-2) on Debian 12, (linux-image-6.8.0-90-generic, ...) on Ubuntu."""
    pkg = os.environ.get("FRACTAL_KERNEL_PACKAGE")
    if not pkg:
        flavour = kernel_flavour(host_arch(), host_family())
        pkg = parse_depends(_run(["apt-cache", "depends", f"linux-image-{flavour}"]), flavour)
    return pkg, parse_policy_candidate(_run(["apt-cache", "policy", pkg]))


def companions(release: str) -> list[tuple[str, str]]:
    """(package, version) of COMPANION_PACKAGES that apt has a candidate for (none on Debian)."""
    out = []
    for template in COMPANION_PACKAGES:
        pkg = template.format(release=release)
        try:
            out.append((pkg, parse_policy_candidate(_run(["apt-cache", "policy", pkg]))))
        except KernelError:  # unknown to apt (empty output) or no candidate
            continue
    return out


def decompress_modules(mod_dir: Path) -> int:
    """Decompress every .ko.zst under ``mod_dir`` in place (one zstd run), returning how many.

    busybox's insmod loads only plain .ko, and Python before 3.14 reads no zstd, so Ubuntu's
    zstd-compressed modules are unpacked once, when the kernel is cached (.ko.xz, Debian 13's,
    are read with lzma where needed)."""
    found = [str(p) for p in mod_dir.rglob("*.ko.zst")]
    if not found:
        return 0
    if shutil.which("zstd") is None:
        raise KernelError(f"{len(found)} kernel modules are zstd-compressed and zstd is not installed "
                          "(apt-get install zstd)")
    for i in range(0, len(found), 500):
        _run(["zstd", "-d", "-q", "--rm", *found[i:i + 500]])
    return len(found)


def release_of(package: str) -> str:
    """linux-image-6.1.0-56-amd64 -> 6.1.0-56-amd64 (the `uname -r` and /lib/modules name)."""
    prefix = "linux-image-"
    if not package.startswith(prefix):
        raise KernelError(f"not a kernel image package: {package}")
    return package[len(prefix):]


XEN_ELFNOTE_PHYS32_ENTRY = 18


ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def bzimage_payload(bzimage: bytes) -> bytes | None:
    """The compressed kernel inside a bzImage, found by the boot protocol's own header fields.

    Protocol 2.08+ (every kernel since 2.6.26) records where the payload sits
    (``payload_offset`` at 0x248, relative to the protected-mode code that starts after the
    ``setup_sects`` 512-byte sectors, and ``payload_length`` at 0x24c), so the payload is taken
    exactly rather than guessed by scanning for a magic number.  None for anything that is not
    such a bzImage.  Pure."""
    import struct
    if len(bzimage) < 0x250 or bzimage[0x202:0x206] != b"HdrS":
        return None
    version, = struct.unpack_from("<H", bzimage, 0x206)
    if version < 0x208:
        return None
    setup_sects = bzimage[0x1F1] or 4  # 0 means 4, for historical reasons (boot protocol)
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + offset
    if length == 0 or start + length > len(bzimage):
        return None
    return bzimage[start:start + length]


#: an uncompressed kernel is ~65 MB; anything past this is not one (a bzImage can be an
#: untrusted image's: `fractal boot` boots the image's own kernel, ccpu/boot/initrd.py)
MAX_VMLINUX = 512 << 20


def unzstd(data: bytes, limit: int = MAX_VMLINUX) -> bytes:
    """Decompress a zstd frame, at most ``limit`` bytes (more is an error, whatever the frame's
    header claims), with the zstandard library (Python before 3.14 reads no zstd)."""
    import io

    import zstandard

    try:
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)) as r:
            out = r.read(limit + 1)
    except zstandard.ZstdError as exc:
        raise KernelError(f"zstd: {exc}") from None
    if len(out) > limit:
        raise KernelError(f"zstd data larger than {limit >> 20} MiB decompressed")
    return out


def extract_vmlinux(bzimage: bytes, zstd: Callable[[bytes], bytes] | None = None,
                    limit: int = MAX_VMLINUX) -> bytes | None:
    """The uncompressed ELF kernel inside a bzImage, or None.

    xz (Debian) and gzip are read with the stdlib; a zstd payload (Ubuntu 24.04's kernels) needs
    ``zstd``, passed in so the function stays pure for its callers' tests.  The kernel's build
    appends the uncompressed size (4 bytes, little-endian) after a zstd frame, which the zstd tool
    would reject as a second, broken frame: it is cut off first.  xz and gzip output stops at
    ``limit`` bytes (a payload that would decompress past it gives no ELF, so None)."""
    import gzip
    import lzma
    import zlib
    payload = bzimage_payload(bzimage)
    if payload is not None and payload.startswith(ZSTD_MAGIC) and zstd is not None:
        out = zstd(payload[:-4])
        return out if out[:4] == b"\x7fELF" else None
    for magic, decomp in ((b"\xfd7zXZ\x00", lambda b: lzma.LZMADecompressor().decompress(b, max_length=limit)),
                          (b"\x1f\x8b\x08\x00", lambda b: zlib.decompressobj(31).decompress(b, limit))):
        start = 0
        while (i := bzimage.find(magic, start)) >= 0:
            start = i + 1
            try:
                out = decomp(bzimage[i:])
            except (lzma.LZMAError, zlib.error, gzip.BadGzipFile, EOFError):
                continue
            if out[:4] == b"\x7fELF":
                return out
    return None


def has_pvh_note(elf: bytes) -> bool:
    """Whether a 64-bit ELF kernel has the Xen PHYS32_ENTRY note QEMU needs to boot it (PVH).  Pure."""
    import struct
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        return False
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _flags, off, _va, _pa, filesz = struct.unpack_from("<IIQQQQ", elf, phoff + i * phentsize)
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = off, off + filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12: pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            pos += 12 + ((namesz + 3) & ~3) + ((descsz + 3) & ~3)
    return False


PVH_IMAGE = "vmlinux-pvh"  # what QEMU boots: vmlinux with the zero tails of its segments left to the loader


def _loads(elf: bytes) -> list[tuple[int, int, int]]:
    """(program header offset, p_offset, p_filesz) of each PT_LOAD of a 64-bit little-endian ELF."""
    import struct
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise KernelError("not a 64-bit little-endian ELF")
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    if phentsize < 56 or phoff + phnum * phentsize > len(elf):
        raise KernelError("ELF program headers out of the file")
    out = []
    for i in range(phnum):
        at = phoff + i * phentsize
        p_type, _flags, off, _va, _pa, filesz, memsz = struct.unpack_from("<IIQQQQQ", elf, at)
        if p_type == 1:  # PT_LOAD
            if off + filesz > len(elf) or filesz > memsz:
                raise KernelError(f"ELF segment at {off:#x} out of the file")
            out.append((at, off, filesz))
    return out


def trim_zero_tails(elf: bytes) -> bytes:
    """The same kernel with each loadable segment's trailing zero bytes left out of its file image
    (``p_filesz`` lowered, ``p_memsz`` kept): an ELF loader zero-fills ``[p_filesz, p_memsz)``,
    so the guest's memory gets the same bytes.  Why: QEMU maps the -kernel ELF and keeps every
    file byte it loads as a ROM for reset -- resident for the VM's life.  Debian's 6.1 vmlinux
    carries .bss and .brk as 23 MB of file zeros (a PROGBITS section, .init.scratch, follows them
    in the last segment), i.e. 23 of the 57 MB QEMU held (docs/vm.md "Host memory").  Pure."""
    import struct
    out = bytearray(elf)
    for at, off, filesz in _loads(elf):
        body = elf[off:off + filesz]
        keep = len(body.rstrip(b"\0"))
        if keep != filesz:
            struct.pack_into("<Q", out, at + 0x20, keep)  # p_filesz
    return bytes(out)


def pvh_image(vmlinux: Path) -> Path | None:
    """``vmlinux-pvh`` beside ``vmlinux`` (made once, atomically), or None when there is no vmlinux.
    A kernel cache this user cannot write (a root-made one, read by a user's ``vm run``) keeps
    booting the untrimmed vmlinux: same guest, 23 MB more in QEMU."""
    dest = vmlinux.with_name(PVH_IMAGE)
    if dest.exists() or not vmlinux.exists():
        return dest if dest.exists() else None
    tmp = dest.with_name(f".{PVH_IMAGE}.{os.getpid()}")
    try:
        tmp.write_bytes(trim_zero_tails(vmlinux.read_bytes()))
        os.replace(tmp, dest)  # a reader never sees half a kernel
    except OSError as exc:
        log.warning("%s not written (%s): booting %s as it is", dest, exc, vmlinux)
        with contextlib.suppress(OSError):
            tmp.unlink()
        return vmlinux
    return dest


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write_modules_dep(mod_dir: Path) -> None:
    direct: dict[str, list[str]] = {}
    for ko in sorted(mod_dir.rglob("*.ko*")):
        data = ko.read_bytes()
        if ko.name.endswith(".xz"):
            import lzma
            data = lzma.decompress(data)
        direct[str(ko.relative_to(mod_dir))] = modules.modinfo_depends(data)
    (mod_dir / "modules.dep").write_text(modules.render_modules_dep(direct))


def fetch(progress: Callable[[str], None] = lambda s: None, *, offline: bool = False) -> Kernel:
    """The distribution's current kernel (image + companion module packages), unpacked in the cache (downloaded and unpacked only once).

    With `offline`, or when apt cannot resolve a version, the newest kernel
    already in the cache is used, so a built guest keeps working without apt.
    """
    root = cache_root() / "kernel"
    try:
        if offline:
            raise KernelError("offline")
        package, version = resolve_package()
    except KernelError as exc:
        cached = sorted(p for p in root.glob("*/kernel.json")) if root.exists() else []
        if not cached:
            raise
        log.warning("using the cached kernel (%s)", exc)
        return _load(cached[-1].parent)
    release = release_of(package)
    dest = root / f"{release}_{version}"
    if (dest / "kernel.json").exists():
        return _load(dest)
    extra = companions(release)
    names = " + ".join(p for p, _ in extra)
    progress(f"downloading {package} {version}" + (f" + {names}" if names else ""))
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as tmp:
        tmpdir = Path(tmp)
        os.chmod(tmpdir, 0o755)  # apt's _apt sandbox user must be able to write here
        debs: dict[str, Path] = {}
        for pkg, ver in [(package, version), *extra]:
            before = set(tmpdir.glob("*.deb"))
            _run(["apt-get", "download", "-q", f"{pkg}={ver}"], cwd=tmpdir)
            got = set(tmpdir.glob("*.deb")) - before
            if len(got) != 1:
                raise KernelError(f"apt-get download {pkg} produced {len(got)} .deb files")
            debs[pkg] = got.pop()
        deb_sha = _sha256_file(debs[package])
        tree = tmpdir / "tree"
        for deb in debs.values():
            progress(f"unpacking {deb.name}")
            _run(["dpkg-deb", "-x", str(deb), str(tree)])
        vmlinuz = tree / "boot" / f"vmlinuz-{release}"
        mod_dir = tree / "lib" / "modules" / release
        if not mod_dir.is_dir():
            mod_dir = tree / "usr" / "lib" / "modules" / release
        if not vmlinuz.exists() or not mod_dir.is_dir():
            raise KernelError(f"{', '.join(d.name for d in debs.values())}: no vmlinuz or modules for {release}")
        if n := decompress_modules(mod_dir):
            progress(f"decompressed {n} zstd modules")
        out = tmpdir / "out"
        out.mkdir()
        shutil.move(str(vmlinuz), out / "vmlinuz")
        shutil.move(str(mod_dir), out / "modules")
        progress("extracting vmlinux (PVH boot skips decompression in the guest)")
        elf = extract_vmlinux((out / "vmlinuz").read_bytes(), zstd=unzstd)
        if elf is not None and has_pvh_note(elf):
            (out / "vmlinux").write_bytes(elf)
        progress("writing modules.dep")
        _write_modules_dep(out / "modules")
        import json
        (out / "kernel.json").write_text(json.dumps({
            "release": release, "package": package, "package_version": version, "deb_sha256": deb_sha,
            "debs": {pkg: {"file": deb.name, "sha256": _sha256_file(deb)} for pkg, deb in debs.items()},
        }, indent=2) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.rename(out, dest)
    return _load(dest)


def _load(dest: Path) -> Kernel:
    import json
    meta = json.loads((dest / "kernel.json").read_text())
    vmlinux = dest / "vmlinux"
    if not vmlinux.exists():  # kernels cached before vmlinux extraction (or zstd payloads) existed
        elf = extract_vmlinux((dest / "vmlinuz").read_bytes(), zstd=unzstd)
        if elf is not None and has_pvh_note(elf):
            tmp = vmlinux.with_name(f".vmlinux.{os.getpid()}")
            tmp.write_bytes(elf)
            os.replace(tmp, vmlinux)  # a reader never sees half a kernel
    return Kernel(release=meta["release"], package=meta["package"], package_version=meta["package_version"],
                  deb_sha256=meta["deb_sha256"], vmlinuz=dest / "vmlinuz", modules_dir=dest / "modules",
                  vmlinux=pvh_image(vmlinux))
