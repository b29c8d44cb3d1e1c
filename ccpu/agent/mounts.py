"""Mounting a container's rootfs at `bundle/rootfs`, and unmounting it on delete.

Why the agent mounts at all: in a guest VM the layers are only visible to the guest (shared in
from the host's repo), so the guest must stack the overlay itself (`layers`); in host mode the
shim may pass containerd's mounts through (`mounts`) or mount itself (`none`).

Mounts use mount(2) through ctypes: the guest has no util-linux, and mount(8) would be one more
process per container.  Options are interpreted as containerd's mount package does
(mount_linux.go): flag words become MS_* flags, everything else is filesystem data, and a
read-only bind is remounted read-only.  Overlay option strings longer than a page are shortened
by making lowerdirs relative to their common parent and mounting from there, in a forked child
so the agent's own cwd never moves.

Every path in the request must resolve inside the agent's layer roots (checked in `plan`).
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .. import stack
from ..linux import mountinfo
from ..linux.mount import (MNT_DETACH, MS_BIND, MS_DIRSYNC, MS_MANDLOCK, MS_NOATIME, MS_NODEV, MS_NODIRATIME,
                           MS_NOEXEC, MS_NOSUID, MS_PRIVATE, MS_RDONLY, MS_REC, MS_RELATIME, MS_REMOUNT, MS_SHARED,
                           MS_SLAVE, MS_STRICTATIME, MS_SYNCHRONOUS, MS_UNBINDABLE, mount, umount)
from ..linux.reaper import Reaper, fork_call
from ..stack import Mount
from . import protocol

# word -> (clear?, flag), as containerd's parseMountOptions
_FLAGS: dict[str, tuple[bool, int]] = {
    "async": (True, MS_SYNCHRONOUS),
    "atime": (True, MS_NOATIME),
    "bind": (False, MS_BIND),
    "defaults": (False, 0),
    "dev": (True, MS_NODEV),
    "diratime": (True, MS_NODIRATIME),
    "dirsync": (False, MS_DIRSYNC),
    "exec": (True, MS_NOEXEC),
    "mand": (False, MS_MANDLOCK),
    "noatime": (False, MS_NOATIME),
    "nodev": (False, MS_NODEV),
    "nodiratime": (False, MS_NODIRATIME),
    "noexec": (False, MS_NOEXEC),
    "nomand": (True, MS_MANDLOCK),
    "norelatime": (True, MS_RELATIME),
    "nostrictatime": (True, MS_STRICTATIME),
    "nosuid": (False, MS_NOSUID),
    "rbind": (False, MS_BIND | MS_REC),
    "relatime": (False, MS_RELATIME),
    "remount": (False, MS_REMOUNT),
    "ro": (False, MS_RDONLY),
    "rw": (True, MS_RDONLY),
    "strictatime": (False, MS_STRICTATIME),
    "suid": (True, MS_NOSUID),
    "sync": (False, MS_SYNCHRONOUS),
}
_PROPAGATION: dict[str, int] = {
    "private": MS_PRIVATE,
    "rprivate": MS_PRIVATE | MS_REC,
    "shared": MS_SHARED,
    "rshared": MS_SHARED | MS_REC,
    "slave": MS_SLAVE,
    "rslave": MS_SLAVE | MS_REC,
    "unbindable": MS_UNBINDABLE,
    "runbindable": MS_UNBINDABLE | MS_REC,
}
_TYPES = ("bind", "overlay", "tmpfs")

def parse_options(options: Sequence[str]) -> tuple[int, int, str]:
    """(flags, propagation flags, data) for mount options, as containerd's parseMountOptions."""
    flags = 0
    propagation = 0
    data: list[str] = []
    for o in options:
        if o in _FLAGS:
            clear, f = _FLAGS[o]
            flags = flags & ~f if clear else flags | f
        elif o in _PROPAGATION:
            propagation |= _PROPAGATION[o]
        elif o == "loop":
            raise protocol.Unimplemented("loop mounts are not supported by the agent")
        else:
            data.append(o)
    return flags, propagation, ",".join(data)


def compact_lowerdirs(options: Sequence[str]) -> tuple[str | None, tuple[str, ...]]:
    """(cwd, options) with lowerdirs relative to their common parent when they exceed a page."""
    try:
        plan = stack.compact_lowerdirs(options)
    except stack.StackError as e:
        raise protocol.InvalidArgument(str(e)) from None
    return plan.chdir, plan.options


