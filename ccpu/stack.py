"""Layer stacks -> mount plans.  Pure functions: no I/O, no syscalls.

A stack is a list of read-only layer directories, nearest (top) first, plus
optionally a writable upper.  These functions decide the shape of the mount
the way containerd's overlayfs snapshotter does, so that containerd, runc and
our own agent can mount the result unchanged:

- nothing below and writable    -> rw bind of the upper
- one layer below, read-only    -> ro bind of that layer
- several layers, read-only     -> overlay with lowerdirs only
- anything below and writable   -> overlay with upper/work

Every overlay is mounted with `userxattr`: overlayfs then reads opaque-directory markers from
`user.overlay.opaque`, which the repo writes next to containerd's `trusted.overlay.opaque`
(ccpu/repo/opaque.py) and which, unlike `trusted.*`, crosses both VM shares; it also keeps
those markers hidden from the container, as overlayfs hides its trusted ones (docs/vm.md).

The kernel takes mount options as one page (4096 bytes).  containerd shortens
long lowerdir lists itself when it mounts (it chdirs to their common parent),
and our agent does the same through `compact_lowerdirs`; layer directories
are named by short numeric ids so that 128 layers fit either way.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

#: what the kernel copies of mount(2)'s option string: one page
PAGE_SIZE = 4096


@dataclass(frozen=True, slots=True)
class Mount:
    """One entry of containerd's mount list (containerd.types.Mount), and one mount(2) the
    agent makes (``ccpu.agent.mounts``): the one mount type of the project.

    Defined here, not in the repo package, so that the agent can ship this
    module alone (stdlib only, no SQLite) into a guest.
    """

    type: str
    source: str
    options: tuple[str, ...] = ()
    target: str = ""


class StackError(ValueError):
    """A stack that cannot be expressed as a mount."""


def snapshot_mounts(
    lowers: Sequence[str],
    upper: str | None = None,
    work: str | None = None,
    *,
    empty_dir: str | None = None,
    index_off: bool = True,
    userxattr: bool = True,
) -> list[Mount]:
    """Mounts for a snapshot whose parents are `lowers` (top first).

    `upper`/`work` are given for writable (active) snapshots.  `empty_dir` is
    what a read-only snapshot without parents shows (containerd binds the
    snapshot's own empty directory).
    """
    if upper is not None:
        if not lowers:
            return [Mount("bind", upper, ("rw", "rbind"))]
        if work is None:
            raise StackError("a writable overlay needs a work directory")
        options = overlay_flags(index_off, userxattr)
        options += [f"workdir={work}", f"upperdir={upper}", "lowerdir=" + ":".join(lowers)]
        return [Mount("overlay", "overlay", tuple(options))]
    if not lowers:
        if empty_dir is None:
            raise StackError("a read-only snapshot without parents needs an empty directory")
        return [Mount("bind", empty_dir, ("ro", "rbind"))]
    if len(lowers) == 1:
        return [Mount("bind", lowers[0], ("ro", "rbind"))]
    options = overlay_flags(index_off, userxattr)
    options.append("lowerdir=" + ":".join(lowers))
    return [Mount("overlay", "overlay", tuple(options))]


def overlay_flags(index_off: bool = True, userxattr: bool = True) -> list[str]:
    """The overlay options that are not paths."""
    return (["index=off"] if index_off else []) + (["userxattr"] if userxattr else [])


@dataclass(frozen=True, slots=True)
class CompactOptions:
    """Overlay options rewritten to fit a page: mount them from `chdir`."""

    chdir: str | None
    options: tuple[str, ...]


def options_size(options: Sequence[str]) -> int:
    return len(",".join(options))


def compact_lowerdirs(options: Sequence[str], limit: int = PAGE_SIZE - 512) -> CompactOptions:
    """Make lowerdirs relative to their common parent when options are too long.

    Mirrors what containerd does before mounting, so that our agent can mount
    stacks of 128 layers itself.  upperdir/workdir stay absolute.
    """
    if options_size(options) < limit:
        return CompactOptions(None, tuple(options))
    lower_idx = next((i for i, o in enumerate(options) if o.startswith("lowerdir=")), None)
    if lower_idx is None:
        raise StackError("mount options exceed a page and have no lowerdir to shorten")
    lowers = options[lower_idx][len("lowerdir="):].split(":")
    common = os.path.commonpath(lowers) if len(lowers) > 1 else os.path.dirname(lowers[0])
    if common in lowers:  # one lower is the parent of the others: step up once
        common = os.path.dirname(common)
    rel = [os.path.relpath(p, common) for p in lowers]
    new = list(options)
    new[lower_idx] = "lowerdir=" + ":".join(rel)
    if options_size(new) >= PAGE_SIZE:
        raise StackError(f"{len(lowers)} layers do not fit in one mount even when relative to {common}")
    return CompactOptions(common, tuple(new))


@dataclass(frozen=True, slots=True)
class NestedOverlay:
    """A writable `userxattr` overlay rewritten for an upper whose filesystem has no `user.*` xattrs.

    With `userxattr` overlayfs also marks the opaque dirs it creates in the upper with
    `user.overlay.opaque`; on such an upper (tmpfs before Linux 6.6: a VM guest's) `mkdir` over
    a deleted directory then fails with EIO.  So `upper` is the writable overlay with overlayfs'
    usual trusted xattrs (tmpfs has those).  With several layers, `lower` is a read-only
    `userxattr` overlay of them (it reads their markers), mounted first; its mount point becomes
    the only lower dir of `upper`.  A single layer has no layer below it to hide: `lower` is
    None and `upper` keeps its lowerdir.
    """

    lower: tuple[str, ...] | None
    upper: tuple[str, ...]  # without a lowerdir= when `lower` is given (its mount point, known at mount time)


def nest_for_trusted_upper(options: Sequence[str]) -> NestedOverlay | None:
    """The rewrite of a writable `userxattr` overlay; None for any other overlay (a read-only one
    needs no xattrs on an upper)."""
    opts = list(options)
    lowerdir = next((o for o in opts if o.startswith("lowerdir=")), None)
    if "userxattr" not in opts or lowerdir is None or not any(o.startswith("upperdir=") for o in opts):
        return None
    if ":" not in lowerdir:
        return NestedOverlay(None, tuple(o for o in opts if o != "userxattr"))
    lower = tuple(overlay_flags()) + (lowerdir,)
    return NestedOverlay(lower, tuple(o for o in opts if o not in ("userxattr", lowerdir)))
