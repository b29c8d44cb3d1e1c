"""The merged root of an image's layers, read on the host without mounting anything.

`fractal boot` checks the image before it boots it: that its init exists (following its
symlinks: busybox's /sbin/init -> ../bin/busybox, Debian's -> /lib/systemd/systemd through the
/lib -> usr/lib link), and which kernels its /boot has.  The layers are read the way overlayfs
stacks them in the guest (docs/vm.md "Layer fidelity"): top first; a whiteout (a 0/0 character
device) hides the name below it; a directory marked opaque (``trusted.overlay.opaque`` or the
repo's ``user.overlay.opaque`` mirror, ccpu/repo/opaque.py) hides the dirs of that name below it;
a non-directory hides everything below it.

The image is untrusted: symlinks are resolved in the merged view, never on the host (an
absolute target starts again at the image's root, ``..`` stops at it), at most
:data:`MAX_HOPS` of them, and only directories that are directories in their own layer are
walked through, so no host path outside the layers is ever looked at.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass

from ..repo.opaque import TRUSTED, USER

MAX_HOPS = 40  # the kernel's own limit on symlinks in one lookup
MAX_PATH = 4096
MAX_NAME = 255
MAX_LIST = 10000  # names read from one merged dir (an image's /boot has a handful)


class RootViewError(ValueError):
    """A path that cannot be resolved in the image (a loop, too long)."""


@dataclass(frozen=True, slots=True)
class Entry:
    """A resolved path: where it is on the host (its top layer's copy) and its lstat."""

    path: str  # the resolved path in the image
    host: str
    st: os.stat_result

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.st.st_mode)

    @property
    def executable(self) -> bool:
        return self.is_file and bool(self.st.st_mode & 0o111)


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return None
        raise


def _opaque(path: str) -> bool:
    for name in (TRUSTED, USER):
        try:
            if os.getxattr(path, name, follow_symlinks=False) == b"y":
                return True
        except OSError:
            continue
    return False


def _whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


class RootView:
    """The merged view of ``layers`` (host dirs, top first)."""

    def __init__(self, layers: Sequence[str]) -> None:
        self.layers = list(layers)

    def _child(self, dirs: list[str], name: str) -> tuple[os.stat_result, str, list[str]] | None:
        """``name`` in the merged dir whose copies are ``dirs`` (top first): (its top lstat, its
        top host path, the copies of it that are dirs, top first) or None if it is not there."""
        for i, d in enumerate(dirs):
            host = os.path.join(d, name)
            st = _lstat(host)
            if st is None:
                continue
            if _whiteout(st):
                return None
            if not stat.S_ISDIR(st.st_mode):
                return st, host, []
            below = [host]
            if not _opaque(host):
                for lower in dirs[i + 1:]:
                    lst = _lstat(os.path.join(lower, name))
                    if lst is None:
                        continue
                    if not stat.S_ISDIR(lst.st_mode):
                        break  # a whiteout or a file below a dir: the dir hides it and what is under
                    below.append(os.path.join(lower, name))
                    if _opaque(below[-1]):
                        break
            return st, host, below
        return None

    def lookup(self, path: str, follow: bool = True) -> Entry | None:
        """The entry at ``path`` in the image (its last symlink followed when ``follow``), or None."""
        if len(path) > MAX_PATH:
            raise RootViewError(f"path longer than {MAX_PATH} bytes")
        todo = [c for c in path.split("/") if c not in ("", ".")]
        todo.reverse()
        hops = 0
        resolved: list[tuple[str, list[str]]] = []  # (name, its dir copies) from the root down
        root_dirs = [d for d in self.layers if os.path.isdir(d)]
        last: Entry | None = Entry("/", root_dirs[0], os.lstat(root_dirs[0])) if root_dirs else None
        while todo:
            name = todo.pop()
            if name == "..":
                if resolved:
                    resolved.pop()
                last = None
                continue
            if len(name) > MAX_NAME:
                raise RootViewError(f"a name in {path!r} is longer than {MAX_NAME} bytes")
            dirs = resolved[-1][1] if resolved else root_dirs
            if not dirs:
                return None  # below a non-directory
            found = self._child(dirs, name)
            if found is None:
                return None
            st, host, below = found
            if stat.S_ISLNK(st.st_mode) and (todo or follow):
                hops += 1
                if hops > MAX_HOPS:
                    raise RootViewError(f"too many symlinks resolving {path!r}")
                target = os.readlink(host)
                if len(target) > MAX_PATH:
                    raise RootViewError(f"symlink {name!r} has a target longer than {MAX_PATH} bytes")
                if target.startswith("/"):
                    resolved = []
                todo.extend(reversed([c for c in target.split("/") if c not in ("", ".")]))
                continue
            if not stat.S_ISDIR(st.st_mode) and todo:
                return None  # a file used as a directory
            resolved.append((name, below))
            last = Entry("/" + "/".join(n for n, _ in resolved), host, st)
        if last is None:  # ended on "..": the dir reached
            if not resolved:
                return Entry("/", root_dirs[0], os.lstat(root_dirs[0])) if root_dirs else None
            top = resolved[-1][1][0]
            return Entry("/" + "/".join(n for n, _ in resolved), top, os.lstat(top))
        return last

    def listdir(self, path: str) -> list[str]:
        """The names in the merged directory ``path`` (symlinks followed), whiteouts applied;
        [] if it is not a directory.  At most :data:`MAX_LIST` names are read."""
        e = self.lookup(path)
        if e is None or not stat.S_ISDIR(e.st.st_mode):
            return []
        copies = self._copies(e.path)
        seen: dict[str, bool] = {}  # name -> visible
        for d in copies:
            with os.scandir(d) as it:
                for i, entry in enumerate(it):
                    if i >= MAX_LIST or len(seen) >= MAX_LIST:
                        break
                    if entry.name in seen:
                        continue
                    st = entry.stat(follow_symlinks=False)
                    seen[entry.name] = not _whiteout(st)
        return sorted(n for n, visible in seen.items() if visible)

    def _copies(self, resolved_path: str) -> list[str]:
        dirs = [d for d in self.layers if os.path.isdir(d)]
        for name in [c for c in resolved_path.split("/") if c]:
            found = self._child(dirs, name)
            if found is None:
                return []
            dirs = found[2]
        return dirs
