"""containerd.services.snapshots.v1.Snapshots over the repo.

Thin: each RPC validates nothing itself, makes one repo call and converts
the result.  Errors are mapped in snapshotter/errors.py.

Calls that only touch SQLite and make or rename a directory (well under a
millisecond) run on the event loop: measured with 8 concurrent clients, a hop
to a worker thread cost more in GIL hand-offs than the work itself.  The
reads among them (Stat, Mounts, Usage of a committed layer) take no lock
(Repo's reads use their thread's own read-only connection), so they never
block the loop behind a Commit or Cleanup holding the repo in a worker
thread.  The short writes (Prepare, View, Remove, Update) stay on the loop only while
the repo lock is free; when a worker thread holds it (a Commit or Cleanup walking a tree) they
wait for it in a thread of their own instead of stopping the loop (``Repo.if_free``).  Calls
that walk a directory tree (Commit and Usage of an active
snapshot measure disk use; Cleanup) run in worker threads so they never
stall the other clients.  So does List:
its cost grows with the repo and with the client's filters (a regexp per
snapshot), and it gets at most ``list_deadline`` seconds of work before it
answers DeadlineExceeded (containerd's own List has no bound; ours must not
let one client keep a thread and the repo busy forever).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, TypeVar

import grpc
from google.protobuf import empty_pb2

from ccpu.api.gen.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from ccpu.api.gen.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from ccpu.repo import Repo, SnapshotInfo

from . import convert
from .errors import DeadlineExceeded, streaming, unary

log = logging.getLogger(__name__)
T = TypeVar("T")

LIST_BATCH = 100  # containerd's own proxy server sends Infos in batches of this size
#: seconds of work a List may take (matching thousands of snapshots takes milliseconds)
LIST_DEADLINE = 10.0


def list_batches(infos: Iterable[SnapshotInfo], deadline: float) -> list[pb.ListSnapshotsResponse]:
    """The List answer, built in a worker thread; DeadlineExceeded once ``time.monotonic()``
    passes ``deadline`` (checked between snapshots: each match is linear, RE2)."""
    out: list[pb.ListSnapshotsResponse] = []
    batch: list[SnapshotInfo] = []
    for info in infos:
        if time.monotonic() > deadline:
            raise DeadlineExceeded("List took longer than the snapshotter allows; use narrower filters")
        batch.append(info)
        if len(batch) == LIST_BATCH:
            out.append(pb.ListSnapshotsResponse(info=[convert.info_pb(x) for x in batch]))
            batch = []
    if batch:
        out.append(pb.ListSnapshotsResponse(info=[convert.info_pb(x) for x in batch]))
    return out


class SnapshotsService(pb_grpc.SnapshotsServicer):
    def __init__(self, repo: Repo, list_deadline: float = LIST_DEADLINE) -> None:
        self.repo = repo
        self.list_deadline = list_deadline

    async def _write(self, fn: Callable[..., T], *args: Any) -> T:
        """A short write: on the event loop when the repo lock is free, else in a worker thread
        (a Commit or Cleanup holds it there: waiting on the loop would stop every client)."""
        done, out = self.repo.if_free(fn, *args)
        if done:
            return out  # type: ignore[return-value]
        return await asyncio.to_thread(fn, *args)

    @unary
    async def Prepare(self, request: pb.PrepareSnapshotRequest, context: grpc.aio.ServicerContext) -> pb.PrepareSnapshotResponse:
        mounts = await self._write(self.repo.prepare, request.key, request.parent, dict(request.labels))
        return pb.PrepareSnapshotResponse(mounts=convert.mounts_pb(mounts))

    @unary
    async def View(self, request: pb.ViewSnapshotRequest, context: grpc.aio.ServicerContext) -> pb.ViewSnapshotResponse:
        mounts = await self._write(self.repo.view, request.key, request.parent, dict(request.labels))
        return pb.ViewSnapshotResponse(mounts=convert.mounts_pb(mounts))

    @unary
    async def Mounts(self, request: pb.MountsRequest, context: grpc.aio.ServicerContext) -> pb.MountsResponse:
        mounts = self.repo.mounts(request.key)
        return pb.MountsResponse(mounts=convert.mounts_pb(mounts))

    @unary
    async def Commit(self, request: pb.CommitSnapshotRequest, context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        await asyncio.to_thread(self.repo.commit, request.name, request.key, dict(request.labels))
        return empty_pb2.Empty()

    @unary
    async def Remove(self, request: pb.RemoveSnapshotRequest, context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        await self._write(self.repo.remove, request.key)
        return empty_pb2.Empty()

    @unary
    async def Stat(self, request: pb.StatSnapshotRequest, context: grpc.aio.ServicerContext) -> pb.StatSnapshotResponse:
        info = self.repo.stat(request.key)
        return pb.StatSnapshotResponse(info=convert.info_pb(info))

    @unary
    async def Update(self, request: pb.UpdateSnapshotRequest, context: grpc.aio.ServicerContext) -> pb.UpdateSnapshotResponse:
        info = convert.info_from_pb(request.info)
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
        updated = await self._write(self.repo.update, info, paths)
        return pb.UpdateSnapshotResponse(info=convert.info_pb(updated))

    @streaming
    async def List(self, request: pb.ListSnapshotsRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ListSnapshotsResponse]:
        filters = list(request.filters)
        deadline = time.monotonic() + self.list_deadline
        # parsing the filters, reading the rows and matching them all run in the thread
        for batch in await asyncio.to_thread(
                lambda: list_batches(self.repo.list(filters), deadline)):
            yield batch

    @unary
    async def Usage(self, request: pb.UsageRequest, context: grpc.aio.ServicerContext) -> pb.UsageResponse:
        usage = self.repo.recorded_usage(request.key)  # a committed layer's: one row, no walk
        if usage is None:  # an active snapshot: its upper is measured, off the event loop
            usage = await asyncio.to_thread(self.repo.usage, request.key)
        return pb.UsageResponse(size=usage.size, inodes=usage.inodes)

    @unary
    async def Cleanup(self, request: pb.CleanupRequest, context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        await asyncio.to_thread(self.repo.recover)
        return empty_pb2.Empty()


def add_to_server(repo: Repo, server: grpc.aio.Server) -> SnapshotsService:
    svc = SnapshotsService(repo)
    pb_grpc.add_SnapshotsServicer_to_server(svc, server)
    return svc
