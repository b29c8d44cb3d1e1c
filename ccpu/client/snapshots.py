"""The fractal snapshotter's layers, asked through containerd's Snapshots service.

`fractal layers` needs, for an image's chain IDs, the repo directories the shim should stack,
and for a container's stack which layer is which.  Both come from the snapshotter's own answers
(never from its metadata.db, whose schema and locking are the snapshotter's business):

* a committed snapshot is named by its chain ID and has no mounts of its own, so the
  directories of an image's layers are the lowerdirs of a short-lived *view* on its top
  snapshot (View, then Remove; no GC label, so a view left behind by a crash is collected by
  containerd's GC like any unreferenced snapshot);
* a container's own layers are the lowerdirs of its active snapshot's mounts, paired with the
  chain of its parents (Stat, one per layer);
* a layer's size is the Usage of its committed snapshot (the snapshotter answers it from its
  records, without walking the tree).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable
from typing import Any

from .. import digest as digests
from ..api.gen.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from ..api.gen.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from .containerd import ContainerdClient, ContainerdError, NotFound

VIEW_PREFIX = "fractal-cli-view-"
#: deepest parent chain followed (containerd's overlay limit is 128 layers; the repo's the same)
MAX_DEPTH = 500


def lowerdirs(mounts: Iterable[Any]) -> list[str]:
    """The read-only layer directories of a mount list, nearest first: an overlay's lowerdirs,
    or the source of a read-only bind (a one-layer view).  A writable bind has none."""
    for m in mounts:
        options = list(m.options)
        if m.type == "overlay":
            for o in options:
                if o.startswith("lowerdir="):
                    return [d for d in o.removeprefix("lowerdir=").split(":") if d]
            return []
        if m.type == "bind" and "ro" in options:
            return [m.source]
    return []


class Snapshots:
    """One snapshotter's snapshots in the client's namespace."""

    def __init__(self, client: ContainerdClient, snapshotter: str) -> None:
        self.client = client
        self.snapshotter = snapshotter
        self._stub = pb_grpc.SnapshotsStub(client.channel)

    def exists(self, key: str) -> bool:
        return self.created(key) is not None

    def created(self, key: str) -> int | None:
        """When snapshot ``key`` was created in this namespace (ns since the epoch, containerd's
        own record of it), or None if there is none.  A snapshot removed and made again gets a
        new time: with the key it names one snapshot's life, during which its layer
        directories cannot change (livelayers.Facts)."""
        try:
            info = self.client.call(self._stub.Stat, pb.StatSnapshotRequest(snapshotter=self.snapshotter, key=key)).info
        except NotFound:
            return None
        return int(info.created_at.seconds) * 1_000_000_000 + int(info.created_at.nanos)

    def parent(self, key: str) -> str:
        info = self.client.call(self._stub.Stat, pb.StatSnapshotRequest(snapshotter=self.snapshotter, key=key)).info
        return str(info.parent)

    def size(self, key: str) -> int | None:
        """Bytes of a committed snapshot's layer (None if the snapshotter cannot say)."""
        try:
            return int(self.client.call(self._stub.Usage, pb.UsageRequest(snapshotter=self.snapshotter, key=key)).size)
        except ContainerdError:
            return None

    def mounted_layers(self, key: str) -> list[str]:
        """The layer directories below an active or view snapshot, nearest first."""
        resp = self.client.call(self._stub.Mounts, pb.MountsRequest(snapshotter=self.snapshotter, key=key))
        return [os.path.normpath(d) for d in lowerdirs(resp.mounts)]

    def layers_of(self, top: str) -> list[str]:
        """The layer directories of committed snapshot ``top`` and its parents, nearest first,
        read from a view made and removed for the purpose."""
        key = f"{VIEW_PREFIX}{uuid.uuid4().hex}"
        resp = self.client.call(self._stub.View, pb.ViewSnapshotRequest(snapshotter=self.snapshotter, key=key,
                                                                         parent=top))
        try:
            return [os.path.normpath(d) for d in lowerdirs(resp.mounts)]
        finally:
            try:
                self.client.call(self._stub.Remove, pb.RemoveSnapshotRequest(snapshotter=self.snapshotter, key=key))
            except ContainerdError:
                pass  # unreferenced: containerd's GC removes it

    def chain(self, key: str) -> list[str]:
        """The chain IDs of the committed parents of ``key``, nearest first.  Committed
        snapshots of unpacked images are named by chain ID; a parent named otherwise (made by
        hand) ends the chain with an empty name in its place."""
        out: list[str] = []
        parent = self.parent(key)
        while parent and len(out) < MAX_DEPTH:
            try:
                out.append(digests.check(parent, "chain ID"))
            except digests.InvalidDigest:
                out.append("")
            parent = self.parent(parent)
        return out
