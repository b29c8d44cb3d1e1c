"""ccpu/linux/mountinfo.py: one parser of /proc/*/mountinfo, escapes undone, a typed record."""

from __future__ import annotations

import os
from pathlib import Path

from ccpu.linux import mountinfo


def test_a_line_with_optional_fields_and_escapes() -> None:
    line = ("36 35 98:0 /mnt\\0401 /a\\040b\\011c\\012d\\134e\\043f rw,noatime master:1 shared:7 - "
            "ext3 /dev/my\\040disk rw,errors=continue\n")
    m = mountinfo.parse_line(line)
    assert m == mountinfo.MountInfo(mount_id=36, parent_id=35, root="/mnt 1", mountpoint="/a b\tc\nd\\e#f",
                                    options=frozenset({"rw", "noatime"}), fstype="ext3", source="/dev/my disk",
                                    super_options="rw,errors=continue")


def test_an_unescaped_backslash_sequence_is_undone_once() -> None:
    # "\134040" is a backslash followed by the text "040", not a space
    assert mountinfo.unescape("/x\\134040") == "/x\\040"
    assert mountinfo.unescape("/plain") == "/plain"


def test_lines_that_are_not_mounts_are_skipped() -> None:
    assert mountinfo.parse_line("") is None
    assert mountinfo.parse_line("x 1 0:1 / / rw - tmpfs t rw") is None
    assert mountinfo.parse_line("1 2 0:1 / / rw tmpfs t rw") is None  # no separator
    assert mountinfo.parse(["1 0 0:1 / / rw - tmpfs t rw", "junk"])[0].mount_id == 1


def test_containing_is_the_longest_prefix_and_the_topmost() -> None:
    mounts = mountinfo.parse([
        "1 0 0:1 / / rw - ext4 /dev/a rw",
        "2 1 0:2 / /var rw - tmpfs t rw",
        "3 1 0:3 / /var/lib rw - xfs /dev/b rw",
        "4 3 0:4 / /var/lib rw - overlay o rw",
    ])
    assert mountinfo.containing("/var/lib/x", mounts).mount_id == 4  # type: ignore[union-attr]
    assert mountinfo.containing("/var/libx", mounts).mount_id == 2  # type: ignore[union-attr]
    assert mountinfo.containing("/etc", mounts).mount_id == 1  # type: ignore[union-attr]
    assert mountinfo.containing("/etc", []) is None


def test_this_process_sees_its_root_and_proc(tmp_path: Path) -> None:
    infos = mountinfo.read()
    assert any(m.mountpoint == "/" for m in infos)
    assert mountinfo.is_mountpoint("/proc") and not mountinfo.is_mountpoint(str(tmp_path))
    assert "/proc" in mountinfo.mount_points()
    assert mountinfo.read(os.getpid()) == infos
