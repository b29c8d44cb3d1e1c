"""ccpu.guest.extend: --add/--run-at-boot parsing, the record, the sources and their hash."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from ccpu.guest import extend
from ccpu.guest import initramfs as ini
from ccpu.guest.source import Source


def test_parse_add_normalises_and_refuses_bad_guest_paths(tmp_path: Path) -> None:
    a = extend.parse_add(f"{tmp_path}/bin:/usr/local//bin/x/")
    assert a == extend.Add(f"{tmp_path}/bin", "usr/local/bin/x")
    assert extend.parse_add("rel/file:/opt/f").host == os.path.abspath("rel/file")
    for bad, why in [("nocolon", "HOST_PATH:GUEST_PATH"), (":/x", "HOST_PATH:GUEST_PATH"),
                     ("/h:", "HOST_PATH:GUEST_PATH"), ("/h:rel", "absolute"), ("/h:/a/../b", "'..'"),
                     ("/h:/", "root"), ("/h:/init", "fractal's"), ("/h:/etc/fractal/modules", "fractal's"),
                     ("/h:/work/x", "fractal's"), ("/h:/proc", "fractal's"), ("/h:/repo/layers", "fractal's")]:
        with pytest.raises(extend.ExtensionError, match=why):
            extend.parse_add(bad)
    # a colon in the host path is kept (the guest path is after the last one)
    assert extend.parse_add("/a:b/c:/d").host == "/a:b/c"


def test_make_refuses_duplicates_bad_commands_and_too_many() -> None:
    with pytest.raises(extend.ExtensionError, match="named twice"):
        extend.make(["/a:/opt/x", "/b:/opt/x/"], [])
    for bad in ["", "  ", "a\nb", "a\0b", "x" * (extend.MAX_COMMAND + 1)]:
        with pytest.raises(extend.ExtensionError):
            extend.make([], [bad])
    with pytest.raises(extend.ExtensionError, match="at most"):
        extend.make([], ["true"] * (extend.MAX_RUN_AT_BOOT + 1))
    assert not extend.make([], [])


def test_record_round_trip_and_clear(tmp_path: Path) -> None:
    assert extend.load(tmp_path) == extend.Extensions()
    ext = extend.make([f"{tmp_path}/f:/opt/f"], ["cpud -d"])
    extend.save(tmp_path, ext)
    assert extend.load(tmp_path) == ext
    extend.save(tmp_path, extend.Extensions())
    assert not (tmp_path / extend.RECORD).exists()
    (tmp_path / extend.RECORD).write_text("[1]")
    with pytest.raises(extend.ExtensionError, match="clear-extensions"):
        extend.load(tmp_path)
    (tmp_path / extend.RECORD).write_text('{"add": [{"host": "/h", "guest": "/init"}]}')
    with pytest.raises(extend.ExtensionError, match="fractal's"):  # a hand-edited record is checked too
        extend.load(tmp_path)


def _tree(tmp_path: Path) -> Path:
    d = tmp_path / "tree"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "a").write_text("a")
    (d / "bin").write_bytes(b"\x7fELF")
    os.chmod(d / "bin", 0o755)
    (d / "ln").symlink_to("sub/a")
    return d


def test_sources_carry_the_tree_and_the_command_list(tmp_path: Path) -> None:
    d = _tree(tmp_path)
    srcs = extend.sources(extend.make([f"{d}:/opt/t", f"{d}/bin:/usr/local/bin/b"], ["b --serve", "true"]))
    by = {s.dest: s for s in srcs}
    assert stat.S_ISDIR(by["opt/t"].mode) and stat.S_ISDIR(by["opt/t/sub"].mode)
    assert by["opt/t/sub/a"].read() == b"a"
    assert by["opt/t/ln"].link == "sub/a"
    assert stat.S_IMODE(by["usr/local/bin/b"].mode) == 0o755
    assert by[extend.RUN_AT_BOOT_FILE].read() == b"b --serve\ntrue\n"
    with pytest.raises(extend.ExtensionError, match="No such file"):
        extend.sources(extend.make([f"{tmp_path}/missing:/opt/m"], []))
    os.mkfifo(d / "fifo")
    with pytest.raises(extend.ExtensionError, match="not a regular file"):
        extend.sources(extend.make([f"{d}:/opt/t"], []))


def test_content_addresses_the_build(tmp_path: Path) -> None:
    """Different --add content -> a different inputs key (so a different build); the same -> the same."""
    d = _tree(tmp_path)
    ext = extend.make([f"{d}:/opt/t"], ["x"])

    def key() -> str:
        return ini.inputs_key(extend.sources(ext), {"layout": "image"})

    k = key()
    assert key() == k
    (d / "sub" / "a").write_text("b")
    assert key() != k
    (d / "sub" / "a").write_text("a")
    assert key() == k
    os.chmod(d / "bin", 0o700)
    assert key() != k
    assert ini.inputs_key(extend.sources(extend.make([f"{d}:/opt/t"], ["y"])), {"layout": "image"}) != key()


def test_conflicts_with_the_guest_are_refused() -> None:
    base = [Source("usr/bin/python3.11", stat.S_IFREG | 0o755, data=b""),
            Source("lib64", stat.S_IFLNK | 0o777, link="usr/lib64"), Source("opt", stat.S_IFDIR | 0o755)]
    extend.check_conflicts(base, [Source("opt", stat.S_IFDIR | 0o755), Source("opt/x", stat.S_IFREG, data=b"")])
    with pytest.raises(extend.ExtensionError, match="already part"):
        extend.check_conflicts(base, [Source("usr/bin/python3.11", stat.S_IFREG | 0o755, data=b"")])
    with pytest.raises(extend.ExtensionError, match="not a directory"):
        extend.check_conflicts(base, [Source("lib64/evil.so", stat.S_IFREG | 0o755, data=b"")])
    # busybox applets are not in `base` when the check runs: an addition may replace one
    assert ini.applet_links("/bin/nc\n/bin/sh\n", {"bin/nc"}) == [Source("bin/sh", stat.S_IFLNK | 0o777,
                                                                         link="/bin/busybox")]


def test_describe_hashes_each_addition(tmp_path: Path) -> None:
    d = _tree(tmp_path)
    ext = extend.make([f"{d}:/opt/t"], [])
    one = extend.describe(ext, extend.sources(ext))
    assert one["add"][0]["guest"] == "/opt/t" and one["add"][0]["entries"] == 5
    (d / "sub" / "a").write_text("changed")
    assert extend.describe(ext, extend.sources(ext))["add"][0]["sha256"] != one["add"][0]["sha256"]
