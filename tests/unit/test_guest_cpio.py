"""The deterministic cpio newc writer: round trip, parents, determinism."""

from __future__ import annotations

import hashlib
import stat

import pytest

from ccpu.guest import cpio
from ccpu.guest.cpio import Entry


def sample() -> list[Entry]:
    return [
        Entry.file("usr/bin/tool", b"\x7fELF...", 0o755),
        Entry.symlink("bin/sh", "/bin/busybox"),
        Entry.file("init", b"#!/bin/sh\necho hi\n", 0o755),
        Entry.dir("tmp", 0o1777),
        Entry.file("etc/empty", b""),
    ]


def test_round_trip_keeps_contents_modes_and_adds_parents() -> None:
    got = {e.path: e for e in cpio.read(cpio.write(sample()))}
    assert got["usr/bin/tool"].data == b"\x7fELF..."
    assert stat.S_IMODE(got["usr/bin/tool"].mode) == 0o755
    assert stat.S_ISLNK(got["bin/sh"].mode) and got["bin/sh"].data == b"/bin/busybox"
    assert stat.S_ISDIR(got["usr"].mode) and stat.S_ISDIR(got["usr/bin"].mode)
    assert stat.S_IMODE(got["tmp"].mode) == 0o1777
    assert got["etc/empty"].data == b""


def test_directories_precede_their_contents() -> None:
    paths = [e.path for e in cpio.read(cpio.write(sample() + [Entry.file("a-b", b"x"), Entry.file("a/b", b"y")]))]
    for i, p in enumerate(paths):
        if "/" in p:
            assert p.rsplit("/", 1)[0] in paths[:i]


def test_same_inputs_in_any_order_give_the_same_bytes() -> None:
    a = cpio.compress(cpio.write(sample()))
    b = cpio.compress(cpio.write(list(reversed(sample()))))
    assert hashlib.sha256(a).digest() == hashlib.sha256(b).digest()
    assert [e.path for e in cpio.read(a)] == [e.path for e in cpio.read(cpio.write(sample()))]


def test_header_fields_are_normalized() -> None:
    raw = cpio.write([Entry.file("f", b"abc")])
    assert raw[:6] == b"070701"
    fields = [int(raw[6 + 8 * i: 14 + 8 * i], 16) for i in range(13)]
    ino, mode, uid, gid, nlink, mtime, size = fields[:7]
    assert (uid, gid, mtime) == (0, 0, 0) and size == 3
    assert raw.endswith(b"\0") and len(raw) % 4 == 0
    assert b"TRAILER!!!" in raw


def test_conflicts_and_bad_paths_are_errors() -> None:
    with pytest.raises(cpio.CpioError):
        cpio.write([Entry.file("a", b"1"), Entry.file("a", b"2")])
    with pytest.raises(cpio.CpioError):
        cpio.write([Entry.file("a", b"1"), Entry.file("a/b", b"2")])
    with pytest.raises(cpio.CpioError):
        cpio.write([Entry.file("../x", b"1")])
    assert len(list(cpio.read(cpio.write([Entry.file("a", b"1"), Entry.file("/a", b"1")])))) == 1
