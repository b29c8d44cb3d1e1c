"""Opaque-directory markers in a form both VM shares carry: `user.overlay.opaque`.

containerd applies a layer into the upper dir of the overlay we hand it and records an OCI
opaque directory (`.wh..wh..opq`) as the xattr `trusted.overlay.opaque=y` (whiteouts are 0/0
character devices, which every share carries).  `trusted.*` xattrs do not reach a guest:
QEMU's 9p `local` backend only passes `user.*` (and POSIX ACLs), and virtiofsd cannot read
them without CAP_SYS_ADMIN.  So the repo records every marker a second time under the name
overlayfs reads when mounted with `userxattr`, and every overlay fractal stacks from repo
layers uses `userxattr` (ccpu/stack.py).  See docs/vm.md, "Layer fidelity".

Written once per layer at Commit, and once for the layers of a repo made before this existed
(`migrate`, recorded by a stamp file so a restart does not walk every layer again).
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

TRUSTED = "trusted.overlay.opaque"
USER = "user.overlay.opaque"
STAMP = "opaque-markers.v1"  # in the repo root: every layer (and upper) of this repo is mirrored


def _get(path: str, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.ENOENT):
            return None
        raise


def mirror(root: Path | str) -> int:
    """Give every directory under `root` (itself included) that carries `trusted.overlay.opaque`
    the same value as `user.overlay.opaque`.  Returns how many it marked.  Never follows
    symlinks; a tree without markers is only read."""
    marked = 0
    stack = [os.fspath(root)]
    while stack:
        d = stack.pop()
        value = _get(d, TRUSTED)
        if value is not None and _get(d, USER) != value:
            os.setxattr(d, USER, value, follow_symlinks=False)
            marked += 1
        try:
            with os.scandir(d) as it:
                stack.extend(e.path for e in it if e.is_dir(follow_symlinks=False))
        except (FileNotFoundError, NotADirectoryError):
            continue
    return marked


def migrate(repo_root: Path, trees: Iterable[Path]) -> int:
    """Mirror the markers of `trees` once per repo (a repo made before markers were mirrored)."""
    stamp = repo_root / STAMP
    if stamp.exists():
        return 0
    marked = 0
    for t in trees:
        try:
            marked += mirror(t)
        except OSError as e:  # one bad tree must not stop the snapshotter; the next start retries
            log.warning("cannot mirror opaque markers under %s: %s", t, e)
            return marked
    stamp.write_text("user.overlay.opaque mirrors trusted.overlay.opaque in every layer\n")
    if marked:
        log.info("mirrored %d opaque directory marker(s) as %s", marked, USER)
    return marked
