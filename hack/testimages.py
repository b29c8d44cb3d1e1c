#!/usr/bin/env python3
"""Build the project's test images locally, as OCI image layouts, without any registry.

Why: the machines reach no container registry, yet the snapshotter and shim must be
tested against real images with nasty layer contents. So images are assembled from
Debian packages (busybox-static, debootstrap) with umoci into
``$FRACTAL_CACHE/images/<name>`` (default cache ``/var/cache/fractal``, outside the
clone so every clone on a machine shares it), tag ``latest``. ``hack/registry.py``
then serves them to containerd.

Layers are written by this module with :mod:`tarfile` and appended verbatim with
``umoci raw add-layer``: that is the only way to *guarantee* a layer contains a
given whiteout / opaque marker / hardlink / PAX xattr record, and with fixed
mtimes, owners and creation dates the layers (and so their digests) are
reproducible, so e.g. the busybox base layer is byte-identical in every image built
on it and a shared layer store can deduplicate it.

Images
======

``busybox``  1 layer: /bin/busybox (busybox-static) + a /bin/<applet> symlink for every
             applet, /etc/passwd, /etc/group, empty /tmp /root /proc /sys /dev.
             Cmd ["sh"], Env PATH.
``edge``     busybox layer + 3 layers exercising overlay/whiteout semantics (below).
``tools``    busybox layer + 2 small layers under /opt/tools (for "add a layer live").
``many``     busybox layer + 1 layer of 3000 empty files under /many (inode exhaustion tests;
             not built by a plain ``build``).
``machine``  busybox layer + /sbin/init, an inittab whose sysinit one-shot service prints what
             the booted root looks like and powers off, /etc/doomed (whited out by layer 3) and
             /etc/opq (made opaque by layer 3).  For ``fractal boot``; built on demand.
``machine-debian``  Debian bookworm minbase + linux-image-amd64 + systemd-sysv (its own kernel,
             systemd as init) + a unit after multi-user.target that reports on the console and
             powers off.  For ``fractal boot`` with the image's kernel; slow, built on demand.
``debian``   Debian bookworm minbase (debootstrap from the mirror in this machine's apt
             sources), 1 layer, Cmd ["bash"]. Slow: built only with ``--only debian``
             or ``--with-debian``.
``fidelity`` busybox layer + 3 layers for issue 16 (a container in a VM sees what runc shows):
             L1 every attribute (ids, modes, hard/sym links, devices, file caps, user.*
             xattrs, ACLs, big/zero-filled files, long and unicode names) under /fid and
             the probe /probe (``hack/fsprobe.c``, compiled here with ``cc -static``);
             L2 makes /fid/d and /fid/e opaque, whites out /fid/x; L3 re-populates /fid/e.
             Cmd ["/probe", "/fid"].  ``fidelity-base``: its first two layers (for live
             ``layers add``).  Built on demand (not by a plain ``build``).

Edge image layout (``EDGE_EXPECTATIONS`` holds the same as data)
----------------------------------------------------------------

Layer 1 = busybox. Layer 2 ("edge-base") creates everything under /edge.
Layer 3 ("edge-delete") deletes / replaces. Layer 4 ("edge-big") adds the big file.

=====================  =====================================================  ==========================
path                   expected in the merged rootfs                          exercises
=====================  =====================================================  ==========================
/edge/deleted          does not exist                                         file whiteout
                                                                              ``edge/.wh.deleted`` (L3)
/edge/deleted-dir      does not exist (L2 had deleted-dir/x)                  whiteout of a whole dir
/edge/opaque/a, b      do not exist (were in L2)                              opaque dir: L3 has
                                                                              ``edge/opaque/.wh..wh..opq``
/edge/opaque/c         file, content ``c\\n``                                 content added next to the
                                                                              opaque marker
/edge/modified         content ``v2\\n`` (L2 had ``v1\\n``)                   file replaced in upper layer
/edge/hard1, hard2     same inode, content ``hardlinked\\n``, nlink 2          tar hardlink entry
/edge/abs-link         symlink -> ``/edge/empty``                             absolute symlink
/edge/rel-link         symlink -> ``../edge/empty``                           relative symlink with ..
/edge/setuid           file, mode 04755                                       setuid bit survives
/edge/owned            file, uid 1234, gid 1234                               non-root ownership
/edge/xattr            file, xattr ``user.fractal`` = ``edge``                PAX SCHILY.xattr record
/edge/empty            file, size 0                                           empty file
/edge/big              size 65 MiB + 123, sha256 ``EDGE_BIG_SHA256``          large file (> 64 MiB,
                                                                              not block aligned)
/edge/EXPECTED         JSON {"big": {"size": ..., "sha256": ...}}             lets in-container tests
                                                                              check /edge/big alone
=====================  =====================================================  ==========================

``python3 hack/testimages.py verify edge`` unpacks the layout with umoci and checks
all of this, plus that the layer tars really contain the whiteout markers.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

TAG = "latest"
DEFAULT_CACHE = Path("/var/cache/fractal")
BUSYBOX_BIN = Path("/bin/busybox")
# Fixed timestamps make layers and configs reproducible (same digests everywhere).
EPOCH = 1700000000
EPOCH_RFC3339 = "2023-11-14T22:13:20Z"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEBIAN_SUITE = "bookworm"

MiB = 1 << 20
EDGE_BIG_SIZE = 65 * MiB + 123
EDGE_BIG_SHA256 = "5e413bc6f1a8387e22e0e996dd66add3f7d0924aa97d48c064ca579fbc4be2ed"
_BIG_FILLER = b"fractal edge big file: the offset header makes every 4 KiB block unique.\n" * 60


class ImageBuildError(RuntimeError):
    pass


# --------------------------------------------------------------------------- paths


def cache_dir(cache: Path | str | None = None) -> Path:
    return Path(cache) if cache is not None else Path(os.environ.get("FRACTAL_CACHE", DEFAULT_CACHE))


def layout_path(name: str, cache: Path | str | None = None) -> Path:
    """OCI layout directory of a test image (whether built or not)."""
    if name not in RECIPES:
        raise KeyError(f"unknown test image {name!r}; known: {', '.join(RECIPES)}")
    return cache_dir(cache) / "images" / name


def image_ref_name(name: str, cache: Path | str | None = None) -> str:
    """The image as a skopeo/containers-image reference: ``oci:<layout dir>:latest``."""
    return f"oci:{layout_path(name, cache)}:{TAG}"


# --------------------------------------------------------------------------- expectations


@dataclass(frozen=True)
class Expect:
    """What one path must look like in a container's merged rootfs (None = don't care)."""

    why: str
    exists: bool = True
    kind: Literal["file", "dir", "symlink"] | None = None
    size: int | None = None
    mode: int | None = None  # stat.S_IMODE, i.e. including setuid/setgid/sticky
    uid: int | None = None
    gid: int | None = None
    content: bytes | None = None
    sha256: str | None = None
    target: str | None = None  # symlink target as stored (readlink)
    same_inode_as: str | None = None
    nlink: int | None = None
    xattrs: Mapping[str, bytes] = field(default_factory=dict)


EDGE_EXPECTATIONS: dict[str, Expect] = {
    "/edge/deleted": Expect("file whiteout .wh.deleted in layer 3", exists=False),
    "/edge/deleted-dir": Expect("directory whiteout .wh.deleted-dir in layer 3", exists=False),
    "/edge/deleted-dir/x": Expect("child of a whited-out directory", exists=False),
    "/edge/opaque": Expect("dir made opaque in layer 3", kind="dir"),
    "/edge/opaque/a": Expect("hidden by opaque marker .wh..wh..opq in layer 3", exists=False),
    "/edge/opaque/b": Expect("hidden by opaque marker .wh..wh..opq in layer 3", exists=False),
    "/edge/opaque/c": Expect("added in the opaque dir in layer 3", kind="file", content=b"c\n"),
    "/edge/modified": Expect("v1 in layer 2, replaced by v2 in layer 3", kind="file", content=b"v2\n"),
    "/edge/hard1": Expect(
        "tar hardlink entry", kind="file", content=b"hardlinked\n", same_inode_as="/edge/hard2", nlink=2
    ),
    "/edge/hard2": Expect("tar hardlink entry", kind="file", content=b"hardlinked\n", nlink=2),
    "/edge/abs-link": Expect("absolute symlink", kind="symlink", target="/edge/empty"),
    "/edge/rel-link": Expect("relative symlink with ..", kind="symlink", target="../edge/empty"),
    "/edge/setuid": Expect("setuid bit", kind="file", mode=0o4755, uid=0, gid=0),
    "/edge/owned": Expect("non-root owner", kind="file", uid=1234, gid=1234, mode=0o644),
    "/edge/xattr": Expect(
        "PAX SCHILY.xattr.user.fractal record", kind="file", content=b"xattr\n", xattrs={"user.fractal": b"edge"}
    ),
    "/edge/empty": Expect("empty file", kind="file", size=0),
    "/edge/big": Expect("file > 64 MiB, size not block aligned", kind="file", size=EDGE_BIG_SIZE, sha256=EDGE_BIG_SHA256),
    "/edge/EXPECTED": Expect("expectations for /edge/big readable in-container", kind="file"),
    "/bin/sh": Expect("busybox base layer", kind="symlink", target="busybox"),
}

# Tar member names (without ./) that must appear in some layer of the edge image.
EDGE_LAYER_MARKERS = ("edge/.wh.deleted", "edge/.wh.deleted-dir", "edge/opaque/.wh..wh..opq")

TOOLS_EXPECTATIONS: dict[str, Expect] = {
    "/opt/tools/hello.txt": Expect("tools layer 1", kind="file", content=b"hello from tools\n"),
    "/opt/tools/bin/hello": Expect("tools layer 1, executable", kind="file", mode=0o755),
    "/opt/tools/VERSION": Expect("tools layer 2", kind="file", content=b"1\n"),
    "/opt/tools/data/numbers.txt": Expect(
        "tools layer 2", kind="file", content=b"".join(b"%d\n" % i for i in range(1, 1001))
    ),
}

EXPECTATIONS: dict[str, dict[str, Expect]] = {"edge": EDGE_EXPECTATIONS, "tools": TOOLS_EXPECTATIONS}


def check_rootfs(rootfs: Path, expectations: Mapping[str, Expect]) -> list[str]:
    """Check a merged rootfs on the host; return human-readable failures (empty = ok)."""
    failures: list[str] = []
    for path, exp in expectations.items():
        p = rootfs / path.lstrip("/")

        def fail(msg: str) -> None:
            failures.append(f"{path}: {msg} ({exp.why})")

        try:
            st = p.lstat()
        except FileNotFoundError:
            if exp.exists:
                fail("missing")
            continue
        if not exp.exists:
            fail("exists but must not")
            continue
        kind = "symlink" if stat.S_ISLNK(st.st_mode) else "dir" if stat.S_ISDIR(st.st_mode) else "file"
        if exp.kind is not None and kind != exp.kind:
            fail(f"is a {kind}, expected {exp.kind}")
            continue
        checks: list[tuple[str, object, object]] = [
            ("size", exp.size, st.st_size),
            ("mode", exp.mode, stat.S_IMODE(st.st_mode)),
            ("uid", exp.uid, st.st_uid),
            ("gid", exp.gid, st.st_gid),
            ("nlink", exp.nlink, st.st_nlink),
        ]
        for what, want, got in checks:
            if want is not None and want != got:
                fail(f"{what} {oct(got) if what == 'mode' else got} != expected {oct(want) if what == 'mode' else want}")  # type: ignore[arg-type]
        if exp.target is not None and os.readlink(p) != exp.target:
            fail(f"symlink target {os.readlink(p)!r} != {exp.target!r}")
        if exp.content is not None and p.read_bytes() != exp.content:
            fail(f"content {p.read_bytes()[:40]!r} != {exp.content[:40]!r}")
        if exp.sha256 is not None:
            h = hashlib.sha256()
            with p.open("rb") as f:
                while chunk := f.read(MiB):
                    h.update(chunk)
            if h.hexdigest() != exp.sha256:
                fail(f"sha256 {h.hexdigest()} != {exp.sha256}")
        if exp.same_inode_as is not None:
            other = rootfs / exp.same_inode_as.lstrip("/")
            if not other.exists() or other.lstat().st_ino != st.st_ino:
                fail(f"not the same inode as {exp.same_inode_as}")
        for key, want_val in exp.xattrs.items():
            try:
                got_val = os.getxattr(p, key, follow_symlinks=False)
            except OSError as e:
                fail(f"xattr {key}: {e.strerror}")
                continue
            if got_val != want_val:
                fail(f"xattr {key}={got_val!r} != {want_val!r}")
    return failures


# --------------------------------------------------------------------------- tar helpers


def _set_xattrs(ti: tarfile.TarInfo, xattrs: Mapping[str, str | bytes] | None) -> None:
    """PAX ``SCHILY.xattr.NAME`` records (how docker/containerd carry xattrs in layers).

    Binary values (file capabilities, ACLs) go through surrogateescape: tarfile then writes the
    record with ``hdrcharset=BINARY`` and the exact bytes, which is what Go's archive/tar reads."""
    if xattrs:
        ti.pax_headers = {
            f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else v
            for k, v in xattrs.items()
        }


