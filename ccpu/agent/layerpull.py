"""A machine's own layer repo, filled from containerd's compressed blobs streamed by the shim
(remote mode, feature ``layers:pull``; docs/remote.md "Layers on the machine").

Why here and why this shape: a remote machine does not see the host's repo, so the shim sends
each layer it lacks as the compressed blob containerd keeps (content store), on a data channel
of the authenticated connection.  Everything in the stream is untrusted input for the agent:

* the blob is written to a temporary file while hashed; more bytes than the declared size are
  refused as they arrive (the shim declared the descriptor's size, capped by ``max_blob``);
* the compressed digest is checked before a byte is decompressed; the decompressed stream is
  hashed against the diff ID while it is applied (capped by ``max_unpacked``, ``max_entries``);
* the tar is applied with the rules containerd's applier uses for an overlay snapshot: OCI
  whiteouts ``.wh.NAME`` become 0/0 character devices, ``.wh..wh..opq`` the opaque xattr (both
  ``trusted.`` and ``user.overlay.opaque``, as the host repo records it: ccpu/repo/opaque.py);
  every name is confined (no absolute names, no ``..``, no write through a symlink, hard links
  only to earlier entries of the same layer);
* the result is fsynced and renamed into ``layers/<chain hex>`` only when complete and
  verified: a crash leaves at most a directory under ``tmp/``, removed at the next start.

References: each layer records the containers that use it (``state.json``, written before the
rename, so a published layer is never unknown after a crash); ``release`` drops a container's
references; a layer nobody uses is kept idle (the next sandbox's containers need no transfer)
up to the cache's size, oldest evicted first.  Standard library only (zstd through the
``zstandard`` package when present: remote machines only, never the VM guest).
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import json
import os
import re
import shutil
import stat
import tarfile
import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import IO, Any

from . import protocol

DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
GZIP_TYPES = {
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
}
ZSTD_TYPES = {"application/vnd.oci.image.layer.v1.tar+zstd"}
TAR_TYPES = {"application/vnd.oci.image.layer.v1.tar", "application/vnd.docker.image.rootfs.diff.tar"}
MEDIA_TYPES = GZIP_TYPES | ZSTD_TYPES | TAR_TYPES

MAX_BLOB = 4 << 30  # compressed bytes of one layer (agent --max-layer-mb can lower it)
MAX_UNPACKED = 16 << 30  # decompressed bytes of one layer
MAX_ENTRIES = 1_000_000  # tar entries of one layer
CHUNK = 1 << 20
OPAQUE = ".wh..wh..opq"
WHITEOUT = ".wh."
OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")
XATTR_PREFIX = "SCHILY.xattr."
#: xattrs a layer's tar may not set: overlayfs's own (a redirect or metacopy crafted by an image
#: would steer lookups); whiteouts and opaque dirs come only from the OCI markers
OVERLAY_XATTRS = ("trusted.overlay.", "user.overlay.")
MAX_SPECIAL = 1 << 20  # a PAX or GNU long-name header's size (Go's archive/tar: the same 1 MiB)


class LayerError(protocol.InvalidArgument):
    """The stream or the layer in it is refused (digest, diff ID, size, a name, a type)."""


@dataclass(frozen=True, slots=True)
class LayerBlob:
    """What the shim says a layer is: checked before any byte is accepted."""

    chain_id: str
    diff_id: str
    digest: str
    media_type: str
    size: int

    @classmethod
    def from_args(cls, args: dict[str, Any], max_blob: int = MAX_BLOB) -> LayerBlob:
        vals = {}
        for key in ("chain_id", "diff_id", "digest"):
            v = protocol.arg_str(args, key)
            if not DIGEST_RE.fullmatch(v):
                raise protocol.InvalidArgument(f"{key} {v[:100]!r} is not sha256:<64 hex>")
            vals[key] = v
        media = protocol.arg_str(args, "media_type")
        if media not in MEDIA_TYPES:
            raise protocol.InvalidArgument(f"layer media type {media[:200]!r} is not one of "
                                           f"{', '.join(sorted(MEDIA_TYPES))}")
        size = protocol.arg_int(args, "size")
        if not 0 < size <= max_blob:
            raise protocol.ResourceExhausted(f"layer {vals['digest']}: {size} bytes is outside "
                                             f"1..{max_blob} (the agent's --max-layer-mb)")
        return cls(vals["chain_id"], vals["diff_id"], vals["digest"], media, size)


def chain_dir_name(chain_id: str) -> str:
    if not DIGEST_RE.fullmatch(chain_id):
        raise protocol.InvalidArgument(f"chain ID {chain_id[:100]!r} is not sha256:<64 hex>")
    return chain_id.split(":", 1)[1]


class Receiver:
    """One blob arriving on a data channel: written to ``path`` while hashed.  ``feed`` is
    called for every data frame (in the connection's read loop: the socket is the only
    buffer), ``close`` at the channel's close frame."""

    def __init__(self, blob: LayerBlob, path: str) -> None:
        self.blob = blob
        self.path = path
        self.received = 0
        self.error: str | None = None
        self._hash = hashlib.sha256()
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self.closed = False
        self.claimed = False  # a layers_pull request waits for it (and removes it when done)

    def feed(self, data: bytes) -> None:
        if self.error is not None or self._fd is None:
            return
        if self.received + len(data) > self.blob.size:
            self.error = (f"layer {self.blob.digest}: the stream is longer than its declared "
                          f"{self.blob.size} bytes")
            self._close_fd()
            return
        try:
            os.write(self._fd, data)  # a regular file: all of it (or an OSError)
        except OSError as e:
            self.error = f"layer {self.blob.digest}: writing {self.path}: {e.strerror}"
            self._close_fd()
            return
        self.received += len(data)
        self._hash.update(data)

    def close(self) -> None:
        self.closed = True
        self._close_fd()

    def discard(self) -> None:
        """Closed and its temp file removed (a stream no request will publish)."""
        self.close()
        _remove(self.path)

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def verify(self) -> None:
        """The whole blob arrived and is the one named: else LayerError."""
        if self.error is not None:
            raise LayerError(self.error)
        if self.received != self.blob.size:
            raise LayerError(f"layer {self.blob.digest}: got {self.received} of {self.blob.size} bytes")
        got = "sha256:" + self._hash.hexdigest()
        if got != self.blob.digest:
            raise LayerError(f"layer {self.blob.digest}: digest mismatch: the stream is {got}")


