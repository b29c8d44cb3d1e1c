"""The guest as one EFI image: a unified kernel image (UKI) made with systemd's stub.

A UKI is systemd's EFI stub (``linuxx64.efi.stub``, Debian package systemd-boot-efi) with the
kernel, the initramfs, the default command line and an os-release added as PE sections
(``.linux``, ``.initrd``, ``.cmdline``, ``.osrel``) by ``objcopy``.  UEFI firmware (OVMF here, any
UEFI machine on hardware) boots it as one file; the firmware measures the whole PE image into PCR 4
and the stub measures each of its sections into PCR 11 (docs/hardware.md).  So PCR 11 names the
exact kernel and initramfs -- and the initramfs names the EROFS system image by its sha256
(/etc/fractal/image, ``initramfs.image_marker``), so it covers the system image too.

Section addresses are computed from the sizes (each section page-aligned after the previous one),
never from the clock, and objcopy copies the stub's header: the same inputs give the same bytes
(a unit test builds twice and compares).

``pcr4`` predicts what the firmware leaves in PCR 4 from the Authenticode hashes of the UKI and
of its ``.linux`` (ccpu.guest.pe), which the build records: OVMF measures the UKI as it loads it
and, when the stub loads the kernel through the firmware's LoadImage, the kernel too; the events
between them are fixed strings.  The attestation tests check it against a real OVMF + swtpm boot.

``pcr11`` predicts the value the stub leaves in PCR 11 from the section contents (systemd's
documented rule: for each section present, in the stub's order, extend the section's name with
its NUL, then its contents; a hash chain, no TPM marshalling).
"""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from . import pe

STUB = "/usr/lib/systemd/boot/efi/linuxx64.efi.stub"
OBJCOPY = "objcopy"
FILE = "fractal.efi"
#: the order in which systemd-stub (252) measures the sections it knows into PCR 11
MEASURED_ORDER = (".linux", ".osrel", ".cmdline", ".initrd", ".splash", ".dtb", ".pcrsig", ".pcrpkey")
PCR_SECTIONS = 11  # systemd-stub: the UKI's sections
PCR_CMDLINE = 12  # systemd-stub: a command line given by the loader (overrides .cmdline, Secure Boot off)
PCR_BOOT_APP = 4  # the firmware: the PE image it loaded
ALIGN = 0x1000
#: the manifest's "uki" record: part of the build's inputs, so a build made before a field the
#: verifier needs (2: the Authenticode hashes for PCR 4) is made again rather than reused
FORMAT = 2
#: how the firmware starts the UKI (Uki.describe): QEMU's -kernel with a loader's command line, or
#: a Boot#### entry (disk, USB stick, HTTP boot) with the built-in one
BOOT_LOADER = "loader"
BOOT_ENTRY = "entry"
BOOTS = (BOOT_LOADER, BOOT_ENTRY)
#: what PCR 12 holds when no loader gave a command line (systemd-stub measures none): never extended
PCR12_NO_LOADER_CMDLINE = bytes(32)
MAX_CMDLINE = 2048  # x86's COMMAND_LINE_SIZE, with its NUL
#: where the first added section goes: above the stub's own sections (checked against the stub)
FIRST_VMA = 0x20000


class UkiError(RuntimeError):
    """The UKI cannot be built (no stub, no objcopy, a stub with sections where ours would go)."""


@dataclass(frozen=True)
class Uki:
    path: Path
    sha256: str
    size: int
    cmdline: str
    sections: dict[str, str]  # section name -> sha256 of its contents
    authenticode: str  # the UKI's Authenticode sha256 (what the firmware measures into PCR 4)
    #: the same of its .linux section, the kernel the stub loads; None if that is no PE image (then
    #: the firmware does not load it, and PCR 4 is not predicted)
    linux_authenticode: str | None

    def describe(self, boot: str = BOOT_LOADER) -> dict:
        """The manifest's record.  ``boot``: how the firmware starts it (BOOT_LOADER: QEMU's
        -kernel, a command line from the loader; BOOT_ENTRY: a Boot#### entry, a disk or USB
        stick, the built-in command line) -- it decides the order of PCR 4 and what PCR 12 holds."""
        if boot not in BOOTS:
            raise UkiError(f"unknown boot {boot!r} (known: {', '.join(BOOTS)})")
        out = {"file": self.path.name, "sha256": self.sha256, "size": self.size, "cmdline": self.cmdline,
               "sections": self.sections, "pcr11": pcr11(self.sections).hex(), "authenticode": self.authenticode,
               "boot": boot}
        if self.linux_authenticode:
            out.update(linux_authenticode=self.linux_authenticode,
                       pcr4=pcr4(self.authenticode, self.linux_authenticode,
                                 direct_kernel=boot == BOOT_LOADER).hex())
        return out


def available() -> bool:
    return os.path.exists(STUB)