class LayerWriter:
    """Writes a reproducible, uncompressed PAX layer tar (root-owned unless told)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tar = tarfile.open(path, "w", format=tarfile.PAX_FORMAT)

    def _info(self, name: str, type_: bytes, mode: int, uid: int = 0, gid: int = 0) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name.strip("/"))
        ti.type = type_
        ti.mode = mode
        ti.uid, ti.gid = uid, gid
        ti.uname = ti.gname = ""
        ti.mtime = EPOCH
        return ti

    def dir(self, name: str, mode: int = 0o755, uid: int = 0, gid: int = 0,
            xattrs: Mapping[str, str | bytes] | None = None) -> None:
        ti = self._info(name, tarfile.DIRTYPE, mode, uid, gid)
        _set_xattrs(ti, xattrs)
        self._tar.addfile(ti)

    def device(self, name: str, kind: Literal["char", "block"], major: int, minor: int, mode: int = 0o600) -> None:
        ti = self._info(name, tarfile.CHRTYPE if kind == "char" else tarfile.BLKTYPE, mode)
        ti.devmajor, ti.devminor = major, minor
        self._tar.addfile(ti)

    def file(
        self,
        name: str,
        data: bytes = b"",
        mode: int = 0o644,
        uid: int = 0,
        gid: int = 0,
        xattrs: Mapping[str, str | bytes] | None = None,
    ) -> None:
        ti = self._info(name, tarfile.REGTYPE, mode, uid, gid)
        ti.size = len(data)
        _set_xattrs(ti, xattrs)
        self._tar.addfile(ti, io.BytesIO(data))

    def file_from(self, name: str, src: Path, size: int, mode: int = 0o644) -> None:
        ti = self._info(name, tarfile.REGTYPE, mode)
        ti.size = size
        with src.open("rb") as f:
            self._tar.addfile(ti, f)

    def symlink(self, name: str, target: str) -> None:
        ti = self._info(name, tarfile.SYMTYPE, 0o777)
        ti.linkname = target
        self._tar.addfile(ti)

    def hardlink(self, name: str, target: str) -> None:
        ti = self._info(name, tarfile.LNKTYPE, 0o644)
        ti.linkname = target.strip("/")
        self._tar.addfile(ti)

    def whiteout(self, name: str) -> None:
        """Delete ``name`` from lower layers (OCI image spec whiteout file)."""
        d, _, base = name.strip("/").rpartition("/")
        self.file(f"{d}/.wh.{base}" if d else f".wh.{base}", mode=0o644)

    def opaque(self, dirname: str) -> None:
        """Hide everything lower layers had in ``dirname`` (OCI opaque whiteout)."""
        self.file(f"{dirname.strip('/')}/.wh..wh..opq", mode=0o644)

    def close(self) -> Path:
        self._tar.close()
        return self.path


def edge_big_chunks() -> Iterator[bytes]:
    """Content of /edge/big: compressible, yet every 4 KiB block differs (offset header),
    so a chunk served from the wrong offset changes the sha256."""
    for off in range(0, EDGE_BIG_SIZE, 4096):
        block = (b"%016x\n" % off + _BIG_FILLER)[:4096]
        yield block[: min(4096, EDGE_BIG_SIZE - off)]


# --------------------------------------------------------------------------- umoci


def run(cmd: list[str], what: str, **kw: object) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw)  # type: ignore[call-overload]
    except FileNotFoundError as e:
        raise ImageBuildError(f"{what}: {cmd[0]} not found (run hack/setup.sh)") from e
    except subprocess.CalledProcessError as e:
        raise ImageBuildError(
            f"{what}: `{' '.join(cmd)}` failed with exit code {e.returncode}:\n{e.stderr.strip() or e.stdout.strip()}"
        ) from e


class Layout:
    """An OCI layout being built; every step rewrites tag ``latest``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.image = f"{path}:{TAG}"
        run(["umoci", "init", "--layout", str(path)], "umoci init")
        run(["umoci", "new", "--image", self.image], "umoci new")

    def add_layer(self, tar: Path, created_by: str) -> None:
        run(
            [
                "umoci", "raw", "add-layer", "--image", self.image,
                "--history.created", EPOCH_RFC3339, "--history.author", "fractal hack/testimages.py",
                "--history.created_by", created_by, str(tar),
            ],
            f"umoci raw add-layer {tar.name}",
        )  # fmt: skip
        tar.unlink()

    def insert_tree(self, src: Path, created_by: str) -> None:
        run(
            [
                "umoci", "insert", "--image", self.image, "--history.created", EPOCH_RFC3339,
                "--history.created_by", created_by, str(src), "/",
            ],
            "umoci insert",
        )  # fmt: skip

    def configure(self, cmd: list[str], env: list[str] = [PATH_ENV]) -> None:
        args = ["umoci", "config", "--image", self.image, "--no-history", "--created", EPOCH_RFC3339]
        args += ["--author", "fractal", "--os", "linux", "--architecture", "amd64"]
        for e in env:
            args += ["--config.env", e]
        for c in cmd:
            args += ["--config.cmd", c]
        run(args, "umoci config")
        run(["umoci", "gc", "--layout", str(self.path)], "umoci gc")


