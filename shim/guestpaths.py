"""Where a VM sandbox's host paths are in its guest.  Pure: strings in, strings out.

The guest sees the sandbox's layer view at ``/repo/layers`` (one read-only bind of
``<FRACTAL_ROOT>/layers/<id>`` at ``<id>``, shim/layerview.py), so a host lower dir
``<root>/layers/<id>`` is ``/repo/layers/<id>`` in the guest.  A container's upper/work dirs live
in the guest, on a tmpfs of its own at ``/run/fractal/containers/<id>`` (its writable-layer
limit), and its bundle is ``/run/fractal/bundles/<id>``.  Nothing here touches the host: the I/O
(reading files to copy, binding layers) is shim/vm.py's.
"""

from __future__ import annotations

import posixpath
from ccpu.stack import LayerStack
from shim.guestspec import NotInVm

GUEST_LAYERS = "/repo/layers"
GUEST_BUNDLES = "/run/fractal/bundles"
GUEST_SCRATCH = "/run/fractal/containers"


def under(path: str, root: str) -> bool:
    """Whether ``path`` is strictly below ``root`` (lexically, after normalisation: ``..`` cannot
    climb out; symlinks are not followed -- callers check strings they were handed)."""
    path, root = posixpath.normpath(path), posixpath.normpath(root)
    return path.startswith(root.rstrip("/") + "/")


def guest_layer_path(host_dir: str, host_layers: str) -> str:
    """``<host_layers>/<id>[/...]`` -> ``/repo/layers/<id>[/...]``."""
    if not posixpath.isabs(host_dir) or not under(host_dir, host_layers):
        raise NotInVm(f"{host_dir} is not in the fractal repo's layers ({host_layers}): the VM "
                      "sees only those")
    rel = posixpath.relpath(posixpath.normpath(host_dir), posixpath.normpath(host_layers))
    return posixpath.join(GUEST_LAYERS, rel)


def host_layer_path(agent_dir: str, host_layers: str) -> str:
    """The inverse of :func:`guest_layer_path`: ``/repo/layers/<id>[/...]`` ->
    ``<host_layers>/<id>[/...]``; any other path as is (it is not a layer the guest was given)."""
    path = posixpath.normpath(agent_dir)
    if not path.startswith(GUEST_LAYERS + "/"):
        return agent_dir
    return posixpath.join(host_layers, path[len(GUEST_LAYERS) + 1:])


def guest_scratch_dir(cid: str) -> str:
    """The container's own tmpfs in the guest: its upper/work dirs and copied files."""
    return posixpath.join(GUEST_SCRATCH, cid)


def guest_scratch(cid: str) -> tuple[str, str]:
    """(upper, work) of the container's overlay, on its tmpfs."""
    base = guest_scratch_dir(cid)
    return posixpath.join(base, "upper"), posixpath.join(base, "work")


def guest_bundle(cid: str) -> str:
    return posixpath.join(GUEST_BUNDLES, cid)


def guest_rootfs(rootfs: object, cid: str, host_layers: str) -> LayerStack:
    """The container's stack as its guest sees it, for the host-side one (shim.rootfs.parse):
    one map over the value -- lowers to the guest's share, upper/work to its scratch tmpfs."""
    if not isinstance(rootfs, LayerStack):
        what = {"PassThroughMounts": "its mounts are not fractal repo layers (another "
                                     "snapshotter, e.g. overlayfs?)",
                "NoRootfs": "it has no rootfs mounts"}.get(type(rootfs).__name__,
                                                           f"rootfs {rootfs!r}")
        raise NotInVm(f"container {cid} cannot run in a VM: {what}; VM mode needs the fractal "
                      "snapshotter (ctr --snapshotter fractal), or use io.fractal.mode=host")
    upper, work = guest_scratch(cid)
    scratch = {"upper": upper, "work": work}
    return rootfs.map(lambda path, role: (guest_layer_path(path, host_layers) if role == "lower"
                                          else scratch[role]))
