"""A bootable disk image holding one EFI application: what a UEFI machine boots from a USB stick.

The image is an MBR disk with one EFI System partition (type 0xEF) at 1 MiB, FAT-formatted by
mtools (``mformat``, ``mmd``, ``mcopy``: no mount, no root) with the application at the removable
media path ``EFI/BOOT/BOOTX64.EFI`` -- the file UEFI firmware starts from a device that has no
Boot#### entry of its own (UEFI spec 3.5.1.1), as OVMF does for the test machine and a PC does for
a stick.  ``dd`` it to a USB stick as it is.

Reproducible: the MBR is written here (no disk identifier), the volume serial is 0 and
``SOURCE_DATE_EPOCH`` pins mtools' timestamps to 1980-01-01 (FAT's epoch), so the same
application gives the same bytes (tests/unit/test_guest_esp.py).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

SECTOR = 512
START = 2048  # the partition's first sector: 1 MiB, as partitioning tools align
PATH = "EFI/BOOT/BOOTX64.EFI"  # the removable media path on x86-64
ESP_TYPE = 0xEF  # MBR partition type: EFI System
FAT_EPOCH = 315532800  # 1980-01-01T00:00:00Z, the earliest FAT timestamp
LABEL = "FRACTAL"
MIN_SIZE = 8 << 20
TOOLS = ("mformat", "mmd", "mcopy")


class EspError(RuntimeError):
    """The image cannot be made (mtools missing or failing)."""


@dataclass(frozen=True)
class Esp:
    path: Path
    sha256: str
    size: int

    def describe(self) -> dict:
        return {"file": self.path.name, "sha256": self.sha256, "size": self.size, "path": PATH}


def size_for(app_size: int) -> int:
    """The disk's size: the application, FAT's own structures and slack, whole MiB.  Pure."""
    need = START * SECTOR + app_size + app_size // 16 + (2 << 20)
    return max(MIN_SIZE, (need + (1 << 20) - 1) >> 20 << 20)


def mbr(total_sectors: int, start: int = START) -> bytes:
    """A 512-byte MBR: no boot code, disk signature 0, one partition of type EFI System from
    ``start`` to the end of the disk (CHS fields 0xFFFFFE: use the LBA ones).  Pure."""
    if not 0 < start < total_sectors <= 0xFFFFFFFF:
        raise EspError(f"a partition from sector {start} on a {total_sectors}-sector disk")
    entry = struct.pack("<B3sB3sII", 0, b"\xfe\xff\xff", ESP_TYPE, b"\xfe\xff\xff", start, total_sectors - start)
    out = bytearray(SECTOR)
    out[0x1BE:0x1BE + 16] = entry
    out[0x1FE:0x200] = b"\x55\xaa"
    return bytes(out)


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


def build(app: Path, out: Path) -> Esp:
    """Write the disk image with ``app`` as its EFI/BOOT/BOOTX64.EFI to ``out`` (atomically)."""
    missing = missing_tools()
    if missing:
        raise EspError(f"{', '.join(missing)} missing (apt-get install mtools)")
    size = size_for(app.stat().st_size)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(mbr(size // SECTOR))
        f.truncate(size)
    part = f"{tmp}@@{START * SECTOR}"
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(FAT_EPOCH), "MTOOLSRC": "/dev/null", "MTOOLS_SKIP_CHECK": "1"}
    steps = (["mformat", "-i", part, "-T", str(size // SECTOR - START), "-h", "64", "-s", "32", "-N", "0",
              "-v", LABEL, "::"],
             ["mmd", "-i", part, "::/EFI", "::/EFI/BOOT"],
             ["mcopy", "-i", part, str(app), "::/" + PATH])
    for argv in steps:
        res = subprocess.run(argv, capture_output=True, text=True, env=env)
        if res.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise EspError(f"{argv[0]}: {(res.stderr or res.stdout).strip()[-400:]}")
    h = hashlib.sha256()
    with open(tmp, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    os.rename(tmp, out)
    return Esp(out, h.hexdigest(), size)


def read_app(image: Path) -> bytes:
    """The EFI/BOOT/BOOTX64.EFI of an image made by :func:`build` (mcopy to stdout)."""
    res = subprocess.run(["mcopy", "-i", f"{image}@@{START * SECTOR}", "::/" + PATH, "-"], capture_output=True,
                         env={**os.environ, "MTOOLSRC": "/dev/null", "MTOOLS_SKIP_CHECK": "1"})
    if res.returncode != 0:
        raise EspError(f"mcopy from {image}: {res.stderr.decode(errors='replace').strip()[-400:]}")
    return res.stdout
