"""The layer repo: containerd snapshot semantics over content-addressed layers.

On disk (ROOT defaults to /var/lib/fractal):

    ROOT/metadata.db        SQLite: snapshots, layers, pins (see metastore.py)
    ROOT/layers/<id>/       one unpacked layer; read-only once committed.  This
                            directory is what guests get (shared read-only).
    ROOT/active/<id>/fs     upper dir of an active snapshot (work/ beside it)
    ROOT/trash/             directories on their way out (removed in background)

A *snapshot* is containerd's name for a node in a parent chain (per
namespace, with labels); a *layer* is the unpacked data, stored once and
named by content (the chain ID from the containerd.io/snapshot.ref label).
Many committed snapshots may name one layer: that is how a second namespace,
or a second image sharing a base, costs no disk and no unpack.  A layer lives
while a snapshot, a child layer or a pin (live layers) refers to it.

Crash safety: every state change is one SQLite transaction.  Directories are
created before the transaction and renamed into place inside it, and removed
only after it commits, so after a crash the only possible mismatches are
orphan directories or a commit whose rename outran its transaction; `recover`
repairs both at start-up and on containerd's Cleanup call.

Reads (stat, mounts, usage of a committed snapshot, list, layers) take no lock:
they read the last committed state on their thread's own SQLite connection
(`MetaStore.reading`), so they never wait behind a write in progress.  That is
sound because the directories follow the rows inside each write transaction
(a directory a committed row names is in place before the COMMIT and goes only
after it), so the state a reader sees is always one whose paths exist.

Permissions: ROOT, layers/, active/ and trash/ are 0700 (fixed at every start).  Layers and
uppers hold whatever images and containers wrote, setuid-root binaries and device nodes
included; a non-root user of the node must not be able to reach them (containerd's
CVE-2021-41103; its snapshotters make these dirs 0700 too).  Everything that uses the dirs
runs as root: containerd's applier, the agent in host mode, virtiofsd for guests.

Full disk: see space.py and `_freeing_tx`.  Giving space back never needs space.
"""

from __future__ import annotations

import fcntl
import functools
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from .. import filters as _filters
from ..stack import snapshot_mounts
from . import opaque, validate
from .errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, RepoLocked, ResourceExhausted
from .fsutil import disk_usage, remove_tree
from .metastore import MetaStore, Queries, SnapshotRow
from .model import Kind, LayerInfo, Mount, SnapshotInfo, Usage
from .space import RESERVE_NAME, Reserve, describe_full, is_full_error

log = logging.getLogger(__name__)

SNAPSHOT_REF_LABEL = "containerd.io/snapshot.ref"
DIR_MODE = 0o700  # ROOT, layers/, active/, trash/: see the module docstring
F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


def _reports_full(fn: F) -> F:
    """A full disk inside `fn` becomes ResourceExhausted saying what is full (never a bare OSError)."""

    @functools.wraps(fn)
    def wrapper(self: "Repo", *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, *args, **kwargs)
        except ResourceExhausted:
            raise
        except (OSError, sqlite3.Error) as e:
            if not is_full_error(e):
                raise
            raise ResourceExhausted(describe_full(self.root, e)) from e

    return wrapper  # type: ignore[return-value]


