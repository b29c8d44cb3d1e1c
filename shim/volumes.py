"""A VM sandbox's volume dir: host paths given to the guest, one bind mount each.

Why bind mounts in one directory shared over 9p: volumes (kubelet's emptyDir/configMap/secret
dirs, ``ctr --mount``, ``nerdctl -v``) arrive with each container, long after the VM booted, and
a share cannot be added to a running guest cheaply.  The sandbox's volume dir
``<vm run dir>/volumes`` is shared once at boot; QEMU's 9p server resolves every path on the host
when the guest asks, so a bind mount made under that dir later is visible in the guest at once.
The guest sees only what was bound there, nothing else of the host; read-only volumes are bound
read-only on the host side too, so the guest cannot write them whatever it does.

The guest is hostile (guest root must be assumed), and it writes that share.  So:

* **the guest cannot change the tree itself**: ``volumes`` is a read-only bind of itself (the
  *view*, private propagation); QEMU serves the view, so the guest can write inside the volumes
  (other mounts) but cannot create, rename, replace or remove anything of ``volumes/<cid>/<n>``:
  no symlink planted for a later container, no mount point moved away, no junk filling the
  host's /run.  The shim makes the dirs through an fd of the dir *under* the view (``_rw``),
  which the guest never sees;
* **the shim never follows a path the guest could have written**: every lookup below the run
  dir goes through ``openat2(RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS)`` (:mod:`ccpu.fdpath`), and
  mount/umount act on ``/proc/self/fd/N`` of what was found that way;
* **the shim undoes exactly the mounts it made**: each one is written to ``<run dir>/mounts.json``
  (which the guest cannot reach) before it is made (path only) and after (with its mount id);
  unmounting looks the path up without symlinks and detaches it only if the mount there is the
  recorded one (or, for an intent without an id, a mount root at all -- nobody else mounts in
  the view).  A dead shim's ``delete`` verb reads the same record (:func:`remove_run_dir`).
  Nothing is ever unmounted by walking a directory or by a path prefix.

Removal never crosses a mount point (:func:`ccpu.fdpath.remove_tree`): host data bound into the
dir is never deleted, even if an unmount failed.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass, field

from ccpu import fdpath
from ccpu.agent.mounts import (MNT_DETACH, MS_BIND, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_PRIVATE, MS_RDONLY,
                               MS_REC, MS_REMOUNT, MS_SLAVE, sys_mount, sys_umount)
from shim.guestspec import Volume

log = logging.getLogger("shim.volumes")

SHARE_TAG = "fractalvols"
VOLUMES = "volumes"  # the shared dir, in the run dir
RECORD = "mounts.json"  # the mounts made below the run dir, in the run dir (not shared)
MAX_RECORDED = 4096  # a record longer than this is not ours


class VolumeError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------
# pure: the record of mounts


def _valid_path(path: str) -> bool:
    """``volumes`` or ``volumes/<cid>/<n>``: normalized, relative, no ``..``, no empty part."""
    parts = path.split("/")
    return (parts[0] == VOLUMES and len(parts) in (1, 3)
            and all(p and p not in (".", "..") for p in parts) and len(path) < 512)


def volume_path(name: str, cid: str) -> str:
    """The run-dir-relative mount point of volume ``name`` (``<cid>/<n>``) of container ``cid``."""
    path = posixpath.join(VOLUMES, name)
    if not _valid_path(path) or path.split("/")[1] != cid:
        raise VolumeError(f"volume name {name!r} is not <container>/<n> below {cid}/")
    return path


@dataclass
class Recorded:
    path: str  # relative to the run dir
    mnt_id: int | None = None  # None: about to be mounted (or the shim died in between)


@dataclass
class MountRecord:
    """The mounts made below a run dir, in the order they were made."""

    entries: list[Recorded] = field(default_factory=list)

    def add(self, path: str) -> None:
        if not _valid_path(path):
            raise VolumeError(f"not a recordable mount point: {path!r}")
        if any(e.path == path for e in self.entries):
            raise VolumeError(f"{path} is already recorded as mounted")
        self.entries.append(Recorded(path))

    def set_id(self, path: str, mnt_id: int) -> None:
        for e in self.entries:
            if e.path == path:
                e.mnt_id = mnt_id
                return
        raise VolumeError(f"{path} is not recorded")

    def drop(self, path: str) -> None:
        self.entries = [e for e in self.entries if e.path != path]

    def below(self, path: str) -> list[Recorded]:
        """Entries at or below ``path``, the ones made last first (children before their parent)."""
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
        except (ValueError, KeyError, TypeError, VolumeError) as exc:
            raise VolumeError(f"unreadable mount record: {exc}") from None


# ---------------------------------------------------------------------------------------------
# I/O


class _Mounts:
    """A run dir's record, kept in memory and saved (atomically, fsynced) on every change."""

    def __init__(self, run_fd: int, record: MountRecord) -> None:
        self.run_fd = run_fd
        self.record = record

    @classmethod
    def load(cls, run_fd: int) -> "_Mounts":
        try:
            fd = fdpath.openat2(run_fd, RECORD, os.O_RDONLY | os.O_NOFOLLOW)
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
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, RECORD, src_dir_fd=self.run_fd, dst_dir_fd=self.run_fd)

    def add(self, path: str) -> None:
        self.record.add(path)
        self.save()

    def mounted(self, path: str, fd: int) -> int:
        """Record the mount now at ``fd`` (the root of what was just mounted at ``path``)."""
        m = fdpath.mount_of(fd)
        if not m.is_root:
            raise VolumeError(f"{path}: no mount there after mounting")
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
                m = fdpath.mount_of(fd)
                if m.is_root and entry.mnt_id in (None, m.mnt_id):
                    sys_umount(fdpath.fd_path(fd), MNT_DETACH)
                elif entry.mnt_id is not None and m.mnt_id != entry.mnt_id and _mount_exists(entry.mnt_id):
                    return f"{entry.path}: mount {entry.mnt_id} is not there any more (found {m.mnt_id})"
            except OSError as exc:
                return f"{entry.path}: {exc.strerror}"
            finally:
                os.close(fd)
        self.record.drop(entry.path)
        self.save()
        return None

    def unmount_below(self, path: str) -> list[str]:
        return [why for e in self.record.below(path) if (why := self.unmount(e))]