class _Hashing:
    """A read-only file over ``raw`` that hashes and counts what is read, up to ``cap``."""

    def __init__(self, raw: IO[bytes], cap: int) -> None:
        self.raw = raw
        self.cap = cap
        self.count = 0
        self.hash = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n if n is not None and n >= 0 else CHUNK)
        self.count += len(data)
        if self.count > self.cap:
            raise LayerError(f"the layer unpacks to more than {self.cap} bytes")
        self.hash.update(data)
        return data

    def drain(self) -> None:
        while self.read(CHUNK):
            pass


def _decompressor(media_type: str, f: IO[bytes]) -> IO[bytes]:
    if media_type in GZIP_TYPES:
        return gzip.GzipFile(fileobj=f, mode="rb")  # type: ignore[return-value]
    if media_type in ZSTD_TYPES:
        try:
            import zstandard  # type: ignore[import-not-found]
        except ImportError:
            raise protocol.Unimplemented("zstd layers need the zstandard package on the machine "
                                         "(python3-zstandard)") from None
        return zstandard.ZstdDecompressor().stream_reader(f)  # type: ignore[no-any-return]
    return f


def clean_name(name: str) -> str:
    """A tar member name as a relative path inside the layer ('' for its root), or LayerError:
    no absolute names, no ``..``, no NUL."""
    if "\0" in name:
        raise LayerError(f"tar entry {name[:200]!r}: NUL in its name")
    if name.startswith("/"):
        raise LayerError(f"tar entry {name[:200]!r}: absolute name")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise LayerError(f"tar entry {name[:200]!r}: '..' in its name")
    return "/".join(parts)


def _real_dir(root: str, rel: str) -> str:
    """``root/rel`` as a directory that is really below ``root``: every component an existing
    directory (missing ones made 0755, as containerd's applier does), none a symlink."""
    path = root
    for part in [p for p in rel.split("/") if p]:
        path = os.path.join(path, part)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            os.mkdir(path, 0o755)
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise LayerError(f"tar entry below {rel!r}: {part!r} is not a directory (a symlink?)")
    return path


