"""The snapshotter's List RPC (snapshotter/service.py) over a real grpc.aio server on a unix
socket, with a stand-in repo: List's work runs off the event loop, and is bounded."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from ccpu.api.gen.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from ccpu.api.gen.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from ccpu.repo import Kind, SnapshotInfo
from snapshotter.service import LIST_BATCH, SnapshotsService


def _info(name: str) -> SnapshotInfo:
    return SnapshotInfo(name, Kind.COMMITTED, "", {"n": name}, 1, 1)


class BlockingRepo:
    """``list`` blocks (in whatever thread runs it) until ``stat`` was answered."""

    def __init__(self) -> None:
        self.listing = threading.Event()
        self.stat_answered = threading.Event()

    def list(self, filters: list[str]) -> Iterator[SnapshotInfo]:
        self.listing.set()
        self.stat_answered.wait(20)
        yield _info("a")

    def stat(self, key: str) -> SnapshotInfo:
        self.stat_answered.set()
        return _info(key)


class EndlessRepo:
    """A List whose matching never ends within the bound (capped so old code terminates)."""

    def list(self, filters: list[str]) -> Iterator[SnapshotInfo]:
        for i in range(400):
            time.sleep(0.01)
            yield _info(f"s{i}")


class Served:
    """The service on a grpc.aio server in a thread of its own (its own event loop), so a
    blocked loop shows as an unanswered call from the test's (synchronous) client."""

    def __init__(self, repo: Any, tmp_path: Path, **kw: Any) -> None:
        self.address = f"unix:{tmp_path}/snap.sock"
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        async def serve() -> None:
            self.stopping = asyncio.Event()
            self.server = grpc.aio.server()
            pb_grpc.add_SnapshotsServicer_to_server(SnapshotsService(repo, **kw), self.server)
            self.server.add_insecure_port(self.address)
            await self.server.start()
            started.set()
            await self.stopping.wait()
            await self.server.stop(None)

        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(serve(),))
        self.thread.start()
        assert started.wait(10)
        self.channel = grpc.insecure_channel(self.address)
        self.stub = pb_grpc.SnapshotsStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.loop.call_soon_threadsafe(self.stopping.set)
        self.thread.join(30)
        assert not self.thread.is_alive(), "the server did not stop"
        self.loop.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Any]:
    made: list[Served] = []

    def make(repo: Any, **kw: Any) -> Served:
        made.append(Served(repo, tmp_path, **kw))
        return made[-1]

    yield make
    for s in made:
        s.close()


def test_list_runs_off_the_event_loop(served: Any) -> None:
    """A Stat is answered while a List is still working (before: List ran on the event loop,
    so the Stat waited for it -- here until its deadline, as the List waits for the Stat)."""
    repo = BlockingRepo()
    srv = served(repo)
    with ThreadPoolExecutor(1) as pool:
        listing = pool.submit(lambda: [i.name for r in srv.stub.List(pb.ListSnapshotsRequest(),
                                                                     timeout=30) for i in r.info])
        assert repo.listing.wait(20)
        st = srv.stub.Stat(pb.StatSnapshotRequest(key="k"), timeout=5)
        assert st.info.name == "k"
        assert listing.result(30) == ["a"]


def test_list_is_bounded(served: Any) -> None:
    srv = served(EndlessRepo(), list_deadline=0.2)
    with pytest.raises(grpc.RpcError) as exc:
        for _ in srv.stub.List(pb.ListSnapshotsRequest(), timeout=30):
            pass
    assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, exc.value
    assert "List took longer" in (exc.value.details() or "")


def test_list_batches(served: Any) -> None:
    class ManyRepo:
        def list(self, filters: list[str]) -> Iterator[SnapshotInfo]:
            return iter([_info(f"s{i}") for i in range(LIST_BATCH * 2 + 1)])

    srv = served(ManyRepo())
    sizes = [len(r.info) for r in srv.stub.List(pb.ListSnapshotsRequest(), timeout=30)]
    assert sizes == [LIST_BATCH, LIST_BATCH, 1]


def test_a_write_waiting_for_the_repo_lock_does_not_stop_the_event_loop(served: Any, tmp_path: Path) -> None:
    """A Prepare (and a Remove) arriving while a worker thread holds the repo lock -- a Commit or
    Cleanup walking a tree -- waits in a thread of its own: a Stat is answered meanwhile (before:
    the Prepare waited for the lock on the event loop, and the Stat with it, until the walk
    ended; here the walk ends only after the Stat, so the Stat's call timed out)."""
    from ccpu.repo import Repo

    repo = Repo(tmp_path / "repo", background_removal=False)
    try:
        repo.prepare("base-key")
        repo.commit("base", "base-key")
        srv = served(repo)
        release = threading.Event()
        held = threading.Event()
        entered = threading.Event()
        prepare = repo.prepare

        def noted_prepare(*a: Any) -> Any:  # the Prepare has reached the repo (and its lock)
            entered.set()
            return prepare(*a)

        repo.prepare = noted_prepare  # type: ignore[method-assign]

        def walk() -> None:  # stands in for Commit/Cleanup holding the lock in a worker thread
            with repo._lock:
                held.set()
                release.wait(60)

        walker = threading.Thread(target=walk)
        walker.start()
        try:
            assert held.wait(10)
            with ThreadPoolExecutor(2) as pool:
                prep = pool.submit(srv.stub.Prepare, pb.PrepareSnapshotRequest(key="box", parent="base"),
                                   timeout=60)
                assert entered.wait(20)
                rm = pool.submit(srv.stub.Remove, pb.RemoveSnapshotRequest(key="nothing"), timeout=60)
                st = srv.stub.Stat(pb.StatSnapshotRequest(key="base"), timeout=20)  # a stuck-bound only
                assert st.info.name == "base"
                assert not prep.done()  # it does wait for the lock, off the loop
                release.set()
                assert prep.result(60).mounts
                with pytest.raises(grpc.RpcError) as exc:
                    rm.result(60)
                assert exc.value.code() == grpc.StatusCode.NOT_FOUND
        finally:
            release.set()
            walker.join(30)
        assert repo.stat("box").parent == "base"
        # with the lock free, writes still run (on the loop) as before
        srv.stub.Remove(pb.RemoveSnapshotRequest(key="box"), timeout=20)
    finally:
        repo.close()