def efi_kernel(kernel: Path) -> bool:
    """Can the stub start this kernel: is it a PE image (CONFIG_EFI_STUB)?  Debian's is; the kernel
    built for the guest (ccpu/guest/kbuild.py) boots by PVH only and has no EFI stub, so a UKI of it
    would never boot under OVMF -- better none, and a clear word where one is asked for."""
    try:
        with open(kernel, "rb") as f:
            pe.sections(f.read())
    except (OSError, pe.PeError):
        return False
    return True


#: Why a guest build has no UKI: the manifest's ``uki_missing`` (set only then), else this.
NO_STUB = "apt-get install systemd-boot-efi, then fractal guest build"
NOT_EFI = "its kernel has no EFI stub (the kernel built for the guest boots by PVH only: use --kernel debian)"


def os_release(kernel_release: str, initramfs_sha256: str) -> bytes:
    """The .osrel section: who this image is (systemd-boot and `bootctl` show it)."""
    return (f'ID=fractal\nNAME="fractal guest"\nPRETTY_NAME="fractal guest {initramfs_sha256[:12]}"\n'
            f"VERSION_ID={initramfs_sha256[:12]}\nBUILD_ID={kernel_release}\n").encode()


def extend(pcr: bytes, data: bytes) -> bytes:
    """One TPM2 extend in the sha256 bank: new = H(old || H(data))."""
    return hashlib.sha256(pcr + hashlib.sha256(data).digest()).digest()


def pcr11(section_sha256: Mapping[str, str]) -> bytes:
    """PCR 11 (sha256 bank) after systemd-stub measured these sections, from their sha256s.

    The stub extends, per section present in MEASURED_ORDER, first the name with its trailing NUL
    (e.g. ``b".linux\\0"``), then the section's contents.  Pure."""
    pcr = bytes(32)
    for name in MEASURED_ORDER:
        digest = section_sha256.get(name)
        if digest is None:
            continue
        pcr = hashlib.sha256(pcr + hashlib.sha256(name.encode() + b"\0").digest()).digest()
        pcr = hashlib.sha256(pcr + bytes.fromhex(digest)).digest()
    return pcr


#: EV_EFI_ACTION that UEFI (PI spec) measures into PCR 4 before it starts a boot option
CALLING_BOOT_OPTION = b"Calling EFI Application from Boot Option"
#: EV_SEPARATOR: the firmware closes PCRs 0-7 at ReadyToBoot with four zero bytes
SEPARATOR = bytes(4)


def pcr4(uki_authenticode: str, linux_authenticode: str, *, direct_kernel: bool = True) -> bytes:
    """PCR 4 (sha256 bank) after the firmware booted this UKI and the stub started its kernel.

    ``direct_kernel``: the UKI came from QEMU's ``-kernel`` (attested VMs, test machines): OVMF
    loads -- and so measures -- it while it prepares the boot options, before the boot-option
    action and the separator (seen in the guest's event log,
    /sys/kernel/security/tpm0/binary_bios_measurements).  False: a machine booting the UKI from
    a Boot#### entry (disk, USB, HTTP boot), where the image is measured after them.  In both, the
    kernel the stub hands to LoadImage comes last.  Pure."""
    events = [hashlib.sha256(CALLING_BOOT_OPTION).digest(), hashlib.sha256(SEPARATOR).digest()]
    uki_app = bytes.fromhex(uki_authenticode)
    events = [uki_app, *events] if direct_kernel else [*events, uki_app]
    pcr = bytes(32)
    for digest in [*events, bytes.fromhex(linux_authenticode)]:
        pcr = hashlib.sha256(pcr + digest).digest()
    return pcr


def cmdline_pcr12(cmdline: str) -> bytes:
    """PCR 12 after systemd-stub measured a loader-given command line: its UTF-16LE bytes with
    the terminating NUL (how UEFI hands load options over).  Pure."""
    return extend(bytes(32), (cmdline + "\0").encode("utf-16-le"))


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def layout(sizes: Mapping[str, int], first: int = FIRST_VMA) -> list[tuple[str, int]]:
    """(section, VMA) for each section, in order, page-aligned one after the other.  Pure."""
    out = []
    vma = first
    for name, size in sizes.items():
        out.append((name, vma))
        vma = _align(vma + max(size, 1))
    return out


def _stub_end(stub: str) -> int:
    """The first address after the stub's own sections (objdump -h)."""
    out = subprocess.run(["objdump", "-h", stub], capture_output=True, text=True)
    if out.returncode != 0:
        raise UkiError(f"objdump -h {stub}: {out.stderr.strip()[-300:]}")
    end = 0
    for line in out.stdout.splitlines():
        f = line.split()
        if len(f) >= 7 and f[0].isdigit():
            end = max(end, int(f[3], 16) + int(f[2], 16))
    return end


def pe_checksum(blob: bytes, at: int) -> int:
    """The PE optional header's CheckSum: 16-bit one's-complement-style sum of the file with the
    checksum field itself read as 0, plus the file's length.  Pure."""
    data = blob[:at] + bytes(4) + blob[at + 4:]
    if len(data) % 2:
        data += b"\0"
    total = 0
    for (word,) in struct.iter_unpack("<H", data):
        total += word
        total = (total & 0xFFFF) + (total >> 16)
    return (total & 0xFFFF) + len(blob)


