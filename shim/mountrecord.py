"""The mounts a shim made below a sandbox's run dir, recorded so that exactly those are undone.

Why a record: parts of a run dir are writable by the guest (the volume share), so nothing there
may be found again by walking directories, resolving paths the usual way or matching mount
point prefixes -- a guest symlink would steer that anywhere on the host.  Instead every mount
is written to ``<run dir>/mounts.json`` (which the guest cannot reach) *before* it is made (its
path, relative to the run dir) and *after* (with its mount id), replaced atomically, so a shim
that dies at any point leaves a record its successor or containerd's ``delete`` verb can use.

Undoing one (:meth:`RunDirMounts.unmount`): the recorded path is looked up from an fd of the run
dir with ``openat2(RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS)`` (:mod:`ccpu.fdpath`), and the mount
found there is detached (through ``/proc/self/fd/N``) only if it is a mount root with the
recorded id -- or, for an entry recorded without an id (the shim died between the two writes),
any mount root there: only the shim mounts in those places.  A recorded id found elsewhere is
an error and nothing is detached.
"""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass, field

from ccpu import fdpath
from ccpu.linux import mountinfo
from ccpu.linux.mount import MNT_DETACH, umount
from ccpu.linux.openat2 import openat2
from ccpu.linux.statx import mount_of

RECORD = "mounts.json"
MAX_RECORDED = 4096  # a record longer than this is not ours
MAX_DEPTH = 8


class MountRecordError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------
# pure


def valid_path(path: str) -> bool:
    """Relative to the run dir, normalized: no ``..``, ``.``, empty part or leading ``/``."""
    parts = path.split("/")
    return (0 < len(path) < 512 and len(parts) <= MAX_DEPTH
            and all(p and p not in (".", "..") for p in parts))


@dataclass
class Recorded:
    path: str  # relative to the run dir
    mnt_id: int | None = None  # None: about to be mounted (or the shim died in between)


@dataclass
class MountRecord:
    """The mounts made below a run dir, in the order they were made."""

    entries: list[Recorded] = field(default_factory=list)

    def add(self, path: str) -> None:
        if not valid_path(path):
            raise MountRecordError(f"not a recordable mount point: {path!r}")
        if any(e.path == path for e in self.entries):
            raise MountRecordError(f"{path} is already recorded as mounted")
        self.entries.append(Recorded(path))

    def set_id(self, path: str, mnt_id: int) -> None:
        for e in self.entries:
            if e.path == path:
                e.mnt_id = mnt_id
                return
        raise MountRecordError(f"{path} is not recorded")

    def drop(self, path: str) -> None:
        self.entries = [e for e in self.entries if e.path != path]

    def below(self, path: str | None = None) -> list[Recorded]:
        """Entries at or below ``path`` (None: all), the ones made last first (children before
        the mount they were made in)."""
        if path is None:
            return list(reversed(self.entries))
        prefix = path.rstrip("/") + "/"
        return [e for e in reversed(self.entries) if e.path == path or e.path.startswith(prefix)]

    def to_json(self) -> str:
        return json.dumps({"mounts": [{"path": e.path, "id": e.mnt_id} for e in self.entries]})

    @classmethod
    def from_json(cls, text: str) -> "MountRecord":
        """Parse; anything malformed is an error (the caller keeps the run dir then)."""
        try:
            raw = json.loads(text)
            items = raw["mounts"]
            if not isinstance(items, list) or len(items) > MAX_RECORDED:
                raise ValueError("mounts is not a list of bounded length")
            rec = cls()
            for item in items:
                path, mnt_id = item["path"], item["id"]
                if not isinstance(path, str) or not (mnt_id is None or (type(mnt_id) is int and mnt_id > 0)):
                    raise ValueError(f"bad entry {item!r}")
                rec.add(path)
                if mnt_id is not None:
                    rec.set_id(path, mnt_id)
            return rec
        except (ValueError, KeyError, TypeError, MountRecordError) as exc:
            raise MountRecordError(f"unreadable mount record: {exc}") from None