def _overlay_paths(options: Sequence[str]) -> list[tuple[str, list[str]]]:
    out = []
    for o in options:
        key, sep, value = o.partition("=")
        if not sep:
            continue
        if key == "lowerdir":
            out.append((key, value.split(":")))
        elif key in ("upperdir", "workdir"):
            out.append((key, [value]))
    return out


@dataclass(frozen=True)
class RootfsPlan:
    """What a ``create``'s rootfs argument comes to: the mounts to make, and for kind
    ``layers`` the validated stack they were made from (the container's live stack)."""

    mounts: list[Mount]
    stack: stack.LayerStack | None = None


def plan(rootfs: Any, layer_roots: Sequence[str]) -> list[Mount]:
    """Validated mounts for a `rootfs` argument (see docs/agent-protocol.md)."""
    return rootfs_plan(rootfs, layer_roots).mounts


def rootfs_plan(rootfs: Any, layer_roots: Sequence[str]) -> RootfsPlan:
    """The mounts (and stack) for a `rootfs` argument, every path checked against the roots."""
    if not isinstance(rootfs, Mapping):
        raise protocol.InvalidArgument("rootfs must be an object")
    kind = rootfs.get("kind")
    if kind == "none":
        return RootfsPlan([])
    if kind == "layers":
        layers = protocol.resolve_stack(rootfs, layer_roots)
        try:  # the same mount shapes the snapshotter hands containerd
            return RootfsPlan(layers.mounts(), layers)
        except stack.StackError as e:
            raise protocol.InvalidArgument(str(e)) from None
    if kind == "mounts":
        result = []
        for m in protocol.arg_list(rootfs, "mounts"):
            if not isinstance(m, Mapping):
                raise protocol.InvalidArgument("rootfs.mounts entries must be objects")
            mtype = protocol.arg_str(m, "type")
            source = protocol.arg_str(m, "source", "") or ""
            options = protocol.arg_list(m, "options", []) or []
            if not all(isinstance(o, str) for o in options):
                raise protocol.InvalidArgument("mount options must be strings")
            if mtype not in _TYPES:
                raise protocol.InvalidArgument(f"unsupported mount type {mtype!r} (supported: {', '.join(_TYPES)})")
            if mtype == "bind" or "bind" in options or "rbind" in options:
                source = protocol.resolve_inside(source, layer_roots, "bind source")
            if mtype == "overlay":
                fixed = []
                for o in options:
                    key, sep, value = o.partition("=")
                    if sep and key == "lowerdir":
                        o = "lowerdir=" + ":".join(protocol.resolve_all(value.split(":"), layer_roots, "lower dir"))
                    elif sep and key in ("upperdir", "workdir"):
                        o = f"{key}={protocol.resolve_inside(value, layer_roots, key)}"
                    fixed.append(o)
                options = fixed
            result.append(Mount(mtype, source, tuple(options)))
        return RootfsPlan(result)
    raise protocol.InvalidArgument(f"unknown rootfs kind {kind!r}")


def _mount_one(m: Mount, target: str) -> None:
    flags, propagation, data = parse_options(m.options)
    if not flags & MS_REMOUNT:
        mount(m.source, target, m.type, flags, data or None)
    if propagation:
        mount(None, target, None, propagation, None)
    if flags & (MS_BIND | MS_RDONLY) == (MS_BIND | MS_RDONLY):  # bind ignores ro: remount
        mount(None, target, None, flags | MS_REMOUNT, None)


def user_xattrs(path: str) -> bool:
    """Whether the filesystem of `path` (a directory of ours) stores `user.*` xattrs."""
    name = "user.fractal.probe"
    try:
        os.setxattr(path, name, b"1", follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):
            return False
        raise
    os.removexattr(path, name, follow_symlinks=False)
    return True


def _workdir(options: Sequence[str]) -> str | None:
    return next((o[len("workdir="):] for o in options if o.startswith("workdir=")), None)


