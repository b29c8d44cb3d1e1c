"""`fractal layers ls|add|rm`: change the layers of a RUNNING container (docs/live-layers.md).

The container's shim serves ``fractal.layers.v1.Layers`` (shim/layers.py, protocol names in
ccpu/layersapi.py) on its ttrpc socket, found through the sandbox record the shim writes
(ccpu.sandboxes).  This side does what needs containerd and the snapshotter:

* which layers an image has (chain IDs from containerd's content store, ccpu.client.images) and
  where the repo keeps them: the snapshotter says, through containerd's Snapshots service
  (ccpu.client.snapshots); the CLI never opens the repo's metadata.db;
* pulling an image that is not in the namespace (or not unpacked for the container's
  snapshotter) with ``ctr images pull --snapshotter S`` -- containerd 1.6 fetches and unpacks
  on the client side (Go code in ctr), so there is no API to ask containerd to do it;
* keeping the added layers alive: a GC reference label on the CONTAINER,
  ``containerd.io/gc.ref.snapshot.<snapshotter>/live-<12 hex of the image's top chain ID>`` =
  that chain ID (the committed snapshot's key in the namespace; its parents follow).  Set before
  the layers are added, removed after they are removed; it goes with the container record.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

from ..client.containerd import FRACTAL_RUNTIME, ContainerdClient, ContainerdError, ContainerRecord
from ..client.snapshots import Snapshots
from ..layersapi import SERVICE, BadPosition
from ..layersapi import parse_position as _parse_position
from .common import add_containerd_flags, add_json_flag, human, print_json

GC_LABEL_PREFIX = "containerd.io/gc.ref.snapshot."
LIVE_LABEL_MARK = "/live-"
SHIM_TIMEOUT = 60.0


class LayersError(ContainerdError):
    """A `fractal layers` request that cannot be done; the message is for the user."""


def gc_label(snapshotter: str, top_chain_id: str) -> str:
    """The container label that keeps an added image's snapshots (and so its repo layers)."""
    return f"{GC_LABEL_PREFIX}{snapshotter}{LIVE_LABEL_MARK}{short(top_chain_id, 12)}"


def short(chain_id: str, n: int = 12) -> str:
    return chain_id.split(":", 1)[-1][:n]


def parse_position(text: str) -> str | int:
    """--position's argparse type: a bad one is a usage error (exit 2), as the shim would refuse it."""
    try:
        return _parse_position(text)
    except BadPosition as e:
        raise argparse.ArgumentTypeError(str(e)) from None


@dataclass
class Layer:
    dir: str
    live: bool
    chain_id: str = ""
    image: str = ""
    size: int | None = None
    added_at: int | None = None
    gc_label: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"dir": self.dir, "live": self.live, "chain_id": self.chain_id or None,
                "image": self.image or None, "size": self.size, "added_at": self.added_at}


@dataclass
class Stack:
    container: str
    upper: str | None
    layers: list[Layer]  # top first
    raw: dict[str, Any] = field(default_factory=dict)


# -- the shim ------------------------------------------------------------------------------------


async def _call_async(address: str, method: str, payload: dict[str, Any], timeout: float) -> dict[str, Any]:
    from .. import layersmsg
    from ..ttrpc import Client

    client = await Client.connect(address, timeout=5.0)
    try:
        resp = await client.call(SERVICE, method, layersmsg.request(method, payload),
                                 layersmsg.Stack, timeout=timeout)
    finally:
        await client.close()
    return layersmsg.answer_dict(resp)


def shim_call(address: str, method: str, payload: dict[str, Any], *, timeout: float = SHIM_TIMEOUT,
              what: str = "change layers of") -> dict[str, Any]:
    """One call of the shim's Layers service; errors become LayersError with the shim's reason."""
    from ..ttrpc import Code, TtrpcError

    try:
        return asyncio.run(_call_async(address, method, payload, timeout))
    except TtrpcError as e:
        cid = payload.get("container", "?")
        if e.code == Code.UNIMPLEMENTED:
            raise LayersError(f"cannot {what} {cid}: its shim does not serve live layers "
                              "(started by an older fractal; restart the container)") from None
        if e.code == Code.UNAVAILABLE:
            raise LayersError(f"cannot {what} {cid}: its shim does not answer ({e.message})") from None
        raise LayersError(f"cannot {what} {cid}: {e.message}") from None


# -- a session on one container --------------------------------------------------------------------