# --------------------------------------------------------------------------- recipes


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


def busybox_layer(work: Path) -> Path:
    if not BUSYBOX_BIN.is_file():
        raise ImageBuildError(f"{BUSYBOX_BIN} missing: apt-get install busybox-static")
    applets = run([str(BUSYBOX_BIN), "--list"], "busybox --list").stdout.split()
    w = LayerWriter(work / "busybox.tar")
    for d in ("bin", "etc", "dev", "proc", "sys", "root", "usr", "usr/bin"):
        w.dir(d, 0o700 if d == "root" else 0o755)
    w.dir("tmp", 0o1777)
    w.file_from("bin/busybox", BUSYBOX_BIN, BUSYBOX_BIN.stat().st_size, mode=0o755)
    for a in sorted(set(applets) - {"busybox"}):
        if "/" not in a:
            w.symlink(f"bin/{a}", "busybox")
    w.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
    w.file("etc/group", b"root:x:0:\nnogroup:x:65534:\n")
    return w.close()


def build_busybox(lay: Layout, work: Path) -> None:
    lay.add_layer(busybox_layer(work), "busybox-static /bin/busybox + applet symlinks")
    lay.configure(["sh"])


def build_edge(lay: Layout, work: Path) -> None:
    lay.add_layer(busybox_layer(work), "busybox-static /bin/busybox + applet symlinks")

    w = LayerWriter(work / "edge-base.tar")
    w.dir("edge")
    w.file("edge/deleted", b"must be whited out\n")
    w.dir("edge/deleted-dir")
    w.file("edge/deleted-dir/x", b"x\n")
    w.dir("edge/opaque")
    w.file("edge/opaque/a", b"a\n")
    w.file("edge/opaque/b", b"b\n")
    w.file("edge/modified", b"v1\n")
    w.file("edge/hard1", b"hardlinked\n")
    w.hardlink("edge/hard2", "edge/hard1")
    w.file("edge/empty")
    w.symlink("edge/abs-link", "/edge/empty")
    w.symlink("edge/rel-link", "../edge/empty")
    w.file("edge/setuid", b"#!/bin/sh\nid -u\n", mode=0o4755)
    w.file("edge/owned", b"owned by 1234\n", uid=1234, gid=1234)
    w.file("edge/xattr", b"xattr\n", xattrs={"user.fractal": "edge"})
    lay.add_layer(w.close(), "edge: base files")

    w = LayerWriter(work / "edge-delete.tar")
    w.dir("edge")
    w.whiteout("edge/deleted")
    w.whiteout("edge/deleted-dir")
    w.dir("edge/opaque")
    w.opaque("edge/opaque")
    w.file("edge/opaque/c", b"c\n")
    w.file("edge/modified", b"v2\n")
    lay.add_layer(w.close(), "edge: whiteouts, opaque dir, modified file")

    big = work / "big"
    h = hashlib.sha256()
    with big.open("wb") as f:
        for chunk in edge_big_chunks():
            h.update(chunk)
            f.write(chunk)
    if h.hexdigest() != EDGE_BIG_SHA256:
        raise ImageBuildError(f"edge big file sha256 {h.hexdigest()} != EDGE_BIG_SHA256 (update the constant)")
    w = LayerWriter(work / "edge-big.tar")
    w.dir("edge")
    w.file_from("edge/big", big, EDGE_BIG_SIZE)
    expected = {"big": {"size": EDGE_BIG_SIZE, "sha256": EDGE_BIG_SHA256}}
    w.file("edge/EXPECTED", (json.dumps(expected, sort_keys=True) + "\n").encode())
    lay.add_layer(w.close(), "edge: big file")
    big.unlink()
    lay.configure(["sh"])


