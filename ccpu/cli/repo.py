"""`fractal repo ls|du`: the layer repo as an administrator sees it on disk.

The one command that reads the repo itself rather than asking the snapshotter: what it shows
(layers, which snapshots share each, what the sharing saves) is the repo's own bookkeeping,
which containerd's Snapshots API has no words for.  It opens metadata.db read-only
(``Repo.open_readonly``: no lock, no repair) and the snapshotter keeps owning it.  A missing,
empty or corrupt database is a one-line error, never a traceback.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from .common import add_json_flag, human, print_json

T = TypeVar("T")


def _read(root: str, read: Callable[[Any], T]) -> tuple[T, Path]:
    """``read(repo)`` on the repo at ``root`` opened read-only, and the repo's path; SQLite's
    complaints about the file (empty, truncated, not a database) become a RepoError."""
    import sqlite3

    from ..repo import Repo, RepoError

    try:
        repo = Repo.open_readonly(root)
        try:
            return read(repo), repo.root
        finally:
            repo.close()
    except sqlite3.DatabaseError as e:
        raise RepoError(f"{os.path.abspath(root)}/metadata.db cannot be read ({e}): "
                        "not a fractal repo, or a damaged one") from None


def cmd_repo_ls(args: argparse.Namespace) -> int:
    layers, _ = _read(args.root, lambda repo: repo.layers())
    if args.json:
        print_json([{
            "id": la.id, "chain_id": la.chain_id, "parent": la.parent_id, "size": la.size,
            "inodes": la.inodes, "users": list(la.users), "path": la.path,
        } for la in layers])
        return 0
    print(f"{'ID':>5}  {'CHAIN ID':<19}  {'PARENT':>6}  {'SIZE':>10}  USERS")
    for la in layers:
        chain = (la.chain_id or "-")[:19]
        parent = str(la.parent_id) if la.parent_id is not None else "-"
        users = ", ".join(la.users) if la.users else "-"
        print(f"{la.id:>5}  {chain:<19}  {parent:>6}  {human(la.size):>10}  {users}")
    return 0


def cmd_repo_du(args: argparse.Namespace) -> int:
    from ..repo.fsutil import disk_usage

    (layers, snapshots), root = _read(args.root, lambda repo: (repo.layers(), list(repo.list())))
    stored = sum(la.size for la in layers)
    # what per-snapshot copies (containerd's overlayfs snapshotter) would need for the same snapshots
    would_be = sum(la.size * max(1, sum(1 for u in la.users if not u.startswith("pin:"))) for la in layers)
    on_disk = disk_usage(root).size  # includes ROOT/reserve (docs/snapshotter.md)
    if args.json:
        print_json({"repo": str(root), "layers": len(layers), "unpacked": stored,
                    "snapshots": len(snapshots), "on_disk": on_disk, "one_copy_per_snapshot": would_be,
                    "saved": would_be - stored})
        return 0
    print(f"repo:       {root}")
    print(f"layers:     {len(layers)} ({human(stored)} unpacked)")
    print(f"snapshots:  {len(snapshots)}")
    print(f"on disk:    {human(on_disk)} (layers, active snapshots, metadata, reserve)")
    print(f"one copy per snapshot would take {human(would_be)}; shared layers save {human(would_be - stored)}")
    return 0


def register(repo: argparse.ArgumentParser) -> None:
    from ..defaults import DEFAULT_ROOT

    sub = repo.add_subparsers(dest="repo_command", metavar="COMMAND")
    root_help = "repo directory (default %(default)s; env FRACTAL_ROOT)"
    root_default = os.environ.get("FRACTAL_ROOT", DEFAULT_ROOT)
    p = sub.add_parser("ls", help="layers, their sizes and the snapshots using them")
    p.add_argument("--root", default=root_default, help=root_help)
    add_json_flag(p)
    p.set_defaults(func=cmd_repo_ls)
    p = sub.add_parser("du", help="disk used by the repo and what sharing saves")
    p.add_argument("--root", default=root_default, help=root_help)
    add_json_flag(p)
    p.set_defaults(func=cmd_repo_du)
