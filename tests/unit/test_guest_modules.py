"""Module load order from modules.dep, and reading depends= from a .ko (synthetic inputs)."""

from __future__ import annotations

import struct

import pytest

from ccpu.guest import modules as m

DEP = """\
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/char/hw_random/virtio-rng.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/net/9p/9pnet.ko:
kernel/net/9p/9pnet_virtio.ko: kernel/net/9p/9pnet.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko
"""


def test_parse_and_order_puts_dependencies_first() -> None:
    deps = m.parse_modules_dep(DEP)
    order = m.load_order(deps, ["virtio_pci", "virtio_console", "9p", "9pnet_virtio"])
    names = [m.module_name(p) for p in order]
    assert names == ["virtio_ring", "virtio", "virtio_pci", "virtio_console", "9pnet", "9p", "9pnet_virtio"]
    for i, p in enumerate(order):
        assert set(deps[p]) <= set(order[:i])


def test_dash_and_underscore_are_the_same_module() -> None:
    deps = m.parse_modules_dep(DEP)
    assert m.module_name("kernel/drivers/char/hw_random/virtio-rng.ko.xz") == "virtio_rng"
    assert m.load_order(deps, ["virtio-rng"])[-1].endswith("virtio-rng.ko")


def test_builtin_modules_are_skipped_and_unknown_ones_fail() -> None:
    deps = m.parse_modules_dep(DEP)
    assert m.load_order(deps, ["overlay"], builtin=["kernel/fs/overlayfs/overlay.ko"]) == []
    with pytest.raises(m.ModuleError, match="neither"):
        m.load_order(deps, ["overlay"])


def test_cycles_and_missing_dependencies_are_errors() -> None:
    with pytest.raises(m.ModuleError, match="cycle"):
        m.load_order({"a.ko": ["b.ko"], "b.ko": ["a.ko"]}, ["a"])
    with pytest.raises(m.ModuleError, match="does not list"):
        m.load_order({"a.ko": ["b.ko"]}, ["a"])


def test_render_modules_dep_gives_the_transitive_closure() -> None:
    text = m.render_modules_dep({"k/a.ko": ["b"], "k/b.ko": ["c"], "k/c.ko": [], "k/d.ko": ["a", "c"]})
    deps = m.parse_modules_dep(text)
    assert deps["k/a.ko"] == ["k/b.ko", "k/c.ko"]
    assert set(deps["k/d.ko"]) == {"k/a.ko", "k/b.ko", "k/c.ko"}
    assert [m.module_name(p) for p in m.load_order(deps, ["d"])] == ["c", "b", "a", "d"]


def _elf_with_modinfo(modinfo: bytes) -> bytes:
    """A minimal ELF64 LE: null section, .modinfo, .shstrtab."""
    shstr = b"\0.modinfo\0.shstrtab\0"
    body_off = 64
    modinfo_off = body_off
    shstr_off = modinfo_off + len(modinfo)
    shoff = shstr_off + len(shstr)
    shoff += -shoff % 8
    hdr = bytearray(64)
    hdr[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", hdr, 0x28, shoff)
    struct.pack_into("<HHH", hdr, 0x3A, 64, 3, 2)
    data = bytes(hdr) + modinfo + shstr
    data += b"\0" * (shoff - len(data))
    sec = lambda name, off, size: struct.pack("<IIQQQQIIQQ", name, 1, 0, 0, off, size, 0, 0, 1, 0)
    return data + sec(0, 0, 0) + sec(1, modinfo_off, len(modinfo)) + sec(10, shstr_off, len(shstr))


def test_modinfo_depends_reads_the_elf_section() -> None:
    ko = _elf_with_modinfo(b"license=GPL\0depends=virtio,virtio_ring\0vermagic=6.1\0")
    assert m.modinfo_depends(ko) == ["virtio", "virtio_ring"]
    assert m.modinfo_depends(_elf_with_modinfo(b"depends=\0")) == []
    with pytest.raises(m.ModuleError):
        m.modinfo_depends(b"not an elf")


def test_split_order_loads_the_boot_set_first_and_the_rest_after() -> None:
    """/etc/fractal/modules and modules.later (ccpu/guest/init.sh): the first list is closed under
    dependencies, the second holds the rest of the wanted closure, each dependencies first."""
    deps = m.parse_modules_dep(DEP)
    first, later = m.split_order(deps, ["virtio_pci", "virtio_console"], ["virtio_pci", "9p", "9pnet_virtio"])
    assert [m.module_name(p) for p in first] == ["virtio_ring", "virtio", "virtio_pci", "virtio_console"]
    assert [m.module_name(p) for p in later] == ["9pnet", "9p", "9pnet_virtio"]
    both = first + later
    for i, p in enumerate(both):
        assert set(deps[p]) <= set(both[:i])
    assert m.split_order(deps, ["virtio_pci"], [])[1] == []


def test_shipped_modules_dep_lists_what_the_guest_carries_decompressed_in_load_order() -> None:
    """busybox modprobe -a reads it in the guest (ccpu/guest/init.sh load_modules)."""
    deps = {"k/virtio.ko.xz": ["k/virtio_ring.ko.xz"], "k/virtio_ring.ko.xz": [],
            "k/virtio_pci.ko.xz": ["k/virtio.ko.xz", "k/virtio_ring.ko.xz"], "k/unused.ko.xz": [],
            "k/other.ko.xz": ["k/unused.ko.xz"]}
    order = m.load_order(deps, ["virtio_pci"])
    text = m.shipped_modules_dep(deps, order)
    assert text == ("k/virtio_ring.ko:\nk/virtio.ko: k/virtio_ring.ko\n"
                    "k/virtio_pci.ko: k/virtio.ko k/virtio_ring.ko\n")
    # what the guest does not carry is never named, not even as a dependency
    assert "unused" not in m.shipped_modules_dep(deps, [*order, "k/other.ko.xz"])
    assert m.parse_modules_dep(text) == {"k/virtio_ring.ko": [], "k/virtio.ko": ["k/virtio_ring.ko"],
                                         "k/virtio_pci.ko": ["k/virtio.ko", "k/virtio_ring.ko"]}
