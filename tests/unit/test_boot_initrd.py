"""ccpu/boot/initrd.py: the boot stage's initramfs for an image's own kernel, its modules taken
from the (untrusted) image in load order, confined and bounded."""

from __future__ import annotations

import gzip
import lzma
import os
from pathlib import Path

import pytest
import zstandard

from ccpu.boot import initrd
from ccpu.boot.rootview import RootView
from ccpu.guest import cpio

VER = "9.9.9-test"
MODS = {  # path -> deps (as depmod writes them)
    "kernel/drivers/virtio/virtio_pci.ko": [],
    "kernel/net/9p/9pnet.ko": [],
    "kernel/net/9p/9pnet_virtio.ko": ["kernel/net/9p/9pnet.ko"],
    "kernel/fs/netfs/netfs.ko": [],
    "kernel/fs/9p/9p.ko": ["kernel/net/9p/9pnet.ko", "kernel/fs/netfs/netfs.ko"],
    "kernel/fs/fuse/fuse.ko": [],
    "kernel/fs/fuse/virtiofs.ko.xz": ["kernel/fs/fuse/fuse.ko"],
    "kernel/fs/overlayfs/overlay.ko": [],
    "kernel/drivers/char/hw_random/virtio-rng.ko": [],
}


def _image(tmp: Path, mods: dict[str, list[str]] = MODS, extra_dep: str = "") -> RootView:
    root = tmp / "layer"
    (root / "boot").mkdir(parents=True)
    (root / f"boot/vmlinuz-{VER}").write_bytes(b"bzImage")
    mdir = root / "usr/lib/modules" / VER
    mdir.mkdir(parents=True)
    os.symlink("usr/lib", root / "lib")
    for p in mods:
        (mdir / p).parent.mkdir(parents=True, exist_ok=True)
        data = f"module {p}".encode()
        (mdir / p).write_bytes(lzma.compress(data) if p.endswith(".xz")
                               else zstandard.ZstdCompressor().compress(data) if p.endswith(".zst") else data)
    (mdir / "modules.dep").write_text("".join(f"{p}: {' '.join(d)}\n" for p, d in mods.items()) + extra_dep)
    (mdir / "modules.builtin").write_text("kernel/drivers/virtio/virtio_mmio.ko\n")
    return RootView([str(root)])


def test_modules_in_load_order_from_the_image(tmp_path: Path) -> None:
    view = _image(tmp_path)
    kernel, out = initrd.build(view, VER, str(tmp_path / "cache"))
    assert kernel == str(tmp_path / "layer" / "boot" / f"vmlinuz-{VER}")
    entries = {e.path: e for e in cpio.read(gzip.decompress(Path(out).read_bytes()))}
    order = entries["etc/fractal/modules"].data.decode().split()
    assert order.index("kernel/net/9p/9pnet.ko") < order.index("kernel/net/9p/9pnet_virtio.ko")
    assert order.index("kernel/fs/fuse/fuse.ko") < order.index("kernel/fs/fuse/virtiofs.ko")
    assert "kernel/drivers/char/hw_random/virtio-rng.ko" in order  # optional, present
    # xz modules are stored decompressed (busybox insmod reads plain .ko)
    assert entries[f"lib/modules/{VER}/kernel/fs/fuse/virtiofs.ko"].data == b"module kernel/fs/fuse/virtiofs.ko.xz"
    assert b"fractal.boot.lowers" in entries["init"].data and "bin/busybox" in entries
    assert "etc/fractal/image" not in entries  # no system image: the boot stage is busybox only
    assert initrd.build(view, VER, str(tmp_path / "cache"))[1] == out  # cached by content


def test_zstd_modules_are_stored_decompressed_and_bounded(tmp_path: Path) -> None:
    """Ubuntu's modules are .ko.zst: decompressed into the boot stage like .ko.xz; a module whose
    decompressed size passes the bound is refused (the image is untrusted)."""
    mods = {p.replace("overlay.ko", "overlay.ko.zst"): d for p, d in MODS.items()}
    _, out = initrd.build(_image(tmp_path, mods), VER, str(tmp_path / "cache"))
    entries = {e.path: e for e in cpio.read(gzip.decompress(Path(out).read_bytes()))}
    assert entries[f"lib/modules/{VER}/kernel/fs/overlayfs/overlay.ko"].data == b"module kernel/fs/overlayfs/overlay.ko.zst"
    assert "kernel/fs/overlayfs/overlay.ko" in entries["etc/fractal/modules"].data.decode().split()
    bomb = tmp_path / "bomb"
    view = _image(bomb, mods)
    big = bomb / "layer/usr/lib/modules" / VER / "kernel/fs/overlayfs/overlay.ko.zst"
    big.write_bytes(zstandard.ZstdCompressor().compress(b"\0" * (initrd.MAX_MODULE + 1)))
    with pytest.raises(initrd.InitrdError, match="decompressed"):
        initrd.build(view, VER, str(bomb / "cache"))


def test_a_missing_required_module_is_a_reason(tmp_path: Path) -> None:
    mods = {p: d for p, d in MODS.items() if "overlay" not in p}
    with pytest.raises(initrd.InitrdError, match="overlay"):
        initrd.build(_image(tmp_path, mods), VER, str(tmp_path / "cache"))


def test_module_paths_are_confined(tmp_path: Path) -> None:
    """modules.dep is the image's: a dependency named outside the modules dir is refused."""
    mods = dict(MODS)
    mods["kernel/fs/overlayfs/overlay.ko"] = ["../../../../etc/shadow"]
    view = _image(tmp_path, mods, extra_dep="../../../../etc/shadow:\n")
    with pytest.raises(initrd.InitrdError, match="not a module path"):
        initrd.build(view, VER, str(tmp_path / "cache"))


def test_no_modules_dep(tmp_path: Path) -> None:
    view = _image(tmp_path)
    os.unlink(tmp_path / "layer/usr/lib/modules" / VER / "modules.dep")
    with pytest.raises(initrd.InitrdError, match="modules.dep"):
        initrd.build(view, VER, str(tmp_path / "cache"))


def test_the_images_kernel_boots_as_its_pvh_vmlinux(tmp_path: Path) -> None:
    """A bzImage with a PVH ELF inside (Debian's xz, Ubuntu's zstd) is booted as that ELF, cached
    by the bzImage's hash: no decompression under TCG, and zstd bzImages do not boot as such."""
    from ccpu.guest import kernel as k
    from tests.unit.test_guest_kernel import _bzimage, _elf_with_note

    elf = _elf_with_note(b"Xen", k.XEN_ELFNOTE_PHYS32_ENTRY) + b"text" * 100
    view = _image(tmp_path)
    bz = tmp_path / "layer" / "boot" / f"vmlinuz-{VER}"
    bz.write_bytes(_bzimage(zstandard.ZstdCompressor().compress(elf) + b"size"))
    kernel, _ = initrd.build(view, VER, str(tmp_path / "cache"))
    assert kernel.startswith(str(tmp_path / "cache" / "boot" / "kernel")) and Path(kernel).read_bytes() == elf
    assert initrd.build(view, VER, str(tmp_path / "cache"))[0] == kernel  # cached