def _remove(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _set_xattrs(path: str, member: tarfile.TarInfo) -> None:
    for key, value in member.pax_headers.items():
        if key.startswith(XATTR_PREFIX):
            name = key[len(XATTR_PREFIX):]
            if name.startswith(OVERLAY_XATTRS):
                raise LayerError(f"tar entry {member.name[:200]!r}: sets the overlay xattr {name[:100]!r}")
            raw = value.encode("utf-8", "surrogateescape")
            os.setxattr(path, name, raw, follow_symlinks=False)


class _BoundedInfo(tarfile.TarInfo):
    """tarfile reads a PAX or GNU long-name header whole into memory: refuse one over
    MAX_SPECIAL before it is read (the headers that follow are read by this class too)."""

    SPECIAL = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
               tarfile.SOLARIS_XHDTYPE)

    def _proc_member(self, tar: tarfile.TarFile) -> tarfile.TarInfo:  # type: ignore[override]
        if self.type in self.SPECIAL and self.size > MAX_SPECIAL:
            raise LayerError(f"a tar extension header of {self.size} bytes (at most {MAX_SPECIAL})")
        return super()._proc_member(tar)  # type: ignore[misc,no-any-return]


def apply_tar(fileobj: IO[bytes], dest: str, max_entries: int = MAX_ENTRIES) -> None:
    """Apply one layer's tar into the empty directory ``dest`` as an overlay lower dir."""
    dir_times: list[tuple[str, int]] = []
    with tarfile.open(fileobj=fileobj, mode="r|", errors="surrogateescape",  # type: ignore[call-overload]
                      tarinfo=_BoundedInfo) as tar:
        for n, m in enumerate(tar):
            if n >= max_entries:
                raise LayerError(f"the layer has more than {max_entries} entries")
            rel = clean_name(m.name)
            parent_rel, _, base = rel.rpartition("/")
            if not base:  # the layer's root itself: its metadata only
                if m.isdir():
                    os.chmod(dest, m.mode & 0o7777)
                    os.lchown(dest, m.uid, m.gid)
                    dir_times.append((dest, m.mtime))
                continue
            parent = _real_dir(dest, parent_rel)
            if base == OPAQUE:
                for name in OPAQUE_XATTRS:
                    os.setxattr(parent, name, b"y", follow_symlinks=False)
                continue
            if base.startswith(WHITEOUT):
                hidden = base[len(WHITEOUT):]
                if not hidden or hidden in (".", ".."):
                    raise LayerError(f"tar entry {m.name[:200]!r}: a whiteout of nothing")
                target = os.path.join(parent, hidden)
                _remove(target)
                os.mknod(target, 0o600 | stat.S_IFCHR, os.makedev(0, 0))
                continue
            target = os.path.join(parent, base)
            _apply_member(tar, m, target, dest)
            if m.isdir():
                dir_times.append((target, m.mtime))
    for path, mtime in reversed(dir_times):  # after their contents: entries change a dir's mtime
        os.utime(path, (mtime, mtime), follow_symlinks=False)


def _apply_member(tar: tarfile.TarFile, m: tarfile.TarInfo, target: str, dest: str) -> None:
    existing = None
    with contextlib.suppress(FileNotFoundError):
        existing = os.lstat(target)
    if m.isdir():
        if existing is None or not stat.S_ISDIR(existing.st_mode):
            _remove(target)
            os.mkdir(target, 0o700)
    else:
        _remove(target)  # a later entry replaces an earlier one of the same name
        if m.isreg():
            src = tar.extractfile(m)
            assert src is not None
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                while chunk := src.read(CHUNK):
                    os.write(fd, chunk)
            finally:
                os.close(fd)
        elif m.issym():
            os.symlink(m.linkname, target)  # resolved in the container's root, never here
        elif m.islnk():
            src_rel = clean_name(m.linkname)
            src_path = os.path.join(dest, src_rel)
            if not src_rel:
                raise LayerError(f"tar entry {m.name[:200]!r}: hard link to the layer's root")
            _real_dir(dest, src_rel.rpartition("/")[0])  # no symlink on the way to the source
            try:
                st = os.lstat(src_path)
            except FileNotFoundError:
                raise LayerError(f"tar entry {m.name[:200]!r}: hard link to {m.linkname[:200]!r}, "
                                 "which is not in this layer (yet)") from None
            if stat.S_ISDIR(st.st_mode):
                raise LayerError(f"tar entry {m.name[:200]!r}: hard link to a directory")
            os.link(src_path, target, follow_symlinks=False)
            return  # the link shares its source's inode: its metadata is the source's
        elif m.ischr() or m.isblk():  # as containerd's applier (running as root) does
            kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
            os.mknod(target, 0o600 | kind, os.makedev(m.devmajor, m.devminor))
        elif m.isfifo():
            os.mkfifo(target, 0o600)
        else:
            raise LayerError(f"tar entry {m.name[:200]!r}: unsupported type {m.type!r}")
    os.lchown(target, m.uid, m.gid)
    if not m.issym():
        os.chmod(target, m.mode & 0o7777)  # after chown: chown clears setuid bits
    _set_xattrs(target, m)
    if not m.isdir():
        os.utime(target, (m.mtime, m.mtime), follow_symlinks=False)


