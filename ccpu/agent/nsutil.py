"""Mount-namespace syscalls the agent needs beyond mount(2)/umount2(2), through ctypes.

Why ctypes: the agent is stdlib-only and runs in guests without util-linux.  Everything here
raises OSError with the errno; callers running in a forked child (see `reaper.fork_call`)
turn that into an exit status or a message on a pipe.

Syscall numbers: open_tree/move_mount are 428/429 on every architecture (the unified numbers
of syscalls added since 5.1); pivot_root has per-architecture numbers.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "arm64": 41, "riscv64": 41, "s390x": 217, "ppc64le": 203}

AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_SYMLINK_NOFOLLOW = 0x100
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x4
CLONE_NEWNS = 0x20000
STATX_MNT_ID = 0x1000
_STATX_SIZE = 256
_STATX_MNT_ID_OFFSET = 144

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def open_tree_clone(path: str, dirfd: int = AT_FDCWD) -> int:
    """A detached copy of the mount at `path` (not recursive): a mount fd, close-on-exec."""
    ret = _libc.syscall(
        ctypes.c_long(SYS_OPEN_TREE), ctypes.c_int(dirfd), ctypes.c_char_p(os.fsencode(path)),
        ctypes.c_uint(OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC),
    )  # fmt: skip
    return _check(ret, f"open_tree {path}")


def move_mount_fd(tree_fd: int, target: str, dirfd: int = AT_FDCWD) -> None:
    """Attach the detached mount `tree_fd` at `target` (resolved in the caller's namespace)."""
    ret = _libc.syscall(
        ctypes.c_long(SYS_MOVE_MOUNT), ctypes.c_int(tree_fd), ctypes.c_char_p(b""),
        ctypes.c_int(dirfd), ctypes.c_char_p(os.fsencode(target)), ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH),
    )  # fmt: skip
    _check(ret, f"move_mount onto {target}")


def setns(fd: int, nstype: int = CLONE_NEWNS) -> None:
    _check(_libc.setns(fd, nstype), "setns")


def pivot_root(new_root: str, put_old: str) -> None:
    nr = _PIVOT_ROOT.get(platform.machine())
    if nr is None:
        raise OSError(38, f"pivot_root: unknown syscall number on {platform.machine()}")
    ret = _libc.syscall(ctypes.c_long(nr), ctypes.c_char_p(os.fsencode(new_root)), ctypes.c_char_p(os.fsencode(put_old)))
    _check(ret, "pivot_root")


def statx(dirfd: int, path: str, flags: int, mask: int) -> bytes:
    """The raw ``struct statx`` (256 bytes) of statx(2)."""
    buf = ctypes.create_string_buffer(_STATX_SIZE)
    _check(_libc.statx(dirfd, os.fsencode(path), flags, mask, buf), f"statx {path or dirfd}")
    return buf.raw


def mount_id(path: str, follow: bool = True) -> int:
    """The mount id (as in mountinfo) of the mount `path` is on."""
    raw = statx(AT_FDCWD, path, 0 if follow else AT_SYMLINK_NOFOLLOW, STATX_MNT_ID)
    return int.from_bytes(raw[_STATX_MNT_ID_OFFSET : _STATX_MNT_ID_OFFSET + 8], sys.byteorder)


def unescape(s: str) -> str:
    """A mountinfo path field with its octal escapes undone."""
    return s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def mountinfo(pid: int | str = "self") -> list[tuple[int, int, str, set[str]]]:
    """(mount id, parent id, mount point, per-mount options) per line of /proc/PID/mountinfo.

    Mount points are relative to that process's root, as the kernel prints them."""
    out = []
    with open(f"/proc/{pid}/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            if len(fields) < 6:
                continue
            out.append((int(fields[0]), int(fields[1]), unescape(fields[4]), set(fields[5].split(","))))
    return out
