"""The containerd side of live layers (docs/live-layers.md): which layers an image has, where
the repo keeps them, the GC label that keeps them, and the names of a container's own layers.

Shared by ``fractal layers`` (ccpu/cli/layers.py: ``ls``, ``rm``, and ``add`` against an older
shim) and the shim's ``AddImages`` (shim/layers.py), which does these lookups itself so that
``fractal layers add`` needs no gRPC in its own process (issue 13).  Blocking gRPC calls: the
shim runs them in a thread.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..layersapi import gc_label
from .containerd import ContainerdClient, ContainerdError, ContainerRecord, NotFound
from .images import ImageLayers, image_layers
from .snapshots import Snapshots


class LiveLayersError(ContainerdError):
    """A lookup that cannot be done; the message is for the user."""


@dataclass
class Planned:
    """What adding images means: the layers to stack (nearest first) and the labels they need."""

    layers: list[dict[str, Any]]
    labels: dict[str, str]  # label -> chain ID, only those the container does not have yet


class Lookups:
    """containerd lookups about one container (``container``: its record) for one request."""

    def __init__(self, client: ContainerdClient, container: ContainerRecord, *,
                 what: str = "change layers of") -> None:
        self.client = client
        self.container = container
        self.what = what
        self.snapshots = Snapshots(client, container.snapshotter)
        self._own: dict[str, str] | None = None
        self._sizes: dict[str, int | None] = {}

    def size(self, chain_id: str) -> int | None:
        """The unpacked size of a layer, by chain ID (asked once per request)."""
        if chain_id not in self._sizes:
            self._sizes[chain_id] = self.snapshots.size(chain_id)
        return self._sizes[chain_id]

    def _image_exists(self, ref: str) -> bool:
        from ..api.gen.containerd.services.images.v1 import images_pb2, images_pb2_grpc

        stub = images_pb2_grpc.ImagesStub(self.client.channel)
        try:
            self.client.call(stub.Get, images_pb2.GetImageRequest(name=ref))
        except NotFound:
            return False
        return True

    def find_image(self, ref: str) -> tuple[ImageLayers | None, str]:
        """(the image's layers, "") if it is usable now, else (None, why not): not in the
        namespace, or not unpacked for the container's snapshotter (both fixed by a pull)."""
        if not self._image_exists(ref):
            return None, f"is not in namespace {self.client.namespace!r}"
        layers = image_layers(self.client, ref)
        if not layers.chain_ids:
            raise LiveLayersError(f"image {ref} has no layers")
        if not self.snapshots.exists(layers.chain_ids[-1]):
            return None, f"is not unpacked for the {self.container.snapshotter} snapshotter"
        return layers, ""

    def layer_dirs(self, ref: str, chain_ids: tuple[str, ...]) -> list[tuple[str, str]]:
        """(dir, chain ID) of every layer of an unpacked image, top first."""
        dirs = self.snapshots.layers_of(chain_ids[-1])
        if len(dirs) != len(chain_ids):
            raise LiveLayersError(f"cannot {self.what} {self.container.id}: the {self.container.snapshotter} "
                               f"snapshotter shows {len(dirs)} layer directories for the {len(chain_ids)} "
                               f"layers of {ref} (not a fractal snapshotter?)")
        return list(zip(dirs, reversed(chain_ids)))

    def plan(self, images: list[tuple[str, ImageLayers]], present: set[str]) -> Planned:
        """The layers of ``images`` (first on top) not in ``present`` (normalized dirs)."""
        have = set(present)
        layers: list[dict[str, Any]] = []
        labels: dict[str, str] = {}
        for ref, img in images:
            label = gc_label(self.container.snapshotter, img.chain_ids[-1])
            labels[label] = img.chain_ids[-1]
            for d, chain in self.layer_dirs(ref, img.chain_ids):  # top first
                if d in have:
                    continue
                have.add(d)
                layers.append({"dir": d, "chain_id": chain, "image": ref, "size": self.size(chain),
                               "gc_label": label})
        used = {la["gc_label"] for la in layers}
        new = {k: v for k, v in labels.items() if k in used and self.container.labels.get(k) != v}
        return Planned(layers, new)

    def own_layers(self) -> dict[str, str]:
        """dir -> chain ID of the layers the container was created with (once per request): the
        lowerdirs of its snapshot's mounts, paired with its snapshot's parents."""
        if self._own is None:
            self._own = {}
            try:
                dirs = self.snapshots.mounted_layers(self.container.snapshot_key)
                chain = self.snapshots.chain(self.container.snapshot_key)
            except ContainerdError:
                return self._own  # the snapshot may be gone: its layers are then shown without names
            if len(dirs) == len(chain):
                self._own = {d: c for d, c in zip(dirs, chain) if c}
        return self._own

    def named(self, entry: dict[str, Any]) -> dict[str, Any]:
        """A stack entry (layersmsg's layer dict) with the chain ID, image and size of a layer
        the container was created with filled in."""
        d = os.path.normpath(entry["dir"])
        own = self.own_layers()
        chain = entry.get("chain_id") or own.get(d, "")
        size = entry.get("size")
        return {**entry, "chain_id": chain,
                "image": entry.get("image") or ("" if entry.get("live") or d not in own else self.container.image),
                "size": size if isinstance(size, int) or not chain else self.size(chain)}
