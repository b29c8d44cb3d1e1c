"""A deterministic, uncompressed EROFS image writer.  Pure functions.

Why our own writer: the guest's read-only system image (CPython, the stdlib, the agent, runc,
their libraries) must be built reproducibly by ``fractal guest build`` -- same inputs, same
bytes, because its sha256 is part of the guest's measurement -- and mkfs.erofs (erofs-utils)
is not installed everywhere the guest is built.  The subset of the format the kernel needs for
a plain read-only tree is small: a superblock, 32-byte compact inodes, and data in whole
blocks (layout FLAT_PLAIN) for files, directories and symlink targets.  No compression, no
xattrs, no inline tails: a little space (a block per small file) for a writer anyone can check
against the on-disk format (linux/fs/erofs/erofs_fs.h).

Layout: block 0 holds the superblock at byte 1024; the inodes follow it from byte 1152 (so the
root's nid is 36, never 0: readdir skips d_ino 0); then the directories' blocks, then the files'
and symlinks' data, each in inode order, block aligned.  Every timestamp is the superblock's build time, 0; owners are root.
"""

from __future__ import annotations

import hashlib
import stat
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

MAGIC = 0xE0F5E1E2
BLOCK_BITS = 12
BLOCK = 1 << BLOCK_BITS
SUPER_OFFSET = 1024
SUPER_SIZE = 128
INODE_SIZE = 32  # the compact inode
DIRENT_SIZE = 12
FLAT_PLAIN = 0  # datalayout: data in contiguous blocks from i_u.raw_blkaddr
FILE_TYPE = {stat.S_IFREG: 1, stat.S_IFDIR: 2, stat.S_IFLNK: 7}  # EROFS_FT_*
VOLUME_NAME = b"fractal-sys"


class ImageError(ValueError):
    """A tree that this writer cannot represent."""


@dataclass(frozen=True)
class File:
    """One entry: its path in the image (no leading '/'), mode (type + permissions), and its
    content (file bytes or symlink target), read only when the image is written."""

    path: str
    mode: int
    content: Callable[[], bytes] = lambda: b""


@dataclass
class _Node:
    mode: int
    content: Callable[[], bytes] = lambda: b""
    children: dict[bytes, _Node] = field(default_factory=dict)
    nid: int = 0
    parent: _Node | None = None


def _tree(files: Iterable[File]) -> _Node:
    root = _Node(stat.S_IFDIR | 0o755)
    root.parent = root
    for f in files:
        kind = stat.S_IFMT(f.mode)
        if kind not in FILE_TYPE:
            raise ImageError(f"{f.path}: file type {kind:o} is not supported")
        parts = [p.encode() for p in f.path.strip("/").split("/") if p]
        if not parts:
            if kind != stat.S_IFDIR:
                raise ImageError("the root must be a directory")
            root.mode = f.mode
            continue
        node = root
        for p in parts[:-1]:
            child = node.children.get(p)
            if child is None:
                child = node.children[p] = _Node(stat.S_IFDIR | 0o755, parent=node)
            elif not stat.S_ISDIR(child.mode):
                raise ImageError(f"{f.path}: {p.decode()} is not a directory")
            node = child
        old = node.children.get(parts[-1])
        if old is not None and (kind != stat.S_IFDIR or not stat.S_ISDIR(old.mode)):
            raise ImageError(f"{f.path} given twice")
        if old is not None:
            old.mode = f.mode
        else:
            node.children[parts[-1]] = _Node(f.mode, f.content, parent=node)
    return root


def _walk(root: _Node) -> list[_Node]:
    """Inodes in order: depth first, names in byte order (deterministic)."""
    out: list[_Node] = []
    stack = [root]
    while stack:
        n = stack.pop()
        out.append(n)
        stack.extend(n.children[k] for k in sorted(n.children, reverse=True))
    return out