def build_tools(lay: Layout, work: Path) -> None:
    lay.add_layer(busybox_layer(work), "busybox-static /bin/busybox + applet symlinks")
    w = LayerWriter(work / "tools-1.tar")
    for d in ("opt", "opt/tools", "opt/tools/bin"):
        w.dir(d)
    w.file("opt/tools/hello.txt", b"hello from tools\n")
    w.file("opt/tools/bin/hello", b"#!/bin/sh\necho hello from tools\n", mode=0o755)
    lay.add_layer(w.close(), "tools: hello")
    w = LayerWriter(work / "tools-2.tar")
    for d in ("opt", "opt/tools", "opt/tools/data"):
        w.dir(d)
    w.file("opt/tools/VERSION", b"1\n")
    w.file("opt/tools/data/numbers.txt", TOOLS_EXPECTATIONS["/opt/tools/data/numbers.txt"].content or b"")
    lay.add_layer(w.close(), "tools: data")
    lay.configure(["sh"], [PATH_ENV + ":/opt/tools/bin"])


MANY_FILES = 3000


def build_many(lay: Layout, work: Path) -> None:
    lay.add_layer(busybox_layer(work), "busybox-static /bin/busybox + applet symlinks")
    w = LayerWriter(work / "many.tar")
    w.dir("many")
    for i in range(MANY_FILES):
        w.file(f"many/{i:05d}")
    lay.add_layer(w.close(), f"many: {MANY_FILES} empty files")
    lay.configure(["sh"])


