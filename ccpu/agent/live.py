"""Live layers: add or remove lower layers of a RUNNING container's root filesystem.

overlayfs cannot change its lower layers once mounted, so a restack builds a second overlay
(new lowers, the container's SAME upper, a fresh work dir) and moves the container onto it
with pivot_root inside the container's mount namespace -- without stopping any process.

Mechanism (docs/agent-protocol.md, "Live layers"; checked on kernel 6.18 and on 6.1):

1. In the agent's namespace, mount the new overlay at a staging dir next to the rootfs
   (`bundle/rootfs.live`): lowerdir = the new stack, upperdir = the container's upper,
   workdir = a fresh empty `<work>.N` beside the original work dir (same filesystem as the
   upper).  Long stacks go through `mounts.mount_all` (relative lowerdirs, >page).
2. `open_tree(staging, OPEN_TREE_CLONE)`: a detached copy of that mount (same superblock).
3. A forked helper `setns`es into the container's mount namespace and checks that its root is
   the container init's root (same mount id), then checks that every mount point it must
   carry over (the direct submounts of the old root: /proc, /dev, /sys, /etc/hosts binds...)
   exists in the new stack with the same kind (directory or not, not a symlink).
4. `move_mount(tree, "/")`: the new root is attached ON TOP OF the container's root.  Why "/":
   it exists in every container, it is on the root mount itself (a staging dir under a submount
   such as /dev would be copied along with that submount into the new root), and it hides
   nothing: path lookups start at each process's root and never descend into a mount stacked
   on the root itself, so until the pivot the container sees exactly its old tree.  (Tried:
   a plain dir on the root mount such as /tmp works too, but shows the new root there until the
   pivot and breaks if the image mounts a tmpfs on it; /dev/shm leaves a copy of the whole new
   root visible at /dev/shm afterwards, because it is copied along with /dev.)
5. The helper (cwd = the new root) makes the new root private, gives it the old root's
   per-mount flags (ro, nosuid, ...), and recursively bind-mounts every direct submount of the
   old root onto the same path in the new root (copies of the same mounts: same superblocks,
   same propagation).  Copies rather than MS_MOVE: the old root keeps all its mounts until
   the pivot, so there is no instant at which a container process finds /proc empty, and a
   failure before the pivot needs no moving back -- detaching the new root undoes everything.
6. `pivot_root(".", ".")`, `umount2(".", MNT_DETACH)` (detaches the old root and, with it, the
   old submounts), `chdir("/")`.  pivot_root moves the root and cwd of every process of that
   namespace whose root/cwd was the old root: they see the new stack on their next lookup.
   This is the commit point.
7. Back in the agent's namespace: the old overlay at `bundle/rootfs` is unmounted and replaced
   by a bind of the staging mount (so `bundle/rootfs` shows the container's current root,
   the same overlay instance, and `delete` unmounts it as before); the staging mount goes.

Atomicity: any failure before the pivot leaves the container as it was (the new root, if
attached, is detached with its copies; the staging mount and the fresh work dir are removed)
and the request fails.  The old work dirs we created are removed when the container is
deleted (an old overlay can live on while open files pin it); the client's own work dir is
never removed.  Two overlays share the upper for the few milliseconds between step 1 and
step 7 (the kernel warns "upperdir is in use"); restacks of one container are serialized.

Semantics for the processes in the container:
- open file descriptors keep pointing at the old overlay until closed (reads still work; the
  old overlay lives on, detached, until its last user is gone);
- a process whose cwd is a subdirectory of the root keeps that (old) directory until it
  chdirs; a cwd exactly at "/" moves with pivot_root;
- files the container wrote (in the upper) stay; files from a removed layer disappear unless
  they were copied up; files of an added layer appear (unless the upper hides them);
- processes exec'd after the restack (and `runc exec`) see the new stack;
- mounts made on the old root are carried over (as copies); the new root mount is private.

The planning part (`plan_restack`) is pure; `restack` does the I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import stat
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import stack
from ..linux import mountinfo, ns, statx
from ..linux.mount import (MNT_DETACH, MS_BIND, MS_NOATIME, MS_NODEV, MS_NODIRATIME, MS_NOEXEC, MS_NOSUID,
                           MS_PRIVATE, MS_RDONLY, MS_REC, MS_RELATIME, MS_REMOUNT, mount, move_mount_fd,
                           open_tree_clone, pivot_root, umount)
from ..linux.reaper import Reaper, fork_call
from ..linux.taskstate import Op, allowed
from . import limits, mounts, protocol

log = logging.getLogger(__name__)

MAX_LOWERS = 500  # overlayfs' OVL_MAX_STACK
FAIL_ENV = "FRACTAL_LIVE_FAIL_AT"  # tests: make the helper fail at "attach" or "binds"

# per-mount flags of the old root that the new root gets too (mountinfo word -> MS_* flag)
_MOUNT_FLAGS = {
    "ro": MS_RDONLY,
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "relatime": MS_RELATIME,
}


# ---------------------------------------------------------------------------------------------
# planning (pure)


def plan_restack(
    lowers: Sequence[str],
    add: Sequence[str] = (),
    remove: Sequence[str] = (),
    position: str | int = "top",
    upper: str | None = None,
    work: str | None = None,
) -> list[str]:
    """The new lowers (nearest first) after removing `remove` and inserting `add`.

    Removals are applied first, then `add` (itself nearest first) is inserted as a block:
    `position` "top" (index 0: just below the writable upper), "bottom", or an index into the
    stack that remains after the removals.  A layer both removed and added is moved.

    Errors: NotFound (removing a layer that is not in the stack), AlreadyExists (adding one that
    is), FailedPrecondition (no lower layer would be left), InvalidArgument (nothing to do,
    duplicates, a bad position, a layer overlapping the upper or work dir, too many layers).
    """
    add, remove = list(add), list(remove)
    if not add and not remove:
        raise protocol.InvalidArgument("restack needs layers to add or to remove")
    for what, dirs in (("add", add), ("remove", remove)):
        if len(set(dirs)) != len(dirs):
            raise protocol.InvalidArgument(f"{what} names a layer twice")
    for d in add:
        for other, name in ((upper, "upper"), (work, "work dir")):
            if other is not None and (d == other or _inside(d, other) or _inside(other, d)):
                raise protocol.InvalidArgument(f"layer {d} overlaps the container's {name} {other}")
    current = list(lowers)
    for d in remove:
        if d not in current:
            raise protocol.NotFound(f"layer {d} is not in the container's stack")
    gone = set(remove)
    kept = [d for d in current if d not in gone]
    for d in add:
        if d in kept:
            raise protocol.AlreadyExists(f"layer {d} is already in the container's stack")
    if position == "top":
        index = 0
    elif position == "bottom":
        index = len(kept)
    elif isinstance(position, int) and not isinstance(position, bool):
        if not 0 <= position <= len(kept):
            raise protocol.InvalidArgument(f"position {position} is outside 0..{len(kept)}")
        index = position
    else:
        raise protocol.InvalidArgument(f"position must be 'top', 'bottom' or an index, not {position!r}")
    new = kept[:index] + add + kept[index:]
    if not new:
        raise protocol.FailedPrecondition(
            "restack would remove every image layer: a container keeps at least one lower layer"
        )
    if len(new) > MAX_LOWERS:
        raise protocol.InvalidArgument(f"{len(new)} layers: overlayfs stacks at most {MAX_LOWERS}")
    return new


def _inside(path: str, parent: str) -> bool:
    return os.path.commonpath([path, parent]) == parent


def fresh_work_name(work_base: str, taken: Sequence[str] = ()) -> str:
    """`<work_base>.N` for the smallest N >= 1 that does not exist (and is not `taken`)."""
    n = 1
    while True:
        candidate = f"{work_base}.{n}"
        if candidate not in taken and not os.path.lexists(candidate):
            return candidate
        n += 1


def root_flags(options: Iterable[str]) -> int:
    """MS_* flags for a mount's per-mount options (as mountinfo prints them)."""
    flags = 0
    for word in options:
        flags |= _MOUNT_FLAGS.get(word, 0)
    return flags


