"""`fractal layers ls|add|rm`: change the layers of a RUNNING container (docs/live-layers.md).

The container's shim serves ``fractal.layers.v1.Layers`` (shim/layers.py, protocol names in
ccpu/layersapi.py) on its ttrpc socket, found through the sandbox record the shim writes
(ccpu.sandboxes).

``add`` asks the shim's ``AddImages`` to do the containerd lookups below (the shim is warm and
connected; this process then loads no grpc, protobuf or asyncio: ccpu/layerswire.py) and only
pulls what it reports missing; ``rm`` asks its ``RemoveTargets`` the same way.  ``ls``, and
``add``/``rm`` for a shim without those methods or not found locally, do them here
(ccpu/client/livelayers.py):

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

import os
import time

from ..layersapi import GC_LABEL_PREFIX, LIVE_LABEL_MARK, SERVICE, BadPosition, BadTarget, gc_label, short  # noqa: F401
from ..layersapi import resolve_targets
from ..layersapi import parse_position as _parse_position
from .common import add_containerd_flags, add_json_flag, human, print_json

TYPE_CHECKING = False  # typing and dataclasses cost `fractal layers add` ~20 ms of imports
if TYPE_CHECKING:      # (issue 13): annotations only, Layer and Stack are plain classes
    import argparse
    from typing import Any

    from ..client.containerd import ContainerRecord

#: ccpu.client.containerd's (not imported here: it loads grpc, which `layers add` avoids)
FRACTAL_RUNTIME = "io.containerd.fractal.v1"
SHIM_TIMEOUT = 60.0


class LayersError(Exception):
    """A `fractal layers` request that cannot be done; the message is for the user."""


def parse_position(text: str) -> str | int:
    """--position's argparse type: a bad one is a usage error (exit 2), as the shim would refuse it."""
    try:
        return _parse_position(text)
    except BadPosition as e:
        import argparse  # here only: `layers add/rm` parse without argparse (ccpu/cli/fastargs.py)

        raise argparse.ArgumentTypeError(str(e)) from None


class Layer:
    """One layer of a container's stack, as the CLI shows it."""

    __slots__ = ("dir", "live", "chain_id", "image", "size", "added_at", "gc_label")

    def __init__(self, dir: str, live: bool, chain_id: str = "", image: str = "",  # noqa: A002
                 size: int | None = None, added_at: int | None = None, gc_label: str = "") -> None:
        self.dir, self.live, self.chain_id, self.image = dir, live, chain_id, image
        self.size, self.added_at, self.gc_label = size, added_at, gc_label

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and all(getattr(self, k) == getattr(other, k) for k in self.__slots__)

    def __repr__(self) -> str:
        return "Layer(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__) + ")"

    def as_dict(self) -> dict[str, Any]:
        return {"dir": self.dir, "live": self.live, "chain_id": self.chain_id or None,
                "image": self.image or None, "size": self.size, "added_at": self.added_at}


class Stack:
    """A container's stack: its writable layer and its layers, top first."""

    __slots__ = ("container", "upper", "layers", "raw")

    def __init__(self, container: str, upper: str | None, layers: list[Layer],
                 raw: dict[str, Any] | None = None) -> None:
        self.container, self.upper, self.layers = container, upper, layers
        self.raw: dict[str, Any] = {} if raw is None else raw

    def __repr__(self) -> str:
        return f"Stack(container={self.container!r}, upper={self.upper!r}, layers={self.layers!r})"


# -- the shim ------------------------------------------------------------------------------------


async def _call_async(address: str, method: str, payload: dict[str, Any], timeout: float) -> dict[str, Any]:  # noqa: E501
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
    import asyncio

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


def stack_of(raw: dict[str, Any], entries: list[dict[str, Any]], container: str) -> Stack:
    """A :class:`Stack` of the shim's answer whose layer entries are named (livelayers.named)."""
    layers = [Layer(dir=e["dir"], live=bool(e.get("live")), chain_id=e.get("chain_id") or "",
                    image=e.get("image") or "", size=e.get("size"), added_at=e.get("added_at"),
                    gc_label=e.get("gc_label") or "") for e in entries]
    return Stack(raw.get("container") or container, raw.get("upper"), layers, raw)


def missing_error(what: str, cid: str, ref: str, why: str, no_pull_snapshotter: str | None) -> LayersError:
    """An image that cannot be added: not pulled, or not unpacked for the container's snapshotter."""
    return LayersError(f"cannot {what} {cid}: image {ref} {why}"
                       + ("" if no_pull_snapshotter is None else
                          f" (pull it with --snapshotter {no_pull_snapshotter})"))


