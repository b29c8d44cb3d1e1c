"""Mount syscalls: mount(2)/umount2(2), the new mount API and pivot_root, with their flags.

Why here, once: the agent stacks rootfs overlays and swaps roots live (in the guest, which has
no util-linux), and the shim binds volumes and layer views below directories a guest can write.
Both need the same calls; they used to carry one copy each.

The new mount API (open_tree 428, move_mount 429, fsopen 430, fsconfig 431, fsmount 432,
mount_setattr 442) has the unified syscall numbers of calls added since Linux 5.1 (the same on
every architecture) and no glibc wrapper in the versions we meet; pivot_root has
per-architecture numbers.
"""

from __future__ import annotations

import ctypes
import errno
import os

from .libc import AT_EMPTY_PATH, AT_FDCWD, check, fsencode, libc, syscall

# mount(2) flags
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_SYNCHRONOUS = 0x10
MS_REMOUNT = 0x20
MS_MANDLOCK = 0x40
MS_DIRSYNC = 0x80
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_UNBINDABLE = 1 << 17
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24

# umount2(2) flags
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8

# the new mount API
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_FSOPEN = 430
SYS_FSCONFIG = 431
SYS_FSMOUNT = 432
SYS_MOUNT_SETATTR = 442
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x4
FSOPEN_CLOEXEC = 1
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6
FSMOUNT_CLOEXEC = 1
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8

_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "arm64": 41, "riscv64": 41, "s390x": 217, "ppc64le": 203}

libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    """mount(2)."""
    ret = libc.mount(fsencode(source), fsencode(target), fsencode(fstype), flags, fsencode(data))
    check(ret, f"mount {fstype or ''} {source or ''} on {target}")


def umount(target: str, flags: int = 0) -> None:
    """umount2(2)."""
    check(libc.umount2(fsencode(target), flags), f"umount {target}")


def open_tree_clone(path: str, dirfd: int = AT_FDCWD) -> int:
    """A detached copy of the mount at ``path`` (not recursive): a mount fd, close-on-exec."""
    return syscall(SYS_OPEN_TREE, ctypes.c_int(dirfd), ctypes.c_char_p(os.fsencode(path)),
                   ctypes.c_uint(OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC), what=f"open_tree {path}")


def move_mount_fd(tree_fd: int, target: str, dirfd: int = AT_FDCWD) -> None:
    """Attach the detached mount ``tree_fd`` at ``dirfd``/``target`` (no symlink followed in the
    target's last component: no MOVE_MOUNT_T_SYMLINKS)."""
    syscall(SYS_MOVE_MOUNT, ctypes.c_int(tree_fd), ctypes.c_char_p(b""), ctypes.c_int(dirfd),
            ctypes.c_char_p(os.fsencode(target)), ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH),
            what=f"move_mount onto {target}")


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def mount_setattr(mount_fd: int, attr_set: int = 0, propagation: int = 0) -> None:
    """mount_setattr(2) on a mount fd (e.g. a detached ``open_tree`` clone), not recursive."""
    attr = _MountAttr(attr_set, 0, propagation, 0)
    syscall(SYS_MOUNT_SETATTR, ctypes.c_int(mount_fd), ctypes.c_char_p(b""), ctypes.c_uint(AT_EMPTY_PATH),
            ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)), what="mount_setattr")


def fsmount_new(fstype: str, options: dict[str, str], attrs: int) -> int:
    """A new, detached filesystem of ``fstype`` (fsopen + fsconfig per option + fsmount) with
    the per-mount flags ``attrs`` (MOUNT_ATTR_*): its mount fd, close-on-exec."""
    fs = syscall(SYS_FSOPEN, ctypes.c_char_p(fstype.encode()), ctypes.c_uint(FSOPEN_CLOEXEC),
                 what=f"fsopen {fstype}")
    try:
        for key, value in options.items():
            syscall(SYS_FSCONFIG, ctypes.c_int(fs), ctypes.c_uint(FSCONFIG_SET_STRING),
                    ctypes.c_char_p(key.encode()), ctypes.c_char_p(value.encode()), ctypes.c_int(0),
                    what=f"fsconfig {key}={value}")
        syscall(SYS_FSCONFIG, ctypes.c_int(fs), ctypes.c_uint(FSCONFIG_CMD_CREATE), None, None, ctypes.c_int(0),
                what="fsconfig create")
        return syscall(SYS_FSMOUNT, ctypes.c_int(fs), ctypes.c_uint(FSMOUNT_CLOEXEC), ctypes.c_uint(attrs),
                       what="fsmount")
    finally:
        os.close(fs)


def pivot_root(new_root: str, put_old: str) -> None:
    nr = _PIVOT_ROOT.get(os.uname().machine)
    if nr is None:
        raise OSError(errno.ENOSYS, f"pivot_root: unknown syscall number on {os.uname().machine}")
    syscall(nr, ctypes.c_char_p(os.fsencode(new_root)), ctypes.c_char_p(os.fsencode(put_old)), what="pivot_root")