def submounts(infos: Sequence[mountinfo.MountInfo], root_id: int) -> list[str]:
    """Mount points of the direct submounts of mount `root_id`, in mount order, without the
    leading "/".  Deeper mounts (/dev/pts under /dev) come along with their parent."""
    return [m.mountpoint.lstrip("/") for m in infos
            if m.parent_id == root_id and m.mount_id != root_id and m.mountpoint != "/"]


# ---------------------------------------------------------------------------------------------
# per-container state


@dataclass
class LiveStack:
    """What the agent knows about a `layers` container's stack (Container.live): the single
    source of truth of what the container's root is stacked from (the shim's bundle record only
    caches metadata about it).  ``stack`` is the validated value create mounted, replaced by
    each restack (its work dir is then one of ours)."""

    stack: stack.LayerStack
    base_work: str | None  # the client's work dir (never removed by us)
    created_works: list[str] = field(default_factory=list)  # ours, removed on delete
    leftover_mounts: list[str] = field(default_factory=list)  # unmounted on delete
    history: list[dict[str, Any]] = field(default_factory=list)
    _lock: asyncio.Lock | None = None

    @property
    def lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    def describe(self) -> dict[str, Any]:
        """The ``layers`` answer: the stack's wire shape (without its kind) and the history."""
        out = {k: v for k, v in self.stack.to_wire().items() if k != "kind"}
        out.setdefault("upper", None)
        out.setdefault("work", None)
        return {**out, "history": list(self.history)}


