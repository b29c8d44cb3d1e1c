"""The guest's read-only system image: an EROFS file built by erofs-utils' ``mkfs.erofs``.

Why EROFS on a read-only virtio-blk disk: docs/vm.md ("The small guest").  Why mkfs.erofs and not
a writer of our own: the image is parsed by the guest's kernel on every boot, and its bytes are
part of the guest's measurement; the format's own tool (Debian's erofs-utils, also what kata and
Android build their images with) is the one to trust for both, and it is reproducible when told
to be (checked: same tree -> same bytes, whatever the files' mtimes, inode numbers or directory
order on the build machine).

What makes it reproducible, each a flag below: every timestamp fixed (``-T0``), a fixed UUID,
owners root (``--all-root``), no xattrs of the build machine (``-x-1``: an SELinux label or a
``user.*`` attribute on the host must not change the image).  No compression: under TCG the
guest would pay to decompress every page it reads, and the image is a host file (not RAM).

The tree is staged from :class:`File` entries (what ``fractal guest build`` collected) in a
private temp dir and handed to mkfs.erofs; only regular files, directories and symlinks exist in
the system image, anything else is refused before mkfs runs.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass

MKFS = "mkfs.erofs"
#: the image's UUID: fixed, so that it does not make two builds of the same tree differ
UUID = "00000000-0000-0000-0000-000000000000"
FLAGS = ("--quiet", "-T0", f"-U{UUID}", "--all-root", "-x-1")
#: what to install when mkfs.erofs is missing (hack/setup.sh installs it)
PACKAGE = "erofs-utils"


class ImageError(ValueError):
    """A tree that cannot become the system image, or mkfs.erofs missing or failing."""


@dataclass(frozen=True)
class File:
    """One entry: its path in the image (no leading '/'), mode (type + permissions), and its
    content (file bytes or symlink target), read only when the image is written."""

    path: str
    mode: int
    content: Callable[[], bytes] = lambda: b""


def available() -> str | None:
    """The mkfs.erofs to use, or None."""
    return shutil.which(MKFS)


def _checked(files: Iterable[File]) -> list[File]:
    """Sorted by path, each path once, every parent a directory, only supported types."""
    out: dict[str, File] = {}
    for f in files:
        path = f.path.strip("/")
        if not path or any(p in ("", ".", "..") for p in path.split("/")):
            raise ImageError(f"{f.path!r}: not a relative path inside the image")
        if stat.S_IFMT(f.mode) not in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK):
            raise ImageError(f"{f.path}: file type {stat.S_IFMT(f.mode):o} is not supported")
        if path in out:
            raise ImageError(f"{f.path} given twice")
        out[path] = File(path, f.mode, f.content)
    for path in out:
        parts = path.split("/")
        for i in range(1, len(parts)):
            parent = out.get("/".join(parts[:i]))
            if parent is not None and not stat.S_ISDIR(parent.mode):
                raise ImageError(f"{path}: {parent.path} is not a directory")
    return [out[p] for p in sorted(out)]


def _stage(files: list[File], root: str) -> None:
    dirs: list[File] = []
    for f in files:
        dest = os.path.join(root, f.path)
        os.makedirs(os.path.dirname(dest), mode=0o755, exist_ok=True)
        if stat.S_ISDIR(f.mode):
            os.makedirs(dest, mode=0o755, exist_ok=True)
            dirs.append(f)
        elif stat.S_ISLNK(f.mode):
            os.symlink(f.content().decode(), dest)
        else:
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(f.content())
            os.chmod(dest, stat.S_IMODE(f.mode))
    for d in reversed(dirs):  # deepest first: a parent's mode must not stop its children's chmod
        os.chmod(os.path.join(root, d.path), stat.S_IMODE(d.mode))


def write(files: Iterable[File], mkfs: str | None = None) -> bytes:
    """The EROFS image of ``files`` (same files -> same bytes)."""
    todo = _checked(files)
    tool = mkfs or available()
    if tool is None:
        raise ImageError(f"{MKFS} not found: install {PACKAGE} (hack/setup.sh does), or build the "
                         "guest with --layout initramfs")
    with tempfile.TemporaryDirectory(prefix="fractal-sysimg-") as tmp:
        root = os.path.join(tmp, "root")
        os.mkdir(root, 0o755)
        _stage(todo, root)
        img = os.path.join(tmp, "system.erofs")
        r = subprocess.run([tool, *FLAGS, img, root], stdin=subprocess.DEVNULL, capture_output=True,
                           text=True, timeout=600)
        if r.returncode != 0:
            raise ImageError(f"{MKFS} failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-400:]}")
        with open(img, "rb") as f:
            return f.read()