# --------------------------------------------------------------------------- fidelity

FSPROBE_SRC = Path(__file__).resolve().parent / "fsprobe.c"
FIDELITY_ROOTS = ("/fid",)  # what the probe walks: everything the fidelity layers create
# struct vfs_cap_data, revision 2, effective: cap_net_raw (13) permitted+effective ("cap_net_raw+ep")
FID_FILE_CAPS = (0x02000001).to_bytes(4, "little") + (1 << 13).to_bytes(4, "little") + bytes(12)
_ACL_UNDEFINED_ID = 0xFFFFFFFF


def posix_acl_xattr(entries: list[tuple[int, int, int]]) -> bytes:
    """The kernel's posix_acl_xattr format: version 2, then (tag, perm, id) little-endian."""
    out = (2).to_bytes(4, "little")
    for tag, perm, ident in entries:
        out += tag.to_bytes(2, "little") + perm.to_bytes(2, "little") + ident.to_bytes(4, "little")
    return out


# user::rwx user:1234:r-x group::r-x mask::r-x other::---
FID_ACL = posix_acl_xattr([(0x01, 7, _ACL_UNDEFINED_ID), (0x02, 5, 1234), (0x04, 5, _ACL_UNDEFINED_ID),
                           (0x10, 5, _ACL_UNDEFINED_ID), (0x20, 0, _ACL_UNDEFINED_ID)])
FID_LONG_NAME = "L" * 251 + ".txt"  # 255 bytes: NAME_MAX
FID_UNICODE_NAME = "ünïcødé-名前-😀"
FID_BIG_SIZE = 20 * MiB + 7


def build_fsprobe(work: Path) -> Path:
    """hack/fsprobe.c -> a static, stripped binary (runs in any image, under any runtime)."""
    out = work / "fsprobe"
    run(["cc", "-static", "-O2", "-s", "-o", str(out), str(FSPROBE_SRC)], "cc -static fsprobe.c")
    return out


def fidelity_layer1(work: Path) -> Path:
    """Everything whose attributes must survive: ids, modes, links, devices, xattrs, sizes, names."""
    probe = build_fsprobe(work)
    w = LayerWriter(work / "fid-1.tar")
    w.file_from("probe", probe, probe.stat().st_size, mode=0o755)
    probe.unlink()
    w.dir("fid")
    w.dir("fid/d")
    w.file("fid/d/a", b"a\n")
    w.file("fid/d/b", b"b\n")
    w.dir("fid/d/sub")
    w.file("fid/d/sub/deep", b"hidden by the opaque parent\n")
    w.file("fid/x", b"whited out in layer 2\n")
    w.dir("fid/e")
    w.file("fid/e/old", b"hidden by layer 2's opaque marker\n")
    w.file("fid/hard1", b"hardlinked\n")
    w.hardlink("fid/hard2", "fid/hard1")
    w.symlink("fid/abs-link", "/fid/d/a")
    w.symlink("fid/rel-link", "../fid/hard1")
    w.symlink("fid/dangling", "nowhere")
    w.file("fid/setuid", b"setuid\n", mode=0o4755)
    w.file("fid/setgid", b"setgid\n", mode=0o2755)
    w.dir("fid/sticky", mode=0o1777)
    w.dir("fid/setgid-dir", mode=0o2775, uid=1234, gid=5678)
    w.file("fid/owned", b"owned\n", mode=0o640, uid=1234, gid=5678)
    w.device("fid/null", "char", 1, 3, mode=0o666)
    w.device("fid/loop", "block", 7, 0, mode=0o660)
    w.file("fid/ping", b"#!/bin/sh\necho ping\n", mode=0o755, xattrs={"security.capability": FID_FILE_CAPS})
    w.file("fid/user-xattr", b"user\n", xattrs={"user.fidelity": "hello", "user.empty": ""})
    w.file("fid/acl", b"acl\n", mode=0o750, xattrs={"system.posix_acl_access": FID_ACL})
    w.dir("fid/acl-dir", mode=0o750, xattrs={"system.posix_acl_access": FID_ACL, "system.posix_acl_default": FID_ACL})
    w.file("fid/zeros", bytes(1 << 20))
    w.file(f"fid/{FID_LONG_NAME}", b"long\n")
    w.file(f"fid/{FID_UNICODE_NAME}", "unicode ✓\n".encode())
    big = work / "fid-big"
    with big.open("wb") as f:
        for off in range(0, FID_BIG_SIZE, 4096):
            f.write((b"%016x fidelity\n" % off * 200)[: min(4096, FID_BIG_SIZE - off)])
    w.file_from("fid/big", big, FID_BIG_SIZE)
    big.unlink()
    return w.close()


