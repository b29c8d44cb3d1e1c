"""Value types shared by the repo, the snapshotter and the CLI."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ..stack import Mount  # noqa: F401  (re-exported: the repo hands out mounts)


class Kind(enum.IntEnum):
    """Snapshot kinds, numbered exactly as containerd's Kind enum on the wire."""

    UNKNOWN = 0
    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3

    @property
    def filter_name(self) -> str:
        """The lower-case word containerd's filters use for this kind."""
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """What containerd's Stat/List see of a snapshot."""

    name: str
    kind: Kind
    parent: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    created_ns: int = 0
    updated_ns: int = 0


@dataclass(frozen=True, slots=True)
class Usage:
    size: int = 0
    inodes: int = 0


@dataclass(frozen=True, slots=True)
class LayerInfo:
    """A unpacked layer in the repo, as `fractal repo ls` shows it."""

    id: int
    chain_id: str | None
    parent_id: int | None
    size: int
    inodes: int
    created_ns: int
    users: tuple[str, ...]
    path: str