def initial_stack(layers: stack.LayerStack | None) -> LiveStack | None:
    """The LiveStack for the stack a `create` mounted (mounts.rootfs_plan validated it), or
    None for rootfs kinds the agent does not stack itself."""
    if layers is None:
        return None
    ls = LiveStack(layers, layers.work)
    ls.history.append({"at": time.time_ns(), "lowers": list(layers.lowers),
                       "added": list(layers.lowers), "removed": []})
    return ls


def cleanup(live: LiveStack | None) -> None:
    """After the container is gone: our staging leftovers and work dirs."""
    if live is None:
        return
    for mp in live.leftover_mounts:
        with contextlib.suppress(OSError):
            mounts.unmount(mp, 1)
            os.rmdir(mp)
    live.leftover_mounts.clear()
    for d in live.created_works:
        _rmtree(d)
    live.created_works.clear()


def _rmtree(path: str) -> None:
    try:
        import shutil  # here: only a removal needs it, not the agent's start (docs/vm.md)

        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("cannot remove %s: %s", path, e)


# ---------------------------------------------------------------------------------------------
# the operations


def _live_of(c: Any) -> LiveStack:
    live = getattr(c, "live", None)
    if live is None:
        raise protocol.FailedPrecondition(
            f"container {c.id} was not created with rootfs kind 'layers': only stacks the agent "
            "mounted itself can be restacked"
        )
    return live


async def layers_op(sup: Any, args: Mapping[str, Any]) -> dict[str, Any]:
    c = sup._container(args)
    return _live_of(c).describe()


async def restack_op(sup: Any, args: Mapping[str, Any]) -> dict[str, Any]:
    c = sup._container(args)
    live = _live_of(c)
    add = protocol.resolve_all(protocol.arg_list(args, "add", []) or [], sup.layer_roots, "layer dir")
    remove = protocol.resolve_all(protocol.arg_list(args, "remove", []) or [], sup.layer_roots, "layer dir")
    position = args.get("position", "top")
    if position is None:
        position = "top"
    for d in add:
        if not os.path.isdir(d):
            raise protocol.InvalidArgument(f"layer dir {d} is not a directory")
    async with live.lock:  # the server serializes per container already; this guards direct callers
        if not allowed(Op.RESTACK, c.init.status) or c.init.pid <= 0:
            raise protocol.FailedPrecondition(f"container {c.id} is {c.init.status}")
        now = live.stack
        new = plan_restack(now.lowers, add, remove, position, now.upper, now.work)
        done = await restack(sup.reaper, c.init.pid, c.rootfs, new, now.upper, live.base_work,
                             agent_mounted=c.mounted, taken=live.created_works)  # fmt: skip
        c.mounted = done.agent_mounted
        if done.work is not None:
            live.created_works.append(done.work)
        live.leftover_mounts.extend(done.leftover_mounts)
        live.stack = now.with_lowers(done.lowers)
        if done.work is not None:
            live.stack = live.stack.with_writable(now.upper, done.work)
        live.history.append({"at": time.time_ns(), "lowers": list(new), "added": add, "removed": remove})
        log.info("restacked %s in %.1f ms (%s)", c.id, done.elapsed_ms, done.timings)
        if getattr(sup, "cgroup_parent", None):  # a guest: the old overlay must let go of the upper
            limits.forget_old_stack()
    return {"lowers": new}


