"""The few filesystem operations the repo needs, kept apart from its semantics."""

from __future__ import annotations

import errno
import os
import shutil
import stat
from pathlib import Path

from .model import Usage


def disk_usage(root: Path) -> Usage:
    """Blocks and inodes used under `root`, counting hard links once (as containerd's fs.DiskUsage)."""
    seen: set[tuple[int, int]] = set()
    size = 0
    stack = [str(root)]
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        return Usage()
    seen.add((st.st_dev, st.st_ino))
    size += st.st_blocks * 512
    while stack:
        d = stack.pop()
        try:
            it = os.scandir(d)
        except (FileNotFoundError, NotADirectoryError):
            continue
        with it:
            for entry in it:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                key = (st.st_dev, st.st_ino)
                if key in seen:
                    continue
                seen.add(key)
                size += st.st_blocks * 512
                if stat.S_ISDIR(st.st_mode):
                    stack.append(entry.path)
    return Usage(size=size, inodes=len(seen))


def remove_tree(path: Path) -> None:
    """rm -rf that tolerates the odd modes containers leave behind (e.g. 000 dirs)."""

    def onerror(func, p, exc_info):  # type: ignore[no-untyped-def]
        if isinstance(exc_info[1], FileNotFoundError):
            return
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
        except OSError:
            pass
        func(p)

    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
        return
    if not path.exists():
        return
    _refuse_mount_points(path)
    shutil.rmtree(path, onerror=onerror)  # onexc is 3.12+


def _refuse_mount_points(path: Path) -> None:
    """Never delete through a mount: a container rootfs left mounted inside would lose its data."""
    dev = os.lstat(path).st_dev
    for dirpath, dirnames, _ in os.walk(path):
        for d in dirnames:
            full = os.path.join(dirpath, d)
            if os.lstat(full).st_dev != dev or os.path.ismount(full):
                raise OSError(errno.EBUSY, "a mount point is inside the tree; not removing it", full)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
