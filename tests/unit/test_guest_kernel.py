"""Kernel package resolution and vmlinux extraction (pure parts)."""

from __future__ import annotations

import lzma
import struct

import pytest
import zstandard

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


def _bzimage(payload: bytes, setup_sects: int = 3) -> bytes:
    """A bzImage as the boot protocol lays it out: setup sectors, then the protected-mode code
    whose payload_offset/payload_length (0x248/0x24c) say where the compressed kernel is."""
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, 0x20F)
    head = b"\x90" * 300  # decompressor code before the payload
    struct.pack_into("<II", setup, 0x248, len(head), len(payload))
    return bytes(setup) + head + payload + b"\x00" * 64


def test_zstd_payload_is_found_by_the_boot_header_and_its_size_trailer_cut() -> None:
    """Ubuntu 24.04's kernels are zstd bzImages; before this was read they booted as bzImages,
    which ended QEMU (qboot + TCG) before the first console line."""
    elf = _elf_with_note(b"Xen", k.XEN_ELFNOTE_PHYS32_ENTRY) + b"kernel text" * 1000
    frame = zstandard.ZstdCompressor().compress(elf)
    payload = frame + struct.pack("<I", len(elf))  # the kernel build appends the size
    bz = _bzimage(payload)
    assert k.bzimage_payload(bz) == payload
    assert k.extract_vmlinux(bz) is None  # no zstd reader given: not guessed
    out = k.extract_vmlinux(bz, zstd=k.unzstd)
    assert out == elf and k.has_pvh_note(out)
    assert k.bzimage_payload(b"MZ" + b"\x00" * 0x300) is None  # no HdrS
    short = bytearray(bz)
    struct.pack_into("<I", short, 0x24C, len(bz))  # a length past the end of the file
    assert k.bzimage_payload(bytes(short)) is None
    bomb = _bzimage(zstandard.ZstdCompressor().compress(b"\0" * (4 << 20)) + b"size")
    with pytest.raises(k.KernelError, match="larger than"):  # an untrusted image's kernel is bounded
        k.extract_vmlinux(bomb, zstd=lambda b: k.unzstd(b, limit=1 << 20))


def test_kernel_package_follows_the_architecture() -> None:
    assert k.kernel_flavour("amd64") == "amd64" and k.kernel_flavour("arm64") == "arm64"
    with pytest.raises(k.KernelError):
        k.kernel_flavour("mips64el")
    arm = "linux-image-arm64\n  Depends: linux-image-6.1.0-56-arm64\n"
    assert k.parse_depends(arm, "arm64") == "linux-image-6.1.0-56-arm64"
    with pytest.raises(k.KernelError):  # an amd64 kernel is no answer for arm64
        k.parse_depends(DEPENDS, "arm64")


UBUNTU_OS_RELEASE = '''PRETTY_NAME="Ubuntu 24.04.1 LTS"
NAME="Ubuntu"
VERSION_ID="24.04"
ID=ubuntu
ID_LIKE=debian
'''
MINT_OS_RELEASE = 'NAME="Linux Mint"\nID=linuxmint\nID_LIKE="ubuntu debian"\n'
DEBIAN_OS_RELEASE = 'PRETTY_NAME="Debian GNU/Linux 13 (trixie)"\nID=debian\nVERSION_ID="13"\n'


def test_kernel_package_follows_the_distribution() -> None:
    """Ubuntu (and what says it is like Ubuntu) ships the "generic" flavour; Debian and the rest
    name it after the architecture."""
    assert k.distro_family(UBUNTU_OS_RELEASE) == "ubuntu"
    assert k.distro_family(MINT_OS_RELEASE) == "ubuntu"
    assert k.distro_family(DEBIAN_OS_RELEASE) == "debian"
    assert k.distro_family("") == "debian"
    assert k.kernel_flavour("amd64", "ubuntu") == "generic"
    with pytest.raises(k.KernelError, match="ubuntu"):
        k.kernel_flavour("mips64el", "ubuntu")
    noble = ("linux-image-generic\n  Depends: linux-image-6.8.0-90-generic\n"
             "  Depends: linux-firmware\n  Depends: intel-microcode\n")
    assert k.parse_depends(noble, "generic") == "linux-image-6.8.0-90-generic"
    assert k.release_of("linux-image-6.8.0-90-generic") == "6.8.0-90-generic"
    with pytest.raises(k.KernelError):  # a Debian answer is no answer for the generic flavour
        k.parse_depends(DEPENDS, "generic")


