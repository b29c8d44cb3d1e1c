"""Per-request context handed to server handlers, and metadata conversions.

Why: handlers need what the Request envelope carried besides the payload -- the metadata
(containerd puts the namespace there), and the deadline derived from ``timeout_nano`` -- without
seeing the envelope itself.  Metadata keys are case-insensitive as in ttrpc's metadata.go (``MD``
lowercases keys); we lowercase them on both ends.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .messages import KeyValue

NAMESPACE_KEY = "containerd-namespace-ttrpc"

Metadata = dict[str, list[str]]
MetadataInput = Mapping[str, str | Iterable[str]]


def metadata_from_pairs(pairs: Iterable[Any]) -> Metadata:
    """Request.metadata (repeated KeyValue) -> {lowercased key: [values in order]}."""
    md: Metadata = {}
    for kv in pairs:
        md.setdefault(kv.key.lower(), []).append(kv.value)
    return md


def metadata_to_pairs(md: MetadataInput | None) -> list[Any]:
    """{key: value or values} -> [KeyValue], one entry per value, keys lowercased."""
    out: list[Any] = []
    for key, values in (md or {}).items():
        if isinstance(values, str):
            values = (values,)
        for value in values:
            out.append(KeyValue(key=key.lower(), value=value))
    return out


@dataclass(frozen=True)
class RequestContext:
    """What a handler knows about its call besides the decoded request message.

    ``deadline`` is on the :func:`time.monotonic` clock (None: no timeout was sent).  The server
    enforces it itself; handlers may read it to pass the remaining time on.
    """

    service: str
    method: str
    metadata: Metadata = field(default_factory=dict)
    deadline: float | None = None

    def get(self, key: str) -> str | None:
        """First value of a metadata key (case-insensitive), as ttrpc GetMetadataValue."""
        values = self.metadata.get(key.lower())
        return values[0] if values else None

    @property
    def namespace(self) -> str | None:
        """The containerd namespace of the call (metadata ``containerd-namespace-ttrpc``)."""
        return self.get(NAMESPACE_KEY)

    def time_remaining(self) -> float | None:
        """Seconds left before the deadline (negative once passed), None without deadline."""
        if self.deadline is None:
            return None
        return self.deadline - time.monotonic()
