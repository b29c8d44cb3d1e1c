"""Conversions between repo values and containerd's protobuf messages."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from ccpu.api.gen.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from ccpu.api.gen.containerd.types import mount_pb2
from ccpu.repo import Kind, Mount, SnapshotInfo


def timestamp(ns: int) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(ns)
    return ts


def mounts_pb(mounts: list[Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, target=m.target, options=list(m.options)) for m in mounts]


def info_pb(info: SnapshotInfo) -> pb.Info:
    return pb.Info(
        name=info.name,
        parent=info.parent,
        kind=int(info.kind),
        created_at=timestamp(info.created_ns),
        updated_at=timestamp(info.updated_ns),
        labels=info.labels,
    )


def info_from_pb(msg: pb.Info) -> SnapshotInfo:
    return SnapshotInfo(
        name=msg.name,
        kind=Kind(msg.kind) if msg.kind in Kind._value2member_map_ else Kind.UNKNOWN,
        parent=msg.parent,
        labels=dict(msg.labels),
    )
