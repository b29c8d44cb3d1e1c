"""`docker export`-style root tarballs: booted (unpacked once into a cache dir keyed by the
tarball's sha256) and written (``--export tgz``: the image's merged root).

Unpacking: the tarball is the user's but its contents are not trusted.  GNU tar extracts it
(owners, modes, devices and file capabilities kept: it is a machine's root), which refuses
absolute and ``..`` member names and defers every symlink it could write through; the
decompressed stream is fed to it here and counted, so a small tarball cannot fill the disk
beyond ``limit`` bytes.  The dir is built under a temporary name and renamed into place: a crash
leaves no half-unpacked root that a later boot would take for a whole one (a stale temporary is
removed by the next unpack of the same tarball).

Exporting: the layers are stacked as the guest stacks them (a read-only ``userxattr`` overlay,
ccpu/stack.py) in a private mount namespace of a child (``unshare -m``), where tar reads them;
the mount goes when that child ends, whatever happens.  One layer is read directly (an overlay
needs two lower dirs without an upper).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .. import stack

DEFAULT_LIMIT = 64 << 30  # bytes a tarball may unpack to
CHUNK = 1 << 20
ROOT = "root"  # the unpacked root below the cache dir: the boot's one layer


class TgzError(RuntimeError):
    """A tarball that cannot be booted or written."""


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _tar_x(dest: str) -> list[str]:
    return ["tar", "-x", "-f", "-", "-C", dest, "--numeric-owner", "--same-owner", "--same-permissions",
            "--xattrs", "--xattrs-include=security.capability", "--xattrs-include=user.*",
            "--no-overwrite-dir"]


def unpack(path: str, cache: str, limit: int = DEFAULT_LIMIT) -> str:
    """The unpacked root of tarball ``path`` (gzip or plain tar) under ``cache``/<sha256>/root,
    unpacked now unless it already is.  Returns the <sha256> dir (the layers' parent)."""
    if not os.path.isfile(path):
        raise TgzError(f"{path}: not a file")
    digest = sha256_file(path)
    final = os.path.join(cache, digest)
    if os.path.isdir(os.path.join(final, ROOT)):
        return final
    os.makedirs(cache, mode=0o700, exist_ok=True)
    for stale in Path(cache).glob(f"{digest}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = tempfile.mkdtemp(prefix=f"{digest}.tmp-", dir=cache)
    root = os.path.join(tmp, ROOT)
    os.mkdir(root, 0o755)
    try:
        _extract(path, root, limit)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _extract(path: str, root: str, limit: int) -> None:
    with open(path, "rb") as raw:
        magic = raw.read(2)
        raw.seek(0)
        src = gzip.GzipFile(fileobj=raw) if magic == b"\x1f\x8b" else raw
        proc = subprocess.Popen(_tar_x(root), stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdin is not None and proc.stderr is not None
        total = 0
        try:
            try:
                while chunk := src.read(CHUNK):
                    total += len(chunk)
                    if total > limit:
                        raise TgzError(f"{path} unpacks to more than {limit} bytes (the limit)")
                    proc.stdin.write(chunk)
            except (OSError, EOFError) as exc:
                if isinstance(exc, BrokenPipeError):
                    pass  # tar ended early: its status says why
                else:
                    raise TgzError(f"{path}: cannot read it as a (gzipped) tar: {exc}") from None
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
            err = proc.stderr.read().decode(errors="replace").strip()
            if proc.wait() != 0:
                raise TgzError(f"{path}: tar failed: {err[-500:]}")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def export(layers: Sequence[str], out: str) -> None:
    """The merged root of ``layers`` (host dirs, top first) as a gzipped tar at ``out``
    (written to a temporary name, then renamed)."""
    out = os.path.abspath(out)
    tmp_out = f"{out}.tmp-{os.getpid()}"
    tar = ["tar", "-c", "-z", "-f", tmp_out, "--numeric-owner", "--xattrs",
           "--xattrs-exclude=trusted.*", "--xattrs-exclude=user.overlay.*", "-C"]
    try:
        if len(layers) == 1:
            _run(tar + [layers[0], "."])
        else:
            with tempfile.TemporaryDirectory(prefix="fractal-export-") as mnt:
                opts = ",".join(["ro", *stack.overlay_flags(), "lowerdir=" + ":".join(layers)])
                if len(opts) > stack.PAGE_SIZE - 1:
                    raise TgzError(f"{len(layers)} layers do not fit in one overlay mount")
                script = 'mount -t overlay -o "$1" fractal-export "$2" && shift 2 && exec "$@"'
                _run(["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", opts, mnt,
                      *tar, mnt, "."])
        os.rename(tmp_out, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_out)
        raise


def _run(argv: list[str]) -> None:
    r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if r.returncode != 0:
        raise TgzError(f"export failed ({argv[0]} exited {r.returncode}): {r.stderr.strip()[-500:]}")
