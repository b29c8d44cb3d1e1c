"""The containerd side of live layers (docs/live-layers.md): which layers an image has, where
the repo keeps them, the GC label that keeps them, and the names of a container's own layers.

Shared by ``fractal layers`` (ccpu/cli/layers.py: ``ls``, ``rm``, and ``add`` against an older
shim) and the shim's ``AddImages`` (shim/layers.py), which does these lookups itself so that
``fractal layers add`` needs no gRPC in its own process (issue 13).  Blocking gRPC calls: the
shim runs them in a thread.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from ..layersapi import gc_label
from .containerd import ContainerdClient, ContainerdError, ContainerRecord, NotFound
from .images import ImageLayers, image_target, target_layers
from .snapshots import Snapshots


class LiveLayersError(ContainerdError):
    """A lookup that cannot be done; the message is for the user."""


@dataclass
class Planned:
    """What adding images means: the layers to stack (nearest first) and the labels they need."""

    layers: list[dict[str, Any]]
    labels: dict[str, str]  # label -> chain ID, only those the container does not have yet


class Facts:
    """What a long-lived caller (the shim) may remember between requests, because it cannot
    change while its key holds -- every lookup by NAME (image name -> target digest, is the
    snapshot still there) is still asked each time:

    * ``image``: an image target digest -> its layers (chain IDs).  Content-addressed: the
      bytes of a digest never change, so neither does the manifest they are, the config it
      names, nor the chain IDs folded from that config's diff IDs (the platform chosen from an
      index is this machine's, fixed for the process).
    * ``dirs``: (namespace, snapshotter, top chain ID, the top snapshot's creation time) -> the
      repo directories of its layers.  While a committed snapshot exists its parents exist and
      its backing layers cannot change or go (a snapshot with children cannot be removed; a
      committed one is immutable); containerd stamps each new snapshot record with its creation
      time, so the same key with the same time is the same snapshot -- one removed and pulled
      again misses (its dirs may differ).  The time is read by the Stat that checks the image
      is unpacked, which is asked anyway.
    * ``size``: (snapshotter, layer directory) -> its unpacked size: a repo names each layer
      directory once (its ids are never reused) and a committed layer's recorded size never
      changes.

    Bounded (least recently used out); thread-safe (the shim asks from worker threads).  With
    ``directory`` (the shims' run dir, root's only) the facts are also kept there, one small
    JSON file each, so that every shim -- one per sandbox, each new -- finds what another
    learnt: a container's first ``layers add`` is then as cheap as its later ones.  What a
    file says is checked for shape on reading; anything else reads as unknown."""

    def __init__(self, limit: int = 512, directory: str | None = None) -> None:
        self.limit = limit
        self.directory = directory
        self._maps: dict[str, OrderedDict[Any, Any]] = {k: OrderedDict() for k in ("image", "dirs", "size")}
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, kind: str, key: Any) -> Any:
        with self._lock:
            m = self._maps[kind]
            if key in m:
                m.move_to_end(key)
                self.hits += 1
                return m[key]
        value = self._read(kind, key)
        with self._lock:
            if value is None:
                self.misses += 1
                return None
            self.hits += 1
            self._keep(kind, key, value)
            return value

    def put(self, kind: str, key: Any, value: Any) -> None:
        with self._lock:
            self._keep(kind, key, value)
        self._write(kind, key, value)

    def _keep(self, kind: str, key: Any, value: Any) -> None:
        m = self._maps[kind]
        m[key] = value
        m.move_to_end(key)
        while len(m) > self.limit:
            m.popitem(last=False)

    # -- the shared copy ------------------------------------------------------------------

    def _path(self, kind: str, key: Any) -> str:
        import hashlib
        import json

        name = hashlib.sha256(json.dumps([kind, list(key) if isinstance(key, tuple) else key]).encode()).hexdigest()
        return os.path.join(self.directory or "", f"{kind}-{name}.json")

    def _trusted_dir(self) -> bool:
        """Only a directory of this user's that no one else may write is read (its facts name
        the host dirs a container gets)."""
        try:
            st = os.stat(self.directory)  # type: ignore[arg-type]
        except OSError:
            return False
        return st.st_uid == os.geteuid() and not st.st_mode & 0o022

    def _read(self, kind: str, key: Any) -> Any:
        if self.directory is None or not self._trusted_dir():
            return None
        import json

        try:
            with open(self._path(kind, key), encoding="utf-8") as f:
                doc = json.loads(f.read(MAX_FACT_BYTES + 1)[:MAX_FACT_BYTES])
        except (OSError, ValueError):
            return None
        try:  # the key is in the file too: a hash collision or a stray file reads as unknown
            if doc["key"] != (list(key) if isinstance(key, tuple) else key):
                return None
            return _from_json(kind, doc["value"])
        except (KeyError, TypeError, ValueError):
            return None

    def _write(self, kind: str, key: Any, value: Any) -> None:
        if self.directory is None:
            return
        import json

        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            path = self._path(kind, key)
            tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"key": list(key) if isinstance(key, tuple) else key, "value": _to_json(kind, value)}, f)
            os.replace(tmp, path)  # a reader sees a whole file or none
            self._prune()
        except OSError:
            pass  # only a shortcut is lost

    def _prune(self) -> None:
        """At most ``4 x limit`` files: the oldest half goes when there are more."""
        names = [n for n in os.listdir(self.directory) if n.endswith(".json")]  # type: ignore[arg-type]
        if len(names) <= 4 * self.limit:
            return
        paths = [os.path.join(self.directory, n) for n in names]  # type: ignore[arg-type]
        stamped = []
        for p in paths:
            try:
                stamped.append((os.stat(p).st_mtime_ns, p))
            except OSError:
                continue
        for _, p in sorted(stamped)[: len(stamped) // 2]:
            try:
                os.unlink(p)
            except OSError:
                pass


#: a fact file bigger than this is not one of ours (an image of 128 layers is ~20 KiB)
MAX_FACT_BYTES = 256 << 10


def _to_json(kind: str, value: Any) -> Any:
    if kind == "image":
        return {"manifest": value.manifest, "diff_ids": list(value.diff_ids), "chain_ids": list(value.chain_ids)}
    if kind == "dirs":
        return [list(pair) for pair in value]
    return value


def _from_json(kind: str, doc: Any) -> Any:
    """A fact read back, its shape checked (a wrong one raises TypeError/ValueError)."""
    from .. import digest as digests

    if kind == "image":
        diff_ids = tuple(digests.check(d, "diff ID") for d in doc["diff_ids"])
        chain = tuple(digests.check(d, "chain ID") for d in doc["chain_ids"])
        if len(chain) != len(diff_ids) or not isinstance(doc["manifest"], str):
            raise ValueError("inconsistent image fact")
        return ImageLayers("", doc["manifest"], diff_ids, chain)
    if kind == "dirs":
        pairs = tuple((str(d), digests.check(c, "chain ID")) for d, c in doc)
        if not all(os.path.isabs(d) for d, _ in pairs):
            raise ValueError("a layer dir must be absolute")
        return pairs
    if isinstance(doc, bool) or not isinstance(doc, int) or doc < 0:
        raise ValueError("a size is a non-negative int")
    return doc


class Lookups:
    """containerd lookups about one container (``container``: its record) for one request;
    ``facts``: what the shim remembers between requests (:class:`Facts`), if anything."""

    def __init__(self, client: ContainerdClient, container: ContainerRecord, *,
                 what: str = "change layers of", facts: Facts | None = None,
                 own: dict[str, str] | None = None) -> None:
        self.client = client
        self.container = container
        self.what = what
        self.facts = facts
        self.snapshots = Snapshots(client, container.snapshotter)
        self._own: dict[str, str] | None = own
        self._sizes: dict[str, int | None] = {}
        self._created: dict[str, int] = {}  # top chain ID -> its snapshot's creation time

    def size(self, chain_id: str, layer_dir: str | None = None) -> int | None:
        """The unpacked size of a layer, by chain ID (asked once per request; with its
        directory, remembered in ``facts``)."""
        key = None if layer_dir is None or self.facts is None else (self.container.snapshotter,
                                                                    os.path.normpath(layer_dir))
        if key is not None:
            known = self.facts.get("size", key)  # type: ignore[union-attr]
            if known is not None:
                return int(known)
        if chain_id not in self._sizes:
            self._sizes[chain_id] = self.snapshots.size(chain_id)
        if key is not None and self._sizes[chain_id] is not None:
            self.facts.put("size", key, self._sizes[chain_id])  # type: ignore[union-attr]
        return self._sizes[chain_id]

    def find_image(self, ref: str) -> tuple[ImageLayers | None, str]:
        """(the image's layers, "") if it is usable now, else (None, why not): not in the
        namespace, or not unpacked for the container's snapshotter (both fixed by a pull)."""
        try:
            media, digest = image_target(self.client, ref)
        except NotFound:
            return None, f"is not in namespace {self.client.namespace!r}"
        layers = self.facts.get("image", digest) if self.facts is not None else None
        if layers is None:
            layers = target_layers(self.client, ref, media, digest)[0]
            if self.facts is not None:
                self.facts.put("image", digest, layers)
        layers = ImageLayers(ref, layers.manifest, layers.diff_ids, layers.chain_ids)
        if not layers.chain_ids:
            raise LiveLayersError(f"image {ref} has no layers")
        created = self.snapshots.created(layers.chain_ids[-1])
        if created is None:
            return None, f"is not unpacked for the {self.container.snapshotter} snapshotter"
        self._created[layers.chain_ids[-1]] = created
        return layers, ""

    def layer_dirs(self, ref: str, chain_ids: tuple[str, ...]) -> list[tuple[str, str]]:
        """(dir, chain ID) of every layer of an unpacked image, top first."""
        top = chain_ids[-1]
        key = None
        if self.facts is not None and top in self._created:
            key = (self.client.namespace, self.container.snapshotter, top, self._created[top])
            known = self.facts.get("dirs", key)
            if known is not None:
                return list(known)
        dirs = self.snapshots.layers_of(top)
        if len(dirs) != len(chain_ids):
            raise LiveLayersError(f"cannot {self.what} {self.container.id}: the {self.container.snapshotter} "
                               f"snapshotter shows {len(dirs)} layer directories for the {len(chain_ids)} "
                               f"layers of {ref} (not a fractal snapshotter?)")
        out = list(zip(dirs, reversed(chain_ids)))
        if key is not None:
            self.facts.put("dirs", key, tuple(out))  # type: ignore[union-attr]
        return out

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
                layers.append({"dir": d, "chain_id": chain, "image": ref, "size": self.size(chain, d),
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

    def own_known(self) -> dict[str, str] | None:
        """The container's own layers if this request named them (for the caller to keep)."""
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
                "size": size if isinstance(size, int) or not chain else self.size(chain, d)}
