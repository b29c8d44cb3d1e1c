"""ccpu/guest/erofs.py: the read-only system image, built by mkfs.erofs.  Read back with the
format's own checker (``fsck.erofs --extract``), and -- where this host's kernel has erofs and we
may mount -- mounted for real in a private mount namespace."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from ccpu.guest import erofs

pytestmark = pytest.mark.skipif(erofs.available() is None or shutil.which("fsck.erofs") is None,
                                reason="erofs-utils not installed (hack/setup.sh installs it)")

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


def extract(img: bytes, tmp: Path) -> Path:
    (tmp / "img").write_bytes(img)
    out = tmp / "out"
    r = subprocess.run(["fsck.erofs", f"--extract={out}", "--preserve", str(tmp / "img")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return out


def test_files_dirs_and_links_read_back(tmp_path: Path) -> None:
    out = extract(erofs.write(FILES + MANY), tmp_path)
    assert (out / "usr/bin/tool").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert stat.S_IMODE((out / "usr/bin/tool").stat().st_mode) == 0o755
    assert (out / "usr/lib/big").read_bytes() == bytes(range(256)) * 100
    assert (out / "usr/lib/empty").read_bytes() == b""
    assert stat.S_IMODE((out / "usr/lib/empty").stat().st_mode) == 0o600
    assert os.readlink(out / "lib64/ld.so") == "/usr/bin/tool"
    assert stat.S_IMODE((out / "etc").stat().st_mode) == 0o700
    assert len(os.listdir(out / "many")) == 600
    assert (out / "many" / f"{'n' * 7}0007").read_bytes() == b"7"
    assert {(out / p).stat().st_uid for p in ("usr/bin/tool", "etc")} == {0}


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
    with pytest.raises(erofs.ImageError):
        erofs.write([erofs.File("../escape", stat.S_IFREG | 0o644)])


def test_missing_mkfs_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(erofs, "available", lambda: None)
    with pytest.raises(erofs.ImageError, match="install erofs-utils"):
        erofs.write(FILES)


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


