"""Pure parts of the initramfs build: ldd parsing, stdlib filter, applets, inputs key."""

from __future__ import annotations

import stat

import pytest

from ccpu.guest import initramfs as ini

LDD = """\
\tlinux-vdso.so.1 (0x00007ffd6a3f2000)
\tlibm.so.6 => /lib/x86_64-linux-gnu/libm.so.6 (0x00007f673e6c0000)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f673e494000)
\t/lib64/ld-linux-x86-64.so.2 (0x00007f673e7b6000)
"""


def test_parse_ldd() -> None:
    assert ini.parse_ldd(LDD) == ["/lib/x86_64-linux-gnu/libm.so.6", "/lib/x86_64-linux-gnu/libc.so.6",
                                  "/lib64/ld-linux-x86-64.so.2"]
    with pytest.raises(ValueError):
        ini.parse_ldd("\tlibfoo.so.1 => not found\n")


@pytest.mark.parametrize("rel,keep", [
    ("os.py", True), ("asyncio/base_events.py", True), ("lib-dynload/_asyncio.cpython-311-x86_64-linux-gnu.so", True),
    ("test/test_os.py", False), ("idlelib/idle.py", False), ("tkinter/__init__.py", False),
    ("ensurepip/__init__.py", False), ("lib2to3/main.py", False), ("__pycache__/os.cpython-311.pyc", False),
    ("json/__pycache__/x.pyc", False), ("lib-dynload/_ssl.cpython-311-x86_64-linux-gnu.so", True), ("lib-dynload/_hashlib.cpython-311-x86_64-linux-gnu.so", False),
    ("lib-dynload/_testcapi.cpython-311-x86_64-linux-gnu.so", False),
    ("config-3.11-x86_64-linux-gnu/libpython3.11.a", False), ("sqlite3/__init__.py", True),
])
def test_keep_stdlib(rel: str, keep: bool) -> None:
    assert ini.keep_stdlib(rel) is keep


def test_applet_links_skip_taken_paths() -> None:
    links = ini.applet_links("bin/sh\nusr/bin/env\nbin/busybox\nusr/sbin/runc\n", {"usr/sbin/runc"})
    assert [s.dest for s in links] == ["bin/sh", "usr/bin/env"]
    assert all(stat.S_ISLNK(s.mode) and s.read() == b"/bin/busybox" for s in links)


def test_inputs_key_depends_on_content_mode_and_options_not_order() -> None:
    a = ini.Source("a", stat.S_IFREG | 0o644, data=b"1")
    b = ini.Source("b", stat.S_IFREG | 0o755, data=b"2")
    k = ini.inputs_key([a, b], {"pyc": True})
    assert ini.inputs_key([b, a], {"pyc": True}) == k
    assert ini.inputs_key([a, ini.Source("b", stat.S_IFREG | 0o755, data=b"3")], {"pyc": True}) != k
    assert ini.inputs_key([a, ini.Source("b", stat.S_IFREG | 0o644, data=b"2")], {"pyc": True}) != k
    assert ini.inputs_key([a, b], {"pyc": False}) != k


def _src(dest: str, kind: int = stat.S_IFREG) -> ini.Source:
    return ini.Source(dest, kind | (0o755 if kind == stat.S_IFDIR else 0o644), data=b"x")


