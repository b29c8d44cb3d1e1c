"""What ``fractal install`` changed, kept so that ``fractal uninstall`` undoes exactly that.

One JSON file next to containerd's main config (``config.toml.fractal-install.json``), listing
each file install created or replaced (with the sha256 of what it wrote), each symlink (with its
target), each directory it created, and where the original of each replaced file was kept
(``<file>.fractal-bak``: the user's bytes, mode and owner).  Why a record and not just the
backups: uninstall must also know what install *created* (to delete it) and must be able to tell
a file the user edited after install (never overwritten without ``--force``) from one that is
still what install wrote.  A second install keeps the first record's originals, so uninstall
always goes back to the state before the first install.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

RECORD_SUFFIX = ".fractal-install.json"
BACKUP_SUFFIX = ".fractal-bak"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def record_path(containerd_config: str) -> Path:
    p = Path(containerd_config)
    return p.with_name(p.name + RECORD_SUFFIX)


def backup_path(path: str) -> Path:
    p = Path(path)
    return p.with_name(p.name + BACKUP_SUFFIX)


@dataclass
class Entry:
    """One thing install changed."""

    path: str
    kind: str  # "file" | "link"
    what: str
    created: bool  # False: it existed and its original is at `backup`
    backup: str | None = None
    sha256: str | None = None  # files: what install wrote
    link_to: str | None = None  # links: the target install set


@dataclass
class Record:
    entries: list[Entry] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)  # created by install, removed when empty

    def get(self, path: str) -> Entry | None:
        return next((e for e in self.entries if e.path == path), None)

    def note(self, entry: Entry) -> None:
        """Add or update ``entry``; an earlier record of the same path keeps its origin (created
        or the backup of the original)."""
        old = self.get(entry.path)
        if old is None:
            self.entries.append(entry)
            return
        old.sha256, old.link_to, old.kind, old.what = entry.sha256, entry.link_to, entry.kind, entry.what

    def note_dir(self, path: str) -> None:
        if path not in self.dirs:
            self.dirs.append(path)

    def dumps(self) -> str:
        return json.dumps({"version": 1, "entries": [asdict(e) for e in self.entries], "dirs": self.dirs},
                          indent=2) + "\n"

    @classmethod
    def loads(cls, text: str) -> "Record":
        data = json.loads(text)
        if data.get("version") != 1:
            raise ValueError(f"unknown record version {data.get('version')!r}")
        return cls([Entry(**e) for e in data.get("entries", [])], list(data.get("dirs", [])))


def load(path: Path) -> Record | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return Record.loads(text)
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{path}: not a fractal install record ({e})") from None
