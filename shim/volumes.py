"""A VM sandbox's volume dir: host paths given to the guest, one bind mount each.

Why bind mounts in one directory shared over 9p: volumes (kubelet's emptyDir/configMap/secret
dirs, ``ctr --mount``, ``nerdctl -v``) arrive with each container, long after the VM booted, and
a share cannot be added to a running guest cheaply.  The sandbox's volume dir
``<vm run dir>/volumes`` is shared once at boot; QEMU's 9p server resolves every path on the host
when the guest asks, so a bind mount made under that dir later is visible in the guest at once.
The guest sees only what was bound there, nothing else of the host; read-only volumes are bound
read-only on the host side too, so the guest cannot write them whatever it does.

The one dangerous operation here is removal: the dir holds bind mounts of real host data, so it
is never removed recursively while anything is mounted below it (:func:`unmount_under` first,
then :func:`remove_tree` refuses to cross into a mount).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from ccpu.agent.mounts import (MNT_DETACH, MS_BIND, MS_RDONLY, MS_REC, MS_REMOUNT, MS_SLAVE, mount_points,
                               sys_mount, sys_umount)
from shim.guestspec import Volume

log = logging.getLogger("shim.volumes")

SHARE_TAG = "fractalvols"


class VolumeError(RuntimeError):
    pass


def _below(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def unmount_under(root: str) -> list[str]:
    """Detach every mount at or below ``root``, deepest first; returns those still there."""
    root = os.path.realpath(root)
    for _ in range(3):
        mine = sorted((p for p in mount_points() if _below(p, root)), key=len, reverse=True)
        if not mine:
            return []
        for p in mine:
            try:
                sys_umount(p, MNT_DETACH)
            except OSError as exc:
                log.warning("umount %s: %s", p, exc)
    return [p for p in mount_points() if _below(p, root)]


def remove_tree(root: str) -> None:
    """rm -r that never descends into a mount point (there: an error, nothing removed below)."""
    import shutil

    left = unmount_under(root)
    if left:
        raise VolumeError(f"not removing {root}: still mounted below it: {', '.join(left)}")
    shutil.rmtree(root, ignore_errors=True)


class VolumeDir:
    """``<vm run dir>/volumes``: ``<container id>/<n>`` is the n-th volume of that container."""

    def __init__(self, root: str) -> None:
        self.root = root

    def create(self) -> None:
        os.makedirs(self.root, mode=0o700, exist_ok=True)

    def attach(self, cid: str, volumes: Sequence[Volume]) -> None:
        """Bind every volume's host path to its place; all or nothing."""
        if not volumes:
            return
        base = os.path.join(self.root, cid)
        v: Volume | None = None
        try:
            for v in volumes:
                target = os.path.join(self.root, v.name)
                if not _below(os.path.normpath(target), base):
                    raise VolumeError(f"volume name {v.name!r} is not below {cid}/")
                os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
                if v.is_dir:
                    os.makedirs(target, mode=0o700, exist_ok=True)
                else:
                    os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600))
                flags = MS_BIND | (MS_REC if v.recursive else 0)
                sys_mount(v.host_path, target, None, flags, None)
                # slave: the node's later mounts and unmounts below the source reach the guest
                # (rslave semantics); nothing done here propagates back to the node
                sys_mount(None, target, None, MS_SLAVE | MS_REC, None)
                if v.readonly:  # a bind ignores MS_RDONLY: remount it
                    sys_mount(None, target, None, flags | MS_REMOUNT | MS_RDONLY, None)
        except OSError as exc:
            self.detach(cid)
            raise VolumeError(f"container {cid}: cannot share {v.host_path if v else '?'} with the VM: "
                              f"{exc}") from None
        except BaseException:
            self.detach(cid)
            raise

    def detach(self, cid: str) -> None:
        """Unmount and remove ``cid``'s volumes (the host data stays, of course)."""
        base = os.path.join(self.root, cid)
        if os.path.lexists(base):
            remove_tree(base)

    def close(self) -> None:
        remove_tree(self.root)
