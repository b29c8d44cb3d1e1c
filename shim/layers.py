"""Live layers through the shim: the ``fractal.layers.v1.Layers`` ttrpc service.

Served on the shim's own socket next to ``containerd.task.v2.Task`` (containerd never calls
it; ``fractal layers`` does, see docs/live-layers.md).  The messages are
hack/protos/fractal/layers/v1/layers.proto's (converted by ccpu/layersmsg.py, shared with the
CLI); every method answers a ``Stack``:

* ``List``   ListRequest{container}                      -> the stack (below)
* ``Add``    AddRequest{container, layers: [{dir, chain_id, image, size, gc_label}], position}
                                                         -> the stack + added, skipped, restack_ms
* ``Remove`` RemoveRequest{container, layers: [dir...], images: [name...]}
                                                         -> the stack + removed (entries), restack_ms
* ``AddImages`` AddImagesRequest{container, images: [ref...], position}
                                                         -> as Add (every layer named), or only
                                                            missing {image: why} + snapshotter
  (``fractal layers add``: the shim does the containerd lookups, ccpu/client/livelayers.py, so
  the CLI's process needs no gRPC; it pulls what is missing and asks again)
* ``RemoveTargets`` RemoveTargetsRequest{container, targets: [image or chain ID prefix...]}
                                                         -> as Remove, every layer named, plus
                                                            labels_removed (``fractal layers rm``,
                                                            the same way: ccpu.layersapi's rule)

The shim remembers between requests only what cannot change while its key holds
(ccpu/client/livelayers.py ``Facts``: an image target digest's chain IDs, a snapshot's layer
dirs by its identity, a layer dir's size) and, per container (the Container object the Task
service made at Create: a new one for a container re-created under the same id), its
containerd record's immutable part (snapshotter, snapshot key) and the chain IDs of the layers
it was created with (its snapshot's parents, fixed at Prepare).  Every name is still looked up
each time: the image name's target, whether the image's top snapshot exists and since when,
the container's labels before an add.

``layers`` (in requests and answers) are nearest first (the top of the stack first), ``dir`` is
the layer's directory on the HOST (a repo layer dir).  The sandbox (shim/sandbox.py:
``layers``, ``restack``) takes and gives host dirs; how its agent sees them (the same path on
the host, the guest's share path in a VM) and what it must expose first is its business.
The stack in an answer: {container, repo_root, upper, layers: [{dir, live, chain_id, image,
size, gc_label, added_at}], history}; ``live`` marks layers added by ``Add`` (the others are
the image's, as the container was created; their chain_id/image are for the client to fill in).

Changes of one container are serialized (one asyncio lock per container; the agent serializes
too).  After a change the metadata (which layer came from which image, added when, its GC label)
is written atomically to ``<bundle>/fractal-layers.json``, so a shim that restarts (or a
second reader) knows it.  The record only caches that metadata: the stack itself always comes
from the agent (``layers`` op), whose live stack is the single source of truth.
Errors are :mod:`ccpu.errdefs` errors (the agent's pass through with their kind: NotFound,
FailedPrecondition, ...), turned into ttrpc codes at the service edge (shim/errors.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any, Protocol

from ccpu import errdefs, layersapi, layersmsg
from ccpu.ttrpc import RequestContext
from shim.sandbox import Sandbox
from shim.state import Container, Status

log = logging.getLogger("shim.layers")

SERVICE = layersapi.SERVICE
RECORD_NAME = "fractal-layers.json"
#: AddImages' bounds: each image is several containerd lookups under the container's lock
MAX_IMAGES = 64
MAX_REF = 4096
RECORD_VERSION = 2  # 2: no "stack" (the agent's live stack is the only one)
#: under the run dir: what the shims remember of images and layers (livelayers.Facts)
FACTS_DIR = "layerfacts"


def _refs(args: dict[str, Any], key: str, none: str) -> list[str]:
    """A request's list of image refs or targets: at least one, at most MAX_IMAGES of at most
    MAX_REF bytes each (the CLI's and any other caller's values are untrusted alike)."""
    refs = str_list(args, key)
    if not refs:
        raise _bad(none)
    if len(refs) > MAX_IMAGES or any(len(r) > MAX_REF for r in refs):
        raise _bad(f"at most {MAX_IMAGES} {key} of at most {MAX_REF} bytes each")
    return refs


def _bad(msg: str) -> errdefs.InvalidArgument:
    return errdefs.InvalidArgument(msg)


def parse_request(req: Any) -> dict[str, Any]:
    """A request message as a dict (ccpu/layersmsg.py); the container is required."""
    args = layersmsg.request_args(req)
    if not args["container"]:
        raise _bad("container is required")
    return args


def answer(obj: dict[str, Any]) -> Any:
    return layersmsg.answer(obj)


def parse_position(value: Any) -> str | int:
    try:
        return layersapi.parse_position(value)
    except layersapi.BadPosition as exc:
        raise _bad(str(exc)) from None


def parse_add_layers(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise _bad("layers must be a non-empty list of {dir, chain_id, image, size}")
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for item in value:
        if isinstance(item, str):
            item = {"dir": item}
        if not isinstance(item, dict):
            raise _bad(f"a layer must be an object with a dir, not {item!r}")
        d = item.get("dir")
        if not isinstance(d, str) or not os.path.isabs(d):
            raise _bad(f"layer dir must be an absolute path, not {d!r}")
        d = os.path.normpath(d)
        if d in seen:
            continue
        seen.add(d)
        size = item.get("size")
        out.append({
            "dir": d,
            "chain_id": str(item.get("chain_id") or ""),
            "image": str(item.get("image") or ""),
            "size": int(size) if isinstance(size, int) and not isinstance(size, bool) else None,
            "gc_label": str(item.get("gc_label") or ""),
        })
    return out


def str_list(args: dict[str, Any], key: str) -> list[str]:
    value = args.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise _bad(f"{key} must be a list of strings")
    return list(value)


# -- the record in the bundle ------------------------------------------------------------------


def record_path(bundle: str) -> str:
    return os.path.join(bundle, RECORD_NAME)


def load_record(bundle: str, container: str) -> dict[str, Any]:
    """The metadata of ``container``'s live layers (an empty record if none was written)."""
    empty: dict[str, Any] = {"version": RECORD_VERSION, "container": container, "live": {},
                             "history": []}
    try:
        with open(record_path(bundle), encoding="utf-8") as f:
            rec = json.load(f)
    except FileNotFoundError:
        return empty
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable (%s): starting a new record", record_path(bundle), exc)
        return empty
    if not isinstance(rec, dict) or rec.get("container") != container:
        return empty
    for key, default in (("live", {}), ("history", [])):
        if not isinstance(rec.get(key), type(default)):
            rec[key] = default
    rec.pop("stack", None)  # version 1 cached the stack too: the agent's is the only one
    rec["version"] = RECORD_VERSION
    return rec