class Session:
    """containerd + the container's record + its shim, for one command."""

    def __init__(self, address: str, namespace: str, container_id: str, *, what: str = "change layers of") -> None:
        self.address = address
        self.namespace = namespace
        self.what = what
        self.client = ContainerdClient(address, namespace)
        try:
            self.container = self._find(container_id)
            self.shim = self._shim_address(self.container)
        except BaseException:
            self.client.close()
            raise
        self.snapshots = Snapshots(self.client, self.container.snapshotter)
        self._own: dict[str, str] | None = None
        self._sizes: dict[str, int | None] = {}

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _find(self, cid: str) -> ContainerRecord:
        try:
            c = self.client.container(cid)
        except ContainerdError as e:
            if "not found" in str(e):
                raise LayersError(f"cannot {self.what} {cid}: no such container in namespace "
                                  f"{self.namespace!r}") from None
            raise
        if c.runtime != FRACTAL_RUNTIME:
            raise LayersError(f"cannot {self.what} {cid}: it is not run by the fractal runtime "
                              f"(runtime {c.runtime or '?'}, want {FRACTAL_RUNTIME})")
        tasks = self.client.tasks()
        t = tasks.get(cid)
        if t is None or t.status not in ("running", "paused", "created"):
            raise LayersError(f"cannot {self.what} {cid}: it has no running task "
                              f"({t.status if t else 'no task'})")
        return c

    def _shim_address(self, c: ContainerRecord) -> str:
        from .. import sandboxes
        from ..grouping import sandbox_group

        group = sandbox_group(c.id, c.annotations)
        rec = sandboxes.read_all(self.namespace).get(group)
        if rec is None or not rec.alive:
            raise LayersError(f"cannot {self.what} {c.id}: no live fractal shim for its sandbox "
                              f"{group!r} under {sandboxes.run_dir()} (FRACTAL_RUN_DIR)")
        if not rec.address:
            raise LayersError(f"cannot {self.what} {c.id}: its shim (pid {rec.shim_pid}) does not "
                              "serve live layers (started by an older fractal; restart the container)")
        return rec.address

    # -- the snapshotter ------------------------------------------------------------------

    def size(self, chain_id: str) -> int | None:
        """The unpacked size of a layer, by chain ID (asked once per session)."""
        if chain_id not in self._sizes:
            self._sizes[chain_id] = self.snapshots.size(chain_id)
        return self._sizes[chain_id]

    def image_layer_dirs(self, ref: str, chain_ids: tuple[str, ...]) -> list[tuple[str, str]]:
        """(dir, chain ID) of every layer of an unpacked image, top first."""
        dirs = self.snapshots.layers_of(chain_ids[-1])
        if len(dirs) != len(chain_ids):
            raise LayersError(f"cannot {self.what} {self.container.id}: the {self.container.snapshotter} "
                              f"snapshotter shows {len(dirs)} layer directories for the {len(chain_ids)} "
                              f"layers of {ref} (not a fractal snapshotter?)")
        return list(zip(dirs, reversed(chain_ids)))

    # -- the stack ------------------------------------------------------------------------

    def _stack(self, raw: dict[str, Any]) -> Stack:
        own = self._own_layers()
        layers = []
        for e in raw.get("layers") or []:
            d = os.path.normpath(e["dir"])
            chain = e.get("chain_id") or own.get(d, "")
            size = e.get("size")
            layers.append(Layer(
                dir=e["dir"], live=bool(e.get("live")), chain_id=chain,
                image=e.get("image") or ("" if e.get("live") or d not in own else self.container.image),
                size=size if isinstance(size, int) or not chain else self.size(chain),
                added_at=e.get("added_at"), gc_label=e.get("gc_label") or ""))
        return Stack(raw.get("container", self.container.id), raw.get("upper"), layers, raw)

    def _own_layers(self) -> dict[str, str]:
        """dir -> chain ID of the layers the container was created with (once per session): the
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

    def stack(self) -> Stack:
        return self._stack(shim_call(self.shim, "List", {"container": self.container.id}, what=self.what))

    # -- images ---------------------------------------------------------------------------

    def _image_exists(self, ref: str) -> bool:
        from ..api.gen.containerd.services.images.v1 import images_pb2, images_pb2_grpc
        from ..client.containerd import NotFound

        stub = images_pb2_grpc.ImagesStub(self.client.channel)
        try:
            self.client.call(stub.Get, images_pb2.GetImageRequest(name=ref))
        except NotFound:
            return False
        return True

    def pull(self, ref: str, plain_http: bool) -> None:
        ctr = os.environ.get("FRACTAL_CTR") or shutil.which("ctr")
        if not ctr:
            raise LayersError(f"image {ref} is not in namespace {self.namespace!r} and `ctr` (to pull it) "
                              "is not on PATH")
        argv = [ctr, "-a", self.address, "-n", self.namespace, "images", "pull",
                "--snapshotter", self.container.snapshotter, *(["--plain-http"] if plain_http else []), ref]
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise LayersError(f"cannot pull {ref}: {e}") from None
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["ctr failed"])[-1]
            raise LayersError(f"image {ref} is not in namespace {self.namespace!r} and cannot be pulled: {last}")

    def image(self, ref: str, *, pull: bool = True, plain_http: bool = False) -> Any:
        """The layers (ImageLayers) of `ref`, pulled and unpacked for the container's snapshotter
        if needed."""
        from ..client.images import image_layers

        for attempt in (0, 1):
            if self._image_exists(ref):
                layers = image_layers(self.client, ref)
                if not layers.chain_ids:
                    raise LayersError(f"image {ref} has no layers")
                if self.snapshots.exists(layers.chain_ids[-1]):
                    return layers
                why = f"is not unpacked for the {self.container.snapshotter} snapshotter"
            else:
                why = f"is not in namespace {self.namespace!r}"
            if attempt or not pull:
                raise LayersError(f"cannot {self.what} {self.container.id}: image {ref} {why}"
                                  + ("" if pull else " (pull it with --snapshotter "
                                     f"{self.container.snapshotter})"))
            self.pull(ref, plain_http)
        raise AssertionError("unreachable")

    # -- changes --------------------------------------------------------------------------

    def add(self, refs: list[str], position: str | int = "top", *, plain_http: bool = False,
            pull: bool = True) -> dict[str, Any]:
        """Add every layer of each image (first image on top); layers already in the stack are
        skipped.  Returns the shim's answer plus what was done."""
        t0 = time.monotonic()
        current = self.stack()
        have = {os.path.normpath(la.dir) for la in current.layers}
        plan: list[dict[str, Any]] = []
        labels: dict[str, str] = {}
        for ref in refs:
            img = self.image(ref, pull=pull, plain_http=plain_http)
            label = gc_label(self.container.snapshotter, img.chain_ids[-1])
            labels[label] = img.chain_ids[-1]
            for d, chain in self.image_layer_dirs(ref, img.chain_ids):  # top first
                if d in have:
                    continue
                have.add(d)
                plan.append({"dir": d, "chain_id": chain, "image": ref, "size": self.size(chain),
                             "gc_label": label})
        if not plan:
            return {"added": [], "skipped": refs, "layers": current.raw.get("layers", []),
                    "restack_ms": 0.0, "cli_ms": round((time.monotonic() - t0) * 1000, 2),
                    "stack": current}
        used = {p["gc_label"] for p in plan}
        new_labels = {k: v for k, v in labels.items() if k in used and self.container.labels.get(k) != v}
        if new_labels:  # before the restack: the layers are referenced from the moment they are used
            self.client.update_container_labels(self.container.id, new_labels)
        try:
            raw = shim_call(self.shim, "Add", {"container": self.container.id, "layers": plan,
                                               "position": position}, what=self.what)
        except BaseException:
            if new_labels:
                try:
                    self.client.update_container_labels(self.container.id, {k: "" for k in new_labels})
                except ContainerdError:
                    pass
            raise
        raw["stack"] = self._stack(raw)
        raw["cli_ms"] = round((time.monotonic() - t0) * 1000, 2)
        return raw

    def remove(self, targets: list[str]) -> dict[str, Any]:
        """Remove layers named by image (the layers added live from it) or by chain ID (a unique
        prefix, with or without ``sha256:``; any layer of the stack)."""
        t0 = time.monotonic()
        current = self.stack()
        dirs: list[str] = []
        images: list[str] = []
        for t in targets:
            hexpart = t.removeprefix("sha256:")
            matches = []
            if re.fullmatch(r"[0-9a-f]{4,64}", hexpart):
                matches = [la for la in current.layers if short(la.chain_id, 64).startswith(hexpart)]
            if len(matches) > 1:
                raise LayersError(f"cannot {self.what} {self.container.id}: {t} matches "
                                  f"{len(matches)} layers; give more of the digest")
            if matches:
                if matches[0].dir not in dirs:
                    dirs.append(matches[0].dir)
                continue
            if any(la.live and la.image == t for la in current.layers):
                images.append(t)
                continue
            if t.startswith("sha256:") or re.fullmatch(r"[0-9a-f]{12,64}", t):
                raise LayersError(f"cannot {self.what} {self.container.id}: no layer {t} in its stack")
            raise LayersError(f"cannot {self.what} {self.container.id}: no layers of image {t} were "
                              "added to it (name a layer digest from `fractal layers ls` to remove "
                              "one of its image's layers)")
        raw = shim_call(self.shim, "Remove", {"container": self.container.id, "layers": dirs,
                                              "images": images}, what=self.what)
        stack = self._stack(raw)
        still = {la.gc_label for la in stack.layers if la.live and la.gc_label}
        gone = {e.get("gc_label") for e in raw.get("removed") or [] if e.get("gc_label")} - still
        gone = {k for k in gone if k}
        if gone:
            self.client.update_container_labels(self.container.id, {k: "" for k in sorted(gone)})
        raw["stack"] = stack
        raw["labels_removed"] = sorted(gone)
        raw["cli_ms"] = round((time.monotonic() - t0) * 1000, 2)
        return raw