def test_image_layout_keeps_init_busybox_modules_and_links_the_rest() -> None:
    srcs = [_src("init"), _src("bin/busybox"), _src("etc/passwd"), _src("proc", stat.S_IFDIR),
            _src("lib/modules/6.1/kernel/fs/erofs/erofs.ko"), _src("lib/x86_64-linux-gnu/libc.so.6"),
            _src("lib64/ld-linux-x86-64.so.2"), _src("usr/bin/python3.11"), _src("usr/lib/python3.11/os.py"),
            ini.Source("usr/bin/env", stat.S_IFLNK | 0o777, link="/bin/busybox")]
    initrd, image = ini.split_layout(srcs)
    assert [s.dest for s in image] == ["lib/x86_64-linux-gnu/libc.so.6", "lib64/ld-linux-x86-64.so.2",
                                       "usr/bin/python3.11", "usr/lib/python3.11/os.py", "usr/bin/env"]
    by = {s.dest: s for s in initrd}
    assert {"init", "bin/busybox", "etc/passwd", "proc", "lib/modules/6.1/kernel/fs/erofs/erofs.ko"} <= set(by)
    # one link per highest directory the initramfs lacks: lib itself stays (it holds the modules)
    links = {d: s.link for d, s in by.items() if s.link is not None}
    assert links == {"lib/x86_64-linux-gnu": "/.image/lib/x86_64-linux-gnu", "lib64": "/.image/lib64",
                     "usr": "/.image/usr"}
    assert stat.S_ISDIR(by[".image"].mode)


def test_modules_loaded_after_the_mount_go_to_the_image_behind_links() -> None:
    """modules.later: the init loads them once the image is mounted, so the initramfs (unpacked by
    the kernel before the init's first line) keeps only what runs before the mount."""
    srcs = [_src("init"), _src("lib/modules/6.1/kernel/fs/erofs/erofs.ko"),
            _src("lib/modules/6.1/kernel/fs/overlayfs/overlay.ko"), _src("lib/modules/6.1/kernel/net/bridge/bridge.ko"),
            _src("lib/modules/6.1/modules.dep"), _src("usr/bin/python3.11")]
    later = ["lib/modules/6.1/kernel/fs/overlayfs/overlay.ko", "lib/modules/6.1/kernel/net/bridge/bridge.ko"]
    initrd, image = ini.split_layout(srcs, later)
    assert [s.dest for s in image] == [*later, "usr/bin/python3.11"]
    by = {s.dest: s for s in initrd}
    assert {"lib/modules/6.1/kernel/fs/erofs/erofs.ko", "lib/modules/6.1/modules.dep"} <= set(by)
    links = {d: s.link for d, s in by.items() if s.link is not None}
    assert links == {"lib/modules/6.1/kernel/fs/overlayfs": "/.image/lib/modules/6.1/kernel/fs/overlayfs",
                     "lib/modules/6.1/kernel/net": "/.image/lib/modules/6.1/kernel/net", "usr": "/.image/usr"}


def test_image_marker_names_the_image_hash() -> None:
    m = ini.image_marker("ab" * 32)
    assert m.dest == "etc/fractal/image" and m.read() == b"erofs " + b"ab" * 32 + b"\n"


def test_default_layout_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ini.LAYOUT_ENV, raising=False)
    monkeypatch.setattr(ini.erofs, "available", lambda: "/usr/bin/mkfs.erofs")
    assert ini.default_layout() == ini.DEFAULT_LAYOUT == "image"
    monkeypatch.setattr(ini.erofs, "available", lambda: None)  # no mkfs.erofs: the layout that needs none
    assert ini.default_layout() == "initramfs"
    monkeypatch.setenv(ini.LAYOUT_ENV, "initramfs")
    assert ini.default_layout() == "initramfs"
    monkeypatch.setenv(ini.LAYOUT_ENV, "floppy")
    with pytest.raises(ValueError):
        ini.default_layout()


def test_python_is_found_not_hard_coded() -> None:
    py = ini.parse_python_probe("/usr/bin/python3.12", "/usr/lib/python3.12 cpython-312\n")
    assert py == ini.Python("/usr/bin/python3.12", "/usr/lib/python3.12", "cpython-312")
    assert py.pkg_dir == "usr/lib/python3.12"
    with pytest.raises(ValueError):
        ini.parse_python_probe("/usr/bin/pypy3", "/usr/lib/pypy3.9 pypy39\n")
    # the static libpython dir is left out whatever its version and multiarch
    assert not ini.keep_stdlib("config-3.12-aarch64-linux-gnu/libpython3.12.a")