def save_record(bundle: str, rec: dict[str, Any]) -> None:
    """Write atomically: a reader sees the old or the new record, never a torn one.

    No fsync: the record describes a running container's stack, which no machine crash leaves
    running (its mounts and processes are gone with it), while against a crash of the shim the
    rename is atomic already (the page cache outlives the process).  A record torn by a power
    loss is read as none (``load_record``).  The fsync cost 5-6 ms of every add/rm's answer
    (ext4, measured at load ~6: 6-8 ms with it, 0.4-4 ms without; docs/performance.md)."""
    path = record_path(bundle)
    tmp = f"{path}.{os.getpid()}.tmp"
    data = json.dumps(rec, indent=1).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.rename(tmp, path)


# -- the service -------------------------------------------------------------------------------


def grpc_without_fork_handlers() -> None:
    """Before the shim first imports grpc: no fork handlers.  With them (grpc's default while
    a channel is open), every os.fork of the shim starts grpc threads in the child, and the
    agent's restack helper -- a forked child that setns()es into the container's mount
    namespace (ccpu/agent/live.py) -- then fails with EINVAL (a multi-threaded process cannot
    change its mount namespace).  The shim's forked children never use grpc."""
    if "grpc" not in sys.modules:
        os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "0"


def _containerd_errors() -> type[Exception]:
    from ccpu.client.containerd import ContainerdError  # imports grpc: only when used

    return ContainerdError


