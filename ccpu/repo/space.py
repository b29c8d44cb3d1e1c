"""Running out of space or inodes in the repo: recognise it, say what is full, keep a reserve.

Why a reserve: every SQLite transaction in WAL mode appends its pages to ``metadata.db-wal``,
so even the DELETE that forgets a snapshot needs a few free blocks.  On a full disk that
commit fails, the snapshot's data stays, and nothing can ever give space back (issue 18).
The repo therefore keeps ``ROOT/reserve``, a small preallocated file: a transaction that
*gives space back* (Remove, unpin, recovery) and fails because the disk is full releases the
reserve and is retried once.  The reserve is made again as soon as there is room for it.

The reserve also holds a few inodes: while the snapshotter runs, a metadata commit needs blocks
only (the metastore's files exist) and giving space back (rename into ``trash/``, unlink) needs
no new inode; but SQLite deletes ``-wal`` and ``-shm`` on a clean stop and must create them when
the snapshotter starts again, possibly on a full disk.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
from pathlib import Path

log = logging.getLogger(__name__)

RESERVE_NAME = "reserve"
#: ample for the few pages a delete touches (SQLite pages are 4 KiB; a Remove writes < 20)
RESERVE_BYTES = 2 << 20
#: empty files besides the preallocated one: inodes for SQLite's -wal and -shm at start
RESERVE_INODES = 3
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def is_full_error(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT from the kernel, or SQLite's SQLITE_FULL ("database or disk is full")."""
    if isinstance(exc, OSError):
        return exc.errno in _FULL_ERRNOS
    if isinstance(exc, sqlite3.Error):
        return (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF == sqlite3.SQLITE_FULL
    return False


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def describe_full(root: Path, exc: BaseException) -> str:
    """What ran out, in words an operator can act on (statvfs of the repo's filesystem)."""
    try:
        st = os.statvfs(root)
    except OSError:
        return f"repo {root} is full ({exc})"
    if isinstance(exc, OSError) and exc.errno == errno.EDQUOT:
        what = "disk quota exceeded"
    elif st.f_files and st.f_favail == 0:
        what = f"out of inodes (0 of {st.f_files} free)"
    else:
        what = f"out of disk space ({_human(st.f_bavail * st.f_frsize)} free of {_human(st.f_blocks * st.f_frsize)})"
    return f"repo {root} is full: {what}; remove images or containers to free space"


class Reserve:
    """``ROOT/reserve/``: space and inodes the repo can always take back (see the module docstring).

    One preallocated file of ``size`` bytes plus a few empty ones: releasing them frees blocks
    for metadata commits and inodes for SQLite's ``-wal``/``-shm`` files, which SQLite creates
    anew when the snapshotter starts after a clean stop.
    """

    def __init__(self, path: Path, size: int = RESERVE_BYTES, inodes: int = RESERVE_INODES) -> None:
        self.path = path
        self.size = size
        self.files = [path / "blocks"] + [path / f"inode-{i}" for i in range(inodes)]
        self._present = False

    def ensure(self) -> bool:
        """Make the reserve if it is missing and there is room for it and more; True if present.

        Cheap when it is there (one flag); never fails: no room simply means not yet.
        """
        if self._present:
            return True
        try:
            if all(f.exists() for f in self.files) and os.stat(self.files[0]).st_blocks * 512 >= self.size:
                self._present = True
                return True
        except OSError:
            pass
        try:
            st = os.statvfs(self.path.parent)
            if st.f_bavail * st.f_frsize < 4 * self.size or st.f_favail < 4 * len(self.files):
                return False  # taking the last blocks would only move the problem
            self.path.mkdir(mode=0o700, exist_ok=True)
            for f in self.files[1:]:
                f.touch(mode=0o600)
            fd = os.open(self.files[0], os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.size)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            if not is_full_error(e):
                log.warning("cannot make the repo reserve %s: %s", self.path, e)
            self.release(quiet=True)
            return False
        self._present = True
        log.info("repo reserve %s in place (%s, %d inodes)", self.path, _human(self.size), len(self.files) + 1)
        return True

    def release(self, quiet: bool = False) -> bool:
        """Free the reserve so a transaction (or the metastore's opening) that gives space back
        can go through; True if it freed anything."""
        self._present = False
        freed = False
        for f in self.files:
            try:
                os.unlink(f)
                freed = True
            except FileNotFoundError:
                pass
        try:
            os.rmdir(self.path)
            freed = True
        except OSError:
            pass
        if freed and not quiet:
            log.warning("repo disk full: released the reserve %s so metadata can be written", self.path)
        return freed