def fidelity_layer2(work: Path) -> Path:
    """An opaque dir with a new entry, a whiteout, and a dir made opaque and emptied."""
    w = LayerWriter(work / "fid-2.tar")
    w.dir("fid")
    w.dir("fid/d")
    w.opaque("fid/d")
    w.file("fid/d/c", b"c\n")
    w.whiteout("fid/x")
    w.dir("fid/e")
    w.opaque("fid/e")
    w.file("fid/e/mid", b"layer 2\n")
    return w.close()


def fidelity_layer3(work: Path) -> Path:
    """Re-populates the dir layer 2 made opaque, and a dir below the other opaque one."""
    w = LayerWriter(work / "fid-3.tar")
    w.dir("fid")
    w.dir("fid/e")
    w.file("fid/e/new", b"layer 3\n")
    w.dir("fid/d")
    w.dir("fid/d/sub")
    w.file("fid/d/sub/top", b"layer 3 in a dir under an opaque one\n")
    return w.close()


def build_fidelity_base(lay: Layout, work: Path) -> None:
    lay.add_layer(busybox_layer(work), "busybox-static /bin/busybox + applet symlinks")
    lay.add_layer(fidelity_layer1(work), "fidelity: attributes, links, devices, xattrs, probe")
    lay.configure(["/probe", *FIDELITY_ROOTS])


def build_fidelity(lay: Layout, work: Path) -> None:
    build_fidelity_base(lay, work)
    lay.add_layer(fidelity_layer2(work), "fidelity: opaque dirs, whiteout")
    lay.add_layer(fidelity_layer3(work), "fidelity: an opaque dir re-populated")
    lay.configure(["/probe", *FIDELITY_ROOTS])


# --------------------------------------------------------------------------- machine (fractal boot)

#: what the machine image's one-shot service prints (tests/integration/test_boot_image.py)
MACHINE_MARKER = "fractal-boot-oneshot"
MACHINE_ONESHOT = f"""#!/bin/sh
# sysinit of busybox init (PID 1): what the booted root looks like, on the console, then power off
[ -e /etc/doomed ] && doomed=present || doomed=absent
opq=$(ls /etc/opq | tr '\\n' ,)
echo written >/written && written=$(cat /written)
root=$(awk '$2 == "/" {{print $3}}' /proc/mounts | tail -n 1)
echo "{MACHINE_MARKER}: pid1=$(cat /proc/1/comm) doomed=$doomed opq=$opq written=$written root=$root"
[ -d /mnt/data ] && echo "{MACHINE_MARKER}: share=$(cat /mnt/data/hello.txt)"
for i in /sys/class/net/*; do  # NICs the boot stage configured (fractal boot --netns)
    n=${{i##*/}}
    [ "$n" = lo ] || echo "{MACHINE_MARKER}: net $n $(ip -o -4 addr show dev $n | awk '{{print $4}}')"
done
gw=$(ip route | awk '/^default/ {{print $3}}')
[ -n "$gw" ] && ping -c 1 -W 5 "$gw" >/dev/null && echo "{MACHINE_MARKER}: ping $gw ok"
poweroff -f
""".encode()


def build_machine(lay: Layout, work: Path) -> None:
    """busybox + an init that runs a one-shot service, a file a later layer deletes and a dir it
    makes opaque: `fractal boot` boots it to its init (docs/boot.md)."""
    lay.add_layer(busybox_layer(work), "busybox-static /bin/busybox + applet symlinks")
    w = LayerWriter(work / "machine-1.tar")
    for d in ("sbin", "etc", "etc/init.d", "etc/opq", "mnt"):
        w.dir(d)
    w.symlink("sbin/init", "../bin/busybox")
    w.file("etc/inittab", b"::sysinit:/etc/init.d/oneshot\n")
    w.file("etc/init.d/oneshot", MACHINE_ONESHOT, mode=0o755)
    w.file("etc/doomed", b"a later layer deletes me\n")
    w.file("etc/opq/a", b"a\n")
    w.file("etc/opq/b", b"b\n")
    lay.add_layer(w.close(), "machine: inittab, one-shot service, files to delete")
    w = LayerWriter(work / "machine-2.tar")
    w.dir("etc")
    w.whiteout("etc/doomed")
    w.dir("etc/opq")
    w.opaque("etc/opq")
    w.file("etc/opq/c", b"c\n")
    lay.add_layer(w.close(), "machine: a whiteout, an opaque dir")
    lay.configure(["/sbin/init"])


