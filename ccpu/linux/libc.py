"""The one ctypes handle on the C library, and how a failed call becomes an OSError.

Why one: every module here calls libc (mount(2), syscall(2) for calls glibc has no wrapper
for, statx, setns, prctl); one handle means each function's ``argtypes`` is declared once,
by the module that owns that call, and every failure is reported the same way -- an OSError
carrying the errno, the call, and the path it was about.

Also here: the ``AT_*`` flags of the fd-relative (``*at``) calls, shared by statx, openat2,
open_tree, move_mount and mount_setattr.
"""

from __future__ import annotations

import ctypes
import os

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000


def error(what: str, path: str | None = None) -> OSError:
    """The OSError for the errno the last failed call left (read it right after the call)."""
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}", path)


def check(ret: int, what: str, path: str | None = None) -> int:
    """``ret`` if the call succeeded (>= 0), else the OSError of :func:`error`."""
    if ret < 0:
        raise error(what, path)
    return ret


def syscall(nr: int, *args: object, what: str, path: str | None = None) -> int:
    """syscall(2) for calls glibc has no wrapper for; ``args`` are ctypes values."""
    return check(libc.syscall(ctypes.c_long(nr), *args), what, path)


def fsencode(path: str | None) -> bytes | None:
    """A path argument for a ``char *`` (None stays NULL)."""
    return None if path is None else os.fsencode(path)
