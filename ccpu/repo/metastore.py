"""SQLite storage of snapshot and layer metadata: rows, not semantics.

Like containerd's snapshots/storage package this layer only stores and
fetches; `ccpu.repo.store` decides what is allowed.  Every change the store
makes is one SQLite transaction, so a crash leaves either the old or the new
state, never half of one; directories are reconciled against these rows at
start-up (see store.Repo.recover).

Durability: WAL journal with synchronous=NORMAL survives a killed process
(the kill -9 case containerd users meet); only an OS crash may lose the last
transactions, never corrupt the file.

Readers never wait behind writers: every thread that reads (the event loop,
each worker thread) gets its own read-only connection (`MetaStore.reading`).
In WAL mode a reader sees the last committed state and takes no lock a
writer holds, so a Stat or Mounts answers while a Commit or a Cleanup is
in the middle of its transaction (issue 13).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .model import Kind

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS layers (
    id          INTEGER PRIMARY KEY,          -- directory layers/<id>; = id of the snapshot that made it
    chain_id    TEXT UNIQUE,                  -- content identity (containerd chain ID), NULL if unknown
    parent_id   INTEGER REFERENCES layers(id),
    size        INTEGER NOT NULL DEFAULT 0,
    inodes      INTEGER NOT NULL DEFAULT 0,
    created_ns  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS snapshots (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: names active/<id>, layers/<id>
    name        TEXT NOT NULL UNIQUE,
    kind        INTEGER NOT NULL,
    parent_id   INTEGER REFERENCES snapshots(id),
    layer_id    INTEGER REFERENCES layers(id),      -- COMMITTED: the layer it names
    chain_id    TEXT,                               -- ACTIVE: content identity the commit will carry
    labels      TEXT NOT NULL DEFAULT '{}',
    created_ns  INTEGER NOT NULL,
    updated_ns  INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent_id);
CREATE INDEX IF NOT EXISTS snapshots_layer ON snapshots(layer_id);
CREATE TABLE IF NOT EXISTS pins (
    layer_id    INTEGER NOT NULL REFERENCES layers(id),
    owner       TEXT NOT NULL,                      -- who holds the layer outside containerd (live layers)
    PRIMARY KEY (layer_id, owner)
);
"""


@dataclass(frozen=True, slots=True)
class SnapshotRow:
    id: int
    name: str
    kind: Kind
    parent_id: int | None
    layer_id: int | None
    chain_id: str | None
    labels: dict[str, str]
    created_ns: int
    updated_ns: int


@dataclass(frozen=True, slots=True)
class LayerRow:
    id: int
    chain_id: str | None
    parent_id: int | None
    size: int
    inodes: int
    created_ns: int


_SNAP_COLS = "id, name, kind, parent_id, layer_id, chain_id, labels, created_ns, updated_ns"
_LAYER_COLS = "id, chain_id, parent_id, size, inodes, created_ns"


def _snap(row: tuple | None) -> SnapshotRow | None:
    if row is None:
        return None
    return SnapshotRow(row[0], row[1], Kind(row[2]), row[3], row[4], row[5], json.loads(row[6]), row[7], row[8])


def _layer(row: tuple | None) -> LayerRow | None:
    return None if row is None else LayerRow(*row)


def _connect_ro(path: Path) -> sqlite3.Connection:
    """A read-only connection: WAL lets it in beside the writer (another process's too)."""
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)


