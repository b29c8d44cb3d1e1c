"""Kernel package resolution and vmlinux extraction (pure parts)."""

from __future__ import annotations

import lzma
import struct

import pytest

from ccpu.guest import kernel as k

DEPENDS = """linux-image-amd64
  Depends: linux-image-6.1.0-56-amd64
"""
POLICY = """linux-image-6.1.0-56-amd64:
  Installed: (none)
  Candidate: 6.1.192-2
  Version table:
"""


def test_parse_apt_output() -> None:
    assert k.parse_depends(DEPENDS) == "linux-image-6.1.0-56-amd64"
    assert k.parse_policy_candidate(POLICY) == "6.1.192-2"
    assert k.release_of("linux-image-6.1.0-56-amd64") == "6.1.0-56-amd64"
    with pytest.raises(k.KernelError):
        k.parse_depends("linux-image-amd64\n")
    with pytest.raises(k.KernelError):
        k.parse_policy_candidate("  Candidate: (none)\n")


def _elf_with_note(name: bytes, ntype: int) -> bytes:
    note = struct.pack("<III", len(name) + 1, 4, ntype) + (name + b"\0").ljust((len(name) + 4) & ~3, b"\0") + b"\0" * 4
    hdr = bytearray(64)
    hdr[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", hdr, 0x20, 64)
    struct.pack_into("<HH", hdr, 0x36, 56, 1)
    note_off = 64 + 56
    ph = struct.pack("<IIQQQQQQ", 4, 0, note_off, 0, 0, len(note), len(note), 4)
    return bytes(hdr) + ph + note


def test_pvh_note_detection_and_extraction() -> None:
    elf = _elf_with_note(b"Xen", k.XEN_ELFNOTE_PHYS32_ENTRY)
    assert k.has_pvh_note(elf)
    assert not k.has_pvh_note(_elf_with_note(b"GNU", 3))
    bz = b"MZ setup code" + b"\x00" * 100 + lzma.compress(elf, format=lzma.FORMAT_XZ) + b"trailer"
    assert k.extract_vmlinux(bz) == elf
    assert k.extract_vmlinux(b"no payload") is None


def test_kernel_package_follows_the_architecture() -> None:
    assert k.kernel_flavour("amd64") == "amd64" and k.kernel_flavour("arm64") == "arm64"
    with pytest.raises(k.KernelError):
        k.kernel_flavour("mips64el")
    arm = "linux-image-arm64\n  Depends: linux-image-6.1.0-56-arm64\n"
    assert k.parse_depends(arm, "arm64") == "linux-image-6.1.0-56-arm64"
    with pytest.raises(k.KernelError):  # an amd64 kernel is no answer for arm64
        k.parse_depends(DEPENDS, "arm64")
