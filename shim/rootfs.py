"""containerd's rootfs mounts -> the agent's ``rootfs`` argument.  Pure: no I/O.

The fractal snapshotter answers a container's snapshot with one overlay mount whose lower dirs
are repo layers (``<repo>/layers/<id>``) and whose upper/work are the container's own.  That
shape is handed to the agent as ``{"kind": "layers", ...}``: the agent stacks the overlay
itself, with the same code a guest uses on its share of the repo.  Anything else (overlayfs or
native snapshotter, a bind mount) is passed through as ``{"kind": "mounts", ...}`` and mounted
in order; no mounts means the bundle's rootfs is already in place (``{"kind": "none"}``).
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

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


def translate(mounts: Sequence[MountLike], repo_root: str | None) -> dict[str, Any]:
    """Agent ``rootfs`` argument for CreateTaskRequest.rootfs.

    ``layers`` only when there is exactly one overlay mount, every lower dir is an absolute
    path under ``<repo_root>/layers/``, and it is writable (upper and work given); the other
    overlay options (e.g. ``index=off``) are the agent's to choose.
    """
    if not mounts:
        return {"kind": "none"}
    if repo_root and len(mounts) == 1 and mounts[0].type == "overlay":
        parts = _overlay_parts(mounts[0].options)
        layers_dir = posixpath.join(repo_root, "layers")
        if parts is not None:
            lowers, upper, work, _ = parts
            if (lowers and upper and work
                    and all(posixpath.isabs(p) and under(p, layers_dir) for p in lowers)):
                return {"kind": "layers", "lowers": lowers, "upper": upper, "work": work}
    return {
        "kind": "mounts",
        "mounts": [
            {"type": m.type, "source": m.source, "options": list(m.options)} for m in mounts
        ],
    }
