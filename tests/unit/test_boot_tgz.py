"""ccpu/boot/tgz.py: a root tarball is unpacked once, keyed by its sha256, bounded, atomically;
its members cannot write outside the dir."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from pathlib import Path

import pytest

from ccpu.boot import tgz


def _tarball(path: Path, members: list[tuple[str, bytes | None, str | None]], compress: bool = True) -> Path:
    """members: (name, data or None for a dir, symlink target or None)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, data, link in members:
            ti = tarfile.TarInfo(name)
            if link is not None:
                ti.type, ti.linkname = tarfile.SYMTYPE, link
                t.addfile(ti)
            elif data is None:
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                t.addfile(ti)
            else:
                ti.size, ti.mode = len(data), 0o755
                t.addfile(ti, io.BytesIO(data))
    raw = buf.getvalue()
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def test_unpacked_once_under_its_digest(tmp_path: Path) -> None:
    src = _tarball(tmp_path / "r.tgz", [("sbin", None, None), ("sbin/init", b"#!/bin/sh\n", None)])
    cache = tmp_path / "cache"
    d = tgz.unpack(str(src), str(cache))
    assert Path(d).name == tgz.sha256_file(str(src))
    init = Path(d) / tgz.ROOT / "sbin" / "init"
    assert init.read_bytes() == b"#!/bin/sh\n" and os.access(init, os.X_OK)
    init.write_bytes(b"changed")  # a second call does not unpack again
    assert tgz.unpack(str(src), str(cache)) == d and init.read_bytes() == b"changed"


def test_plain_tar_too(tmp_path: Path) -> None:
    src = _tarball(tmp_path / "r.tar", [("etc", None, None), ("etc/x", b"x", None)], compress=False)
    d = tgz.unpack(str(src), str(tmp_path / "cache"))
    assert (Path(d) / tgz.ROOT / "etc" / "x").read_bytes() == b"x"


def test_size_bound_and_no_half_root_left(tmp_path: Path) -> None:
    """A small tarball that unpacks past the limit is refused, and nothing is left in the cache
    that a later boot could take for a whole root."""
    src = _tarball(tmp_path / "bomb.tgz", [("big", b"\0" * (4 << 20), None)])
    assert src.stat().st_size < 64 << 10
    cache = tmp_path / "cache"
    with pytest.raises(tgz.TgzError, match="more than"):
        tgz.unpack(str(src), str(cache), limit=1 << 20)
    assert list(cache.iterdir()) == []


def test_a_crashed_unpack_is_redone(tmp_path: Path) -> None:
    src = _tarball(tmp_path / "r.tgz", [("a", b"a", None)])
    cache = tmp_path / "cache"
    stale = cache / f"{tgz.sha256_file(str(src))}.tmp-dead"
    (stale / tgz.ROOT).mkdir(parents=True)
    d = tgz.unpack(str(src), str(cache))
    assert (Path(d) / tgz.ROOT / "a").read_bytes() == b"a" and not stale.exists()


def test_members_cannot_write_outside(tmp_path: Path) -> None:
    """`..` members are refused by tar; a symlink to outside followed by a member through it
    does not write outside (tar defers such symlinks)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    src = _tarball(tmp_path / "evil.tgz", [("esc", None, str(outside)), ("esc/pwned", b"x", None)])
    try:
        tgz.unpack(str(src), str(tmp_path / "cache"))
    except tgz.TgzError:
        pass
    assert not (outside / "pwned").exists()
    src = _tarball(tmp_path / "dots.tgz", [("../../dots-pwned", b"x", None)])
    try:
        tgz.unpack(str(src), str(tmp_path / "cache2"))
    except tgz.TgzError:
        pass
    assert not (tmp_path / "dots-pwned").exists() and not Path("/dots-pwned").exists()


def test_not_a_tarball(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tgz"
    bad.write_bytes(b"\x1f\x8bnot gzip at all")
    with pytest.raises(tgz.TgzError):
        tgz.unpack(str(bad), str(tmp_path / "cache"))
    assert not any((tmp_path / "cache").iterdir())
