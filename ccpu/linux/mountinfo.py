"""``/proc/<pid>/mountinfo``: one parser, one unescape, one typed record per mount.

Line format (proc(5)): ``ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE
SUPER_OPTIONS``.  The kernel escapes space, tab, newline and backslash (and, since 5.x, ``#``) in
the path-like fields as ``\\ooo`` octal; every such escape is undone here, whichever characters a
kernel chooses to escape.  Mount points are relative to the reading process's root, as the
kernel prints them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

_OCTAL = re.compile(r"\\([0-7]{3})")


def unescape(field: str) -> str:
    """A mountinfo field with its ``\\ooo`` escapes undone."""
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field) if "\\" in field else field


@dataclass(frozen=True, slots=True)
class MountInfo:
    mount_id: int
    parent_id: int
    root: str  # the path of the mounted dir within its filesystem
    mountpoint: str
    options: frozenset[str]  # per-mount options (ro, nosuid, relatime, ...)
    fstype: str
    source: str
    super_options: str  # the filesystem's own options, as printed


def parse_line(line: str) -> MountInfo | None:
    """One mountinfo line; None for a line that is not one (never raises)."""
    fields = line.split()
    try:
        sep = fields.index("-", 6)
        return MountInfo(
            mount_id=int(fields[0]), parent_id=int(fields[1]), root=unescape(fields[3]),
            mountpoint=unescape(fields[4]), options=frozenset(fields[5].split(",")),
            fstype=unescape(fields[sep + 1]), source=unescape(fields[sep + 2]),
            super_options=fields[sep + 3] if len(fields) > sep + 3 else "")
    except (ValueError, IndexError):
        return None


def parse(lines: Iterable[str]) -> list[MountInfo]:
    return [m for m in map(parse_line, lines) if m is not None]


def read(pid: int | str = "self") -> list[MountInfo]:
    """The mounts ``pid`` sees, in mount order (OSError if it is gone or unreadable)."""
    with open(f"/proc/{pid}/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        return parse(f)


def is_mountpoint(path: str) -> bool:
    """Whether ``path`` (symlinks resolved) is a mount point of this mount namespace."""
    real = os.path.realpath(path)
    return any(m.mountpoint == real for m in read())


def mount_points() -> list[str]:
    """Every mount point of this mount namespace, in mount order."""
    return [m.mountpoint for m in read()]


def containing(path: str, mounts: Iterable[MountInfo]) -> MountInfo | None:
    """The mount of ``mounts`` whose mount point is the longest prefix of ``path`` (a real
    path): the filesystem a file there is on (the topmost one where several share a point)."""
    best: MountInfo | None = None
    for m in mounts:
        mp = m.mountpoint
        if (path == mp or path.startswith(mp.rstrip("/") + "/")) and (best is None or len(mp) >= len(best.mountpoint)):
            best = m
    return best