def deterministic(blob: bytes) -> bytes:
    """objcopy writes the clock into the PE header's TimeDateStamp (and so into its CheckSum): set
    it to 0 and compute the checksum again, so the same sections give the same file.  Pure."""
    if blob[:2] != b"MZ":
        raise UkiError("objcopy's output is not a PE image")
    pe = struct.unpack_from("<I", blob, 0x3C)[0]
    if blob[pe:pe + 4] != b"PE\0\0":
        raise UkiError("objcopy's output has no PE header")
    out = bytearray(blob)
    struct.pack_into("<I", out, pe + 8, 0)  # COFF header: TimeDateStamp
    at = pe + 24 + 64  # optional header: CheckSum
    struct.pack_into("<I", out, at, pe_checksum(bytes(out), at))
    return bytes(out)


def build(out: Path, *, kernel: Path, initramfs: Path, cmdline: str, osrel: bytes, stub: str = STUB) -> Uki:
    """Write the UKI to ``out`` (atomically) and describe it."""
    if not os.path.exists(stub):
        raise UkiError(f"{stub} is missing (apt-get install systemd-boot-efi)")
    contents = {".osrel": osrel, ".cmdline": cmdline.encode(), ".linux": kernel.read_bytes(),
                ".initrd": initramfs.read_bytes()}
    first = max(FIRST_VMA, _align(_stub_end(stub)))
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    with tempfile.TemporaryDirectory(prefix="fractal-uki-") as d:
        argv = [OBJCOPY]
        for name, vma in layout({k: len(v) for k, v in contents.items()}, first):
            p = Path(d, name.lstrip("."))
            p.write_bytes(contents[name])
            argv += ["--add-section", f"{name}={p}", "--change-section-vma", f"{name}={vma:#x}"]
        argv += [stub, str(tmp)]
        res = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "SOURCE_DATE_EPOCH": "0"})
        if res.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise UkiError(f"objcopy: {res.stderr.strip()[-500:]}")
    blob = deterministic(tmp.read_bytes())
    tmp.write_bytes(blob)
    os.rename(tmp, out)
    return Uki(out, hashlib.sha256(blob).hexdigest(), len(blob), cmdline,
               {k: hashlib.sha256(v).hexdigest() for k, v in contents.items()},
               pe.authenticode_sha256(blob).hex(), _authenticode(contents[".linux"]))


def check_cmdline(cmdline: str) -> str:
    """A command line to build in: printable ASCII, one line, shorter than the kernel's limit."""
    if not cmdline.strip():
        raise UkiError("the command line is empty")
    if len(cmdline) >= MAX_CMDLINE:
        raise UkiError(f"the command line is {len(cmdline)} bytes: the kernel takes < {MAX_CMDLINE}")
    bad = sorted({c for c in cmdline if not " " <= c <= "~"})
    if bad:
        raise UkiError(f"the command line has characters other than printable ASCII: {bad[:5]!r}")
    return cmdline


def with_cmdline(src: Path, out: Path, cmdline: str, *, stub: str = STUB) -> Uki:
    """A UKI for one machine: ``src``'s (the guest build's) kernel, initramfs and os-release
    sections, unchanged byte for byte, with ``cmdline`` built in as its ``.cmdline`` -- what a
    machine booting it from a disk or USB stick runs with, no loader to give another."""
    check_cmdline(cmdline)
    image = src.read_bytes()
    try:
        parts = {n: pe.section_data(image, n) for n in (".linux", ".initrd", ".osrel")}
    except pe.PeError as exc:
        raise UkiError(f"{src}: not a UKI: {exc}") from None
    with tempfile.TemporaryDirectory(prefix="fractal-uki-") as d:
        Path(d, "linux").write_bytes(parts[".linux"])
        Path(d, "initrd").write_bytes(parts[".initrd"])
        return build(out, kernel=Path(d, "linux"), initramfs=Path(d, "initrd"), cmdline=cmdline,
                     osrel=parts[".osrel"], stub=stub)


#: the per-machine manifest's format (``fractal guest uki``)
MACHINE_FORMAT = 1


def machine_manifest(made: Uki, *, guest_sha256: str, kernel_release: str, esp: Mapping | None = None) -> dict:
    """What the host needs to attest a machine booting ``made`` from a boot entry: its record
    (PCR 4 in the boot-entry order, PCR 11 of its sections, the built-in command line), the guest
    build it came from, and the disk image it went on.  ``[remote.attest.uki]`` names it.  Pure."""
    out = {"kind": "fractal-machine-uki", "format": MACHINE_FORMAT, "guest_sha256": guest_sha256,
           "kernel": {"release": kernel_release}, "uki": made.describe(BOOT_ENTRY)}
    if esp is not None:
        out["esp"] = dict(esp)
    return out


def _authenticode(image: bytes) -> str | None:
    try:
        return pe.authenticode_sha256(image).hex()
    except pe.PeError:
        return None
