"""The repo when the disk is full or a metadata commit fails (issue 10 item 7, issue 18 item 1).

The failures are injected at the SQLite connection (a COMMIT that fails as on a full disk), so
each test pins one ordering; the same situations on a real full filesystem, through containerd,
are in tests/integration/test_repo_full.py.
"""

from __future__ import annotations

import errno
import sqlite3
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from ccpu.repo import Kind, Repo, ResourceExhausted
from snapshotter.errors import status_of

from tests.unit.test_repo import upper_of


class FailingCommits:
    """Stands in for the metastore's connection: COMMIT fails with SQLITE_FULL while ``full()``.

    The failed COMMIT leaves the transaction open, the worst of what SQLite may do
    (sqlite.org/lang_transaction.html: it "may or may not" roll back by itself).
    """

    def __init__(self, db: sqlite3.Connection, full: Callable[[], bool]) -> None:
        self._db, self.full = db, full

    def execute(self, sql: str, *args: object) -> sqlite3.Cursor:
        if sql == "COMMIT" and self.full():
            e = sqlite3.OperationalError("database or disk is full")
            e.sqlite_errorcode = sqlite3.SQLITE_FULL  # type: ignore[attr-defined]
            raise e
        return self._db.execute(sql, *args)

    def __getattr__(self, name: str) -> object:
        return getattr(self._db, name)


def failing(times: int) -> Callable[[], bool]:
    left = [times]

    def full() -> bool:
        left[0] -= 1
        return left[0] >= 0

    return full


def test_prepare_whose_commit_fails_leaves_nothing_and_later_prepares_work(tmp_path: Path) -> None:
    root = tmp_path / "r"
    r = Repo(root, background_removal=False)
    real = r.meta._db
    r.meta._db = FailingCommits(real, failing(2))  # the Prepare and its one retry
    with pytest.raises(ResourceExhausted, match="is full"):
        r.prepare("a")
    assert sorted(p.name for p in r.active_dir.iterdir()) == []
    assert r.meta.snapshots() == []
    up = upper_of(r.prepare("b"))  # no restart
    Path(up, "f").write_text("x")
    r.commit("l", "b")
    r.close()
    r = Repo(root, background_removal=False)  # what was answered is on disk
    try:
        assert [(i.name, i.kind) for i in r.list()] == [("l", Kind.COMMITTED)]
        assert sorted(p.name for p in r.active_dir.iterdir()) == []
    finally:
        r.close()


def test_prepare_clears_a_directory_left_by_a_failed_attempt(tmp_path: Path) -> None:
    """An ``active/<id>`` nobody committed (the id SQLite hands out again) never blocks Prepare."""
    r = Repo(tmp_path / "r", background_removal=False)
    try:
        up = Path(upper_of(r.prepare("a")))
        r.remove("a")
        stale = up.parent.with_name(str(int(up.parent.name) + 1))
        (stale / "fs").mkdir(parents=True)
        (stale / "fs" / "junk").write_text("from an attempt whose COMMIT failed")
        up_b = Path(upper_of(r.prepare("b")))
        assert up_b.parent == stale and list(up_b.iterdir()) == []
    finally:
        r.close()


def test_remove_on_a_full_disk_releases_the_reserve_and_heals(tmp_path: Path) -> None:
    r = Repo(tmp_path / "r", background_removal=False)
    try:
        assert r.reserve.files[0].stat().st_blocks * 512 >= r.reserve.size
        up = Path(upper_of(r.prepare("a")))
        (up / "data").write_bytes(b"x" * (1 << 20))
        real = r.meta._db
        r.meta._db = FailingCommits(real, lambda: r.reserve.path.exists())  # room only once it is freed
        r.remove("a")
        assert not up.exists() and r.meta.snapshots() == []
        assert not r.reserve.path.exists()
        r.meta._db = real  # space is back
        r.prepare("b")
        assert r.reserve.files[0].stat().st_blocks * 512 >= r.reserve.size  # made again
    finally:
        r.close()


def test_remove_frees_the_data_even_when_no_metadata_can_be_written(tmp_path: Path) -> None:
    r = Repo(tmp_path / "r", background_removal=False)
    try:
        up = Path(upper_of(r.prepare("a")))
        (up / "data").write_bytes(b"x" * (1 << 20))
        real = r.meta._db
        r.meta._db = FailingCommits(real, lambda: True)
        with pytest.raises(ResourceExhausted):
            r.remove("a")
        assert not up.exists()  # the space is given back all the same
        assert list(r.trash_dir.iterdir()) == []
        r.meta._db = real
        r.prepare("b")  # nothing is wedged
        r.remove("a")  # containerd's retry forgets the row
        assert [i.name for i in r.list()] == ["b"]
        assert r.recover() == []
    finally:
        r.close()


def test_full_disk_errors_map_to_resource_exhausted() -> None:
    code, msg = status_of(ResourceExhausted("repo /x is full: out of inodes (0 of 10 free)"))
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED and "out of inodes" in msg
    code, msg = status_of(OSError(errno.ENOSPC, "No space left on device", "/x/active/3"))
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED and "/x/active/3" in msg
    assert status_of(OSError(errno.EDQUOT, "Disk quota exceeded"))[0] is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_of(OSError(errno.EIO, "I/O error"))[0] is grpc.StatusCode.UNKNOWN


def test_repo_dirs_are_0700_also_for_an_existing_repo(tmp_path: Path) -> None:
    root = tmp_path / "r"
    Repo(root, background_removal=False).close()
    for d in (root, root / "layers", root / "active", root / "trash"):
        d.chmod(0o755)  # as an older version left them
    Repo(root, background_removal=False).close()
    for d in (root, root / "layers", root / "active", root / "trash"):
        assert d.stat().st_mode & 0o7777 == 0o700, d
