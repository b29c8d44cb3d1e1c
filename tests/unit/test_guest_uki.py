"""The unified kernel image (ccpu/guest/uki.py): its PCR 11 prediction, its reproducibility."""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from ccpu.guest import uki

MEASURE = "/usr/lib/systemd/systemd-measure"


def _chain(steps: list[bytes]) -> bytes:
    pcr = bytes(32)
    for data in steps:
        pcr = hashlib.sha256(pcr + hashlib.sha256(data).digest()).digest()
    return pcr


def test_pcr11_is_the_stubs_hash_chain_in_its_order() -> None:
    """Name with NUL, then contents, per section, in the stub's order whatever the dict's order."""
    contents = {".initrd": b"I", ".linux": b"L", ".cmdline": b"C", ".osrel": b"O"}
    sha = {k: hashlib.sha256(v).hexdigest() for k, v in contents.items()}
    want = _chain([b".linux\0", b"L", b".osrel\0", b"O", b".cmdline\0", b"C", b".initrd\0", b"I"])
    assert uki.pcr11(sha) == want
    assert uki.pcr11({k: sha[k] for k in (".linux", ".initrd")}) == _chain([b".linux\0", b"L", b".initrd\0", b"I"])
    # any section changing changes the value
    assert uki.pcr11({**sha, ".initrd": hashlib.sha256(b"J").hexdigest()}) != want


@pytest.mark.skipif(not os.path.exists(MEASURE), reason="no systemd-measure (systemd >= 252)")
def test_pcr11_agrees_with_systemd_measure(tmp_path: Path) -> None:
    """systemd's own calculator, after its first boot phase ("enter-initrd", measured by
    systemd-pcrphase, which fractal's init does not run): one more extend of ours gives its value."""
    files = {".linux": b"kernel bytes" * 100, ".osrel": b"ID=fractal\n", ".cmdline": b"console=ttyS0",
             ".initrd": b"\x07" * 4099}
    args = []
    for name, data in files.items():
        (tmp_path / name[1:]).write_bytes(data)
        args.append(f"--{name[1:]}={tmp_path / name[1:]}")
    out = subprocess.run([MEASURE, "calculate", "--bank=sha256", *args], capture_output=True, text=True, check=True)
    first = next(line for line in out.stdout.splitlines() if line.startswith("11:sha256="))
    ours = uki.pcr11({k: hashlib.sha256(v).hexdigest() for k, v in files.items()})
    assert uki.extend(ours, b"enter-initrd").hex() == first.split("=", 1)[1].lower()


def test_cmdline_pcr12_is_the_utf16_load_options_with_nul() -> None:
    assert uki.cmdline_pcr12("ab") == _chain(["ab\0".encode("utf-16-le")])


def test_layout_places_sections_page_aligned_after_each_other() -> None:
    assert uki.layout({".osrel": 10, ".cmdline": 0x1000, ".linux": 0x1001}, 0x20000) == [
        (".osrel", 0x20000), (".cmdline", 0x21000), (".linux", 0x22000)]


def _pe(timestamp: int) -> bytes:
    blob = bytearray(0x200)
    blob[:2] = b"MZ"
    struct.pack_into("<I", blob, 0x3C, 0x80)
    blob[0x80:0x84] = b"PE\0\0"
    struct.pack_into("<I", blob, 0x80 + 8, timestamp)
    blob[0x100:0x110] = b"some code bytes!"
    return bytes(blob)


def test_deterministic_clears_the_timestamp_and_recomputes_the_checksum() -> None:
    a, b = uki.deterministic(_pe(1234)), uki.deterministic(_pe(99999))
    assert a == b
    assert struct.unpack_from("<I", a, 0x80 + 8)[0] == 0
    at = 0x80 + 24 + 64
    assert struct.unpack_from("<I", a, at)[0] == uki.pe_checksum(a, at) != 0
    with pytest.raises(uki.UkiError):
        uki.deterministic(b"ELF" + bytes(100))


@pytest.mark.skipif(not uki.available() or shutil.which("objcopy") is None, reason="no systemd-boot-efi stub")
def test_two_builds_give_the_same_image(tmp_path: Path) -> None:
    """Same inputs, same bytes: objcopy's clock is taken out (the build sleeps past a second)."""
    import time

    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd"
    kernel.write_bytes(b"\x01" * 5000)
    initrd.write_bytes(b"\x02" * 7000)
    kw = dict(kernel=kernel, initramfs=initrd, cmdline="console=ttyS0", osrel=uki.os_release("6.1", "ab" * 32))
    one = uki.build(tmp_path / "a.efi", **kw)
    time.sleep(1.1)
    two = uki.build(tmp_path / "b.efi", **kw)
    assert one.sha256 == two.sha256 and (tmp_path / "a.efi").read_bytes() == (tmp_path / "b.efi").read_bytes()
    assert one.sections[".initrd"] == hashlib.sha256(b"\x02" * 7000).hexdigest()
    sections = subprocess.run(["objdump", "-h", str(tmp_path / "a.efi")], capture_output=True, text=True).stdout
    for name in (".osrel", ".cmdline", ".linux", ".initrd"):
        assert name in sections
    assert one.describe()["pcr11"] == uki.pcr11(one.sections).hex()