async def _mount_overlay(reaper: Reaper, m: Mount, target: str) -> None:
    """One overlay; a writable `userxattr` one over an upper without user xattrs goes through
    a read-only lower overlay (stack.NestedOverlay).  That lower overlay is mounted at a
    private temporary dir next to `target` and detached again once the upper overlay holds it
    (overlayfs keeps its own clone of every lower mount), so nothing extra is left to unmount."""
    nested = stack.nest_for_trusted_upper(m.options)
    work = _workdir(m.options)
    if nested is None or work is None or user_xattrs(work):
        cwd, opts = compact_lowerdirs(m.options)
        await _mount_at(reaper, Mount(m.type, m.source, opts), target, cwd)
        return
    if nested.lower is None:  # one layer: the plain overlay, without userxattr
        _mount_one(Mount(m.type, m.source, nested.upper), target)
        return
    lower_mp = f"{target.rstrip('/')}.lower"
    os.makedirs(lower_mp, exist_ok=True)
    if mountinfo.is_mountpoint(lower_mp):  # left by an agent that died between the two mounts
        umount(lower_mp, MNT_DETACH)
    try:
        cwd, opts = compact_lowerdirs(nested.lower)
        await _mount_at(reaper, Mount("overlay", "overlay", opts), lower_mp, cwd)
        try:
            _mount_one(Mount(m.type, m.source, nested.upper + (f"lowerdir={lower_mp}",)), target)
        finally:
            umount(lower_mp, MNT_DETACH)
    finally:
        os.rmdir(lower_mp)


async def _mount_at(reaper: Reaper, m: Mount, target: str, chdir: str | None = None) -> None:
    """Mount ``m`` on ``target``; from the cwd ``chdir`` when its options name paths relative to it."""
    if chdir is None:
        _mount_one(m, target)
    else:
        await _mount_from(reaper, m, target, chdir)


async def mount_all(reaper: Reaper, mounts: Sequence[Mount], target: str) -> int:
    """Mount `mounts` in order on `target`; returns how many were mounted.  On failure the ones
    already mounted are unmounted again before the error is raised."""
    done = 0
    try:
        for m in mounts:
            if m.type == "overlay":
                await _mount_overlay(reaper, m, target)
            else:
                await _mount_at(reaper, m, target)
            done += 1
    except OSError as e:
        unmount(target, done)
        if e.errno in protocol.NO_SPACE:
            raise protocol.ResourceExhausted(f"{e} ({full_filesystem(target)})") from None
        raise protocol.Internal(str(e)) from None
    except BaseException:
        unmount(target, done)
        raise
    return done


async def _mount_from(reaper: Reaper, m: Mount, target: str, chdir: str) -> None:
    def child() -> int:
        try:
            os.chdir(chdir)
            _mount_one(m, target)
        except OSError as e:
            return e.errno or 255
        return 0

    code = await fork_call(reaper, child)
    if code:
        raise OSError(code, f"mount overlay on {target} from {chdir}: {os.strerror(code)}")


def full_filesystem(path: str) -> str:
    """Which filesystem is full, for an ENOSPC on `path`: mount point, type, size, inodes."""
    try:
        m = mountinfo.containing(os.path.realpath(path), mountinfo.read())
    except OSError:
        m = None
    mp, fstype = (m.mountpoint, m.fstype) if m is not None else ("/", "?")
    try:
        st = os.statvfs(mp)
        size = f"{st.f_blocks * st.f_frsize // (1 << 20)} MiB, {st.f_bavail * st.f_frsize // (1 << 20)} MiB free, " \
               f"{st.f_favail} of {st.f_files} inodes free"
    except OSError:
        size = "size unknown"
    return f"the {fstype} at {mp} is full ({size})"


def unmount(target: str, count: int) -> None:
    """Undo `count` stacked mounts on `target`: retry EBUSY briefly, then detach lazily.  A
    target that is gone (ENOENT: its dir was removed, which detaches the mounts on it in every
    namespace -- containerd removing a dead shim's bundle under a remote agent) has nothing
    left to unmount."""
    for _ in range(count):
        for attempt in range(10):
            try:
                umount(target)
                break
            except OSError as e:
                if e.errno in (errno.EINVAL, errno.ENOENT):  # not mounted (any more), or gone
                    return
                if e.errno != errno.EBUSY or attempt == 9:
                    try:
                        umount(target, MNT_DETACH)
                    except OSError as e2:
                        if e2.errno in (errno.EINVAL, errno.ENOENT):
                            return
                        raise
                    break
                time.sleep(0.05)
