"""Remote mode's layer source: which blob a host layer dir is, read from containerd.

The remote machine gets layers as containerd's own compressed blobs (docs/remote.md, "Layers on
the machine").  For a container's stack of host repo dirs (``<repo>/layers/<id>``) the shim
needs, per layer, its chain ID (the repo's ``metadata.db`` names each layer dir by it) and the
blob that unpacks to it (digest, media type, size, diff ID: the manifests of containerd's
images).  The blob's bytes are read through containerd's **content API** (``Content.Read``),
not from its content dir: the API works whatever containerd's root is, honours namespaces (an
image of another namespace is never sent), and needs no read access to containerd's files --
the cost, a gRPC stream, is small next to the network transfer (hack/bench/remote.py).

Blocking calls (SQLite, gRPC): the caller runs them in a thread.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from typing import Any

from ccpu import errdefs


def chain_ids_of(repo_root: str, host_dirs: list[str]) -> list[str]:
    """The chain ID of every ``<repo_root>/layers/<id>`` dir, from the repo's metadata (read
    only).  A dir that is not a repo layer with a chain ID cannot be sent: FailedPrecondition."""
    layers = os.path.join(repo_root, "layers")
    ids: list[int] = []
    for d in host_dirs:
        parent, name = os.path.split(os.path.normpath(d))
        if parent != os.path.normpath(layers) or not name.isdigit():
            raise errdefs.FailedPrecondition(f"{d} is not a layer of the fractal repo ({layers}): a "
                                             "remote machine gets only repo layers")
        ids.append(int(name))
    db = os.path.join(repo_root, "metadata.db")
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        try:
            rows = dict(conn.execute(
                f"SELECT id, chain_id FROM layers WHERE id IN ({','.join('?' * len(ids))})", ids).fetchall())
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise errdefs.Unavailable(f"cannot read the fractal repo's {db}: {exc}") from None
    out = []
    for d, i in zip(host_dirs, ids):
        chain = rows.get(i)
        if not chain:
            raise errdefs.FailedPrecondition(f"layer {d} has no chain ID in the repo: it cannot be "
                                             "sent to a remote machine")
        out.append(str(chain))
    return out


class BlobSource:
    """containerd's images and content store, in the sandbox's namespace."""

    def __init__(self, address: str, namespace: str) -> None:
        self.address = address
        self.namespace = namespace
        self._client: Any = None
        self._known: dict[str, Any] = {}  # chain ID -> ccpu.client.images.LayerBlob

    def _connect(self) -> Any:
        if self._client is None:
            from shim.layers import grpc_without_fork_handlers

            grpc_without_fork_handlers()
            from ccpu.client.containerd import ContainerdClient

            self._client = ContainerdClient(self.address, self.namespace, timeout=30)
        return self._client

    def resolve(self, container: str, chain_ids: list[str]) -> dict[str, Any]:
        """The blob of every chain ID: the container's image first, then every image of the
        namespace (a live layer's).  One that no image has: FailedPrecondition."""
        from ccpu.client.containerd import ContainerdError
        from ccpu.client.images import image_blobs

        client = self._connect()
        wanted = [c for c in chain_ids if c not in self._known]
        if wanted:
            try:
                names = []
                try:
                    own = client.container(container).image
                    if own:
                        names.append(own)
                except ContainerdError:
                    pass
                names += [n for n in self._image_names(client) if n not in names]
                for name in names:
                    try:
                        for blob in image_blobs(client, name):
                            self._known.setdefault(blob.chain_id, blob)
                    except ContainerdError:
                        continue  # an image being removed, a foreign platform: not ours to send
                    if all(c in self._known for c in wanted):
                        break
            except ContainerdError as exc:
                raise errdefs.Unavailable(f"remote layers: {exc}") from None
        lacking = [c for c in chain_ids if c not in self._known]
        if lacking:
            raise errdefs.FailedPrecondition(
                f"no image in namespace {self.namespace!r} has the layer(s) {', '.join(lacking)}: "
                "their blobs cannot be sent to the remote machine")
        return {c: self._known[c] for c in chain_ids}

    @staticmethod
    def _image_names(client: Any) -> list[str]:
        from ccpu.api.gen.containerd.services.images.v1 import images_pb2, images_pb2_grpc

        stub = images_pb2_grpc.ImagesStub(client.channel)
        return [i.name for i in client.call(stub.List, images_pb2.ListImagesRequest()).images]

    def chunks(self, digest: str) -> Iterator[bytes]:
        from ccpu.client.images import read_blob

        return read_blob(self._connect(), digest)  # type: ignore[no-any-return]

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