def test_pcr4_orders_the_uki_by_how_it_boots() -> None:
    """-kernel: the UKI before the boot-option action and the separator; a boot entry: after."""
    app, kernel = "11" * 32, "22" * 32
    action, sep = uki.CALLING_BOOT_OPTION, uki.SEPARATOR

    def chain(digests: list[bytes]) -> bytes:
        pcr = bytes(32)
        for d in digests:
            pcr = hashlib.sha256(pcr + d).digest()
        return pcr

    h = lambda b: hashlib.sha256(b).digest()  # noqa: E731
    assert uki.pcr4(app, kernel) == chain([bytes.fromhex(app), h(action), h(sep), bytes.fromhex(kernel)])
    assert uki.pcr4(app, kernel, direct_kernel=False) == chain([h(action), h(sep), bytes.fromhex(app),
                                                                bytes.fromhex(kernel)])


def test_cmdline_to_build_in_is_checked() -> None:
    assert uki.check_cmdline("console=ttyS0 fractal.listen=1.2.3.4:7443") == "console=ttyS0 fractal.listen=1.2.3.4:7443"
    for bad, why in (("", "empty"), ("a\nb", "printable ASCII"), ("é", "printable ASCII"), ("x" * 2048, "< 2048")):
        with pytest.raises(uki.UkiError, match=why):
            uki.check_cmdline(bad)


@pytest.mark.skipif(not uki.available() or shutil.which("objcopy") is None, reason="no systemd-boot-efi stub")
def test_a_machines_uki_keeps_the_builds_sections_and_builds_its_cmdline_in(tmp_path: Path) -> None:
    from ccpu.guest import pe

    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd"
    kernel.write_bytes(b"\x01" * 5000)
    initrd.write_bytes(b"\x02" * 7000)
    base = uki.build(tmp_path / "base.efi", kernel=kernel, initramfs=initrd, cmdline="console=ttyS0",
                     osrel=uki.os_release("6.1", "ab" * 32))
    line = "console=ttyS0 fractal.listen=169.254.9.2:7443 fractal.ca=sha256:" + "cd" * 32
    one = uki.with_cmdline(base.path, tmp_path / "m1.efi", line)
    two = uki.with_cmdline(base.path, tmp_path / "m2.efi", line)
    assert one.sha256 == two.sha256  # reproducible
    assert {k: v for k, v in one.sections.items() if k != ".cmdline"} == \
        {k: v for k, v in base.sections.items() if k != ".cmdline"}
    assert pe.section_data(one.path.read_bytes(), ".cmdline") == line.encode()
    m = uki.machine_manifest(one, guest_sha256="ab" * 32, kernel_release="6.1", esp={"file": "esp.img"})
    u = m["uki"]
    assert u["boot"] == "entry" and u["cmdline"] == line and m["esp"] == {"file": "esp.img"}
    assert u["pcr11"] == uki.pcr11(one.sections).hex() != base.describe()["pcr11"]
    assert base.describe()["boot"] == "loader"
    if one.linux_authenticode:  # our fake kernel is no PE image: no PCR 4 then
        assert u["pcr4"] == uki.pcr4(one.authenticode, one.linux_authenticode, direct_kernel=False).hex()
    with pytest.raises(uki.UkiError, match="not a UKI"):
        uki.with_cmdline(initrd, tmp_path / "x.efi", line)
    with pytest.raises(uki.UkiError, match="unknown boot"):
        one.describe("pxe")


def test_a_kernel_without_an_efi_stub_gets_no_uki(tmp_path: Path) -> None:
    """uki.efi_kernel: only a PE image can be the stub's .linux (the kernel built for the guest boots
    by PVH only); the guest build then writes no UKI and says why (manifest ``uki_missing``)."""
    bzimage = tmp_path / "bzImage"
    bzimage.write_bytes(b"\xeaxx" + bytes(0x300))  # a legacy boot sector's jump, no MZ / PE header
    assert not uki.efi_kernel(bzimage)
    assert not uki.efi_kernel(tmp_path / "absent")
    half = tmp_path / "half"
    half.write_bytes(_pe(1)[:0x82])  # MZ, then cut inside the PE signature
    assert not uki.efi_kernel(half)
    if uki.available():  # the systemd stub is itself a PE/EFI application
        assert uki.efi_kernel(Path(uki.STUB))
    assert "--kernel debian" in uki.NOT_EFI