def test_zstd_modules_are_decompressed_once(tmp_path) -> None:  # noqa: ANN001
    """Ubuntu's .ko.zst become plain .ko (busybox insmod and Python < 3.14 read no zstd)."""
    import shutil
    import subprocess
    if shutil.which("zstd") is None:
        pytest.skip("zstd not installed")
    d = tmp_path / "kernel" / "fs" / "9p"
    d.mkdir(parents=True)
    (d / "9p.ko").write_bytes(b"\x7fELF module body")
    subprocess.run(["zstd", "-q", "--rm", str(d / "9p.ko")], check=True)
    (tmp_path / "plain.ko").write_bytes(b"plain")
    assert k.decompress_modules(tmp_path) == 1
    assert (d / "9p.ko").read_bytes() == b"\x7fELF module body" and not (d / "9p.ko.zst").exists()
    assert (tmp_path / "plain.ko").read_bytes() == b"plain"
    assert k.decompress_modules(tmp_path) == 0


def _elf_with_loads(segments: list[tuple[bytes, int]]) -> bytes:
    """A 64-bit ELF with one PT_LOAD per (file bytes, memsz), laid out one after the other."""
    hdr = bytearray(64)
    hdr[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", hdr, 0x20, 64)
    struct.pack_into("<HH", hdr, 0x36, 56, len(segments))
    off = 64 + 56 * len(segments)
    phs, bodies = b"", b""
    for body, memsz in segments:
        phs += struct.pack("<IIQQQQQQ", 1, 7, off + len(bodies), 0x1000, 0x1000, len(body), memsz, 0x1000)
        bodies += body
    return bytes(hdr) + phs + bodies


def _loaded(elf: bytes) -> list[bytes]:
    """What an ELF loader puts in memory per PT_LOAD: the file bytes, zero-filled to memsz."""
    out = []
    for i in range(struct.unpack_from("<H", elf, 0x38)[0]):
        _t, _f, off, _v, _p, filesz, memsz, _a = struct.unpack_from("<IIQQQQQQ", elf, 64 + 56 * i)
        out.append(elf[off:off + filesz] + b"\0" * (memsz - filesz))
    return out


def test_zero_tails_are_left_to_the_loader_and_the_loaded_bytes_stay_the_same() -> None:
    elf = _elf_with_loads([(b"text" * 10, 40), (b"data\0\0x" + b"\0" * 5000, 9000), (b"\0" * 300, 300)])
    trimmed = k.trim_zero_tails(elf)
    assert _loaded(trimmed) == _loaded(elf)
    filesz = [struct.unpack_from("<Q", trimmed, 64 + 56 * i + 0x20)[0] for i in range(3)]
    assert filesz == [40, 7, 0]  # untouched, cut after the last non-zero byte, all zeros
    assert len(trimmed) == len(elf) and k.trim_zero_tails(trimmed) == trimmed
    with pytest.raises(k.KernelError):
        k.trim_zero_tails(b"\x7fELF\x01\x01" + b"\0" * 60)  # 32-bit
    bad = bytearray(elf)
    struct.pack_into("<Q", bad, 64 + 0x20, 1 << 40)  # p_filesz past the end of the file
    with pytest.raises(k.KernelError):
        k.trim_zero_tails(bytes(bad))


def test_pvh_image_is_made_once_beside_vmlinux(tmp_path) -> None:  # noqa: ANN001
    assert k.pvh_image(tmp_path / "vmlinux") is None
    elf = _elf_with_loads([(b"x" + b"\0" * 100, 101)])
    (tmp_path / "vmlinux").write_bytes(elf)
    img = k.pvh_image(tmp_path / "vmlinux")
    assert img == tmp_path / k.PVH_IMAGE and img.read_bytes() == k.trim_zero_tails(elf) != elf
    assert k.pvh_image(tmp_path / "vmlinux") == img and (tmp_path / "vmlinux").read_bytes() == elf


def test_a_kernel_cache_that_cannot_be_written_boots_the_untrimmed_vmlinux(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    (tmp_path / "vmlinux").write_bytes(_elf_with_loads([(b"x" + b"\0" * 100, 101)]))

    def refused(*_a: object) -> None:
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(k.os, "replace", refused)
    assert k.pvh_image(tmp_path / "vmlinux") == tmp_path / "vmlinux"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vmlinux"]  # no temp file left behind