def pull(address: str, namespace: str, snapshotter: str, ref: str, plain_http: bool) -> None:
    """``ctr images pull --snapshotter S``: containerd 1.6 fetches and unpacks on the client side."""
    import shutil
    import subprocess

    ctr = os.environ.get("FRACTAL_CTR") or shutil.which("ctr")
    if not ctr:
        raise LayersError(f"image {ref} is not in namespace {namespace!r} and `ctr` (to pull it) "
                          "is not on PATH")
    argv = [ctr, "-a", address, "-n", namespace, "images", "pull",
            "--snapshotter", snapshotter, *(["--plain-http"] if plain_http else []), ref]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LayersError(f"cannot pull {ref}: {e}") from None
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["ctr failed"])[-1]
        raise LayersError(f"image {ref} is not in namespace {namespace!r} and cannot be pulled: {last}")


# -- the fast path of `layers add`: the shim does the containerd lookups ----------------------------


class _OldShim(Exception):
    """The shim has no AddImages (an older fractal) or cannot be found here: take the slow path,
    which also gives every error about the container itself (no such container, not fractal's,
    not running) as before."""


def _local_shim(namespace: str, cid: str) -> str:
    """The ttrpc address of the live shim whose sandbox record lists ``cid`` (no containerd)."""
    from .. import sandboxes

    for rec in sandboxes.read_all(namespace).values():
        if isinstance(rec.containers, list) and cid in rec.containers and rec.address and rec.alive:
            return rec.address
    raise _OldShim(cid)


def add_through_shim(address: str, namespace: str, cid: str, refs: list[str], position: str | int, *,
                     plain_http: bool = False, pull_missing: bool = True,
                     what: str = "change layers of") -> dict[str, Any]:
    """`layers add` without gRPC: ask the shim's AddImages (it resolves the images through
    containerd); pull what it reports missing with ctr and ask again.  Raises _OldShim when the
    shim cannot be asked here."""
    from .. import layerswire as wire

    t0 = time.monotonic()
    shim = _local_shim(namespace, cid)
    payload = wire.add_images_request(cid, refs, str(position))
    for attempt in (0, 1):
        raw = _ask_shim(shim, payload, cid, what)
        missing: dict[str, str] = raw.get("missing") or {}
        if not missing:
            raw["stack"] = stack_of(raw, raw.get("layers") or [], cid)
            raw["cli_ms"] = round((time.monotonic() - t0) * 1000, 2)
            if not raw.get("added"):
                raw["skipped"] = refs
            return raw
        snapshotter = raw.get("snapshotter") or "fractal"
        ref = next(r for r in refs if r in missing)
        if attempt or not pull_missing:
            raise missing_error(what, cid, ref, missing[ref], None if pull_missing else snapshotter)
        for ref in (r for r in refs if r in missing):
            pull(address, namespace, snapshotter, ref, plain_http)
    raise AssertionError("unreachable")


def _ask_shim(shim: str, payload: bytes, cid: str, what: str, **kw: Any) -> dict[str, Any]:
    """One call to the container's shim, its answer decoded; an older shim (UNIMPLEMENTED) is
    _OldShim, any other refusal one LayersError line."""
    from .. import layerswire as wire

    try:
        return wire.stack(wire.call(shim, payload, SHIM_TIMEOUT, **kw))
    except wire.WireError as e:
        if e.code == wire.UNIMPLEMENTED:
            raise _OldShim(cid) from None
        if e.code == wire.UNAVAILABLE:
            raise LayersError(f"cannot {what} {cid}: its shim does not answer ({e.message})") from None
        raise LayersError(f"cannot {what} {cid}: {e.message}") from None


def remove_through_shim(namespace: str, cid: str, targets: list[str], *,
                        what: str = "change layers of") -> dict[str, Any]:
    """`layers rm` without gRPC: the shim's RemoveTargets resolves the targets, restacks and
    takes the GC labels off.  Raises _OldShim when the shim cannot be asked here."""
    from .. import layerswire as wire

    t0 = time.monotonic()
    shim = _local_shim(namespace, cid)
    raw = _ask_shim(shim, wire.remove_targets_request(cid, targets), cid, what, method=wire.REMOVE_METHOD)
    raw["stack"] = stack_of(raw, raw.get("layers") or [], cid)
    raw.setdefault("labels_removed", [])
    raw["cli_ms"] = round((time.monotonic() - t0) * 1000, 2)
    return raw


