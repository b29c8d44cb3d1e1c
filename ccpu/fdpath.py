"""Path work that never follows a symlink and never leaves its starting directory.

Why: the shim works in directories a VM guest can write (the volume share, over 9p).  A path
string resolved by the kernel the usual way follows whatever symlink the guest put in it, so
every lookup below such a place starts from a directory fd and goes through
``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)``: a symlink anywhere
in the path is ELOOP, ``..`` out of the start is EXDEV.  What is done to the result is done
through the fd (``*at`` calls relative to it, or ``/proc/self/fd/N`` for mount(2)/umount2(2),
which then act on exactly the file the fd holds).

Stdlib only; Linux >= 5.6 for openat2 (the syscall itself: :mod:`ccpu.linux.openat2`; which
mount a file is on: :func:`ccpu.linux.statx.mount_of`).
"""

from __future__ import annotations

import errno
import os
import stat

from ccpu.linux.openat2 import RESOLVE_NO_XDEV, STRICT, openat2


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
