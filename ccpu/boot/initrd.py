"""The initramfs that boots an image's OWN kernel: fractal's boot stage with the image's modules.

The image's ``/boot/vmlinuz-<ver>`` cannot use fractal's initramfs (its modules are for fractal's
kernel), and the image's own initrd does not know fractal's shares.  So this builds a small one:
the guest init (``ccpu/guest/init.sh``, mode ``boot``), static busybox and its applets, and the
modules the boot stage needs -- :data:`REQUIRED` and what is there of :data:`OPTIONAL` --
taken from the image's ``/lib/modules/<ver>`` in load order (its ``modules.dep``,
``ccpu/guest/modules.py``).  No system image, no python: the boot stage is busybox only.

Everything comes from the untrusted image through :class:`~ccpu.boot.rootview.RootView`
(confined lookups) and is bounded: module paths are relative ``.ko``/``.ko.xz``/``.ko.zst`` names below
the modules dir, each file and the whole archive have a size limit.  The archive is cached under
``$FRACTAL_CACHE/boot/initrd/<sha256 of its inputs>.cpio.gz``, written atomically.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import posixpath
import re
import subprocess
import tempfile
from pathlib import Path

from ..guest import cpio, modules
from ..guest.initramfs import BUSYBOX
from .rootview import RootView, RootViewError

#: the boot stage's needs: the PCI transport, the shares (9p, virtiofs over fuse), overlay
REQUIRED = ("virtio_pci", "9pnet_virtio", "9p", "fuse", "virtiofs", "overlay")
#: loaded when the image's kernel has them: microvm's transport, early entropy, free page reporting
OPTIONAL = ("virtio_mmio", "virtio_rng", "virtio_balloon", "virtio_net")  # virtio_net: --netns
MAX_KERNEL = 128 << 20
MAX_MODULE = 64 << 20
MAX_DEP = 16 << 20  # modules.dep / modules.builtin
MAX_TOTAL = 256 << 20
_KO = re.compile(r"[A-Za-z0-9_./+-]+\.ko(\.xz|\.zst)?")
INIT_SH = Path(__file__).resolve().parent.parent / "guest" / "init.sh"


class InitrdError(RuntimeError):
    """The image's kernel cannot be booted (why, for the note)."""


