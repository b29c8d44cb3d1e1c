"""What the agent puts on disk for a container besides its rootfs mounts: the dirs it makes (and
takes back on delete), a VM container's copied host files, shared dirs and net sysctls.

Why a module of its own: these are the agent's few writes at paths a client names, each checked
against the agent's roots (ccpu/agent/protocol.py); kept apart from the container state machine
(container.py) so they can be tested on their own through this public interface.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from ..linux import mountinfo
from . import protocol

log = logging.getLogger(__name__)


def makedirs(path: str) -> list[str]:
    """mkdir -p; returns the dirs it created, outermost first."""
    created: list[str] = []
    p = path
    while p and p != "/" and not os.path.isdir(p):
        created.append(p)
        p = os.path.dirname(p)
    os.makedirs(path, mode=0o755, exist_ok=True)
    return created[::-1]


_NET_SYSCTL = re.compile(r"net(\.[A-Za-z0-9_-]+)+")


def place_files(args: Mapping[str, Any], bundle: str, layer_roots: Sequence[str],
                 scratch: str | None = None) -> None:
    """A VM container's copied host files (``files``: into its bundle or its scratch dir, where
    the container's writes to them count against its own limit) and shared dirs (``dirs``: the
    pod's /dev/shm, below a layer root) -- see shim/guestspec.py."""
    import base64
    import binascii

    for entry in protocol.arg_list(args, "files", []) or []:
        if not isinstance(entry, Mapping):
            raise protocol.InvalidArgument("files entries must be objects")
        path = protocol.resolve_inside(entry.get("path"), [bundle] + ([scratch] if scratch else []), "file path")
        try:
            data = base64.b64decode(str(entry.get("data") or ""), validate=True)
        except (binascii.Error, ValueError):
            raise protocol.InvalidArgument(f"file {path}: data is not base64") from None
        mode = entry.get("mode", 0o644)
        if not isinstance(mode, int) or not 0 <= mode <= 0o7777:
            raise protocol.InvalidArgument(f"file {path}: bad mode {mode!r}")
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
    sysctls = protocol.arg_dict(args, "sysctls", {}) or {}
    for key, value in sysctls.items():
        # the pod netns's net.* sysctls, for the agent's own netns (= the pod's, in a VM)
        if not _NET_SYSCTL.fullmatch(str(key)) or not isinstance(value, str) or "\n" in value:
            raise protocol.InvalidArgument(f"sysctl {key!r}={value!r}: only net.* keys with one-line values")
        try:
            with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
                f.write(value)
        except OSError as exc:
            raise protocol.InvalidArgument(f"sysctl {key}={value}: {exc.strerror}") from None
    for d in protocol.arg_list(args, "dirs", []) or []:
        path = protocol.resolve_inside(d, layer_roots, "shared dir")
        if not os.path.isdir(path):
            os.makedirs(path, exist_ok=True)
            os.chmod(path, 0o1777)  # like /dev/shm


def remove_made(made: Sequence[str]) -> None:
    """Remove dirs `makedirs` created (outermost first, so a tree goes at once).  Never crosses
    into a mount: whatever is still mounted below stays (and is logged)."""
    import shutil

    if not made:
        return
    points = mountinfo.mount_points()
    for d in made:
        if not os.path.isdir(d):
            continue
        real = os.path.realpath(d)
        if any(p == real or p.startswith(real + "/") for p in points):
            log.error("not removing %s: something is still mounted below it", d)
            continue
        shutil.rmtree(d, ignore_errors=True)