# -- a session on one container --------------------------------------------------------------------


class Session:
    """containerd + the container's record + its shim, for one command."""

    def __init__(self, address: str, namespace: str, container_id: str, *, what: str = "change layers of") -> None:
        from ..client.containerd import ContainerdClient
        from ..client.livelayers import Lookups

        self.address = address
        self.namespace = namespace
        self.what = what
        self.client = ContainerdClient(address, namespace)
        try:
            self.container: ContainerRecord = self._find(container_id)
            self.shim = self._shim_address(self.container)
        except BaseException:
            self.client.close()
            raise
        self.look = Lookups(self.client, self.container, what=what)
        self.snapshots = self.look.snapshots

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _find(self, cid: str) -> ContainerRecord:
        from ..client.containerd import ContainerdError

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

    # -- the stack ------------------------------------------------------------------------

    def size(self, chain_id: str) -> int | None:
        return self.look.size(chain_id)

    def _stack(self, raw: dict[str, Any]) -> Stack:
        return stack_of(raw, [self.look.named(e) for e in raw.get("layers") or []], self.container.id)

    def stack(self) -> Stack:
        return self._stack(shim_call(self.shim, "List", {"container": self.container.id}, what=self.what))

    # -- images ---------------------------------------------------------------------------

    def pull(self, ref: str, plain_http: bool) -> None:
        pull(self.address, self.namespace, self.container.snapshotter, ref, plain_http)

    def image(self, ref: str, *, pull: bool = True, plain_http: bool = False) -> Any:
        """The layers (ImageLayers) of `ref`, pulled and unpacked for the container's snapshotter
        if needed."""
        for attempt in (0, 1):
            layers, why = self.look.find_image(ref)
            if layers is not None:
                return layers
            if attempt or not pull:
                raise missing_error(self.what, self.container.id, ref, why,
                                    None if pull else self.container.snapshotter)
            self.pull(ref, plain_http)
        raise AssertionError("unreachable")

    # -- changes --------------------------------------------------------------------------

    def add(self, refs: list[str], position: str | int = "top", *, plain_http: bool = False,
            pull: bool = True) -> dict[str, Any]:
        """Add every layer of each image (first image on top); layers already in the stack are
        skipped.  Returns the shim's answer plus what was done."""
        t0 = time.monotonic()
        current = self.stack()
        imgs = [(ref, self.image(ref, pull=pull, plain_http=plain_http)) for ref in refs]
        planned = self.look.plan(imgs, {os.path.normpath(la.dir) for la in current.layers})
        plan, new_labels = planned.layers, planned.labels
        if not plan:
            return {"added": [], "skipped": refs, "layers": current.raw.get("layers", []),
                    "restack_ms": 0.0, "cli_ms": round((time.monotonic() - t0) * 1000, 2),
                    "stack": current}
        if new_labels:  # before the restack: the layers are referenced from the moment they are used
            self.client.update_container_labels(self.container.id, new_labels)
        try:
            raw = shim_call(self.shim, "Add", {"container": self.container.id, "layers": plan,
                                               "position": position}, what=self.what)
        except BaseException:
            from ..client.containerd import ContainerdError

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
        try:
            dirs, images = resolve_targets(targets, [{"dir": la.dir, "live": la.live, "chain_id": la.chain_id,
                                                      "image": la.image} for la in current.layers])
        except BadTarget as e:
            raise LayersError(f"cannot {self.what} {self.container.id}: {e}") from None
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
    from ..client.address import resolve_target

    address, namespace = resolve_target(args.address, args.namespace)
    try:
        res = add_through_shim(address, namespace, args.container, list(args.images), args.position,
                               plain_http=args.plain_http, pull_missing=not args.no_pull)
    except _OldShim:
        from .groups import setup_logging

        setup_logging(args.debug)  # the gRPC path's libraries log
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
    from ..client.address import resolve_target

    address, namespace = resolve_target(args.address, args.namespace)
    try:
        res = remove_through_shim(namespace, args.container, list(args.targets))
    except _OldShim:
        from .groups import setup_logging

        setup_logging(args.debug)  # the gRPC path's libraries log
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
    p.set_defaults(func=cmd_add, lazy_logging=True)

    p = lsub.add_parser("rm", help="remove layers (of an image added live, or by digest)")
    add_containerd_flags(p)
    add_json_flag(p, "machine-readable output (with timings)")
    p.add_argument("container")
    p.add_argument("targets", nargs="+", metavar="IMAGE|DIGEST")
    p.set_defaults(func=cmd_rm, lazy_logging=True)