def _read(view: RootView, path: str, limit: int) -> tuple[str, bytes]:
    try:
        e = view.lookup(path)
    except RootViewError as exc:
        raise InitrdError(f"{path}: {exc}") from None
    if e is None or not e.is_file:
        raise InitrdError(f"the image has no file {path}")
    if e.st.st_size > limit:
        raise InitrdError(f"{path} is larger than {limit >> 20} MiB")
    with open(e.host, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise InitrdError(f"{path} is larger than {limit >> 20} MiB")
    return e.host, data


def kernel_path(view: RootView, version: str) -> str:
    """The host path of the image's ``/boot/vmlinuz-<version>`` (its top layer's copy)."""
    host, _ = _read(view, f"/boot/vmlinuz-{version}", MAX_KERNEL)
    return host


def module_order(view: RootView, version: str) -> list[str]:
    """The modules to insmod, in order (paths relative to /lib/modules/<version>)."""
    mdir = f"/lib/modules/{version}"
    _, dep = _read(view, f"{mdir}/modules.dep", MAX_DEP)
    try:
        _, builtin_b = _read(view, f"{mdir}/modules.builtin", MAX_DEP)
        builtin = builtin_b.decode(errors="replace").split()
    except InitrdError:
        builtin = []
    try:
        deps = modules.parse_modules_dep(dep.decode(errors="replace"))
        names = {modules.module_name(p) for p in deps} | {modules.module_name(b) for b in builtin}
        wanted = REQUIRED + tuple(m for m in OPTIONAL if m in names)
        order = modules.load_order(deps, wanted, builtin)
    except modules.ModuleError as exc:
        raise InitrdError(f"the image's modules for {version}: {exc}") from None
    for ko in order:
        if not _KO.fullmatch(ko) or posixpath.normpath(ko) != ko or ko.startswith(("/", "../")):
            raise InitrdError(f"the image's modules.dep names {ko!r}: not a module path below {mdir}")
    return order


def _unzstd(data: bytes, ko: str) -> bytes:
    """A ``.ko.zst`` module decompressed, bounded by MAX_MODULE whatever its frame header claims
    (the image is untrusted: a small file must not become gigabytes here)."""
    from ..guest import kernel as guest_kernel

    try:
        return guest_kernel.unzstd(data, limit=MAX_MODULE)
    except guest_kernel.KernelError as exc:
        raise InitrdError(f"{ko}: {exc}") from None


def pvh_kernel(view: RootView, version: str, cache: str) -> str:
    """The image's kernel as QEMU should boot it: the ELF vmlinux inside its bzImage when that has
    a PVH entry (QEMU boots it directly: no decompression under TCG, and Ubuntu's zstd bzImages do
    not boot as bzImages under qboot + TCG at all; ccpu/guest/kernel.py), cached by the bzImage's
    sha256; else the bzImage itself.  Bounded: the image is untrusted (MAX_KERNEL in, MAX_VMLINUX out)."""
    from ..guest import kernel as guest_kernel

    host, data = _read(view, f"/boot/vmlinuz-{version}", MAX_KERNEL)
    out = os.path.join(cache, "boot", "kernel", hashlib.sha256(data).hexdigest() + ".vmlinux")
    if os.path.exists(out):
        return out
    try:
        elf = guest_kernel.extract_vmlinux(data, zstd=guest_kernel.unzstd)
    except guest_kernel.KernelError as exc:
        raise InitrdError(f"/boot/vmlinuz-{version}: {exc}") from None
    if elf is None or not guest_kernel.has_pvh_note(elf):
        return host
    os.makedirs(os.path.dirname(out), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(out), prefix=".vmlinux-")
    with os.fdopen(fd, "wb") as f:
        f.write(elf)
    os.chmod(tmp, 0o644)  # QEMU may run as its own user
    os.replace(tmp, out)
    return out


def build(view: RootView, version: str, cache: str) -> tuple[str, str]:
    """(kernel, initramfs) host paths for booting the image's kernel ``version``."""
    kernel = pvh_kernel(view, version, cache)
    order = module_order(view, version)
    entries: list[cpio.Entry] = []
    total = 0
    for ko in order:
        _, data = _read(view, f"/lib/modules/{version}/{ko}", MAX_MODULE)
        if ko.endswith(".xz"):  # busybox insmod loads plain .ko only
            try:
                data = lzma.LZMADecompressor().decompress(data, max_length=MAX_MODULE)
            except lzma.LZMAError as exc:
                raise InitrdError(f"{ko}: {exc}") from None
            ko = ko[:-3]
        elif ko.endswith(".zst"):  # Ubuntu's modules
            data = _unzstd(data, ko)
            ko = ko[:-4]
        total += len(data)
        if total > MAX_TOTAL:
            raise InitrdError(f"the boot stage's modules are larger than {MAX_TOTAL >> 20} MiB")
        entries.append(cpio.Entry.file(f"lib/modules/{version}/{ko}", data))
    entries.append(cpio.Entry.file("etc/fractal/modules",
                                   "".join(k.removesuffix(".xz").removesuffix(".zst") + "\n" for k in order).encode()))
    entries.append(cpio.Entry.file("init", INIT_SH.read_bytes(), 0o755))
    with open(BUSYBOX, "rb") as f:
        entries.append(cpio.Entry.file("bin/busybox", f.read(), 0o755))
    listing = subprocess.run([BUSYBOX, "--list-full"], check=True, capture_output=True, text=True).stdout
    for line in sorted(set(listing.split())):
        p = line.strip("/")
        if p and p != "bin/busybox":
            entries.append(cpio.Entry.symlink(p, "/bin/busybox"))
    entries.append(cpio.Entry.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"))
    entries.append(cpio.Entry.file("etc/group", b"root:x:0:\ntty:x:5:\n"))
    entries += [cpio.Entry.dir(d, 0o1777 if d == "tmp" else 0o755)
                for d in ("proc", "sys", "dev", "run", "tmp", "repo", "mnt", "root")]
    archive = cpio.write(entries)
    key = hashlib.sha256(archive).hexdigest()
    out_dir = os.path.join(cache, "boot", "initrd")
    out = os.path.join(out_dir, f"{key}.cpio.gz")
    if not os.path.exists(out):
        os.makedirs(out_dir, mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f"{key}.tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(cpio.compress(archive))
            # QEMU reads it through /proc/self/fd/N, which reopens the file as QEMU's own
            # (unprivileged) user: world-readable, as the guest build's initramfs (nothing secret)
            os.chmod(tmp, 0o644)
            os.rename(tmp, out)
        except BaseException:
            os.unlink(tmp)
            raise
    return kernel, out