class Repo:
    """One repo directory, served by one process at a time (flock on ROOT/lock)."""

    def __init__(self, root: Path | str, *, background_removal: bool = True) -> None:
        self.root = Path(root).absolute()
        self.layers_dir = self.root / "layers"
        self.active_dir = self.root / "active"
        self.trash_dir = self.root / "trash"
        self._closed = False
        for d in (self.root, self.layers_dir, self.active_dir, self.trash_dir):
            d.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        self._lockfile = open(self.root / "lock", "a+")
        try:
            fcntl.flock(self._lockfile, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lockfile.close()
            raise RepoLocked(f"repo {self.root} is in use by another process") from None
        self.reserve = Reserve(self.root / RESERVE_NAME)
        try:
            self.meta = self._open_metastore()
        except BaseException:
            self._lockfile.close()
            raise
        self._lock = threading.RLock()
        self._trash_lock = threading.Lock()
        self._inflight: set[str] = set()
        self._background = background_removal
        self._reaper: threading.Thread | None = None
        self._reap_wanted = threading.Event()
        self._closed = False
        try:
            self.recover()
        except ResourceExhausted as e:  # serve anyway: containerd's Remove and Cleanup free space later
            log.error("recover at start: %s", e)
        self.reserve.ensure()
        # layers (and writable uppers) made before opaque markers were mirrored: once per repo
        try:
            opaque.migrate(self.root, [*self.layers_dir.iterdir(), *self.active_dir.glob("*/fs")])
        except OSError as e:  # e.g. a full disk: the stamp is not written, the next start retries
            log.error("mirroring opaque markers of an older repo: %s", e)

    def _open_metastore(self) -> MetaStore:
        """The metastore, also on a full disk: the reserve is released if opening needs room."""
        db = self.root / "metadata.db"
        try:
            return MetaStore(db)
        except (OSError, sqlite3.Error) as e:
            if not is_full_error(e) and not self._fs_full():
                raise
            if not self.reserve.release():
                raise ResourceExhausted(f"cannot open {db}: {describe_full(self.root, e)}") from e
        try:
            return MetaStore(db)
        except (OSError, sqlite3.Error) as e:
            raise ResourceExhausted(f"cannot open {db}: {describe_full(self.root, e)}") from e

    def _fs_full(self) -> bool:
        """SQLite reports a file it cannot create for lack of inodes as "unable to open": look."""
        st = os.statvfs(self.root)
        return st.f_bavail == 0 or (st.f_files > 0 and st.f_favail == 0)

    @classmethod
    def open_readonly(cls, root: Path | str) -> "Repo":
        """For inspection (`fractal repo ...`) while a snapshotter serves the repo.

        Takes no lock and repairs nothing; any mutating call fails in SQLite.
        """
        self = cls.__new__(cls)
        self.root = Path(root).absolute()
        self.layers_dir, self.active_dir, self.trash_dir = (self.root / d for d in ("layers", "active", "trash"))
        db = self.root / "metadata.db"
        if not db.exists():
            raise NotFound(f"{self.root} is not a fractal repo (no metadata.db)")
        self.meta = MetaStore(db, readonly=True)
        self.reserve = Reserve(self.root / RESERVE_NAME)
        self._lock = threading.RLock()
        self._trash_lock = threading.Lock()
        self._inflight = set()
        self._lockfile = None  # type: ignore[assignment]
        self._background = False
        self._reaper = None
        self._reap_wanted = threading.Event()
        self._closed = False
        return self

    def if_free(self, fn: Callable[..., T], *args: Any) -> tuple[bool, T | None]:
        """Run ``fn(*args)`` now if no other thread holds the repo lock: (True, its result);
        else (False, None) without waiting -- the caller runs it where waiting is harmless.

        Why: the snapshotter runs its short writes (Prepare, View, Remove, Update) on its event
        loop, where a hop to a thread costs more than the work; but a write that finds the lock
        held by a Commit or a Cleanup in a worker thread would block the loop, and every client
        with it (reads included), until that walk is done.  The lock is re-entrant, so ``fn``
        takes it again as usual."""
        if not self._lock.acquire(blocking=False):
            return False, None
        try:
            return True, fn(*args)
        finally:
            self._lock.release()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._reap_wanted.set()
        if self._reaper is not None:
            self._reaper.join(timeout=30)
        self.meta.close()
        if self._lockfile is not None:
            self._lockfile.close()

    # -- paths -------------------------------------------------------------
    def layer_path(self, lid: int) -> Path:
        return self.layers_dir / str(lid)

    def _active_path(self, sid: int) -> Path:
        return self.active_dir / str(sid)

    # -- snapshot API (names and semantics as containerd's Snapshotter) -----
    def prepare(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        return self._create(Kind.ACTIVE, key, parent, labels or {})

    def view(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        return self._create(Kind.VIEW, key, parent, labels or {})

    @_reports_full
    def _create(self, kind: Kind, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        try:
            return self._create_once(kind, key, parent, labels)
        except (OSError, sqlite3.Error) as e:
            if not is_full_error(e):
                raise
        # Trash is reclaimed first: what Remove gave back may still be on its way out.
        self.empty_trash()
        return self._create_once(kind, key, parent, labels)

    def _create_once(self, kind: Kind, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        self.reserve.ensure()
        validate.check_key(key)
        validate.check_parent(parent)
        labels = validate.check_labels(labels)
        label_chain = labels.get(SNAPSHOT_REF_LABEL)
        if label_chain is not None:
            validate.check_chain_id(label_chain)
        chain = label_chain or validate.chain_id_from_key(key)
        # The new directory is made outside the lock (only its rename needs it); a
        # crash leaves a ".new-*" orphan that recover() removes.
        tmp = self.active_dir / f".new-{uuid.uuid4().hex}"
        self._inflight.add(tmp.name)
        try:
            (tmp / "fs").mkdir(parents=True, mode=0o755)
            if kind is Kind.ACTIVE:
                (tmp / "work").mkdir(mode=0o700)
            with self._lock:
                if self.meta.snapshot(key) is not None:
                    raise AlreadyExists(f"snapshot {key!r} already exists")
                prow = self._parent_row(parent)
                if label_chain is not None and kind is Kind.ACTIVE:
                    self._link_existing_layer(label_chain, prow, labels)  # raises AlreadyExists if it could
                if prow is not None:
                    top = os.stat(self.layer_path(prow.layer_id))  # type: ignore[arg-type]
                    os.chown(tmp / "fs", top.st_uid, top.st_gid)
                sid = self._insert_and_place(tmp, kind, key, prow, chain if kind is Kind.ACTIVE else None, labels)
                row = SnapshotRow(sid, key, kind, prow.id if prow else None, None, None, labels, 0, 0)
                return self._mounts_of(row, self.meta)
        except BaseException:
            remove_tree(tmp)
            raise
        finally:
            self._inflight.discard(tmp.name)

    def _insert_and_place(self, tmp: Path, kind: Kind, key: str, prow: SnapshotRow | None,
                          chain: str | None, labels: dict[str, str]) -> int:
        """The snapshot's row and its directory ``active/<id>``: both or neither.

        The rename happens inside the transaction; if the COMMIT fails (full disk) it is undone,
        so no ``active/<id>`` outlives a row that never was.  A directory already at that path
        can only be the leftover of such an attempt (the id was never committed, so SQLite hands
        it out again): it is cleared rather than failing every later Prepare.
        """
        dst: Path | None = None
        try:
            with self.meta.tx():
                sid = self.meta.insert_snapshot(
                    key, kind, prow.id if prow else None, None, chain, labels, time.time_ns())
                if os.path.lexists(self._active_path(sid)):
                    log.warning("clearing %s: left by a Prepare whose transaction failed", self._active_path(sid))
                    self._trash(self._active_path(sid))
                os.rename(tmp, self._active_path(sid))
                dst = self._active_path(sid)
            return sid
        except BaseException:
            if dst is not None and not os.path.lexists(tmp):
                os.rename(dst, tmp)  # the caller removes tmp
            raise

    def _parent_row(self, parent: str) -> SnapshotRow | None:
        if not parent:
            return None
        prow = self.meta.snapshot(parent)
        if prow is None:
            raise NotFound(f"parent snapshot {parent!r} does not exist")
        if prow.kind is not Kind.COMMITTED:
            raise InvalidArgument(f"parent {parent!r} is not a committed snapshot")
        return prow

    def _link_existing_layer(self, chain: str, prow: SnapshotRow | None, labels: dict[str, str]) -> None:
        """containerd's remote-snapshot path: the layer is here already, skip the unpack.

        We make (or find) a committed snapshot for the layer under the requested
        parent, carrying the snapshot.ref label, and answer AlreadyExists;
        containerd then finds it by List(labels.ref==chain, parent==parent).
        Only done when the label is there: without it containerd cannot find
        the snapshot and would retry forever; such unpacks (ctr 1.6) are
        deduplicated at Commit instead, by the chain ID in the key.
        """
        layer = self.meta.layer_by_chain(chain)
        parent_layer = prow.layer_id if prow else None
        if layer is None or layer.parent_id != parent_layer:
            return
        parent_id = prow.id if prow else None
        if self.meta.find_committed(chain, parent_id) is None:
            name = chain
            if self.meta.snapshot(name) is not None:
                name = f"{chain}@{uuid.uuid4().hex[:12]}"
            with self.meta.tx():
                self.meta.insert_snapshot(name, Kind.COMMITTED, parent_id, layer.id, None, labels, time.time_ns())
        raise AlreadyExists(f"target snapshot {chain!r} already exists in the repo")

    def mounts(self, key: str) -> list[Mount]:
        with self.meta.reading() as q:
            row = self._row(key, q)
            if row.kind is Kind.COMMITTED:
                raise FailedPrecondition(f"snapshot {key!r} is committed: only active and view snapshots have mounts")
            return self._mounts_of(row, q)

    def _mounts_of(self, row: SnapshotRow, q: Queries) -> list[Mount]:
        lowers = [str(self.layer_path(lid)) for lid in self._parent_layers(row, q)]
        own = self._active_path(row.id)
        if row.kind is Kind.ACTIVE:
            return snapshot_mounts(lowers, str(own / "fs"), str(own / "work"))
        return snapshot_mounts(lowers, empty_dir=str(own / "fs"))

    def _parent_layers(self, row: SnapshotRow, q: Queries) -> list[int]:
        """Layer ids below `row`, nearest first."""
        if row.parent_id is None:
            return []
        layers = q.ancestor_layers(row.id)
        if any(lid is None for lid in layers):
            raise FailedPrecondition(f"snapshot {row.name!r} has a broken parent chain")
        return layers  # type: ignore[return-value]

    @_reports_full
    def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        validate.check_key(name, "name")
        validate.check_key(key)
        labels = validate.check_labels(labels or {})
        with self._lock:
            row = self._row(key)
            if row.kind is not Kind.ACTIVE:
                raise FailedPrecondition(f"snapshot {key!r} is not active")
            if self.meta.snapshot(name) is not None:
                raise AlreadyExists(f"snapshot {name!r} already exists")
        # Measuring may take long for big layers: do it outside the lock, then re-check.
        # The opaque markers containerd wrote (trusted.*) get their user.* twin (opaque.py).
        opaque.mirror(self._active_path(row.id) / "fs")
        usage = disk_usage(self._active_path(row.id) / "fs")
        with self._lock:
            again = self.meta.snapshot(key)
            if again is None or again.id != row.id or again.kind is not Kind.ACTIVE:
                raise NotFound(f"snapshot {key!r} was removed while it was being committed")
            if self.meta.snapshot(name) is not None:
                raise AlreadyExists(f"snapshot {name!r} already exists")
            parent_layer = self.meta.snapshot_by_id(row.parent_id).layer_id if row.parent_id else None  # type: ignore[union-attr]
            chain = row.chain_id or validate.chain_id_from_name(name)
            existing = self.meta.layer_by_chain(chain) if chain else None
            src = self._active_path(row.id) / "fs"
            dst = self.layer_path(row.id)
            moved = False
            try:
                with self.meta.tx():
                    now = time.time_ns()
                    if existing is not None and existing.parent_id == parent_layer:
                        # Unpacked twice concurrently: keep the first copy, drop ours.
                        self.meta.set_committed(row.id, name, existing.id, labels, now)
                    else:
                        self.meta.insert_layer(
                            row.id, chain if existing is None else None, parent_layer, usage.size, usage.inodes, now
                        )
                        self.meta.set_committed(row.id, name, row.id, labels, now)
                        os.rename(src, dst)
                        moved = True
            except BaseException:
                if moved and dst.exists() and not src.exists():
                    os.rename(dst, src)
                raise
            self._trash(self._active_path(row.id))

    @_reports_full
    def remove(self, key: str) -> None:
        validate.check_key(key)
        with self._lock:
            row = self._row(key)
            if self.meta.has_children(row.id):
                raise FailedPrecondition(f"cannot remove snapshot {key!r} with child")

            def forget() -> list[int]:
                self.meta.delete_snapshot(row.id)
                return self._collect_layers(row.layer_id)

            try:
                dead = self._freeing_tx(forget)
            except ResourceExhausted:
                # Not even the reserve was enough: an active snapshot's data (a failed unpack,
                # a container's upper) goes anyway; its row stays until containerd's retry.
                if row.kind is not Kind.COMMITTED:
                    self._trash(self._active_path(row.id))
                    self.empty_trash()
                raise
            if row.kind is not Kind.COMMITTED:
                self._trash(self._active_path(row.id))
            for lid in dead:
                self._trash(self.layer_path(lid))

    def _freeing_tx(self, body: Callable[[], T]) -> T:
        """One transaction that gives space back: if the disk is too full to commit it, the
        reserve is released and it is retried once (the body runs again from scratch)."""
        for attempt in (1, 2):
            try:
                with self.meta.tx():
                    return body()
            except (OSError, sqlite3.Error) as e:
                if not is_full_error(e):
                    raise
                if attempt == 2:
                    raise ResourceExhausted(describe_full(self.root, e)) from e
                self.reserve.release()
                self.empty_trash()
        raise AssertionError("unreachable")

    def _collect_layers(self, lid: int | None) -> list[int]:
        """Delete layer rows no longer used, walking down the chain (inside a tx)."""
        dead: list[int] = []
        while lid is not None and self.meta.layer_users(lid) == 0:
            layer = self.meta.layer(lid)
            if layer is None:
                break
            self.meta.delete_layer(lid)
            dead.append(lid)
            lid = layer.parent_id
        return dead

    def stat(self, key: str) -> SnapshotInfo:
        with self.meta.reading() as q:
            return self._info(self._row(key, q), q)

    @_reports_full
    def update(self, info: SnapshotInfo, fieldpaths: Sequence[str] = ()) -> SnapshotInfo:
        """Update labels, as containerd's storage.UpdateInfo: only `labels` and `labels.*` may change."""
        validate.check_key(info.name)
        new_labels = validate.check_labels(info.labels)
        with self._lock:
            row = self._row(info.name)
            labels = dict(row.labels)
            if not fieldpaths:
                labels = new_labels
            for path in fieldpaths:
                if path == "labels":
                    labels = dict(new_labels)
                elif path.startswith("labels."):
                    k = path[len("labels."):]
                    if k in new_labels:
                        labels[k] = new_labels[k]
                    else:
                        labels.pop(k, None)
                else:
                    raise InvalidArgument(f"cannot update {path!r} field on snapshot {info.name!r}")
            validate.check_labels(labels)
            with self.meta.tx():
                self.meta.set_labels(row.id, labels, time.time_ns())
            return self._info(self.meta.snapshot_by_id(row.id), self.meta)  # type: ignore[arg-type]

    def usage(self, key: str) -> Usage:
        source = self._usage_source(key)
        return source if isinstance(source, Usage) else disk_usage(source)

    def recorded_usage(self, key: str) -> Usage | None:
        """Usage without walking a directory: a committed layer's (measured at Commit) or a
        view's (nothing); None for an active snapshot, whose upper must be measured (`usage`)."""
        source = self._usage_source(key)
        return source if isinstance(source, Usage) else None

    def _usage_source(self, key: str) -> Usage | Path:
        """The recorded usage, or the active snapshot's upper directory to measure."""
        with self.meta.reading() as q:
            row = self._row(key, q)
            if row.kind is Kind.COMMITTED:
                layer = q.layer(row.layer_id)  # type: ignore[arg-type]
                return Usage(layer.size, layer.inodes) if layer else Usage()
            if row.kind is Kind.VIEW:
                return Usage()
            return self._active_path(row.id) / "fs"

    def list(self, filter_strings: Sequence[str] = ()) -> Iterable[SnapshotInfo]:
        try:
            flt = _filters.parse(list(filter_strings))
        except _filters.FilterSyntaxError as e:
            raise InvalidArgument(f"bad filter: {e}") from None
        with self.meta.reading() as q:
            rows = q.snapshots()
        by_id = {r.id: r for r in rows}
        infos = [self._info(r, q, by_id) for r in rows]
        for info in infos:
            adaptor = _filters.snapshot_adaptor(info.name, info.parent, info.kind.filter_name, info.labels)
            if flt.match(adaptor):
                yield info

    def _row(self, key: str, q: Queries | None = None) -> SnapshotRow:
        row = (q or self.meta).snapshot(key)
        if row is None:
            raise NotFound(f"snapshot {key!r} does not exist")
        return row

    @staticmethod
    def _info(row: SnapshotRow, q: Queries, by_id: Mapping[int, SnapshotRow] | None = None) -> SnapshotInfo:
        parent = ""
        if row.parent_id is not None:
            p = by_id.get(row.parent_id) if by_id is not None else q.snapshot_by_id(row.parent_id)
            parent = p.name if p else ""
        return SnapshotInfo(row.name, row.kind, parent, dict(row.labels), row.created_ns, row.updated_ns)

    # -- pins: references from outside containerd (live-added layers) -------
    @_reports_full
    def pin(self, chain_or_id: str, owner: str) -> int:
        with self._lock, self.meta.tx():
            lid = self._resolve_layer(chain_or_id)
            self.meta.pin(lid, owner)
            return lid

    @_reports_full
    def unpin(self, chain_or_id: str, owner: str) -> None:
        with self._lock:

            def forget() -> list[int]:
                lid = self._resolve_layer(chain_or_id)
                self.meta.unpin(lid, owner)
                return self._collect_layers(lid)

            dead = self._freeing_tx(forget)
            for d in dead:
                self._trash(self.layer_path(d))

    def _resolve_layer(self, chain_or_id: str) -> int:
        layer = self.meta.layer_by_chain(chain_or_id)
        if layer is None and chain_or_id.isdigit():
            layer = self.meta.layer(int(chain_or_id))
        if layer is None:
            raise NotFound(f"layer {chain_or_id!r} is not in the repo")
        return layer.id

    # -- introspection for `fractal repo` -----------------------------------
    def layers(self) -> list[LayerInfo]:
        with self.meta.reading() as q:
            out = []
            for layer in q.layers():
                users = [s.name for s in q.snapshots_of_layer(layer.id)]
                users += [f"pin:{o}" for o in q.pins(layer.id)]
                out.append(LayerInfo(layer.id, layer.chain_id, layer.parent_id, layer.size, layer.inodes,
                                     layer.created_ns, tuple(users), str(self.layer_path(layer.id))))
            return out

    # -- crash recovery and removal ------------------------------------------
    @_reports_full
    def recover(self) -> list[str]:
        """Make directories agree with the metadata.  Returns what it did, for logs.

        Safe to run any time the lock is held: it only removes what no row
        names and re-does renames a crash interrupted.
        """
        actions: list[str] = []
        with self._lock:
            for d in (self.root, self.layers_dir, self.active_dir, self.trash_dir):
                if os.stat(d).st_mode & 0o7777 != DIR_MODE:
                    os.chmod(d, DIR_MODE)  # a repo made by an older version (0711/0755)
                    actions.append(f"made {d} {DIR_MODE:o}")
            rows = self.meta.snapshots()
            live_active = {r.id for r in rows if r.kind is not Kind.COMMITTED}
            layer_ids = {layer.id for layer in self.meta.layers()}
            for r in rows:
                if r.kind is Kind.ACTIVE and not (self._active_path(r.id) / "fs").exists():
                    half = self.layer_path(r.id)
                    if half.exists() and r.id not in layer_ids:
                        os.rename(half, self._active_path(r.id) / "fs")
                        actions.append(f"undid interrupted commit of {r.name!r}")
                    else:
                        log.warning("active snapshot %r has lost its directory", r.name)
            for entry in list(self.active_dir.iterdir()):
                if entry.name in self._inflight:  # a Prepare is building it right now
                    continue
                if not (entry.name.isdigit() and int(entry.name) in live_active):
                    self._trash(entry)
                    actions.append(f"removed orphan {entry}")
            for entry in list(self.layers_dir.iterdir()):
                if not (entry.name.isdigit() and int(entry.name) in layer_ids):
                    self._trash(entry)
                    actions.append(f"removed orphan {entry}")

            def collect() -> list[int]:
                dead: list[int] = []
                for layer in self.meta.layers():
                    if self.meta.layer(layer.id) is not None and self.meta.layer_users(layer.id) == 0:
                        dead += self._collect_layers(layer.id)
                return dead

            dead = self._freeing_tx(collect)
            for lid in dead:
                self._trash(self.layer_path(lid))
                actions.append(f"removed unused layer {lid}")
        for a in actions:
            log.info("recover: %s", a)
        self._reap_wanted.set()
        self._ensure_reaper()
        return actions

    def _trash(self, path: Path) -> None:
        if not os.path.lexists(path):
            return
        dst = self.trash_dir / f"{path.name}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(path, dst)
        except OSError as e:
            if is_full_error(e):  # no room for trash/'s entry: delete in place, which needs none
                self._remove_now(path)
                return
            # e.g. still a mount point: metadata is already right, recover() retries
            log.warning("cannot move %s to trash: %s", path, e)
            return
        if self._background:
            self._reap_wanted.set()
            self._ensure_reaper()
        else:
            self.empty_trash()

    def _ensure_reaper(self) -> None:
        if not self._background:
            self.empty_trash()
            return
        if self._reaper is None or not self._reaper.is_alive():
            self._reaper = threading.Thread(target=self._reap_loop, name="repo-trash", daemon=True)
            self._reaper.start()

    def _reap_loop(self) -> None:
        while not self._closed:
            self._reap_wanted.wait()
            self._reap_wanted.clear()
            self.empty_trash()

    def empty_trash(self) -> None:
        """Delete what is in trash/ (one caller at a time: the reaper, or a Prepare on a full disk)."""
        with self._trash_lock:
            for entry in list(self.trash_dir.iterdir()):
                self._remove_now(entry)

    @staticmethod
    def _remove_now(path: Path) -> None:
        try:
            remove_tree(path)
        except OSError as e:  # busy mounts etc.: retried at next start
            log.warning("cannot remove %s: %s", path, e)
