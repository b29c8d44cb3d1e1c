"""openat2(2): open a path relative to a directory fd, refusing symlinks and escapes.

Python 3.11 has no ``os.openat2``; the call is syscall 437 on every architecture (the unified
numbers of calls added since Linux 5.1), Linux >= 5.6.  What is built on it (confined mkdir,
remove, lookups below a guest-writable dir) is :mod:`ccpu.fdpath`.
"""

from __future__ import annotations

import ctypes
import os

from .libc import syscall

SYS_OPENAT2 = 437
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
#: no symlink of any kind, nothing outside the starting dir
STRICT = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def openat2(dirfd: int, path: str, flags: int, resolve: int = STRICT, mode: int = 0) -> int:
    """openat2(2); the new fd is close-on-exec.  OSError with the path on failure."""
    how = _OpenHow(flags | os.O_CLOEXEC, mode if flags & (os.O_CREAT | os.O_TMPFILE) else 0, resolve)
    return syscall(SYS_OPENAT2, ctypes.c_int(dirfd), ctypes.c_char_p(os.fsencode(path)), ctypes.byref(how),
                   ctypes.c_size_t(ctypes.sizeof(how)), what=f"openat2 {path!r}", path=path)
