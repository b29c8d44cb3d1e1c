"""fd-relative mount syscalls for host code that works below directories (stdlib only).

Why: a path string is resolved again at every use, and any component a guest or a container can
write may be swapped for a symlink in between.  Names are resolved from a directory fd with
``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`` (:mod:`ccpu.fdpath`); these helpers attach
mounts with the new mount API (``open_tree`` + ``mount_setattr`` + ``move_mount`` onto
``dirfd``/name, never following a symlink; ``fsopen``/``fsmount`` for a new tmpfs) and detach a
mount only after checking, by mount id, that it is the one recorded.

The agent's ``ccpu.agent.nsutil`` has ``open_tree``/``move_mount`` already and ``ccpu.fdpath`` the
confined lookups (both reused here); this module adds the mount calls host-side code needs on top.
Syscall numbers are the unified ones (same on every architecture since 5.x): fsopen 430, fsconfig
431, fsmount 432, mount_setattr 442.
"""

from __future__ import annotations

import ctypes
import os
import sys

from ccpu import fdpath
from ccpu.agent.nsutil import (AT_EMPTY_PATH, AT_SYMLINK_NOFOLLOW, STATX_MNT_ID, move_mount_fd,
                               open_tree_clone)

SYS_FSOPEN = 430
SYS_FSCONFIG = 431
SYS_FSMOUNT = 432
SYS_MOUNT_SETATTR = 442
FSOPEN_CLOEXEC = 1
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6
FSMOUNT_CLOEXEC = 1

MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8

_STATX_SIZE = 256
_STATX_MNT_ID_OFFSET = 144

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def open_dir(dirfd: int, path: str) -> int:
    """An O_PATH fd of the directory ``path`` below ``dirfd`` (no symlinks, beneath it: ccpu.fdpath)."""
    return fdpath.open_path(dirfd, path, directory=True)


def mount_setattr(mount_fd: int, attr_set: int = 0, propagation: int = 0) -> None:
    """mount_setattr(2) on a mount fd (e.g. a detached ``open_tree`` clone), not recursive."""
    attr = _MountAttr(attr_set, 0, propagation, 0)
    ret = _libc.syscall(ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_int(mount_fd), ctypes.c_char_p(b""),
                        ctypes.c_uint(AT_EMPTY_PATH), ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)))
    _check(ret, "mount_setattr")


def mount_id_at(dirfd: int, name: str) -> int:
    """The id (as in mountinfo) of the mount on top at ``dirfd``/``name`` (not following a symlink)."""
    buf = ctypes.create_string_buffer(_STATX_SIZE)
    flags = AT_SYMLINK_NOFOLLOW | (AT_EMPTY_PATH if not name else 0)
    _check(_libc.statx(dirfd, os.fsencode(name), flags, STATX_MNT_ID, buf), f"statx {name}")
    return int.from_bytes(buf.raw[_STATX_MNT_ID_OFFSET:_STATX_MNT_ID_OFFSET + 8], sys.byteorder)


def bind_at(source_fd: int, dirfd: int, name: str, attrs: int) -> int:
    """Bind the directory ``source_fd`` (an O_PATH fd) onto the existing ``dirfd``/``name`` with
    the per-mount flags ``attrs`` (MOUNT_ATTR_*) set before it becomes visible, private (nothing
    mounted below it later propagates anywhere).  Not recursive: mounts below the source are not
    carried.  Returns the new mount's id."""
    tree = open_tree_clone(f"/proc/self/fd/{source_fd}")  # the very dir the fd names
    try:
        mount_setattr(tree, attrs, MS_PRIVATE)
        move_mount_fd(tree, name, dirfd)  # target: no symlink followed (no MOVE_MOUNT_T_SYMLINKS)
    finally:
        os.close(tree)
    return mount_id_at(dirfd, name)


def tmpfs_at(dirfd: int, name: str, options: dict[str, str], attrs: int) -> int:
    """Mount a new tmpfs (``options``: e.g. mode, size, nr_inodes) on the existing ``dirfd``/``name``,
    private, with the per-mount flags ``attrs``.  Returns its mount id."""
    fs = _check(_libc.syscall(ctypes.c_long(SYS_FSOPEN), ctypes.c_char_p(b"tmpfs"),
                              ctypes.c_uint(FSOPEN_CLOEXEC)), "fsopen tmpfs")
    try:
        for key, value in options.items():
            _check(_libc.syscall(ctypes.c_long(SYS_FSCONFIG), ctypes.c_int(fs), ctypes.c_uint(FSCONFIG_SET_STRING),
                                 ctypes.c_char_p(key.encode()), ctypes.c_char_p(value.encode()), ctypes.c_int(0)),
                   f"fsconfig {key}={value}")
        _check(_libc.syscall(ctypes.c_long(SYS_FSCONFIG), ctypes.c_int(fs), ctypes.c_uint(FSCONFIG_CMD_CREATE),
                             None, None, ctypes.c_int(0)), "fsconfig create")
        mnt = _check(_libc.syscall(ctypes.c_long(SYS_FSMOUNT), ctypes.c_int(fs), ctypes.c_uint(FSMOUNT_CLOEXEC),
                                   ctypes.c_uint(attrs)), "fsmount")
    finally:
        os.close(fs)
    try:
        mount_setattr(mnt, 0, MS_PRIVATE)
        move_mount_fd(mnt, name, dirfd)
    finally:
        os.close(mnt)
    return mount_id_at(dirfd, name)


def umount_at(dirfd: int, name: str, expect_id: int) -> bool:
    """Detach the mount at ``dirfd``/``name`` if it is the one with id ``expect_id``; False if
    another (or none) is there -- then nothing is touched."""
    try:
        if mount_id_at(dirfd, name) != expect_id:
            return False
    except FileNotFoundError:
        return False
    path = os.fsencode(f"/proc/self/fd/{dirfd}/{name}")
    _check(_libc.umount2(path, MNT_DETACH | UMOUNT_NOFOLLOW), f"umount {name}")
    return True
