"""Layer stacks -> mount plans.  Pure functions: no I/O, no syscalls.

A stack is a list of read-only layer directories, nearest (top) first, plus
optionally a writable upper.  These functions decide the shape of the mount
the way containerd's overlayfs snapshotter does, so that containerd, runc and
our own agent can mount the result unchanged:

- nothing below and writable    -> rw bind of the upper
- one layer below, read-only    -> ro bind of that layer
- several layers, read-only     -> overlay with lowerdirs only
- anything below and writable   -> overlay with upper/work

The kernel takes mount options as one page (4096 bytes).  containerd shortens
long lowerdir lists itself when it mounts (it chdirs to their common parent),
and our agent does the same through `compact_lowerdirs`; layer directories
are named by short numeric ids so that 128 layers fit either way.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass



@dataclass(frozen=True, slots=True)
class Mount:
    """One entry of containerd's mount list (containerd.types.Mount).

    Defined here, not in the repo package, so that the agent can ship this
    module alone (stdlib only, no SQLite) into a guest.
    """

    type: str
    source: str
    options: tuple[str, ...] = ()
    target: str = ""

PAGE_SIZE = 4096


class StackError(ValueError):
    """A stack that cannot be expressed as a mount."""


def snapshot_mounts(
    lowers: Sequence[str],
    upper: str | None = None,
    work: str | None = None,
    *,
    empty_dir: str | None = None,
    index_off: bool = True,
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
        options: list[str] = []
        if index_off:
            options.append("index=off")
        options += [f"workdir={work}", f"upperdir={upper}", "lowerdir=" + ":".join(lowers)]
        return [Mount("overlay", "overlay", tuple(options))]
    if not lowers:
        if empty_dir is None:
            raise StackError("a read-only snapshot without parents needs an empty directory")
        return [Mount("bind", empty_dir, ("ro", "rbind"))]
    if len(lowers) == 1:
        return [Mount("bind", lowers[0], ("ro", "rbind"))]
    options = ["index=off"] if index_off else []
    options.append("lowerdir=" + ":".join(lowers))
    return [Mount("overlay", "overlay", tuple(options))]


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