def unpack(blob: LayerBlob, blob_path: str, dest: str, max_unpacked: int = MAX_UNPACKED) -> int:
    """Decompress and apply the verified blob at ``blob_path`` into ``dest`` (made here),
    checking the diff ID of what was applied.  Returns the tar's size."""
    os.mkdir(dest, 0o755)
    with open(blob_path, "rb") as raw:
        try:
            plain = _Hashing(_decompressor(blob.media_type, raw), max_unpacked)
            apply_tar(plain, dest)  # type: ignore[arg-type]
            plain.drain()  # the tar's end padding counts for the diff ID too
        except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib_error()) as e:
            raise LayerError(f"layer {blob.digest}: not a valid {blob.media_type}: {e}") from None
        except OSError as e:
            if e.errno in protocol.NO_SPACE:
                raise
            if type(e).__name__ == "ZstdError":
                raise LayerError(f"layer {blob.digest}: not valid zstd: {e}") from None
            raise
    got = "sha256:" + plain.hash.hexdigest()
    if got != blob.diff_id:
        raise LayerError(f"layer {blob.digest}: diff ID mismatch: it unpacks to {got}, "
                         f"not {blob.diff_id}")
    return plain.count


def syncfs(path: str) -> None:
    """syncfs(2) of the filesystem holding ``path``: the repo's, not every mounted one (sync(2)
    would wait for every other writer of the machine)."""
    import ctypes

    from ..linux.libc import check, libc

    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        check(libc.syncfs(ctypes.c_int(fd)), "syncfs", path)
    finally:
        os.close(fd)


def zlib_error() -> type[Exception]:
    import zlib

    return zlib.error