def _mount_exists(mnt_id: int) -> bool:
    from ccpu.agent.nsutil import mountinfo

    return any(mid == mnt_id for mid, *_ in mountinfo())


def remove_run_dir(run_dir: str) -> None:
    """Undo every mount recorded in ``run_dir``, then remove it (never crossing a mount point).
    For the shim's stop and for the ``delete`` verb after a dead shim."""
    try:
        run_fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        mounts = _Mounts.load(run_fd)
        problems = mounts.unmount_below(VOLUMES)
        if problems:
            raise VolumeError(f"not removing {run_dir}: cannot unmount {'; '.join(problems)}")
        left = [p for name in os.listdir(run_fd) if name != RECORD
                for p in fdpath.remove_tree(run_fd, name)]
        if left:
            raise VolumeError(f"not removing {run_dir}: mounted below it (not by us?): {', '.join(left)}")
        fdpath.remove_tree(run_fd, RECORD)
    finally:
        os.close(run_fd)
    try:
        os.rmdir(run_dir)
    except FileNotFoundError:
        pass


class VolumeDir:
    """``<run dir>/volumes``: ``<container id>/<n>`` is the n-th volume of that container."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir
        self.root = os.path.join(run_dir, VOLUMES)  # what QEMU shares (the read-only view)
        self._mounts: _Mounts | None = None
        self._rw: int | None = None  # O_PATH fd of the dir under the view: where we make dirs
        self._view: int | None = None  # O_PATH fd of the view's root: where we mount

    def create(self) -> None:
        """Make the dir and its read-only view (the run dir exists and has no record yet)."""
        run_fd = os.open(self.run_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self._mounts = mounts = _Mounts.load(run_fd)
        except BaseException:
            os.close(run_fd)
            raise
        try:
            fdpath.make_dir(run_fd, VOLUMES, 0o700)
            self._rw = fdpath.open_path(run_fd, VOLUMES, cross_mounts=False, directory=True)
            mounts.add(VOLUMES)
            sys_mount(fdpath.fd_path(self._rw), fdpath.fd_path(self._rw), None, MS_BIND, None)
            self._view = fdpath.open_path(run_fd, VOLUMES, directory=True)
            mounts.mounted(VOLUMES, self._view)
            view = fdpath.fd_path(self._view)
            sys_mount(None, view, None, MS_PRIVATE, None)  # binds made in it go nowhere else
            sys_mount(None, view, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                      None)
        except BaseException:
            self.close()  # what was mounted is in the record: remove_run_dir undoes it
            raise

    def attach(self, cid: str, volumes: Sequence[Volume]) -> None:
        """Bind every volume's host path to its place; all or nothing."""
        if not volumes:
            return
        assert self._mounts is not None and self._rw is not None and self._view is not None, "create() first"
        paths = [volume_path(v.name, cid) for v in volumes]
        v: Volume | None = None
        try:
            fdpath.make_dir(self._rw, cid, 0o700)
            for v, path in zip(volumes, paths):
                name = path.split("/", 1)[1]
                if v.is_dir:
                    fdpath.make_dir(self._rw, name, 0o700)
                else:
                    fdpath.make_file(self._rw, name, 0o600)
                self._bind(v, name, path)
        except OSError as exc:
            self.detach(cid)
            raise VolumeError(f"container {cid}: cannot share {v.host_path if v else '?'} with the VM: "
                              f"{exc}") from None
        except BaseException:
            self.detach(cid)
            raise

    def _bind(self, v: Volume, name: str, path: str) -> None:
        assert self._mounts is not None and self._view is not None
        flags = MS_BIND | (MS_REC if v.recursive else 0)
        target = fdpath.open_path(self._view, name, cross_mounts=False)  # on the view, not mounted yet
        try:
            # the source is the node's (kubelet's, the ctr user's) path: resolved as runc does
            source = os.open(v.host_path, os.O_PATH | os.O_CLOEXEC)
            try:
                self._mounts.add(path)
                sys_mount(fdpath.fd_path(source), fdpath.fd_path(target), None, flags, None)
            finally:
                os.close(source)
        finally:
            os.close(target)
        mounted = fdpath.open_path(self._view, name)
        try:
            self._mounts.mounted(path, mounted)
            at = fdpath.fd_path(mounted)
            # slave: the node's later mounts and unmounts below the source reach the guest
            # (rslave semantics); nothing done here propagates back to the node
            sys_mount(None, at, None, MS_SLAVE | MS_REC, None)
            if v.readonly:  # a bind ignores MS_RDONLY: remount it
                sys_mount(None, at, None, flags | MS_REMOUNT | MS_RDONLY, None)
        finally:
            os.close(mounted)

    def detach(self, cid: str) -> None:
        """Unmount and remove ``cid``'s volumes (the host data stays, of course)."""
        if self._mounts is None or self._rw is None:
            return
        base = volume_path(f"{cid}/0", cid).rsplit("/", 1)[0]
        problems = self._mounts.unmount_below(base)
        if problems:
            raise VolumeError(f"container {cid}: volumes left mounted: {'; '.join(problems)}")
        left = fdpath.remove_tree(self._rw, cid)
        if left:
            raise VolumeError(f"container {cid}: not removing its volume dir, still mounted: {', '.join(left)}")

    def close(self) -> None:
        """Forget the fds (the run dir itself goes with :func:`remove_run_dir`)."""
        for fd in (self._rw, self._view, self._mounts.run_fd if self._mounts else None):
            if fd is not None:
                os.close(fd)
        self._rw = self._view = None
        self._mounts = None
