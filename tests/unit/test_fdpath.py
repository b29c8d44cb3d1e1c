"""ccpu/fdpath.py: lookups that follow no symlink and stay beneath their start (no mounts
needed here; removal next to mount points is in tests/security/test_volume_dir_mounts.py)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from ccpu import fdpath


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path, int]:
    base, outside = tmp_path / "base", tmp_path / "outside"
    base.mkdir()
    outside.mkdir()
    (outside / "precious").write_text("keep\n")
    (base / "dir").mkdir()
    (base / "link").symlink_to(outside)
    (base / "dir" / "deep-link").symlink_to(outside)
    fd = os.open(base, os.O_PATH | os.O_DIRECTORY)
    yield base, outside, fd
    os.close(fd)


def test_open_refuses_symlinks_and_escapes(tree: tuple[Path, Path, int]) -> None:
    _base, _outside, fd = tree
    for path, err in (("link", errno.ELOOP), ("link/precious", errno.ELOOP), ("dir/deep-link/precious", errno.ELOOP),
                      ("../outside", errno.EXDEV), ("/etc", errno.EXDEV)):
        with pytest.raises(OSError) as exc:
            os.close(fdpath.open_path(fd, path))
        assert exc.value.errno == err, path
    os.close(fdpath.open_path(fd, "dir", directory=True))


def test_make_dir_and_file_never_through_a_symlink(tree: tuple[Path, Path, int]) -> None:
    base, outside, fd = tree
    for make in (fdpath.make_dir, fdpath.make_file):
        with pytest.raises(OSError):
            make(fd, "link/new")
        with pytest.raises(OSError):
            make(fd, "link")  # the symlink itself is not a dir/file to reuse
    assert sorted(p.name for p in outside.iterdir()) == ["precious"]
    fdpath.make_dir(fd, "dir/sub")
    fdpath.make_dir(fd, "dir/sub")  # exists: fine
    fdpath.make_file(fd, "dir/sub/f")
    fdpath.make_file(fd, "dir/sub/f")
    assert (base / "dir" / "sub").is_dir() and (base / "dir" / "sub" / "f").is_file()


def test_remove_tree_removes_symlinks_not_their_targets(tree: tuple[Path, Path, int]) -> None:
    base, outside, _ = tree
    rfd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert fdpath.remove_tree(rfd, "dir") == []
        assert fdpath.remove_tree(rfd, "link") == []
        assert fdpath.remove_tree(rfd, "missing") == []
        with pytest.raises(OSError):
            fdpath.remove_tree(rfd, "a/b")
    finally:
        os.close(rfd)
    assert list(base.iterdir()) == []
    assert (outside / "precious").read_text() == "keep\n"