class Queries:
    """The read queries, over one connection (``_db``) guarded by ``_lock``.

    Shared by the writer (`MetaStore`: reads inside a write transaction must see
    its own uncommitted rows) and the per-thread readers (`MetaReader`).
    """

    _db: sqlite3.Connection
    _lock: threading.RLock

    def snapshot(self, name: str) -> SnapshotRow | None:
        with self._lock:
            return _snap(self._db.execute(f"SELECT {_SNAP_COLS} FROM snapshots WHERE name=?", (name,)).fetchone())

    def snapshot_by_id(self, sid: int) -> SnapshotRow | None:
        with self._lock:
            return _snap(self._db.execute(f"SELECT {_SNAP_COLS} FROM snapshots WHERE id=?", (sid,)).fetchone())

    def snapshots(self) -> list[SnapshotRow]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_SNAP_COLS} FROM snapshots ORDER BY id").fetchall()
        return [_snap(r) for r in rows]  # type: ignore[misc]

    def ancestor_layers(self, sid: int) -> list[int | None]:
        """Layer ids of the parent chain of snapshot `sid`, nearest first, in one query."""
        with self._lock:
            rows = self._db.execute(
                "WITH RECURSIVE chain(id, parent_id, layer_id, depth) AS ("
                " SELECT id, parent_id, layer_id, 0 FROM snapshots WHERE id=?"
                " UNION ALL SELECT s.id, s.parent_id, s.layer_id, c.depth + 1"
                " FROM snapshots s JOIN chain c ON s.id = c.parent_id)"
                " SELECT layer_id FROM chain WHERE depth > 0 ORDER BY depth",
                (sid,),
            ).fetchall()
        return [r[0] for r in rows]

    def snapshots_of_layer(self, layer_id: int) -> list[SnapshotRow]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_SNAP_COLS} FROM snapshots WHERE layer_id=? ORDER BY id", (layer_id,)).fetchall()
        return [_snap(r) for r in rows]  # type: ignore[misc]

    def has_children(self, sid: int) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM snapshots WHERE parent_id=? LIMIT 1", (sid,)).fetchone() is not None

    def find_committed(self, chain_id: str, parent_id: int | None) -> SnapshotRow | None:
        """A committed snapshot labelled with `chain_id` under exactly `parent_id`."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_SNAP_COLS} FROM snapshots s WHERE kind=? AND parent_id IS ?"
                " AND layer_id IN (SELECT id FROM layers WHERE chain_id=?) ORDER BY id",
                (int(Kind.COMMITTED), parent_id, chain_id),
            ).fetchall()
        for r in rows:
            snap = _snap(r)
            assert snap is not None
            if snap.labels.get("containerd.io/snapshot.ref") == chain_id:
                return snap
        return None

    def layer(self, lid: int) -> LayerRow | None:
        with self._lock:
            return _layer(self._db.execute(f"SELECT {_LAYER_COLS} FROM layers WHERE id=?", (lid,)).fetchone())

    def layer_by_chain(self, chain_id: str) -> LayerRow | None:
        with self._lock:
            return _layer(self._db.execute(f"SELECT {_LAYER_COLS} FROM layers WHERE chain_id=?", (chain_id,)).fetchone())

    def layers(self) -> list[LayerRow]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_LAYER_COLS} FROM layers ORDER BY id").fetchall()
        return [LayerRow(*r) for r in rows]

    def layer_users(self, lid: int) -> int:
        """References that keep a layer: snapshots naming it, child layers, pins."""
        with self._lock:
            row = self._db.execute(
                "SELECT (SELECT COUNT(*) FROM snapshots WHERE layer_id=?)"
                " + (SELECT COUNT(*) FROM layers WHERE parent_id=?)"
                " + (SELECT COUNT(*) FROM pins WHERE layer_id=?)",
                (lid, lid, lid),
            ).fetchone()
        return int(row[0])

    def pins(self, lid: int) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT owner FROM pins WHERE layer_id=? ORDER BY owner", (lid,))]


class MetaReader(Queries):
    """One thread's read-only connection; see `MetaStore.reading`."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.RLock()  # uncontended: only its own thread uses it
        self._db = _connect_ro(path)

    def close(self) -> None:
        self._db.close()


