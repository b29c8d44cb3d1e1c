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
* **the shim undoes exactly the mounts it made**: each one (the view and every volume) is in the
  run dir's record (:mod:`shim.mountrecord`, ``<run dir>/mounts.json``, which the guest cannot
  reach), and is detached only if the recorded mount is found at its recorded place.  A dead
  shim's ``delete`` verb reads the same record (:func:`remove_run_dir`).  Nothing is ever
  unmounted by walking a directory or by a path prefix.

Removal never crosses a mount point (:func:`ccpu.fdpath.remove_tree`): host data bound into the
dir is never deleted, even if an unmount failed.
"""

from __future__ import annotations

import logging
import os
import posixpath
from collections.abc import Sequence

from ccpu import fdpath
from ccpu.linux.mount import (MS_BIND, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_PRIVATE, MS_RDONLY, MS_REC, MS_REMOUNT,
                              MS_SLAVE, mount)
from shim.guestspec import Volume
from ccpu.linux.statx import mount_of
from shim.mountrecord import MountRecordError, RunDirMounts, remove_run_dir, valid_path

__all__ = ["SHARE_TAG", "VolumeDir", "VolumeError", "remove_run_dir", "volume_path"]

log = logging.getLogger("shim.volumes")

SHARE_TAG = "fractalvols"
VOLUMES = "volumes"  # the shared dir, in the run dir


class VolumeError(MountRecordError):
    pass


def volume_path(name: str, cid: str) -> str:
    """The run-dir-relative mount point of volume ``name`` (``<cid>/<n>``) of container ``cid``."""
    parts = name.split("/")
    if len(parts) != 2 or parts[0] != cid or not valid_path(name):
        raise VolumeError(f"volume name {name!r} is not <container>/<n> below {cid}/")
    return posixpath.join(VOLUMES, name)


class VolumeDir:
    """``<run dir>/volumes``: ``<container id>/<n>`` is the n-th volume of that container."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir
        self.root = os.path.join(run_dir, VOLUMES)  # what QEMU shares (the read-only view)
        self._mounts: RunDirMounts | None = None
        self._rw: int | None = None  # O_PATH fd of the dir under the view: where we make dirs
        self._view: int | None = None  # O_PATH fd of the view's root: where we mount

    def create(self) -> None:
        """Make the dir and its read-only view (the run dir exists and has no record yet)."""
        run_fd = os.open(self.run_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self._mounts = mounts = RunDirMounts.load(run_fd)
        except BaseException:
            os.close(run_fd)
            raise
        try:
            fdpath.make_dir(run_fd, VOLUMES, 0o700)
            self._rw = fdpath.open_path(run_fd, VOLUMES, cross_mounts=False, directory=True)
            mounts.add(VOLUMES)
            mount(fdpath.fd_path(self._rw), fdpath.fd_path(self._rw), None, MS_BIND, None)
            self._view = fdpath.open_path(run_fd, VOLUMES, directory=True)
            mounts.mounted(VOLUMES, self._view)
            view = fdpath.fd_path(self._view)
            mount(None, view, None, MS_PRIVATE, None)  # binds made in it go nowhere else
            mount(None, view, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                      None)
        except BaseException:
            self.close()  # what was mounted is in the record: remove_run_dir undoes it
            raise

    def adopt(self, rw_fd: int) -> None:
        """Take over the dir another process made in this run dir (a pooled VM's, renamed here:
        shim/pool.py).  ``rw_fd``: its fd of the dir under the view (a path reaches only the
        view); ours now.  The view must be the mount the record names."""
        run_fd = os.open(self.run_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self._mounts = mounts = RunDirMounts.load(run_fd)
        except BaseException:
            os.close(run_fd)
            os.close(rw_fd)
            raise
        self._rw = rw_fd
        self._view = fdpath.open_path(run_fd, VOLUMES, directory=True)
        rec = next((e for e in mounts.record.entries if e.path == VOLUMES), None)
        m = mount_of(self._view)
        if rec is None or not m.is_root or rec.mnt_id != m.mnt_id:
            self.close()
            raise VolumeError(f"{self.root}: not the recorded volume view")

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
                mount(fdpath.fd_path(source), fdpath.fd_path(target), None, flags, None)
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
            mount(None, at, None, MS_SLAVE | MS_REC, None)
            if v.readonly:  # a bind ignores MS_RDONLY: remount it
                mount(None, at, None, flags | MS_REMOUNT | MS_RDONLY, None)
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