# -- output ----------------------------------------------------------------------------------------


def format_stack(stack: Stack) -> str:
    rows = [f"{'#':>3}  {'LAYER':<19}  {'SIZE':>10}  {'ADDED':<6}  IMAGE"]
    for i, la in enumerate(stack.layers):
        digest = f"sha256:{short(la.chain_id)}" if la.chain_id else os.path.basename(la.dir)
        rows.append(f"{i:>3}  {digest:<19}  {human(la.size):>10}  {'live' if la.live else 'image':<6}  "
                    f"{la.image or '-'}")
    return "\n".join(rows)


def stack_json(stack: Stack) -> dict[str, Any]:
    return {"container": stack.container, "upper": stack.upper,
            "layers": [la.as_dict() for la in stack.layers]}


# -- commands ------------------------------------------------------------------------------------


def _session(args: Any, what: str) -> Session:
    from ..client.address import resolve_target

    address, namespace = resolve_target(args.address, args.namespace)
    return Session(address, namespace, args.container, what=what)


def cmd_ls(args: Any) -> int:
    with _session(args, "list layers of") as s:
        stack = s.stack()
    if args.json:
        print_json(stack_json(stack))
    else:
        print(format_stack(stack))
    return 0


def cmd_add(args: Any) -> int:
    with _session(args, "change layers of") as s:
        res = s.add(list(args.images), args.position, plain_http=args.plain_http, pull=not args.no_pull)
    stack: Stack = res.pop("stack")
    if args.json:
        print_json({"added": res.get("added", []), "skipped": res.get("skipped", []),
                    "restack_ms": res.get("restack_ms"), "cli_ms": res.get("cli_ms"), **stack_json(stack)})
        return 0
    added = res.get("added") or []
    if not added:
        print(f"{args.container}: every layer of {', '.join(args.images)} is already in its stack; nothing added")
        return 0
    print(f"{args.container}: added {len(added)} layer(s) of {', '.join(args.images)} "
          f"(restack {res.get('restack_ms', 0):.1f} ms)")
    return 0


