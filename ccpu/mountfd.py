"""fd-relative mount syscalls for host code that works below directories (stdlib only).

Why: a path string is resolved again at every use, and any component a guest or a container can
write may be swapped for a symlink in between.  Names are resolved from a directory fd with
``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`` (:mod:`ccpu.fdpath`); these helpers attach
mounts with the new mount API (``open_tree`` + ``mount_setattr`` + ``move_mount`` onto
``dirfd``/name, never following a symlink; ``fsopen``/``fsmount`` for a new tmpfs) and detach a
mount only after checking, by mount id, that it is the one recorded.

The syscalls themselves are :mod:`ccpu.linux.mount` and :mod:`ccpu.linux.statx`; this module
puts them together for host-side code.
"""

from __future__ import annotations

import os

from ccpu import fdpath
from ccpu.linux.mount import (MNT_DETACH, MS_PRIVATE, UMOUNT_NOFOLLOW, fsmount_new, mount_setattr, move_mount_fd,
                              open_tree_clone, umount)
from ccpu.linux.statx import mount_id_at


def open_dir(dirfd: int, path: str) -> int:
    """An O_PATH fd of the directory ``path`` below ``dirfd`` (no symlinks, beneath it: ccpu.fdpath)."""
    return fdpath.open_path(dirfd, path, directory=True)


def bind_at(source_fd: int, dirfd: int, name: str, attrs: int) -> int:
    """Bind the directory ``source_fd`` (an O_PATH fd) onto the existing ``dirfd``/``name`` with
    the per-mount flags ``attrs`` (MOUNT_ATTR_*) set before it becomes visible, private (nothing
    mounted below it later propagates anywhere).  Not recursive: mounts below the source are not
    carried.  Returns the new mount's id."""
    tree = open_tree_clone(fdpath.fd_path(source_fd))  # the very dir the fd names
    try:
        mount_setattr(tree, attrs, MS_PRIVATE)
        move_mount_fd(tree, name, dirfd)  # target: no symlink followed (no MOVE_MOUNT_T_SYMLINKS)
    finally:
        os.close(tree)
    return mount_id_at(dirfd, name)


def tmpfs_at(dirfd: int, name: str, options: dict[str, str], attrs: int) -> int:
    """Mount a new tmpfs (``options``: e.g. mode, size, nr_inodes) on the existing ``dirfd``/``name``,
    private, with the per-mount flags ``attrs``.  Returns its mount id."""
    mnt = fsmount_new("tmpfs", options, attrs)
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
    umount(f"{fdpath.fd_path(dirfd)}/{name}", MNT_DETACH | UMOUNT_NOFOLLOW)
    return True