class Containers(Protocol):
    """What the Layers service needs of the Task service: its containers by id."""

    def container(self, cid: str) -> Container | None: ...


class LayersService:
    """``fractal.layers.v1.Layers`` for the containers of one shim (``task``: its TaskService;
    ``sandbox``: where they run)."""

    def __init__(self, task: Containers, sandbox: Sandbox, repo_root: str | None = None,
                 containerd: tuple[str, str] | None = None) -> None:
        self.task = task
        self.sandbox = sandbox
        self.repo_root = repo_root
        self.containerd = containerd  # (gRPC address, namespace): AddImages asks it
        self._locks: dict[str, asyncio.Lock] = {}
        self._facts: Any = None  # livelayers.Facts, made with the first lookup (it imports grpc)
        #: per container: (its Container, its containerd record, its own layers' dir -> chain ID)
        self._known: dict[str, tuple[Container, Any, dict[str, str]]] = {}

    def methods(self) -> dict[str, tuple[type, Callable[..., Any]]]:
        """The handlers by RPC name (served through ``shim.errors.at_edge``)."""
        return {name: (layersmsg.REQUESTS[name], getattr(self, name))
                for name in ("List", "Add", "Remove", "AddImages", "RemoveTargets")}

    # -- helpers ------------------------------------------------------------------------------

    def _lock(self, cid: str) -> asyncio.Lock:
        for other in [k for k in self._locks if self.task.container(k) is None]:
            if not self._locks[other].locked():
                del self._locks[other]
        for other in [k for k, v in self._known.items() if self.task.container(k) is not v[0]]:
            del self._known[other]
        return self._locks.setdefault(cid, asyncio.Lock())

    def _container(self, cid: str) -> Container:
        c = self.task.container(cid)
        if c is None:
            raise errdefs.NotFound(f"container {cid} is not running in this sandbox")
        return c

    def _check_stackable(self, c: Container) -> None:
        """Refuse a container whose root is not a stack of repo layers (the overlayfs or native
        snapshotter's, bind mounts...) or that has stopped."""
        from ccpu.stack import LayerStack
        from shim import rootfs as rootfs_mod

        if not isinstance(rootfs_mod.parse(list(c.rootfs), self.repo_root), LayerStack):
            kinds = sorted({m.type for m in c.rootfs}) or ["none"]
            raise errdefs.FailedPrecondition(
                f"container {c.id}'s root filesystem is not a stack of fractal "
                f"layers (its snapshotter gave {len(c.rootfs)} mount(s) of type "
                f"{', '.join(kinds)}; only the fractal snapshotter's can be restacked)")
        if c.init.status == Status.STOPPED:
            raise errdefs.FailedPrecondition(f"container {c.id} is stopped")

    async def _stack(self, c: Container) -> dict[str, Any]:
        """The sandbox's view of the stack, in host dirs."""
        now = await self.sandbox.layers(c.id)
        return {"lowers": list(now.lowers), "upper": now.upper, "history": list(now.history)}

    def _view(self, c: Container, rec: dict[str, Any], stack: dict[str, Any]) -> dict[str, Any]:
        live = rec.get("live", {})
        layers = []
        for d in stack["lowers"]:
            meta = live.get(d)
            entry: dict[str, Any] = {"dir": d, "live": meta is not None}
            if meta is not None:
                entry.update({k: meta.get(k) for k in ("chain_id", "image", "size", "gc_label",
                                                       "added_at")})
            layers.append(entry)
        return {"container": c.id, "repo_root": self.repo_root, "upper": stack.get("upper"),
                "layers": layers, "history": rec.get("history", [])}

    async def _restack(self, c: Container, add: list[str], remove: list[str],
                       position: str | int) -> tuple[list[str], float]:
        """The new lowers and how long the restack took (the sandbox's whole work: a VM's
        layer binds too)."""
        t0 = time.monotonic()
        lowers = await self.sandbox.restack(c.id, add, remove, position)
        return lowers, round((time.monotonic() - t0) * 1000, 2)

    # -- RPCs ---------------------------------------------------------------------------------

    async def List(self, req: Any, ctx: RequestContext) -> Any:
        args = parse_request(req)
        c = self._container(args["container"])
        self._check_stackable(c)
        async with self._lock(c.id):
            rec = load_record(c.bundle, c.id)
            stack = await self._stack(c)
            return answer(self._view(c, rec, stack))

    async def Add(self, req: Any, ctx: RequestContext) -> Any:
        args = parse_request(req)
        c = self._container(args["container"])
        layers = parse_add_layers(args.get("layers"))
        position = parse_position(args.get("position"))
        self._check_stackable(c)
        async with self._lock(c.id):
            return answer(await self._add(c, layers, position))

    async def _add(self, c: Container, layers: list[dict[str, Any]], position: str | int,
                   stack: dict[str, Any] | None = None) -> dict[str, Any]:
        """Stack ``layers`` (checked; the caller holds the container's lock, and may pass the
        stack it read under it): the view plus added, skipped, restack_ms."""
        rec = load_record(c.bundle, c.id)
        if stack is None:
            stack = await self._stack(c)
        present = set(stack["lowers"])
        todo = [la for la in layers if la["dir"] not in present]
        skipped = [la["dir"] for la in layers if la["dir"] in present]
        restack_ms = 0.0
        if todo:
            lowers, restack_ms = await self._restack(c, [la["dir"] for la in todo], [], position)
            now = time.time_ns()
            for la in todo:
                rec["live"][la["dir"]] = {**{k: v for k, v in la.items() if k != "dir"},
                                          "added_at": now}
            stack["lowers"] = lowers
            rec["history"].append({"at": now, "added": [la["dir"] for la in todo],
                                   "removed": [], "restack_ms": restack_ms})
            self._persist(c, rec)
            log.info("%s: added %d live layer(s) in %.1f ms: %s", c.id, len(todo), restack_ms,
                     ", ".join(sorted({la["image"] or la["dir"] for la in todo})))
        out = self._view(c, rec, stack)
        out.update({"added": [la["dir"] for la in todo], "skipped": skipped,
                    "restack_ms": restack_ms})
        return out

    async def AddImages(self, req: Any, ctx: RequestContext) -> Any:
        """Add every layer of images (first on top), doing what ``fractal layers add`` did
        through containerd (ccpu/client/livelayers.py) here, where the interpreter is warm:
        image -> chain IDs -> repo dirs, the container's GC label (set before the restack,
        taken back if it fails).  An image that needs a pull changes nothing and is named in
        the answer's ``missing``."""
        args = parse_request(req)
        c = self._container(args["container"])
        images = _refs(args, "images", "name images to add")
        position = parse_position(args.get("position"))
        self._check_stackable(c)
        if not self.containerd:
            raise errdefs.FailedPrecondition("this shim does not know containerd's address")
        async with self._lock(c.id):
            look = await asyncio.to_thread(self._lookups, c, True)
            # the container's own layers are named for the answer (Mounts, a Stat per parent,
            # Usage: ~7 ms of round trips): asked meanwhile, beside the image lookups and the
            # restack, rather than after them (issue 13; one gRPC channel serves both threads)
            own = asyncio.ensure_future(asyncio.to_thread(
                lambda: [look.size(chain) for chain in look.own_layers().values()]))
            try:
                found = [(ref, await asyncio.to_thread(look.find_image, ref)) for ref in images]
                missing = {ref: why for ref, (img, why) in found if img is None}
                if missing:
                    return answer({"container": c.id, "missing": missing,
                                   "snapshotter": look.container.snapshotter})
                stack = await self._stack(c)
                plan = await asyncio.to_thread(
                    look.plan, [(ref, img) for ref, (img, _) in found if img is not None],
                    {os.path.normpath(d) for d in stack["lowers"]})
                if plan.layers and plan.labels:  # referenced from the moment they are used
                    await asyncio.to_thread(look.client.update_container_labels, c.id, plan.labels)
                if not plan.layers:
                    out = self._view(c, load_record(c.bundle, c.id), stack)
                    out.update({"added": [], "skipped": images, "restack_ms": 0.0})
                else:
                    try:
                        out = await self._add(c, plan.layers, position, stack)
                    except BaseException:
                        if plan.labels:
                            await asyncio.to_thread(self._unlabel, look, c.id, plan.labels)
                        raise
                await own
                out["layers"] = await asyncio.to_thread(lambda: [look.named(e) for e in out["layers"]])
                return answer(out)
            except _containerd_errors() as exc:
                raise errdefs.FailedPrecondition(str(exc)) from None
            finally:
                await asyncio.gather(own, return_exceptions=True)  # never close under its feet
                self._remember(c, look)
                look.client.close()

    def _lookups(self, c: Container, fresh: bool) -> Any:
        """containerd lookups for container ``c`` (a new connection per request: the shim
        keeps no gRPC channel between the rare ``layers`` calls).  ``fresh``: read its record
        (labels) from containerd even if it is known; else the remembered one serves (its
        snapshotter and snapshot key are immutable in containerd; its image name is shown)."""
        grpc_without_fork_handlers()
        from ccpu.client.containerd import ContainerdClient
        from ccpu.client.livelayers import Facts, Lookups

        if self._facts is None:  # shared by the shims of this run dir (root's only)
            from ccpu import sandboxes

            self._facts = Facts(directory=str(sandboxes.run_dir() / FACTS_DIR))
        address, namespace = self.containerd  # type: ignore[misc]
        known = self._known.get(c.id)
        if known is not None and known[0] is not c:
            known = None
        client = ContainerdClient(address, namespace)
        try:
            record = client.container(c.id) if fresh or known is None else known[1]
            return Lookups(client, record, facts=self._facts,
                           own=None if known is None else dict(known[2]))
        except BaseException as exc:
            client.close()
            if isinstance(exc, _containerd_errors()):
                raise errdefs.FailedPrecondition(f"containerd: {exc}") from None
            raise

    def _remember(self, c: Container, look: Any) -> None:
        """Keep what stays true of ``c`` while it exists: its record, its own layers' names."""
        own = look.own_known()
        if own and self.task.container(c.id) is c:
            self._known[c.id] = (c, look.container, dict(own))

    @staticmethod
    def _unlabel(look: Any, cid: str, labels: dict[str, str]) -> bool:
        try:
            look.client.update_container_labels(cid, {k: "" for k in labels})
        except _containerd_errors() as exc:
            log.warning("%s: cannot take back labels %s: %s", cid, sorted(labels), exc)
            return False
        return True

    async def Remove(self, req: Any, ctx: RequestContext) -> Any:
        args = parse_request(req)
        c = self._container(args["container"])
        dirs = [os.path.normpath(d) for d in str_list(args, "layers")]
        images = str_list(args, "images")
        if not dirs and not images:
            raise _bad("name layers or images to remove")
        self._check_stackable(c)
        async with self._lock(c.id):
            rec = load_record(c.bundle, c.id)
            stack = await self._stack(c)
            return answer(await self._remove(c, rec, stack, dirs, images))

    async def _remove(self, c: Container, rec: dict[str, Any], stack: dict[str, Any], dirs: list[str],
                      images: list[str]) -> dict[str, Any]:
        """Take layers off (by host dir, or every layer added for an image; the caller holds
        the container's lock): the view plus removed, restack_ms."""
        present = stack["lowers"]
        dirs = list(dirs)
        for d in dirs:
            if not os.path.isabs(d):
                raise _bad(f"layer dir must be an absolute path, not {d!r}")
            if d not in present:
                raise errdefs.NotFound(f"layer {d} is not in container {c.id}'s stack")
        for name in images:
            mine = [d for d in present if rec["live"].get(d, {}).get("image") == name]
            if not mine:
                raise errdefs.NotFound(f"no layers of image {name} were added to container {c.id}")
            dirs += [d for d in mine if d not in dirs]
        remove = [d for d in present if d in set(dirs)]  # stack order, no duplicates
        lowers, restack_ms = await self._restack(c, [], remove, "top")
        now = time.time_ns()
        removed = []
        for d in remove:
            meta = rec["live"].pop(d, None)
            removed.append({"dir": d, "live": meta is not None, **(meta or {})})
        stack["lowers"] = lowers
        rec["history"].append({"at": now, "added": [], "removed": remove,
                               "restack_ms": restack_ms})
        self._persist(c, rec)
        log.info("%s: removed %d layer(s) in %.1f ms", c.id, len(remove), restack_ms)
        out = self._view(c, rec, stack)
        out.update({"removed": removed, "restack_ms": restack_ms})
        return out

    async def RemoveTargets(self, req: Any, ctx: RequestContext) -> Any:
        """Remove layers named as ``fractal layers rm`` names them (ccpu.layersapi
        ``resolve_targets``: an image added live, or a chain ID prefix of any layer), then take
        the GC labels no remaining added layer needs off the container, here where the
        interpreter is warm (the CLI's process then needs no gRPC, issue 13)."""
        args = parse_request(req)
        c = self._container(args["container"])
        targets = _refs(args, "targets", "name layers or images to remove")
        self._check_stackable(c)
        if not self.containerd:
            raise errdefs.FailedPrecondition("this shim does not know containerd's address")
        async with self._lock(c.id):
            rec = load_record(c.bundle, c.id)
            stack = await self._stack(c)
            look = await asyncio.to_thread(self._lookups, c, False)
            try:
                named = await asyncio.to_thread(
                    lambda: [look.named(e) for e in self._view(c, rec, stack)["layers"]])
                try:
                    dirs, images = layersapi.resolve_targets(targets, named)
                except layersapi.BadTarget as exc:
                    if exc.ambiguous:
                        raise _bad(str(exc)) from None
                    raise errdefs.NotFound(str(exc)) from None
                out = await self._remove(c, rec, stack, dirs, images)
                still = {la.get("gc_label") for la in out["layers"] if la.get("live")}
                gone = sorted({e.get("gc_label") or "" for e in out["removed"]} - still - {""})
                if gone and not await asyncio.to_thread(self._unlabel, look, c.id, dict.fromkeys(gone, "")):
                    gone = []  # the layers are off; a label left only keeps them from GC longer
                out["labels_removed"] = gone
                out["layers"] = await asyncio.to_thread(lambda: [look.named(e) for e in out["layers"]])
                return answer(out)
            except _containerd_errors() as exc:
                raise errdefs.FailedPrecondition(str(exc)) from None
            finally:
                self._remember(c, look)
                look.client.close()

    def _persist(self, c: Container, rec: dict[str, Any]) -> None:
        try:
            save_record(c.bundle, rec)
        except OSError as exc:  # the change is done; only the metadata could not be kept
            log.error("%s: cannot write %s: %s", c.id, record_path(c.bundle), exc)
