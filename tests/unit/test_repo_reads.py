"""Reads never wait behind writes (issue 13): Stat, Mounts, Usage, List and layers() read the
last committed state on their thread's own read-only connection, holding no lock a writer holds."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ccpu.repo import Kind, Repo

#: How long a read may stay blocked before the test calls it stuck.  Not a speed figure: a read
#: that waits behind the writer below waits until the writer lets go, which it only does after
#: this bound (the test would otherwise hang instead of failing).
STUCK = 60.0


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[Repo]:
    r = Repo(tmp_path / "repo", background_removal=False)
    yield r
    r.close()


def _layered(repo: Repo) -> None:
    """base (committed) <- box (active), view (view); box labelled old."""
    repo.prepare("base-key")
    Path(repo.root, "active").joinpath(str(repo.meta.snapshot("base-key").id), "fs", "f").write_text("x" * 100)
    repo.commit("base", "base-key")
    repo.prepare("box", "base", {"state": "old"})
    repo.view("view", "base")


def _while_writing(repo: Repo, read: Callable[[], object]) -> object:
    """Run ``read`` in another thread while this one holds the repo lock and an open write
    transaction that changes box's label; returns what ``read`` returned."""
    out: dict[str, object] = {}
    done = threading.Event()

    def reader() -> None:
        try:
            out["value"] = read()
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            out["error"] = e
        finally:
            done.set()

    with repo._lock, repo.meta.tx():
        repo.meta.set_labels(repo.meta.snapshot("box").id, {"state": "new"}, 1)
        t = threading.Thread(target=reader, daemon=True)
        t.start()
        finished = done.wait(STUCK)
    t.join()
    assert finished, "a read waited behind the write transaction"
    if "error" in out:
        raise out["error"]  # type: ignore[misc]
    return out["value"]


def test_stat_sees_the_committed_state_while_a_write_is_in_progress(repo: Repo) -> None:
    _layered(repo)
    info = _while_writing(repo, lambda: repo.stat("box"))
    assert info.labels == {"state": "old"} and info.parent == "base"  # not the uncommitted label
    assert repo.stat("box").labels == {"state": "new"}  # the write, once committed, is seen


def test_mounts_usage_list_layers_answer_while_a_write_is_in_progress(repo: Repo) -> None:
    _layered(repo)
    expected = (repo.mounts("box"), repo.mounts("view"), repo.usage("base"), repo.usage("view"),
                [i.name for i in repo.list()], repo.layers())
    got = _while_writing(repo, lambda: (repo.mounts("box"), repo.mounts("view"), repo.usage("base"),
                                        repo.usage("view"), [i.name for i in repo.list()], repo.layers()))
    assert got == expected
    assert repo.usage("base").size >= 100
    assert repo.recorded_usage("box") is None  # an active upper is measured, not recorded
    assert repo.usage("box").inodes >= 1


def test_readers_are_per_thread_read_only_and_closed_with_the_repo(tmp_path: Path) -> None:
    repo = Repo(tmp_path / "repo", background_removal=False)
    repo.prepare("a")
    conns: list[sqlite3.Connection] = []

    def grab() -> None:
        with repo.meta.reading() as q:
            conns.append(q._db)  # type: ignore[attr-defined]

    grab()
    grab()
    t = threading.Thread(target=grab)
    t.start()
    t.join()
    assert conns[0] is conns[1] and conns[0] is not conns[2] and conns[0] is not repo.meta._db
    with repo.meta.reading() as q, pytest.raises(sqlite3.OperationalError, match="readonly"):
        q._db.execute("DELETE FROM snapshots")  # type: ignore[attr-defined]
    assert repo.stat("a").kind is Kind.ACTIVE
    repo.close()
    with pytest.raises(sqlite3.ProgrammingError):
        conns[2].execute("SELECT 1")  # the other thread's reader was closed too
    with pytest.raises(sqlite3.ProgrammingError):
        with repo.meta.reading():
            pass


def test_an_open_read_does_not_stop_writes_and_sees_one_snapshot(repo: Repo) -> None:
    """The other direction: a reader in the middle of a read transaction (say a long List) does
    not block Prepare/Remove, and keeps seeing the state it started from."""
    repo.prepare("a")
    with repo.meta.reading() as q:
        assert [r.name for r in q.snapshots()] == ["a"]
        repo.prepare("b")
        repo.remove("a")
        assert [r.name for r in q.snapshots()] == ["a"]  # one consistent snapshot
    assert [i.name for i in repo.list()] == ["b"]


def test_reads_after_reopen_see_what_was_committed_before_a_kill(tmp_path: Path) -> None:
    """A repo dropped without close (the kill -9 case: readers never closed, WAL not checkpointed)
    reopens with every committed row, readable through the new readers."""
    root = tmp_path / "repo"
    r = Repo(root, background_removal=False)
    r.prepare("k1")
    r.commit("c1", "k1")
    r.prepare("k2", "c1")
    _ = r.stat("k2"), r.mounts("k2")  # readers opened on this thread
    r._lockfile.close()  # what the kernel does to a killed process's flock; nothing else is closed
    r2 = Repo(root, background_removal=False)
    try:
        assert r2.stat("k2").parent == "c1"
        assert [i.name for i in r2.list()] == ["c1", "k2"]
    finally:
        r2.close()