class MetaStore(Queries):
    """One SQLite database: one writer connection behind a lock, one reader per reading thread.

    The snapshotter is one process with short transactions, so a single
    writing connection behind a lock is both simplest and fastest (no busy
    retries).  Reads that need not see a transaction in progress go through
    `reading` and never take that lock.
    """

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self._lock = threading.RLock()
        self._path = path
        self._local = threading.local()
        self._readers: list[MetaReader] = []
        self._readers_lock = threading.Lock()
        self._closed = False
        if readonly:  # inspection beside a running snapshotter: WAL lets readers in
            self._db = _connect_ro(path)
            return
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            # Written only when needed: opening an existing repo on a full disk must need no space.
            if self._db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                self._db.executescript("BEGIN;" + _SCHEMA + f"PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")
        except BaseException:
            self._db.close()
            raise

    def close(self) -> None:
        """Readers first: the writer, closing last, checkpoints the WAL into the database."""
        with self._readers_lock:
            self._closed = True
            readers, self._readers = self._readers, []
        for r in readers:
            r.close()
        with self._lock:
            self._db.close()

    @contextmanager
    def reading(self) -> Iterator[Queries]:
        """A consistent read of the committed state on this thread's own connection.

        Takes neither the write lock nor SQLite's write lock: a writer holding
        both (a Commit renaming a layer into place, a Cleanup walking the repo)
        does not delay it.  All queries inside see one snapshot of the
        database (a deferred read transaction).  Nested use joins the outer one.
        """
        reader: MetaReader | None = getattr(self._local, "reader", None)
        if reader is None:
            reader = MetaReader(self._path)
            with self._readers_lock:
                if self._closed:
                    reader.close()
                    raise sqlite3.ProgrammingError("the metastore is closed")
                self._readers.append(reader)
            self._local.reader = reader
        if reader._db.in_transaction:
            yield reader
            return
        reader._db.execute("BEGIN")
        try:
            yield reader
        finally:
            if reader._db.in_transaction:
                reader._db.execute("COMMIT")  # ends the read: the WAL may be checkpointed past it

    @contextmanager
    def tx(self) -> Iterator["MetaStore"]:
        """A write transaction.  Nested use joins the outer one."""
        with self._lock:
            if self._db.in_transaction:
                yield self
                return
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise

    def _rollback(self) -> None:
        """End a failed transaction, whatever state SQLite left it in.

        A COMMIT that fails (SQLITE_FULL, I/O error) may or may not have rolled back by itself
        (sqlite.org/lang_transaction.html).  Left open, every later ``tx()`` would join it and
        nothing would ever be committed again: the wedge of issue 10 item 7.
        """
        if self._db.in_transaction:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # rolled back automatically in the meantime

    # -- snapshots -------------------------------------------------------
    def insert_snapshot(
        self, name: str, kind: Kind, parent_id: int | None, layer_id: int | None,
        chain_id: str | None, labels: dict[str, str], now_ns: int,
    ) -> int:
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO snapshots (name, kind, parent_id, layer_id, chain_id, labels, created_ns, updated_ns)"
                " VALUES (?,?,?,?,?,?,?,?)",
                (name, int(kind), parent_id, layer_id, chain_id, json.dumps(labels, sort_keys=True), now_ns, now_ns),
            )
            return int(cur.lastrowid)  # type: ignore[arg-type]

    def set_committed(self, sid: int, name: str, layer_id: int, labels: dict[str, str], now_ns: int) -> None:
        """Turn active snapshot `sid` into committed `name` (keeps its id, so children stay linked)."""
        with self._lock:
            self._db.execute(
                "UPDATE snapshots SET name=?, kind=?, layer_id=?, chain_id=NULL, labels=?, created_ns=?, updated_ns=?"
                " WHERE id=?",
                (name, int(Kind.COMMITTED), layer_id, json.dumps(labels, sort_keys=True), now_ns, now_ns, sid),
            )

    def set_labels(self, sid: int, labels: dict[str, str], now_ns: int) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE snapshots SET labels=?, updated_ns=? WHERE id=?",
                (json.dumps(labels, sort_keys=True), now_ns, sid),
            )

    def delete_snapshot(self, sid: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM snapshots WHERE id=?", (sid,))

    # -- layers ----------------------------------------------------------
    def insert_layer(self, lid: int, chain_id: str | None, parent_id: int | None, size: int, inodes: int, now_ns: int) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO layers (id, chain_id, parent_id, size, inodes, created_ns) VALUES (?,?,?,?,?,?)",
                (lid, chain_id, parent_id, size, inodes, now_ns),
            )

    def delete_layer(self, lid: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM layers WHERE id=?", (lid,))

    # -- pins (references held outside containerd) ----------------------
    def pin(self, lid: int, owner: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO pins (layer_id, owner) VALUES (?,?)", (lid, owner))

    def unpin(self, lid: int, owner: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM pins WHERE layer_id=? AND owner=?", (lid, owner))