# ---------------------------------------------------------------------------------------------
# I/O


class RunDirMounts:
    """A run dir's record, kept in memory and saved (atomically) on every change.
    ``run_fd``: an fd of the run dir (O_PATH is enough), owned by the caller."""

    def __init__(self, run_fd: int, record: MountRecord) -> None:
        self.run_fd = run_fd
        self.record = record

    @classmethod
    def load(cls, run_fd: int) -> "RunDirMounts":
        try:
            fd = openat2(run_fd, RECORD, os.O_RDONLY)
        except FileNotFoundError:
            return cls(run_fd, MountRecord())
        with os.fdopen(fd, encoding="utf-8") as f:
            return cls(run_fd, MountRecord.from_json(f.read(1 << 20)))

    def save(self) -> None:
        tmp = RECORD + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=self.run_fd)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(self.record.to_json())
        # atomic (a crash leaves the old or the new record), not fsynced: the mounts it lists do
        # not survive a host crash either, and the page cache survives the shim's death
        os.replace(tmp, RECORD, src_dir_fd=self.run_fd, dst_dir_fd=self.run_fd)

    def add(self, path: str) -> None:
        """Before mounting at ``path``."""
        self.record.add(path)
        self.save()

    def mounted(self, path: str, fd: int) -> int:
        """After mounting: record the mount now at ``fd`` (the root of what was mounted at ``path``)."""
        m = mount_of(fd)
        if not m.is_root:
            raise MountRecordError(f"{path}: no mount there after mounting")
        self.record.set_id(path, m.mnt_id)
        self.save()
        return m.mnt_id

    def unmount(self, entry: Recorded) -> str | None:
        """Detach the recorded mount if it is where it was made; None, or why it is left."""
        try:
            fd = fdpath.open_path(self.run_fd, entry.path)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                return f"{entry.path}: {exc.strerror}"
            fd = None  # the mount point is gone, so is the mount
        if fd is not None:
            try:
                m = mount_of(fd)
                if m.is_root and entry.mnt_id in (None, m.mnt_id):
                    umount(fdpath.fd_path(fd), MNT_DETACH)
                elif entry.mnt_id is not None and m.mnt_id != entry.mnt_id and _mount_exists(entry.mnt_id):
                    return f"{entry.path}: mount {entry.mnt_id} is not there any more (found {m.mnt_id})"
            except OSError as exc:
                return f"{entry.path}: {exc.strerror}"
            finally:
                os.close(fd)
        self.record.drop(entry.path)
        self.save()
        return None

    def unmount_below(self, path: str | None = None) -> list[str]:
        """Undo the recorded mounts at or below ``path`` (None: all); why each left one is left."""
        return [why for e in self.record.below(path) if (why := self.unmount(e))]


def _mount_exists(mnt_id: int) -> bool:
    return any(m.mount_id == mnt_id for m in mountinfo.read())


def remove_run_dir(run_dir: str) -> None:
    """Undo every mount recorded in ``run_dir``, then remove it (never crossing a mount point,
    never following a symlink).  For the shim's stop and for the ``delete`` verb after a dead
    shim.  MountRecordError says why it stays (e.g. something is still mounted below it)."""
    try:
        run_fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        problems = RunDirMounts.load(run_fd).unmount_below()
        if problems:
            raise MountRecordError(f"not removing {run_dir}: cannot unmount {'; '.join(problems)}")
        left = [p for name in os.listdir(run_fd) if name != RECORD
                for p in fdpath.remove_tree(run_fd, name)]
        if left:
            raise MountRecordError(f"not removing {run_dir}: mounted below it (not by us?): {', '.join(left)}")
        fdpath.remove_tree(run_fd, RECORD)
        os.rmdir(run_dir)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise MountRecordError(f"not removing {run_dir}: {exc}") from None
    finally:
        os.close(run_fd)
