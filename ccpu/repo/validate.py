"""Checks on what requests hand us: keys, labels, chain IDs.

Keys never become paths in the repo (directories are named by numeric ids),
so a hostile key cannot escape the root; we still refuse keys with "." or ".."
elements or NUL bytes, which only an attacker or a bug would send, so that
nothing that looks like a traversal is ever stored or shown to a guest.  Label
limits follow containerd's labels.Validate (key + value <= 4096 bytes), so a
request containerd itself would refuse is refused here too.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from .errors import InvalidArgument

MAX_KEY_BYTES = 4096
MAX_LABEL_BYTES = 4096  # containerd labels.maxSize, key and value together
MAX_LABELS = 1024

_DIGEST = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]{32,}$")
_SHA256 = re.compile(r"^sha256:[a-f0-9]{64}$")


def check_key(key: str, what: str = "key") -> str:
    if not key:
        raise InvalidArgument(f"{what} must not be empty")
    if "\x00" in key:
        raise InvalidArgument(f"{what} {key!r} contains a NUL byte")
    if len(key.encode()) > MAX_KEY_BYTES:
        raise InvalidArgument(f"{what} is longer than {MAX_KEY_BYTES} bytes")
    # A leading "/" is allowed: containerd's own snapshotter testsuite uses absolute
    # paths as keys, and keys are database keys here, never paths.
    if any(part in ("..", ".") for part in key.split("/")):
        raise InvalidArgument(f"{what} {key!r} must not contain '.' or '..' path elements")
    return key


def check_parent(parent: str) -> str:
    return check_key(parent, "parent") if parent else ""


def check_labels(labels: Mapping[str, str]) -> dict[str, str]:
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(f"too many labels ({len(labels)} > {MAX_LABELS})")
    for k, v in labels.items():
        if not k:
            raise InvalidArgument("label key must not be empty")
        if "\x00" in k or "\x00" in v:
            raise InvalidArgument(f"label {k!r} contains a NUL byte")
        size = len(k.encode()) + len(v.encode())
        if size > MAX_LABEL_BYTES:
            raise InvalidArgument(
                f"label key and value length ({size} bytes) greater than maximum size ({MAX_LABEL_BYTES} bytes), key: {k[:64]}"
            )
    return dict(labels)


def check_chain_id(value: str) -> str:
    """A content identity must be a digest: it is compared, logged and shown."""
    if not _DIGEST.match(value):
        raise InvalidArgument(f"containerd.io/snapshot.ref {value!r} is not a digest")
    return value


def is_sha256(value: str) -> bool:
    return bool(_SHA256.match(value))


def chain_id_from_key(key: str) -> str | None:
    """The chain ID containerd's unpacker writes into extraction keys.

    containerd names the active snapshot of an unpack "extract-<unique> <chainID>"
    (snapshots.UnpackKeyFormat), behind its "<ns>/<seq>/" prefix.  `ctr images
    pull` in containerd 1.6 sends no snapshot.ref label, so this is the only
    place it tells us which layer it is unpacking.
    """
    base = key.split("/", 2)[-1]
    if not base.startswith("extract-") or " " not in base:
        return None
    candidate = base.rsplit(" ", 1)[1]
    return candidate if _DIGEST.match(candidate) else None


def chain_id_from_name(name: str) -> str | None:
    """containerd commits a layer under "<ns>/<seq>/<chainID>"."""
    parts = name.split("/", 2)
    candidate = parts[2] if len(parts) == 3 and parts[1].isdigit() else name
    return candidate if _DIGEST.match(candidate) else None
