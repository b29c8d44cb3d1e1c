"""Path work that never follows a symlink and never leaves its starting directory.

Why: the shim works in directories a VM guest can write (the volume share, over 9p).  A path
string resolved by the kernel the usual way follows whatever symlink the guest put in it, so
every lookup below such a place starts from a directory fd and goes through
``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)``: a symlink anywhere
in the path is ELOOP, ``..`` out of the start is EXDEV.  What is done to the result is done
through the fd (``*at`` calls relative to it, or ``/proc/self/fd/N`` for mount(2)/umount2(2),
which then act on exactly the file the fd holds).

Stdlib only (ctypes); Linux >= 5.6 for openat2, >= 5.8 for ``STATX_ATTR_MOUNT_ROOT``.
openat2 is syscall 437 on every architecture (the unified numbers of syscalls added since 5.1);
Python 3.11 has no ``os.openat2``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import sys
from dataclasses import dataclass

from ccpu.agent import nsutil

SYS_OPENAT2 = 437
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
#: what every lookup here uses: no symlink of any kind, nothing outside the starting dir
STRICT = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS

STATX_ATTR_MOUNT_ROOT = 0x2000
_STATX_ATTRIBUTES = 8
_STATX_ATTRIBUTES_MASK = 56
_STATX_MNT_ID = 144

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def openat2(dirfd: int, path: str, flags: int, resolve: int = STRICT, mode: int = 0) -> int:
    """openat2(2); the new fd is close-on-exec.  OSError with the path on failure."""
    how = _OpenHow(flags | os.O_CLOEXEC, mode if flags & (os.O_CREAT | os.O_TMPFILE) else 0, resolve)
    ret = _libc.syscall(ctypes.c_long(SYS_OPENAT2), ctypes.c_int(dirfd), ctypes.c_char_p(os.fsencode(path)),
                        ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"openat2 {path!r}: {os.strerror(err)}", path)
    return int(ret)


def open_path(dirfd: int, path: str, *, cross_mounts: bool = True, directory: bool = False) -> int:
    """An O_PATH fd of ``dirfd/path`` (no symlinks, beneath ``dirfd``); with
    ``cross_mounts=False`` a mount point on the way (the last component included) is EXDEV.
    A symlink as the last component is ELOOP too (no O_NOFOLLOW: with it, openat2 would hand
    out an fd of the symlink itself, and mount(2) onto that would cover the symlink)."""
    flags = os.O_PATH | (os.O_DIRECTORY if directory else 0)
    return openat2(dirfd, path, flags, STRICT | (0 if cross_mounts else RESOLVE_NO_XDEV))


def fd_path(fd: int) -> str:
    """The magic link that makes mount(2)/umount2(2) act on exactly the file ``fd`` holds."""
    return f"/proc/self/fd/{fd}"


@dataclass(frozen=True)
class MountOf:
    """Which mount a file is on, and whether it is that mount's root (a mount point)."""

    mnt_id: int
    is_root: bool


def mount_of(fd: int) -> MountOf:
    raw = nsutil.statx(fd, "", nsutil.AT_EMPTY_PATH, nsutil.STATX_MNT_ID)

    def u64(off: int) -> int:
        return int.from_bytes(raw[off:off + 8], sys.byteorder)

    if not u64(_STATX_ATTRIBUTES_MASK) & STATX_ATTR_MOUNT_ROOT:
        raise OSError(errno.ENOSYS, "statx: the kernel does not report STATX_ATTR_MOUNT_ROOT (< 5.8)")
    return MountOf(u64(_STATX_MNT_ID), bool(u64(_STATX_ATTRIBUTES) & STATX_ATTR_MOUNT_ROOT))


def _split(path: str) -> tuple[str, str]:
    parent, _, name = path.rstrip("/").rpartition("/")
    if not name or name in (".", ".."):
        raise OSError(errno.EINVAL, f"bad path {path!r}", path)
    return parent or ".", name


def make_dir(dirfd: int, path: str, mode: int = 0o700) -> None:
    """mkdir ``dirfd/path`` (its parent must exist); an existing dir is fine."""
    parent, name = _split(path)
    pfd = openat2(dirfd, parent, os.O_PATH | os.O_DIRECTORY)
    try:
        try:
            os.mkdir(name, mode, dir_fd=pfd)
        except FileExistsError:
            if not stat.S_ISDIR(os.stat(name, dir_fd=pfd, follow_symlinks=False).st_mode):
                raise
    finally:
        os.close(pfd)


def make_file(dirfd: int, path: str, mode: int = 0o600) -> None:
    """Create the empty regular file ``dirfd/path`` (its parent must exist); an existing one is fine."""
    parent, name = _split(path)
    pfd = openat2(dirfd, parent, os.O_PATH | os.O_DIRECTORY)
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=pfd)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EEXIST, f"{path!r} exists and is not a regular file", path)
        finally:
            os.close(fd)
    finally:
        os.close(pfd)


def remove_tree(dirfd: int, name: str) -> list[str]:
    """``rm -r dirfd/name`` that follows no symlink (they are removed, not followed) and never
    enters a mount point, nor removes one.  Returns the paths left because they are mount points
    (so their parents stay too); [] when everything is gone or was not there.  ``name`` is one
    path component."""
    if not name or "/" in name or name in (".", ".."):
        raise OSError(errno.EINVAL, f"not one path component: {name!r}", name)
    try:
        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return []
    if not stat.S_ISDIR(st.st_mode):
        try:
            os.unlink(name, dir_fd=dirfd)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno != errno.EBUSY:  # EBUSY: a file mounted over
                raise
            return [name]
        return []
    try:
        fd = openat2(dirfd, name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                     STRICT | RESOLVE_NO_XDEV)
    except OSError as exc:
        if exc.errno == errno.EXDEV:  # a mount point: not ours to enter
            return [name]
        raise
    left: list[str] = []
    try:
        for entry in os.listdir(fd):
            left += [f"{name}/{p}" for p in remove_tree(fd, entry)]
    finally:
        os.close(fd)
    if not left:
        try:
            os.rmdir(name, dir_fd=dirfd)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
            left.append(name)
    return left