def cmd_rm(args: Any) -> int:
    with _session(args, "change layers of") as s:
        res = s.remove(list(args.targets))
    stack: Stack = res.pop("stack")
    if args.json:
        print_json({"removed": [e.get("dir") for e in res.get("removed") or []],
                    "labels_removed": res.get("labels_removed", []),
                    "restack_ms": res.get("restack_ms"), "cli_ms": res.get("cli_ms"), **stack_json(stack)})
        return 0
    print(f"{args.container}: removed {len(res.get('removed') or [])} layer(s) "
          f"(restack {res.get('restack_ms', 0):.1f} ms)")
    return 0


def register(layers: argparse.ArgumentParser) -> None:
    """`fractal layers ls|add|rm` (flags as ctr's: -a/-n and the env)."""
    lsub = layers.add_subparsers(dest="layers_command", metavar="COMMAND")

    p = lsub.add_parser("ls", help="the container's layers, top first")
    add_containerd_flags(p)
    add_json_flag(p)
    p.add_argument("container")
    p.set_defaults(func=cmd_ls)

    p = lsub.add_parser("add", help="add every layer of images to a running container")
    add_containerd_flags(p)
    p.add_argument("--position", default="top", type=parse_position,
                   help="where the image layers go: top (just below the container's writable "
                        "layer; default), bottom, or an index into the stack (0 = top)")
    p.add_argument("--plain-http", action="store_true", help="pull over plain HTTP (ctr's flag)")
    p.add_argument("--no-pull", action="store_true", help="fail instead of pulling a missing image")
    add_json_flag(p, "machine-readable output (with timings)")
    p.add_argument("container")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image refs; the first one ends up on top")
    p.set_defaults(func=cmd_add)

    p = lsub.add_parser("rm", help="remove layers (of an image added live, or by digest)")
    add_containerd_flags(p)
    add_json_flag(p, "machine-readable output (with timings)")
    p.add_argument("container")
    p.add_argument("targets", nargs="+", metavar="IMAGE|DIGEST")
    p.set_defaults(func=cmd_rm)
