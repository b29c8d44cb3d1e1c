"""Deterministic cpio "newc" archives (the initramfs format).  Pure functions.

The initramfs hash is the guest's base-stack measurement, so the archive must
depend on the *contents* only: entries sorted by path, mtime 0, uid/gid 0,
inode numbers assigned in order, and gzip without a timestamp or file name.
The same inputs give byte-identical output, hence the same sha256.
"""

from __future__ import annotations

import gzip
import io
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

MAGIC = b"070701"
TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class Entry:
    """One archive member.  `path` is relative ("usr/bin/x"); `mode` includes the file type bits."""

    path: str
    mode: int
    data: bytes = b""  # file contents, or the target of a symlink

    @staticmethod
    def file(path: str, data: bytes, perm: int = 0o644) -> "Entry":
        return Entry(path, stat.S_IFREG | perm, data)

    @staticmethod
    def dir(path: str, perm: int = 0o755) -> "Entry":
        return Entry(path, stat.S_IFDIR | perm)

    @staticmethod
    def symlink(path: str, target: str) -> "Entry":
        return Entry(path, stat.S_IFLNK | 0o777, target.encode())


class CpioError(ValueError):
    """Malformed archive or conflicting entries."""


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _header(ino: int, mode: int, nlink: int, size: int, name: bytes) -> bytes:
    fields = (ino, mode, 0, 0, nlink, 0, size, 0, 0, 0, 0, len(name) + 1, 0)
    return MAGIC + b"".join(b"%08X" % f for f in fields)


def normalize(entries: Iterable[Entry]) -> list[Entry]:
    """Sorted, deduplicated entries with every parent directory present.

    Identical duplicates are dropped; conflicting duplicates are an error
    (two different files claiming one path is a build bug, not a choice).
    """
    by_path: dict[str, Entry] = {}
    for e in entries:
        path = e.path.strip("/")
        if not path or ".." in path.split("/"):
            raise CpioError(f"bad path {e.path!r}")
        e = Entry(path, e.mode, e.data)
        old = by_path.get(path)
        if old is not None and old != e:
            if stat.S_ISDIR(old.mode) and stat.S_ISDIR(e.mode):
                continue
            raise CpioError(f"conflicting entries for {path}")
        by_path[path] = e
    for path in list(by_path):
        parts = path.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            p = by_path.get(parent)
            if p is None:
                by_path[parent] = Entry.dir(parent)
            elif not stat.S_ISDIR(p.mode):
                raise CpioError(f"{parent} is not a directory but {path} is below it")
    # Sort by path components so a directory precedes everything below it.
    return [by_path[p] for p in sorted(by_path, key=lambda p: p.split("/"))]


def write(entries: Iterable[Entry]) -> bytes:
    """newc archive bytes (uncompressed) of `entries` (normalized first)."""
    out = io.BytesIO()
    for ino, e in enumerate(normalize(entries), 1):
        name = e.path.encode()
        nlink = 2 if stat.S_ISDIR(e.mode) else 1
        data = b"" if stat.S_ISDIR(e.mode) else e.data
        hdr = _header(ino, e.mode, nlink, len(data), name)
        out.write(hdr + name + b"\0")
        out.write(_pad4(len(hdr) + len(name) + 1))
        out.write(data)
        out.write(_pad4(len(data)))
    hdr = _header(0, 0, 1, 0, TRAILER.encode())
    out.write(hdr + TRAILER.encode() + b"\0")
    out.write(_pad4(len(hdr) + len(TRAILER) + 1))
    return out.getvalue()


def compress(archive: bytes, level: int = 6) -> bytes:
    """gzip with mtime 0 and no file name, so the output depends on the input only."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=level, mtime=0) as gz:
        gz.write(archive)
    return buf.getvalue()


def read(archive: bytes) -> Iterator[Entry]:
    """Parse newc bytes (gzip-compressed or not) back into entries (trailer excluded)."""
    if archive[:2] == b"\x1f\x8b":
        archive = gzip.decompress(archive)
    pos = 0
    while True:
        if archive[pos:pos + 6] != MAGIC:
            raise CpioError(f"bad magic at offset {pos}")
        try:
            fields = [int(archive[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        except ValueError as exc:
            raise CpioError(f"bad header at offset {pos}") from exc
        mode, size, namesize = fields[1], fields[6], fields[11]
        pos += 110
        name = archive[pos:pos + namesize - 1].decode()
        pos += namesize
        pos += -pos % 4
        data = archive[pos:pos + size]
        if len(data) != size:
            raise CpioError(f"truncated data for {name}")
        pos += size
        pos += -pos % 4
        if name == TRAILER:
            return
        yield Entry(name, mode, data)
