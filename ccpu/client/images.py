"""What an image is made of, read from containerd: its layers' chain IDs.

The repo names layers by chain ID (identity of a layer *on its parents*), the
same key containerd uses for the committed snapshots of an image.  So to find
an image's layer directories we read its manifest and config from containerd's
content store and fold the config's diff IDs into chain IDs (OCI image spec:
ChainID(L0) = DiffID(L0); ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln))).
"""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from .. import digest as digests
from ..api.gen.containerd.services.content.v1 import content_pb2, content_pb2_grpc
from ..api.gen.containerd.services.images.v1 import images_pb2, images_pb2_grpc
from .containerd import ContainerdClient, ContainerdError, NotFound

INDEX_TYPES = {
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
}


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    out: list[str] = []
    for d in diff_ids:
        out.append(d if not out else "sha256:" + hashlib.sha256(f"{out[-1]} {d}".encode()).hexdigest())
    return out


def _arch() -> str:
    m = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(m, m)


@dataclass(frozen=True, slots=True)
class ImageLayers:
    name: str
    manifest: str
    diff_ids: tuple[str, ...]
    chain_ids: tuple[str, ...]  # bottom first, as in the config


@dataclass(frozen=True, slots=True)
class LayerBlob:
    """One layer as containerd's content store keeps it: the compressed blob (digest, media
    type, size: the manifest's descriptor) and what it unpacks to (diff ID, chain ID)."""

    chain_id: str
    diff_id: str
    digest: str
    media_type: str
    size: int


def image_blobs(client: ContainerdClient, name: str) -> list[LayerBlob]:
    """Image `name`'s layers as blobs, bottom first (remote mode streams them to a machine)."""
    layers, manifest = _image(client, name)
    descs = manifest.get("layers", [])
    if not isinstance(descs, list) or len(descs) != len(layers.diff_ids):
        raise ContainerdError(f"image {name!r}: its manifest names {len(descs) if isinstance(descs, list) else '?'} "
                              f"layers, its config {len(layers.diff_ids)}")
    out = []
    for desc, diff, chain in zip(descs, layers.diff_ids, layers.chain_ids):
        try:
            dig = digests.check(desc.get("digest"), "layer digest")
        except (digests.InvalidDigest, AttributeError) as e:
            raise ContainerdError(f"image {name!r}: {e}") from None
        size = desc.get("size")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ContainerdError(f"image {name!r}: layer {dig} has no valid size")
        out.append(LayerBlob(chain, diff, dig, str(desc.get("mediaType", "")), size))
    return out


def read_blob(client: ContainerdClient, digest: str):  # type: ignore[no-untyped-def]
    """The blob's bytes from containerd's content store, in the chunks containerd sends."""
    content = content_pb2_grpc.ContentStub(client._channel)
    try:
        for r in content.Read(content_pb2.ReadContentRequest(digest=digest), metadata=client._md):
            yield r.data
    except grpc.RpcError as e:
        raise ContainerdError(f"cannot read {digest} from containerd's content store: {e.details()}") from None  # type: ignore[attr-defined]


def image_layers(client: ContainerdClient, name: str) -> ImageLayers:
    """The layers of image `name` in the client's namespace (NotFound -> ContainerdError)."""
    return _image(client, name)[0]


def image_target(client: ContainerdClient, name: str) -> tuple[str, str]:
    """(media type, digest) of image `name`'s target: the one lookup by name, which changes
    whenever the name is pointed elsewhere (NotFound -> ContainerdError)."""
    images = images_pb2_grpc.ImagesStub(client._channel)
    try:
        img = images.Get(images_pb2.GetImageRequest(name=name), metadata=client._md, timeout=client.timeout).image
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
            raise NotFound(f"image {name!r} not found in namespace {client.namespace!r}") from None
        raise ContainerdError(f"containerd: {e.details()}") from None  # type: ignore[attr-defined]
    return img.target.media_type, img.target.digest


def _image(client: ContainerdClient, name: str) -> tuple[ImageLayers, dict]:
    return target_layers(client, name, *image_target(client, name))


def target_layers(client: ContainerdClient, name: str, media: str, digest: str) -> tuple[ImageLayers, dict]:
    """The layers of the image whose target is ``digest`` (manifest or index) and its manifest:
    a function of the digest alone (content-addressed), read from the content store."""
    doc = _read_json(client, digest)
    if media in INDEX_TYPES or "manifests" in doc:
        want = _arch()
        for m in doc.get("manifests", []):
            p = m.get("platform") or {}
            if p.get("os", "linux") == "linux" and p.get("architecture") == want:
                digest = m["digest"]
                doc = _read_json(client, digest)
                break
        else:
            raise ContainerdError(f"image {name!r} has no linux/{want} manifest")
    config = _read_json(client, doc["config"]["digest"])
    try:  # the config is the image author's: its diff IDs become chain IDs we look up and label with
        diff_ids = tuple(digests.check(d, "diff ID") for d in config.get("rootfs", {}).get("diff_ids", []))
    except digests.InvalidDigest as e:
        raise ContainerdError(f"image {name!r}: {e}") from None
    return ImageLayers(name, digest, diff_ids, tuple(chain_ids(diff_ids))), doc


def _read_json(client: ContainerdClient, digest: str) -> dict:
    content = content_pb2_grpc.ContentStub(client._channel)
    try:
        data = b"".join(r.data for r in content.Read(content_pb2.ReadContentRequest(digest=digest),
                                                     metadata=client._md, timeout=client.timeout))
    except grpc.RpcError as e:
        raise ContainerdError(f"cannot read {digest} from containerd's content store: {e.details()}") from None  # type: ignore[attr-defined]
    return json.loads(data)
