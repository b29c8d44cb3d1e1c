"""ccpu/guest/erofs.py: the read-only system image.  Read back with a small independent reader
of the on-disk format (superblock, compact inodes, dirents), and -- where this host's kernel has
erofs and we may mount -- mounted for real in a private mount namespace."""

from __future__ import annotations

import os
import shutil
import stat
import struct
import subprocess
from pathlib import Path

import pytest

from ccpu.guest import erofs

FILES = [
    erofs.File("usr/bin/tool", stat.S_IFREG | 0o755, lambda: b"#!/bin/sh\necho hi\n"),
    erofs.File("usr/lib/big", stat.S_IFREG | 0o644, lambda: bytes(range(256)) * 100),  # 25600 B: 7 blocks
    erofs.File("usr/lib/empty", stat.S_IFREG | 0o600),
    erofs.File("lib64/ld.so", stat.S_IFLNK | 0o777, lambda: b"/usr/bin/tool"),
    erofs.File("etc", stat.S_IFDIR | 0o700),
]
# enough entries (and long names) to spread one directory over several blocks
MANY = [erofs.File(f"many/{'n' * (i % 60)}{i:04d}", stat.S_IFREG | 0o644, (lambda i=i: str(i).encode()))
        for i in range(600)]


class Reader:
    def __init__(self, img: bytes) -> None:
        self.img = img
        (self.magic, _csum, _compat, self.blkbits, _ext, self.root, self.inos, _t, _tn, self.blocks,
         self.meta) = struct.unpack_from("<IIIBBHQQIII", img, 1024)

    def inode(self, nid: int) -> tuple[int, int, int, int]:
        fmt, _x, mode, nlink, size, _r, addr = struct.unpack_from("<HHHHIII", self.img, self.meta * 4096 + nid * 32)
        assert fmt == 0  # compact, flat plain
        return mode, nlink, size, addr

    def data(self, nid: int) -> bytes:
        _mode, _n, size, addr = self.inode(nid)
        return self.img[addr * 4096:addr * 4096 + size]

    def entries(self, nid: int) -> list[tuple[bytes, int, int]]:
        raw, out = self.data(nid), []
        for b in range(0, len(raw), 4096):
            block = raw[b:b + 4096]
            count = struct.unpack_from("<H", block, 8)[0] // 12
            heads = [struct.unpack_from("<QHBB", block, i * 12) for i in range(count)]
            for i, (n, off, ftype, _r) in enumerate(heads):
                end = heads[i + 1][1] if i + 1 < count else len(block)
                out.append((block[off:end].rstrip(b"\0"), n, ftype))
        return out

    def lookup(self, path: str) -> int:
        nid = self.root
        for part in path.split("/"):
            nid = {name: n for name, n, _ in self.entries(nid)}[part.encode()]
        return nid


def test_superblock_root_and_sizes() -> None:
    img = erofs.write(FILES)
    r = Reader(img)
    assert r.magic == erofs.MAGIC and r.blkbits == 12 and r.meta == 0
    assert r.root == 36  # right after the superblock, never 0 (readdir skips inode 0)
    assert len(img) % 4096 == 0 and r.blocks == len(img) // 4096
    assert r.inos == 10  # / usr usr/bin tool usr/lib big empty lib64 ld.so etc


def test_files_dirs_and_links_read_back() -> None:
    r = Reader(erofs.write(FILES + MANY))
    assert r.data(r.lookup("usr/bin/tool")) == b"#!/bin/sh\necho hi\n"
    assert r.data(r.lookup("usr/lib/big")) == bytes(range(256)) * 100
    mode, _n, size, _a = r.inode(r.lookup("usr/lib/empty"))
    assert mode == stat.S_IFREG | 0o600 and size == 0
    mode, _n, _s, _a = r.inode(r.lookup("lib64/ld.so"))
    assert stat.S_ISLNK(mode) and r.data(r.lookup("lib64/ld.so")) == b"/usr/bin/tool"
    assert r.inode(r.lookup("etc"))[0] == stat.S_IFDIR | 0o700
    assert r.inode(r.root)[1] == 2 + 4  # nlink: . + .. + etc, lib64, many, usr
    many = r.entries(r.lookup("many"))
    assert len(many) == 602 and r.inode(r.lookup("many"))[2] > 4096  # several blocks
    names = [n for n, _, _ in many]
    assert names == sorted(names)  # the kernel binary-searches them
    assert r.data(r.lookup("many/" + "n" * (431 % 60) + "0431")) == b"431"
    dots = {n: nid for n, nid, _ in r.entries(r.lookup("usr/bin"))}
    assert dots[b"."] == r.lookup("usr/bin") and dots[b".."] == r.lookup("usr")


def test_same_files_same_bytes_whatever_the_order() -> None:
    assert erofs.write(FILES + MANY) == erofs.write(list(reversed(FILES + MANY)))
    changed = FILES[:1] + [erofs.File("usr/lib/big", stat.S_IFREG | 0o644, lambda: b"other")] + FILES[2:]
    assert erofs.write(changed) != erofs.write(FILES)


def test_refuses_what_it_cannot_represent() -> None:
    with pytest.raises(erofs.ImageError):
        erofs.write([erofs.File("dev/null", stat.S_IFCHR | 0o666)])
    with pytest.raises(erofs.ImageError):
        erofs.write([erofs.File("a", stat.S_IFREG | 0o644), erofs.File("a/b", stat.S_IFREG | 0o644)])
    with pytest.raises(erofs.ImageError):
        erofs.write([erofs.File("a", stat.S_IFREG | 0o644), erofs.File("a", stat.S_IFREG | 0o644)])


def _can_mount() -> bool:
    try:
        fs = Path("/proc/filesystems").read_text()
    except OSError:
        return False
    return os.geteuid() == 0 and "\terofs\n" in fs and shutil.which("unshare") is not None


@pytest.mark.skipif(not _can_mount(), reason="needs root, unshare and erofs in this host's kernel")
def test_the_kernel_mounts_it(tmp_path: Path) -> None:
    img = tmp_path / "sys.erofs"
    img.write_bytes(erofs.write(FILES + MANY))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = (f"mount -t erofs -o ro,loop {img} {mnt} && cat {mnt}/usr/bin/tool && readlink {mnt}/lib64/ld.so "
              f"&& ls {mnt}/many | wc -l && cat {mnt}/many/{'n' * 7}0007 && stat -c %a {mnt}/etc "
              f"&& cmp -s {mnt}/usr/lib/big {tmp_path}/big && echo same")
    (tmp_path / "big").write_bytes(bytes(range(256)) * 100)
    out = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n") == ["#!/bin/sh", "echo hi", "/usr/bin/tool", "600", "7700", "same", ""]


def test_directories_come_before_file_data() -> None:
    r = Reader(erofs.write(FILES + MANY))
    dirs = [r.lookup(p) for p in ("usr", "usr/bin", "many", "lib64")] + [r.root]
    files = [r.lookup(p) for p in ("usr/bin/tool", "usr/lib/big", "lib64/ld.so")]
    assert max(r.inode(d)[3] for d in dirs) < min(r.inode(f)[3] for f in files)
