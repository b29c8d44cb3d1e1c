"""`fractal uninstall`: undo exactly what `fractal install` did, from its record.

Each file install replaced gets its original back (the ``.fractal-bak`` copy renamed over it:
the user's bytes, mode and owner, byte for byte); each file or symlink it created is removed;
each directory it created is removed when empty.  A file changed *since* install (its sha256 is
not the one recorded) is left alone and reported, because restoring the original would throw the
user's later edits away; ``--force`` restores it anyway.  The record goes last, and only when
nothing was left behind, so a partial uninstall can be finished by running it again.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from . import install_record as rec
from .install import DEFAULT_CONTAINERD_CONFIG, _fsync_dir


@dataclass
class Step:
    path: str
    status: str  # restored | removed | kept (changed since install) | gone
    detail: str = ""


def _current_sha(path: Path) -> str | None:
    try:
        return rec.sha256(path.read_bytes())
    except OSError:
        return None


def undo(record: rec.Record, force: bool = False) -> list[Step]:
    """Undo ``record``'s entries, newest first; returns what happened to each."""
    steps: list[Step] = []
    for e in reversed(record.entries):
        path = Path(e.path)
        if e.kind == "link":
            if not path.is_symlink():
                steps.append(Step(e.path, "gone", "already removed"))
            elif os.readlink(path) != e.link_to and not force:
                steps.append(Step(e.path, "kept", f"points to {os.readlink(path)} now, not {e.link_to}"))
            else:
                path.unlink()
                if e.backup:  # a link that was there before install: its old target back
                    os.symlink(e.backup, path)
                steps.append(Step(e.path, "restored" if e.backup else "removed"))
            continue
        sha = _current_sha(path)
        if sha is None and not path.exists():
            steps.append(Step(e.path, "gone", "already removed"))
            if e.backup and os.path.lexists(e.backup) and not path.exists():
                os.replace(e.backup, path)
                steps[-1] = Step(e.path, "restored", "from " + e.backup)
            continue
        if sha != e.sha256 and not force:
            what = f"original in {e.backup}" if e.backup else "install created it"
            steps.append(Step(e.path, "kept", f"changed since fractal install ({what}); merge by hand, "
                                              "or --force"))
            continue
        if e.backup:
            if not os.path.lexists(e.backup):  # (a link kept as the backup may dangle)
                steps.append(Step(e.path, "kept", f"its original {e.backup} is missing"))
                continue
            os.replace(e.backup, path)  # the user's own file: bytes, mode, owner
            _fsync_dir(path.parent)
            steps.append(Step(e.path, "restored", "from " + e.backup))
        else:
            path.unlink()
            steps.append(Step(e.path, "removed"))
    for d in sorted(record.dirs, key=lambda p: p.count("/"), reverse=True):
        try:
            Path(d).rmdir()
            steps.append(Step(d, "removed", "directory install created"))
        except FileNotFoundError:
            pass
        except OSError:
            steps.append(Step(d, "gone" if not Path(d).exists() else "left", "not empty"))
    return steps


def cmd_uninstall(args) -> int:  # noqa: ANN001
    config = str(Path(args.containerd_config).resolve())
    record_file = rec.record_path(config)
    try:
        record = rec.load(record_file)
    except ValueError as e:
        print(f"fractal uninstall: {e}", file=sys.stderr)
        return 1
    if record is None:
        print(f"fractal uninstall: no install record {record_file}: nothing `fractal install "
              f"--containerd-config {args.containerd_config}` did is known", file=sys.stderr)
        return 1
    steps = undo(record, force=args.force)
    for s in steps:
        print(f"  {s.status:<9} {s.path}" + (f"  ({s.detail})" if s.detail else ""))
    if any(s.status == "kept" for s in steps):
        print(f"not everything was undone; the record {record_file} stays (run again after fixing, "
              "or with --force)", file=sys.stderr)
        return 1
    record_file.unlink()
    print(f"  removed   {record_file}  (install record)")
    print("next: systemctl restart containerd   # and stop fractal-snapshotter and fractal-pool if they run")
    return 0


def register(p) -> None:  # noqa: ANN001
    p.add_argument("--containerd-config", default=DEFAULT_CONTAINERD_CONFIG,
                   help="the containerd config `fractal install` was given (default %(default)s)")
    p.add_argument("--force", action="store_true",
                   help="also restore/remove files changed since install (their later edits are lost)")
    p.set_defaults(func=cmd_uninstall)