MACHINE_DEBIAN_MARKER = "fractal-boot-systemd"
#: a unit ordered after multi-user.target: the boot reached it; it says so on the console, then powers off
MACHINE_DEBIAN_UNIT = f"""[Unit]
Description=fractal boot check: multi-user.target reached, then power off
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'echo "{MACHINE_DEBIAN_MARKER}: kernel=$(uname -r) multi-user=$(systemctl is-active multi-user.target) pid1=$(cat /proc/1/comm)" >/dev/console; systemctl --no-block poweroff'

[Install]
WantedBy=multi-user.target
""".encode()


def build_machine_debian(lay: Layout, work: Path) -> None:
    """Debian with its own kernel (linux-image-amd64) and systemd as /sbin/init, and a unit that
    reports multi-user.target on the console and powers off (`fractal boot` with the image's kernel)."""
    rootfs = work / "rootfs"
    mirror = apt_mirror()
    print(f"testimages: debootstrap {DEBIAN_SUITE} + linux-image-amd64, systemd-sysv from {mirror} (slow)", flush=True)
    run(["debootstrap", "--variant=minbase", "--include=linux-image-amd64,systemd-sysv", DEBIAN_SUITE,
         str(rootfs), mirror], "debootstrap")
    for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for p in (rootfs / junk).glob("*"):
            if p.is_file() and p.name != "lock":
                p.unlink()
    unit = rootfs / "etc/systemd/system/fractal-boot-check.service"
    unit.write_bytes(MACHINE_DEBIAN_UNIT)
    wants = rootfs / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / unit.name).symlink_to(f"/etc/systemd/system/{unit.name}")
    lay.insert_tree(rootfs, f"debootstrap {DEBIAN_SUITE} + linux-image-amd64 systemd-sysv + a boot check unit")
    shutil.rmtree(rootfs)
    lay.configure(["/sbin/init"])