def dir_blocks(entries: list[tuple[bytes, int, int]]) -> bytes:
    """A directory's data: (name, nid, file type) sorted by name, packed into blocks of dirents
    followed by their names.  The kernel binary-searches names across and within blocks, and
    takes a block's dirent count from its first ``nameoff``; the last name of a block ends at
    the block's (or the directory's) end or at a NUL.  Returns the bytes up to the last name."""
    entries = sorted(entries)
    out = bytearray()
    i = 0
    while i < len(entries):
        j, used = i, 0
        while j < len(entries) and used + DIRENT_SIZE + len(entries[j][0]) <= BLOCK:
            used += DIRENT_SIZE + len(entries[j][0])
            j += 1
        if j == i:
            raise ImageError(f"name too long: {entries[i][0]!r}")
        chunk = entries[i:j]
        nameoff = DIRENT_SIZE * len(chunk)
        heads, names = bytearray(), bytearray()
        for name, nid, ftype in chunk:
            heads += struct.pack("<QHBB", nid, nameoff + len(names), ftype, 0)
            names += name
        block = bytes(heads + names)
        i = j
        if i < len(entries):
            block += b"\0" * (BLOCK - len(block))
        out += block
    return bytes(out)


def _inode(node: _Node, size: int, blkaddr: int, ino: int, nlink: int) -> bytes:
    fmt = FLAT_PLAIN << 1  # bit 0: 0 = compact inode
    if size >= 1 << 32:
        raise ImageError("files of 4 GiB or more need extended inodes")
    return struct.pack("<HHHHIIIIHHI", fmt, 0, node.mode & 0xFFFF, nlink, size, 0, blkaddr, ino, 0, 0, 0)


def _superblock(root_nid: int, inodes: int, blocks: int, uuid: bytes) -> bytes:
    sb = struct.pack("<IIIBBHQQIIII16s16sI", MAGIC, 0, 0, BLOCK_BITS, 0, root_nid, inodes, 0, 0, blocks, 0, 0,
                     uuid, VOLUME_NAME.ljust(16, b"\0"), 0)
    return sb.ljust(SUPER_SIZE, b"\0")


def write(files: Iterable[File]) -> bytes:
    """The image of ``files`` (parent directories are implied, mode 0755).  Same files, same bytes."""
    root = _tree(files)
    nodes = _walk(root)
    first = SUPER_OFFSET + SUPER_SIZE
    for i, n in enumerate(nodes):
        n.nid = (first + i * INODE_SIZE) // INODE_SIZE
    if root.nid >= 1 << 16:
        raise ImageError("root nid does not fit the superblock")
    data_block = -(-(first + len(nodes) * INODE_SIZE) // BLOCK)
    # directories first, then files: all metadata (inodes, dirents) sits in the image's first
    # blocks, so path lookups cost a few sequential reads (readahead) instead of a seek each
    bodies: dict[int, bytes] = {}  # the directories' blocks (files are read when written)
    nlinks: dict[int, int] = {}
    for n in nodes:
        if stat.S_ISDIR(n.mode):
            assert n.parent is not None
            entries = [(b".", n.nid, FILE_TYPE[stat.S_IFDIR]), (b"..", n.parent.nid, FILE_TYPE[stat.S_IFDIR])]
            entries += [(k, c.nid, FILE_TYPE[stat.S_IFMT(c.mode)]) for k, c in n.children.items()]
            bodies[n.nid] = dir_blocks(entries)
            nlinks[n.nid] = 2 + sum(1 for c in n.children.values() if stat.S_ISDIR(c.mode))
    data = bytearray()
    placed: dict[int, tuple[int, int]] = {}  # nid -> (size, first block)
    for dirs in (True, False):
        for n in nodes:
            if stat.S_ISDIR(n.mode) != dirs:
                continue
            body = bodies[n.nid] if dirs else n.content()
            placed[n.nid] = (len(body), data_block + len(data) // BLOCK if body else 0)
            data += body
            data += b"\0" * (-len(data) % BLOCK)
    table = bytearray()
    for ino, n in enumerate(nodes, 1):
        size, blkaddr = placed[n.nid]
        table += _inode(n, size, blkaddr, ino, nlinks.get(n.nid, 1))
    head = bytearray(data_block * BLOCK)
    head[first:first + len(table)] = table
    blocks = data_block + len(data) // BLOCK
    uuid = hashlib.sha256(bytes(head) + bytes(data)).digest()[:16]  # stable: derived from the content
    head[SUPER_OFFSET:SUPER_OFFSET + SUPER_SIZE] = _superblock(root.nid, len(nodes), blocks, uuid)
    return bytes(head) + bytes(data)