# ---------------------------------------------------------------------------------------------
# the I/O


@dataclass(frozen=True)
class Restacked:
    lowers: list[str]
    work: str | None  # the new overlay's work dir (created by us), None without an upper
    agent_mounted: int  # mounts now at `rootfs` in the agent's namespace
    leftover_mounts: list[str]  # to unmount on delete (only if replacing rootfs failed)
    elapsed_ms: float
    timings: dict[str, float]


async def restack(
    reaper: Reaper,
    container_pid: int,
    rootfs: str,
    new_lowers: Sequence[str],
    upper: str | None,
    work_base: str | None,
    *,
    agent_mounted: int = 1,
    taken: Sequence[str] = (),
) -> Restacked:
    """Move the running container `container_pid` onto an overlay of `new_lowers` over `upper`.

    `rootfs` is where the agent mounted the container's current root (bundle/rootfs).  Atomic:
    on any failure before the pivot nothing changed (see the module docstring) and an
    AgentError is raised.  After the pivot the change is done, whatever happens to the agent's
    own view, and the new mount info is returned."""
    t0 = time.monotonic()
    timings: dict[str, float] = {}

    def lap(name: str) -> None:
        timings[name] = round((time.monotonic() - t0) * 1000, 2)

    new_work = None
    if upper is not None:
        if work_base is None:
            raise protocol.InvalidArgument("a writable stack needs a work dir")
        new_work = fresh_work_name(work_base, taken)
    try:
        planned = stack.snapshot_mounts(list(new_lowers), upper, new_work)
    except stack.StackError as e:
        raise protocol.InvalidArgument(str(e)) from None
    staging = rootfs.rstrip("/") + ".live"
    if mountinfo.is_mountpoint(staging):  # left by an agent that died mid-restack
        mounts.unmount(staging, 8)
    os.makedirs(staging, exist_ok=True)
    if new_work is not None:
        os.mkdir(new_work, 0o700)
    staged = 0
    tree_fd = ns_fd = -1
    committed = False
    warning = ""
    try:
        staged = await mounts.mount_all(reaper, planned, staging)
        lap("mount")
        tree_fd = open_tree_clone(staging)
        try:
            ns_fd = os.open(f"/proc/{container_pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
            root_id = statx.mount_id(f"/proc/{container_pid}/root")
            infos = mountinfo.read(container_pid)
        except FileNotFoundError:
            raise protocol.FailedPrecondition(f"container process {container_pid} is gone") from None
        root_opts = next((m.options for m in infos if m.mount_id == root_id), frozenset())
        carried = submounts(infos, root_id)
        lap("prepare")
        message = await _run_in_child(reaper, lambda: _switch_root(ns_fd, tree_fd, root_id, carried, root_flags(root_opts)))
        lap("pivot")
        if message.startswith("ok"):
            committed = True
            warning = message[3:]
        elif not message:  # the helper died without a word: did it get past the pivot?
            with contextlib.suppress(OSError):
                committed = statx.mount_id(f"/proc/{container_pid}/root") != root_id
            if not committed:
                raise protocol.Internal("restack helper died before the pivot")
            warning = "the helper died after the pivot"
        else:
            raise helper_error(message)
    except OSError as e:
        raise protocol.Internal(f"restack: {e}") from None
    finally:
        for fd in (tree_fd, ns_fd):
            if fd >= 0:
                os.close(fd)
        if not committed:
            try:
                mounts.unmount(staging, staged)
                os.rmdir(staging)
            except OSError as e:
                log.error("restack failed and its staging mount %s stays: %s", staging, e)
            if new_work is not None:
                _rmtree(new_work)
    if warning:
        log.warning("restack of pid %d: %s", container_pid, warning)
    # committed: the agent's view of the rootfs becomes the container's new root
    leftover: list[str] = []
    mounted = 0
    try:
        mounts.unmount(rootfs, agent_mounted)
        mount(staging, rootfs, None, MS_BIND, None)
        mounted = 1
        mounts.unmount(staging, staged)
        os.rmdir(staging)
    except OSError as e:
        log.error("restack done, but the agent's view of %s is not updated: %s", rootfs, e)
        if mountinfo.is_mountpoint(staging):
            leftover.append(staging)
    lap("agent-view")
    return Restacked(list(new_lowers), new_work, mounted, leftover, timings["agent-view"], timings)


def helper_error(message: str) -> protocol.AgentError:
    """The error for the restack helper's failure line (``<stage>:<errno>:<text>``): what went
    wrong before the pivot is the caller's (FailedPrecondition) or ours (Internal)."""
    stage, _, rest = message.partition(":")
    err_s, _, text = rest.partition(":")
    err = int(err_s) if err_s.isdigit() else 0
    text = f"restack failed, the container is unchanged: {text}"
    if stage == "setns" and err in (errno.ENOENT, errno.ESRCH, errno.EINVAL):
        return protocol.FailedPrecondition(text)
    if stage in ("root", "target"):
        return protocol.FailedPrecondition(text)
    return protocol.Internal(text)


async def _run_in_child(reaper: Reaper, fn: Any) -> str:
    """Run `fn` (returning a status line) in a forked child; its line ("" if it died)."""
    r, w = os.pipe()
    try:

        def child() -> int:
            os.close(r)
            try:
                line = fn()
            except BaseException as e:  # noqa: BLE001 -- the child reports, never raises
                line = f"helper:0:{type(e).__name__}: {e}"
            os.write(w, line.encode("utf-8", "replace")[:4000])
            return 0 if line.startswith("ok") else 1

        exited = fork_call(reaper, child)
        os.close(w)
        w = -1
        await exited
        os.set_blocking(r, False)
        chunks = []
        while True:
            try:
                data = os.read(r, 4096)
            except BlockingIOError:
                break
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks).decode("utf-8", "replace")
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def _switch_root(ns_fd: int, tree_fd: int, root_id: int, carried: Sequence[str], flags: int) -> str:
    """The helper (a forked child; syscalls only): steps 3-6 of the module docstring.

    Returns "ok" or "ok:<warning>" once the pivot happened, else "<stage>:<errno>:<message>"
    after undoing whatever it did in the container's namespace."""
    fail_at = os.environ.get(FAIL_ENV, "")
    try:
        ns.setns(ns_fd, ns.CLONE_NEWNS)
    except OSError as e:
        return f"setns:{e.errno}:cannot enter the container's mount namespace: {e.strerror}"
    try:
        if statx.mount_id("/") != root_id:
            return "root:0:the container init's root is not the root of its mount namespace"
        for rel in carried:
            try:
                old_is_dir = stat.S_ISDIR(os.lstat("/" + rel).st_mode)
                st = os.lstat(rel, dir_fd=tree_fd)
            except OSError as e:
                return f"target:{e.errno}:the new stack has no /{rel} to carry the container's mount there ({e.strerror})"
            if stat.S_ISLNK(st.st_mode) or stat.S_ISDIR(st.st_mode) != old_is_dir:
                kind = "a directory" if old_is_dir else "a file"
                return f"target:{errno.ENOTDIR}:/{rel} is not {kind} in the new stack: cannot carry the container's mount there"
    except OSError as e:
        return f"check:{e.errno}:{e}"
    try:
        move_mount_fd(tree_fd, "/")
    except OSError as e:
        return f"attach:{e.errno}:{e}"
    # from here on, failures detach the new root again (with the copies made on it)
    stage = "attach"
    try:
        os.fchdir(tree_fd)
        if fail_at == "attach":
            raise OSError(errno.EIO, "injected failure after attaching the new root")
        stage = "binds"
        mount(None, ".", None, MS_PRIVATE, None)
        if flags:
            mount(None, ".", None, MS_REMOUNT | MS_BIND | flags, None)
        for rel in carried:
            mount("/" + rel, rel, None, MS_BIND | MS_REC, None)
        if fail_at == "binds":
            raise OSError(errno.EIO, "injected failure before the pivot")
        stage = "pivot"
        pivot_root(".", ".")
    except OSError as e:
        try:
            umount(".", MNT_DETACH)  # cwd is the new root: detach it
        except OSError as e2:
            return f"{stage}:{e.errno}:{e}; and the new root could not be detached: {e2}"
        return f"{stage}:{e.errno}:{e}"
    # committed
    try:
        umount(".", MNT_DETACH)  # the old root, now stacked on the new one
        os.chdir("/")
    except OSError as e:
        return f"ok:pivoted, but the old root was not detached: {e}"
    return "ok"