def _fidelity_inputs() -> str:
    """The probe is compiled at build time: its source and the compiler are inputs."""
    cc = subprocess.run(["cc", "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    return f"fsprobe={_sha256_file(FSPROBE_SRC)} cc={cc}"


def apt_mirror() -> str:
    """The Debian mirror this machine's apt uses (never hard-coded in the repo)."""
    suite_re = re.compile(rf"^{DEBIAN_SUITE}(-updates)?$")
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for f in files:
        if not f.is_file() or f.suffix not in ("", ".list", ".sources"):
            continue
        text = f.read_text(errors="replace")
        if f.suffix == ".sources":  # deb822
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(
                    (k.strip().lower(), v.strip())
                    for k, _, v in (l.partition(":") for l in stanza.splitlines() if l and not l.startswith("#"))
                )
                if "deb" in fields.get("types", "").split() and any(
                    suite_re.match(s) for s in fields.get("suites", "").split()
                ):
                    return fields["uris"].split()[0]
        else:
            for line in text.splitlines():
                parts = line.split("#", 1)[0].split()
                parts = [p for p in parts if not p.startswith("[")]
                if len(parts) >= 3 and parts[0] == "deb" and suite_re.match(parts[2]):
                    return parts[1]
    raise ImageBuildError(f"no '{DEBIAN_SUITE}' deb source found in /etc/apt/sources.list{{,.d/*}}")


def build_debian(lay: Layout, work: Path) -> None:
    rootfs = work / "rootfs"
    mirror = apt_mirror()
    print(f"testimages: debootstrap --variant=minbase {DEBIAN_SUITE} from {mirror} (slow)", flush=True)
    run(["debootstrap", "--variant=minbase", DEBIAN_SUITE, str(rootfs), mirror], "debootstrap")
    for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for p in (rootfs / junk).glob("*"):
            if p.is_file() and p.name != "lock":
                p.unlink()
    lay.insert_tree(rootfs, f"debootstrap --variant=minbase {DEBIAN_SUITE}")
    shutil.rmtree(rootfs)
    lay.configure(["bash"])


@dataclass(frozen=True)
class Recipe:
    # Bump version when the image's content changes; the stamp makes builds idempotent.
    version: str
    build: Callable[[Layout, Path], None]
    uses_busybox: bool = True
    default: bool = True  # built by a plain `build`
    extra_inputs: Callable[[], str] = lambda: ""


RECIPES: dict[str, Recipe] = {
    "busybox": Recipe("1", build_busybox),
    "edge": Recipe("1", build_edge),
    "tools": Recipe("1", build_tools),
    "many": Recipe("1", build_many, default=False),
    "debian": Recipe("1", build_debian, uses_busybox=False, default=False, extra_inputs=apt_mirror),
    # issue 16: the same probe under runc, host mode and VM mode (tests/integration/test_vm_fidelity.py)
    "fidelity": Recipe("1", build_fidelity, default=False, extra_inputs=_fidelity_inputs),
    "fidelity-base": Recipe("1", build_fidelity_base, default=False, extra_inputs=_fidelity_inputs),
    # fractal boot (tests/integration/test_boot_image.py)
    "machine": Recipe("2", build_machine, default=False),
    "machine-debian": Recipe("1", build_machine_debian, uses_busybox=False, default=False, extra_inputs=apt_mirror),
}


def recipe_key(name: str) -> str:
    r = RECIPES[name]
    parts = [f"name={name}", f"version={r.version}", f"extra={r.extra_inputs()}"]
    if r.uses_busybox:
        parts.append(f"busybox={_sha256_file(BUSYBOX_BIN)}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _stamp(name: str, cache: Path | str | None) -> Path:
    return cache_dir(cache) / "images" / f"{name}.stamp"


def is_built(name: str, cache: Path | str | None = None) -> bool:
    stamp = _stamp(name, cache)
    return (
        (layout_path(name, cache) / "index.json").is_file()
        and stamp.is_file()
        and json.loads(stamp.read_text()).get("key") == recipe_key(name)
    )


@contextlib.contextmanager
def _lock(cache: Path) -> Iterator[None]:
    """Serialise builds: CI and a developer shell may share the cache."""
    (cache / "images").mkdir(parents=True, exist_ok=True)
    with open(cache / "images" / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def build(name: str, cache: Path | str | None = None, force: bool = False) -> Path:
    """Build one image if its recipe changed; return its OCI layout dir."""
    cache = cache_dir(cache)
    dst = layout_path(name, cache)
    if not force and is_built(name, cache):  # no lock to wait for: a build of another image may hold it
        # for minutes; the stamp is removed before a rebuild replaces the layout, written after
        print(f"testimages: {name} up to date ({dst})")
        return dst
    with _lock(cache):
        if not force and is_built(name, cache):
            print(f"testimages: {name} up to date ({dst})")
            return dst
        t0 = time.monotonic()
        print(f"testimages: building {name} ...", flush=True)
        images = cache / "images"
        with tempfile.TemporaryDirectory(prefix=f".build-{name}-", dir=images) as tmp:
            work = Path(tmp) / "work"
            work.mkdir()
            lay = Layout(Path(tmp) / "layout")
            RECIPES[name].build(lay, work)
            _stamp(name, cache).unlink(missing_ok=True)
            if dst.exists():
                dst.rename(Path(tmp) / "old")
            lay.path.rename(dst)
        _stamp(name, cache).write_text(json.dumps({"key": recipe_key(name), "built": time.time()}) + "\n")
        size = sum(p.stat().st_size for p in dst.rglob("*") if p.is_file())
        print(f"testimages: built {name} in {time.monotonic() - t0:.1f}s, {size / MiB:.1f} MiB -> {dst}")
        return dst


def build_all(
    only: list[str] | None = None, with_debian: bool = False, cache: Path | str | None = None, force: bool = False
) -> dict[str, Path]:
    names = only or [n for n, r in RECIPES.items() if r.default or (with_debian and n == "debian")]
    return {n: build(n, cache, force) for n in names}


# --------------------------------------------------------------------------- verify


def _blob(layout: Path, digest: str) -> Path:
    algo, _, hexd = digest.partition(":")
    return layout / "blobs" / algo / hexd


def layer_blobs(layout: Path, tag: str = TAG) -> list[Path]:
    index = json.loads((layout / "index.json").read_text())
    for m in index["manifests"]:
        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            manifest = json.loads(_blob(layout, m["digest"]).read_text())
            return [_blob(layout, l["digest"]) for l in manifest["layers"]]
    raise ImageBuildError(f"tag {tag!r} not in {layout}/index.json")


def layer_member_names(layout: Path) -> list[set[str]]:
    out = []
    for blob in layer_blobs(layout):
        with blob.open("rb") as raw:
            gz = raw.read(2) == b"\x1f\x8b"
            raw.seek(0)
            with tarfile.open(fileobj=gzip.GzipFile(fileobj=raw) if gz else raw, mode="r|") as t:
                out.append({m.name.removeprefix("./") for m in t})
    return out


def verify(name: str, cache: Path | str | None = None) -> list[str]:
    """Unpack the image with umoci and check its expectations; return failures."""
    layout = layout_path(name, cache)
    if not (layout / "index.json").is_file():
        return [f"{name}: not built ({layout})"]
    failures: list[str] = []
    if name == "edge":
        members = set().union(*layer_member_names(layout))
        failures += [f"no layer contains {m}" for m in EDGE_LAYER_MARKERS if m not in members]
    with tempfile.TemporaryDirectory(prefix=f"verify-{name}-") as tmp:
        bundle = Path(tmp) / "bundle"
        run(["umoci", "unpack", "--image", f"{layout}:{TAG}", str(bundle)], "umoci unpack")
        failures += check_rootfs(bundle / "rootfs", EXPECTATIONS.get(name, {}))
    return failures


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Build/verify fractal's local OCI test images.")
    ap.add_argument("--cache", type=Path, default=None, help="cache dir (default $FRACTAL_CACHE or /var/cache/fractal)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build images whose recipe changed")
    b.add_argument("--only", action="append", choices=list(RECIPES), help="build just this image (repeatable)")
    b.add_argument("--with-debian", action="store_true", help="also build the slow debian image")
    b.add_argument("--force", action="store_true")
    for cmd, hlp in (("path", "print the OCI layout dir"), ("ref", "print oci:DIR:latest"), ("verify", "check contents")):
        p = sub.add_parser(cmd, help=hlp)
        p.add_argument("name", choices=list(RECIPES))
    sub.add_parser("list", help="list images and whether they are built")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "build":
            build_all(args.only, args.with_debian, args.cache, args.force)
        elif args.cmd == "path":
            print(layout_path(args.name, args.cache))
        elif args.cmd == "ref":
            print(image_ref_name(args.name, args.cache))
        elif args.cmd == "list":
            for n in RECIPES:
                print(f"{n:8} {'built' if is_built(n, args.cache) else 'not built':9} {layout_path(n, args.cache)}")
        elif args.cmd == "verify":
            failures = verify(args.name, args.cache)
            for f in failures:
                print(f"FAIL {f}")
            print(f"testimages: verify {args.name}: {'OK' if not failures else f'{len(failures)} failure(s)'}")
            return 1 if failures else 0
    except ImageBuildError as e:
        print(f"testimages: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
