"""The Authenticode hash of a PE image: what UEFI firmware extends into PCR 4 for each boot
application it loads (the UKI, then the kernel that systemd-stub loads from its ``.linux``).

Why here and not a library: the hash is a fixed walk over three header fields and the section
table (Microsoft's "Windows Authenticode Portable Executable Signature Format", section
"Calculating the PE Image Hash"; EDK2's DxeTpm2MeasureBootLib does the same walk); the libraries
that offer it (signify, pefile + glue) would add a dependency chain for twenty lines.  The result
is checked against what OVMF itself measured, in the attestation tests: a wrong walk gives a PCR 4
that never matches.

The image is untrusted input only in the sense that a bad file must fail cleanly: every offset is
bounds-checked and a malformed image raises :class:`PeError`.  Pure.
"""

from __future__ import annotations

import hashlib
import struct

_PE32 = 0x10B
_PE32_PLUS = 0x20B
_CERT_DIR = 4  # IMAGE_DIRECTORY_ENTRY_SECURITY: excluded from the hash (it holds the signature)
_SECTION = struct.Struct("<8sIIIIIIHHI")  # IMAGE_SECTION_HEADER (40 bytes)


class PeError(ValueError):
    """Not a PE image this module can hash."""


def _u(fmt: str, data: bytes, at: int) -> tuple[int, ...]:
    size = struct.calcsize(fmt)
    if at < 0 or at + size > len(data):
        raise PeError(f"truncated PE image (a {size}-byte field at {at:#x}, image {len(data)} bytes)")
    return struct.unpack_from(fmt, data, at)


def _headers(data: bytes) -> tuple[int, int, int, int, int]:
    """(checksum offset, certificate directory entry offset or -1, SizeOfHeaders, section table
    offset, number of sections)."""
    if data[:2] != b"MZ":
        raise PeError("no MZ header")
    (pe,) = _u("<I", data, 0x3C)
    if data[pe:pe + 4] != b"PE\0\0":
        raise PeError("no PE signature")
    nsections, = _u("<H", data, pe + 6)
    opt_size, = _u("<H", data, pe + 20)
    opt = pe + 24
    magic, = _u("<H", data, opt)
    if magic not in (_PE32, _PE32_PLUS):
        raise PeError(f"optional header magic {magic:#x}")
    dirs = opt + (96 if magic == _PE32 else 112)
    ndirs, = _u("<I", data, dirs - 4)
    size_of_headers, = _u("<I", data, opt + 60)
    cert_entry = dirs + 8 * _CERT_DIR if ndirs > _CERT_DIR else -1
    if not opt + 68 <= size_of_headers <= len(data) or (cert_entry >= 0 and cert_entry + 8 > size_of_headers):
        raise PeError(f"SizeOfHeaders {size_of_headers} out of range")
    return opt + 64, cert_entry, size_of_headers, opt + opt_size, nsections


def sections(data: bytes) -> dict[str, tuple[int, int, int]]:
    """Section name -> (file offset, raw size, virtual size)."""
    _, _, _, table, n = _headers(data)
    out = {}
    for i in range(n):
        name, vsize, _va, rsize, rptr, *_ = _u(_SECTION.format, data, table + i * _SECTION.size)
        if rptr + rsize > len(data):
            raise PeError(f"section {i} runs past the end of the image")
        out[name.rstrip(b"\0").decode(errors="replace")] = (rptr, rsize, vsize)
    return out


def section_data(data: bytes, name: str) -> bytes:
    """A section's contents as the image loader sees them (its virtual size, not the padded raw one)."""
    found = sections(data).get(name)
    if found is None:
        raise PeError(f"no {name} section")
    rptr, rsize, vsize = found
    size = min(rsize, vsize) if vsize else rsize
    return data[rptr:rptr + size]


def authenticode_sha256(data: bytes) -> bytes:
    """The image's Authenticode SHA-256: the headers without the checksum field and the
    certificate directory entry, the sections' raw data in file order, then any data after the
    last section except the certificate table."""
    checksum, cert_entry, size_of_headers, _, _ = _headers(data)
    h = hashlib.sha256()
    h.update(data[:checksum])
    cert_size = 0
    if cert_entry >= 0:
        h.update(data[checksum + 4:cert_entry])
        h.update(data[cert_entry + 8:size_of_headers])
        _, cert_size = _u("<II", data, cert_entry)
    else:
        h.update(data[checksum + 4:size_of_headers])
    hashed = size_of_headers
    for rptr, rsize, _ in sorted(sections(data).values()):
        if rsize:
            h.update(data[rptr:rptr + rsize])
            hashed += rsize
    if cert_size > len(data):
        raise PeError("certificate table larger than the image")
    if len(data) > hashed:
        h.update(data[hashed:len(data) - cert_size])
    return h.digest()
