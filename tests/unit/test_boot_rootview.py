"""ccpu/boot/rootview.py: the image's merged root read on the host as overlayfs would stack it,
its symlinks resolved inside the image (the image is untrusted)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ccpu.boot.rootview import RootView, RootViewError
from ccpu.repo.opaque import TRUSTED, USER

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="whiteouts (0/0 devices) and trusted.* xattrs need root")


def _opaque(d: Path) -> None:
    for name in (USER, TRUSTED):
        try:
            os.setxattr(d, name, b"y")
            return
        except OSError:
            continue
    pytest.skip("no xattr for an opaque marker here")


@pytest.fixture
def layers(tmp_path: Path) -> list[str]:
    """bottom: /bin/busybox, /sbin/init -> ../bin/busybox, /etc/{doomed,opq/a}, /lib -> usr/lib,
    /usr/lib/systemd/systemd; top: whiteout of /etc/doomed, /etc/opq opaque with c, /boot kernels."""
    low, top = tmp_path / "1", tmp_path / "2"
    for d in ("bin", "sbin", "etc/opq", "usr/lib/systemd", "boot"):
        (low / d).mkdir(parents=True)
    (low / "bin/busybox").write_text("x")
    os.chmod(low / "bin/busybox", 0o755)
    os.symlink("../bin/busybox", low / "sbin/init")
    os.symlink("usr/lib", low / "lib")
    (low / "usr/lib/systemd/systemd").write_text("x")
    os.chmod(low / "usr/lib/systemd/systemd", 0o755)
    (low / "etc/doomed").write_text("x")
    (low / "etc/opq/a").write_text("a")
    (low / "boot/vmlinuz-old").write_text("k")
    for d in ("etc/opq", "boot", "evil"):
        (top / d).mkdir(parents=True)
    (top / "etc/opq/c").write_text("c")
    _opaque(top / "etc/opq")
    (top / "boot/vmlinuz-new").write_text("k")
    os.symlink("/../../../../etc/passwd", top / "evil/abs")
    os.symlink("../../../../../../etc/shadow", top / "evil/rel")
    os.symlink("loop2", top / "evil/loop1")
    os.symlink("loop1", top / "evil/loop2")
    os.symlink("/lib/systemd/systemd", top / "evil/init")
    if os.geteuid() == 0:
        os.mknod(top / "etc/doomed", 0o600 | 0o020000, os.makedev(0, 0))
    return [str(top), str(low)]


def test_symlinks_resolve_inside_the_image(layers: list[str]) -> None:
    v = RootView(layers)
    e = v.lookup("/sbin/init")
    assert e is not None and e.path == "/bin/busybox" and e.executable
    e = v.lookup("/evil/init")  # absolute, through the /lib -> usr/lib link
    assert e is not None and e.path == "/usr/lib/systemd/systemd" and e.executable
    assert v.lookup("/sbin/init", follow=False) is not None


def test_escapes_stay_in_the_image(layers: list[str]) -> None:
    """`..` stops at the image's root: /etc/passwd and /etc/shadow of the host are never reached."""
    v = RootView(layers)
    assert v.lookup("/evil/abs") is None
    assert v.lookup("/evil/rel") is None
    assert v.lookup("/../../etc/opq/c") is not None
    with pytest.raises(RootViewError):
        v.lookup("/evil/loop1")


def test_opaque_dirs_hide_what_is_below(layers: list[str]) -> None:
    v = RootView(layers)
    assert v.listdir("/etc/opq") == ["c"]
    assert v.lookup("/etc/opq/a") is None
    assert v.listdir("/boot") == ["vmlinuz-new", "vmlinuz-old"]


@root_only
def test_whiteouts_hide_what_is_below(layers: list[str]) -> None:
    v = RootView(layers)
    assert v.lookup("/etc/doomed") is None
    assert "doomed" not in v.listdir("/etc")


def test_a_file_is_not_a_directory(layers: list[str]) -> None:
    v = RootView(layers)
    assert v.lookup("/bin/busybox/x") is None
    assert v.listdir("/bin/busybox") == []
