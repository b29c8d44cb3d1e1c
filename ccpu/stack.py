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
import posixpath
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

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
    """A stack that cannot be expressed as a mount, or a malformed one on the wire."""


@dataclass(frozen=True, slots=True)
class LayerStack:
    """A container's root as a stack of layer directories: the ONE value for it, end to end.

    Why one typed value: the stack used to be re-parsed from overlay options, re-shaped into
    dicts and re-validated in the shim, the VM placement and the agent, each a little
    differently.  Now shim/rootfs.py parses containerd's mounts into a LayerStack once, the
    sandbox's layer paths (shim/layerpaths.py) move it to where the agent sees it with one
    :meth:`map`, it crosses the agent protocol as :meth:`to_wire` (``rootfs`` of kind
    ``layers``), and the agent checks it once (ccpu/agent/protocol.py: ``resolve_stack``) and
    keeps it as the container's live stack (ccpu/agent/live.py).

    ``lowers`` are nearest (top) first; ``upper``/``work`` are None for a read-only stack
    (the agent accepts that; the shim always sends a writable one).
    """

    lowers: tuple[str, ...]
    upper: str | None = None
    work: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.lowers, str) or not isinstance(self.lowers, tuple):
            object.__setattr__(self, "lowers", tuple(self.lowers))
        if not self.lowers:
            raise StackError("a layer stack needs at least one lower layer")
        if not all(isinstance(p, str) and p for p in self.lowers):
            raise StackError("lower dirs must be non-empty strings")
        for name in ("upper", "work"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise StackError(f"the {name} dir must be a non-empty string")
        if (self.upper is None) != (self.work is None):
            raise StackError("a writable stack needs both an upper and a work dir")

    @property
    def writable(self) -> bool:
        return self.upper is not None

    def map(self, fn: Callable[[str, str], str]) -> LayerStack:
        """The same stack with every path ``p`` replaced by ``fn(p, role)`` (role: ``lower``,
        ``upper`` or ``work``): how a stack moves between the host's and an agent's view."""
        return LayerStack(tuple(fn(p, "lower") for p in self.lowers),
                          None if self.upper is None else fn(self.upper, "upper"),
                          None if self.work is None else fn(self.work, "work"))

    def with_lowers(self, lowers: Sequence[str]) -> LayerStack:
        return replace(self, lowers=tuple(lowers))

    def with_writable(self, upper: str | None, work: str | None) -> LayerStack:
        return replace(self, upper=upper, work=work)

    def mounts(self) -> list[Mount]:
        """The mount(s) that stack it, shaped as the snapshotter gives containerd."""
        return snapshot_mounts(list(self.lowers), self.upper, self.work)

    def to_wire(self) -> dict[str, Any]:
        """The agent protocol's ``rootfs`` object of kind ``layers`` (docs/agent-protocol.md)."""
        out: dict[str, Any] = {"kind": "layers", "lowers": list(self.lowers)}
        if self.upper is not None:
            out.update(upper=self.upper, work=self.work)
        return out

    @classmethod
    def from_wire(cls, value: Any) -> LayerStack:
        """The stack of a ``layers`` object; StackError if it is malformed (shape only: where
        its paths may point is the receiver's to check)."""
        if not isinstance(value, Mapping):
            raise StackError("a layer stack must be an object")
        lowers = value.get("lowers")
        if not isinstance(lowers, list):
            raise StackError("rootfs.lowers must be a list of paths")
        if not lowers:
            raise StackError("rootfs.lowers is empty")
        upper, work = value.get("upper"), value.get("work")
        for name, v in (("upper", upper), ("work", work)):
            if v is not None and not isinstance(v, str):
                raise StackError(f"rootfs.{name} must be a path")
        if upper is None:
            work = None  # a read-only stack: a work dir means nothing
        return cls(tuple(lowers), upper, work)


def normalized_abs(path: str, role: str = "path") -> str:
    """``path`` normalized; StackError unless it is absolute (a stack's paths never depend on
    anyone's cwd)."""
    if not posixpath.isabs(path) or "\0" in path:
        raise StackError(f"{role} dir {path!r} is not an absolute path")
    return posixpath.normpath(path)


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