class LocalRepo:
    """``ROOT/layers/<chain hex>/`` (published, read-only by convention), ``ROOT/tmp/``
    (arriving blobs and layers being applied), ``ROOT/state.json``: ``refs`` {chain ID:
    [container...]}, ``sizes`` {chain ID: unpacked bytes} of every published layer, ``idle``
    [chain ID...] of the layers no container uses, oldest first.

    Why idle layers are kept: one agent serves one sandbox at a time, so each new sandbox (a
    ``ctr run --rm``, a new pod) would stream its image again if the last container's release
    removed it.  Idle layers are kept up to ``cache_max`` bytes, the oldest evicted first."""

    def __init__(self, root: str, max_blob: int = MAX_BLOB, max_unpacked: int = MAX_UNPACKED,
                 cache_max: int = 2 << 30) -> None:
        self.root = os.path.realpath(root)
        self.layers = os.path.join(self.root, "layers")
        self.tmp = os.path.join(self.root, "tmp")
        self.state_path = os.path.join(self.root, "state.json")
        self.max_blob = max_blob
        self.max_unpacked = max_unpacked
        self.cache_max = cache_max
        self.transfers = 0  # layers received since start (the tests' and bench's counter)
        self._lock = threading.Lock()  # the state: publishes run in threads
        for d in (self.root, self.layers, self.tmp):
            os.makedirs(d, mode=0o700, exist_ok=True)
        self.refs: dict[str, list[str]] = {}
        self.sizes: dict[str, int] = {}
        self.idle: list[str] = []
        self._load()
        self.recover()

    def _load(self) -> None:
        try:
            with open(self.state_path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            return  # none yet, or unreadable: recover() then removes every layer (unknown)
        if not isinstance(data, dict):
            return
        sizes = data.get("sizes")
        if isinstance(sizes, dict):
            self.sizes = {k: v for k, v in sizes.items() if isinstance(k, str) and DIGEST_RE.fullmatch(k)
                          and isinstance(v, int) and not isinstance(v, bool) and v >= 0}
        refs = data.get("refs")
        if isinstance(refs, dict):
            self.refs = {k: [c for c in v if isinstance(c, str)] for k, v in refs.items()
                         if k in self.sizes and isinstance(v, list)}
        idle = data.get("idle")
        if isinstance(idle, list):
            self.idle = [c for c in idle if c in self.sizes]

    def _save(self) -> None:
        tmp = self.state_path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, json.dumps({"refs": self.refs, "sizes": self.sizes, "idle": self.idle},
                                    sort_keys=True).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.state_path)

    def recover(self) -> None:
        """At start: nothing half-made stays (``tmp/``), no layer the state does not know; the
        containers of a previous run are gone with it (the agent's table starts empty), so
        their layers become idle (and are evicted beyond the cache's size)."""
        for name in os.listdir(self.tmp):
            _remove(os.path.join(self.tmp, name))
        on_disk = set(os.listdir(self.layers))
        known = {chain_dir_name(c): c for c in self.sizes}
        for name in on_disk - set(known):
            _remove(os.path.join(self.layers, name))
        self.sizes = {c: n for c, n in self.sizes.items() if chain_dir_name(c) in on_disk}
        self.idle = [c for c in self.idle if c in self.sizes] + \
            [c for c in self.refs if c in self.sizes and c not in self.idle]
        self.idle += [c for c in self.sizes if c not in self.idle]
        self.refs = {}
        for c in self._evict_locked():
            _remove(self.path(c))
        self._save()

    def path(self, chain_id: str) -> str:
        return os.path.join(self.layers, chain_dir_name(chain_id))

    def has(self, chain_id: str) -> bool:
        return chain_id in self.sizes and os.path.isdir(self.path(chain_id))

    def _ref_locked(self, container: str, chain_ids: Iterable[str]) -> None:
        for c in chain_ids:
            users = self.refs.setdefault(c, [])
            if container not in users:
                users.append(container)
            if c in self.idle:
                self.idle.remove(c)

    def have(self, container: str, chain_ids: list[str]) -> list[str]:
        """The chain IDs this repo lacks; ``container`` holds a reference on every other one."""
        for c in chain_ids:
            chain_dir_name(c)
        with self._lock:
            present = [c for c in chain_ids if self.has(c)]
            self._ref_locked(container, present)
            self._save()
        return [c for c in chain_ids if c not in present]

    def receiver(self, blob: LayerBlob) -> Receiver:
        return Receiver(blob, os.path.join(self.tmp, f"{uuid.uuid4().hex}.blob"))

    def publish(self, container: str, rx: Receiver) -> str:
        """Verify, unpack, fsync and rename the received layer into place (blocking: run in a
        thread).  The blob and any partial tree are removed whatever happens."""
        blob = rx.blob
        work = os.path.join(self.tmp, f"{uuid.uuid4().hex}.d")
        try:
            rx.verify()
            with self._lock:
                if self.has(blob.chain_id):  # another container's pull of it won
                    self._ref_locked(container, [blob.chain_id])
                    self._save()
                    return self.path(blob.chain_id)
            size = unpack(blob, rx.path, work, self.max_unpacked)
            syncfs(work)  # every file and dir of the tree is on disk before it becomes visible
            with self._lock:
                self.sizes[blob.chain_id] = size  # before the rename: never an unknown layer
                self._ref_locked(container, [blob.chain_id])
                self._save()
                try:
                    os.rename(work, self.path(blob.chain_id))
                except OSError as e:
                    if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                        raise
            dfd = os.open(self.layers, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
            self.transfers += 1
            return self.path(blob.chain_id)
        finally:
            rx.close()
            _remove(rx.path)
            _remove(work)

    def release(self, container: str, chain_ids: list[str] | None = None) -> list[str]:
        """Drop ``container``'s references (all, or those of ``chain_ids``); layers left without
        any become idle, and the oldest idle ones beyond the cache's size are removed.  Returns
        the removed chain IDs."""
        with self._lock:
            for c in list(self.refs):
                if chain_ids is not None and c not in chain_ids:
                    continue
                users = self.refs[c]
                if container in users:
                    users.remove(container)
                if not users:
                    del self.refs[c]
                    self.idle.append(c)
            removed = self._evict_locked()
            gone = []
            for c in removed:  # out of layers/ at once: has() is false before the lock drops
                g = os.path.join(self.tmp, f"{uuid.uuid4().hex}.gone")
                with contextlib.suppress(FileNotFoundError):
                    os.rename(self.path(c), g)
                    gone.append(g)
            self._save()
        for g in gone:
            _remove(g)
        return removed

    def _evict_locked(self) -> list[str]:
        removed = []
        while self.idle and sum(self.sizes[c] for c in self.idle) > self.cache_max:
            c = self.idle.pop(0)
            del self.sizes[c]
            removed.append(c)
        return removed
