"""A containerd client -> the snapshotter's event loop (issue 10, item 7): a List filter such as
``labels.x~=^(a|a)*$`` made Python's backtracking ``re`` run for minutes (2**n paths for a label
of n ``a`` and a ``b``) on the loop that serves every other snapshot call.

Through the real fractal snapshotter (its own env, so a regression wedges only that process,
which the env's teardown kills): the hostile List answers correctly, and a Stat sent while it
runs is answered.  The deadlines on the calls are liveness bounds (RE2 answers in microseconds;
the backtracking engine would need longer than the machine will run), not speed checks.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import grpc
import pytest

from ccpu.api.gen.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from ccpu.api.gen.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from hack.containerd_env import FractalEnv

EVIL = "labels.x~=/^(a|a)*$/"


@pytest.fixture(scope="module")
def snap() -> Iterator[pb_grpc.SnapshotsStub]:
    with FractalEnv(snapshotter=True) as env, \
            grpc.insecure_channel(f"unix:{env.snapshotter_address}") as ch:
        yield pb_grpc.SnapshotsStub(ch)


def _names(stub: pb_grpc.SnapshotsStub, filters: list[str]) -> list[str]:
    return [i.name for r in stub.List(pb.ListSnapshotsRequest(filters=filters), timeout=60)
            for i in r.info]


def test_backtracking_filter_neither_stalls_nor_misanswers(snap: pb_grpc.SnapshotsStub) -> None:
    snap.Prepare(pb.PrepareSnapshotRequest(key="redos", labels={"x": "a" * 64 + "b"}), timeout=30)
    try:
        with ThreadPoolExecutor(2) as pool:
            evil = pool.submit(_names, snap, [EVIL])
            # served while the hostile List is in flight (before: queued behind it, forever)
            assert snap.Stat(pb.StatSnapshotRequest(key="redos"), timeout=30).info.name == "redos"
            assert evil.result(90) == []
        assert _names(snap, ["labels.x~=/^(a|a)*b$/"]) == ["redos"]
    finally:
        snap.Remove(pb.RemoveSnapshotRequest(key="redos"), timeout=30)
