"""statx(2): which mount a file is on, and whether it is that mount's root.

Why statx: a mount id read from the file itself (``STATX_MNT_ID``, Linux >= 5.8) cannot be
fooled by a path that was swapped after it was checked; callers compare it with a recorded id
before they detach anything.  Python 3.11's os.stat has neither field.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys
from dataclasses import dataclass

from .libc import AT_EMPTY_PATH, AT_FDCWD, AT_SYMLINK_NOFOLLOW, check, libc

STATX_MNT_ID = 0x1000
STATX_ATTR_MOUNT_ROOT = 0x2000

_SIZE = 256  # struct statx
_ATTRIBUTES = 8  # offsets of its u64 fields
_ATTRIBUTES_MASK = 56
_MNT_ID = 144

libc.statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]


def statx(dirfd: int, path: str, flags: int, mask: int) -> bytes:
    """The raw ``struct statx`` (256 bytes) of statx(2)."""
    buf = ctypes.create_string_buffer(_SIZE)
    check(libc.statx(dirfd, os.fsencode(path), flags, mask, buf), f"statx {path or dirfd}")
    return buf.raw


def _u64(raw: bytes, off: int) -> int:
    return int.from_bytes(raw[off:off + 8], sys.byteorder)


def mount_id(path: str, follow: bool = True) -> int:
    """The mount id (as in mountinfo) of the mount ``path`` is on."""
    return _u64(statx(AT_FDCWD, path, 0 if follow else AT_SYMLINK_NOFOLLOW, STATX_MNT_ID), _MNT_ID)


def mount_id_at(dirfd: int, name: str) -> int:
    """The id of the mount on top at ``dirfd``/``name`` (not following a symlink; ``""``: the fd itself)."""
    flags = AT_SYMLINK_NOFOLLOW | (AT_EMPTY_PATH if not name else 0)
    return _u64(statx(dirfd, name, flags, STATX_MNT_ID), _MNT_ID)


@dataclass(frozen=True)
class MountOf:
    """Which mount a file is on, and whether it is that mount's root (a mount point)."""

    mnt_id: int
    is_root: bool


def mount_of(fd: int) -> MountOf:
    """The mount of the file ``fd`` holds; ENOSYS on kernels that do not report mount roots (< 5.8)."""
    raw = statx(fd, "", AT_EMPTY_PATH, STATX_MNT_ID)
    if not _u64(raw, _ATTRIBUTES_MASK) & STATX_ATTR_MOUNT_ROOT:
        raise OSError(errno.ENOSYS, "statx: the kernel does not report STATX_ATTR_MOUNT_ROOT (< 5.8)")
    return MountOf(_u64(raw, _MNT_ID), bool(_u64(raw, _ATTRIBUTES) & STATX_ATTR_MOUNT_ROOT))
