"""containerd's rootfs mounts -> what the container's root is (:data:`Rootfs`).  Pure: no I/O.

The ONE place the shim parses containerd's mounts.  The fractal snapshotter answers a
container's snapshot with one overlay mount whose lower dirs are repo layers
(``<repo>/layers/<id>``) and whose upper/work are the container's own: that becomes a
:class:`ccpu.stack.LayerStack` (host paths), which the sandbox moves to its agent's view
(shim/agentsandbox.py, shim/guestpaths.py) and sends as the agent's ``{"kind": "layers", ...}``;
the agent stacks the overlay itself, with the same code a guest uses on its share of the repo.
Anything else (overlayfs or native snapshotter, a bind mount) is :class:`PassThroughMounts`
(``{"kind": "mounts", ...}``, mounted in order); no mounts is :class:`NoRootfs`: the bundle's
rootfs is already in place (``{"kind": "none"}``).
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias

from ccpu.stack import LayerStack, Mount
from shim.guestpaths import under


class MountLike(Protocol):
    type: str
    source: str
    options: Sequence[str]


def _overlay_parts(options: Iterable[str]) -> tuple[list[str], str, str, list[str]] | None:
    """(lowers, upper, work, other options) of an overlay mount; None if lowerdir is missing."""
    lowers: list[str] | None = None
    upper = work = ""
    other: list[str] = []
    for opt in options:
        if opt.startswith("lowerdir="):
            lowers = [p for p in opt[len("lowerdir="):].split(":") if p]
        elif opt.startswith("upperdir="):
            upper = opt[len("upperdir="):]
        elif opt.startswith("workdir="):
            work = opt[len("workdir="):]
        else:
            other.append(opt)
    if lowers is None:
        return None
    return lowers, upper, work, other


@dataclass(frozen=True)
class PassThroughMounts:
    """containerd's mounts as they are, for the agent to mount in order."""

    mounts: tuple[Mount, ...]

    def to_wire(self) -> dict[str, Any]:
        return {"kind": "mounts", "mounts": [
            {"type": m.type, "source": m.source, "options": list(m.options)} for m in self.mounts]}


@dataclass(frozen=True)
class NoRootfs:
    """No mounts: the bundle's rootfs is already in place."""

    def to_wire(self) -> dict[str, Any]:
        return {"kind": "none"}


#: what a container's root is, parsed once from CreateTaskRequest.rootfs
Rootfs: TypeAlias = LayerStack | PassThroughMounts | NoRootfs


def kind(rootfs: Rootfs) -> str:
    """The agent protocol's name of the rootfs kind (``layers``, ``mounts``, ``none``)."""
    return str(rootfs.to_wire()["kind"])


def parse(mounts: Sequence[MountLike], repo_root: str | None) -> Rootfs:
    """The container's root for CreateTaskRequest.rootfs.

    A :class:`LayerStack` only when there is exactly one overlay mount, every lower dir is an
    absolute path under ``<repo_root>/layers/``, and it is writable (upper and work given); the
    other overlay options (e.g. ``index=off``) are the agent's to choose.
    """
    if not mounts:
        return NoRootfs()
    if repo_root and len(mounts) == 1 and mounts[0].type == "overlay":
        parts = _overlay_parts(mounts[0].options)
        layers_dir = posixpath.join(repo_root, "layers")
        if parts is not None:
            lowers, upper, work, _ = parts
            if (lowers and upper and work
                    and all(posixpath.isabs(p) and under(p, layers_dir) for p in lowers)):
                return LayerStack(tuple(lowers), upper, work)
    return PassThroughMounts(tuple(Mount(m.type, m.source, tuple(m.options)) for m in mounts))
