"""OCI content digests from untrusted places (registries, image layouts, image configs).

A digest names a blob, and the importers turn it into a path (``blobs/<alg>/<hex>``) and a
URL (``/v2/<name>/blobs/<digest>``).  A registry or a layout is not trusted, so a digest is
checked *before* any such use: ``sha256:../../etc/x`` would otherwise write or read outside
the layout (issue 10 item 3).

Accepted: the algorithms the OCI image spec registers that hashlib verifies, with their exact
encoded length in lower-case hex (image-spec descriptor.md: sha256 64, sha512 128).  blake3,
registered later, is refused with a clear message rather than passed through unverified.
"""

from __future__ import annotations

import hashlib
import re

HEX_LENGTHS = {"sha256": 64, "sha512": 128}
_HEX = re.compile(r"[0-9a-f]+")
_SHOWN = 100  # a hostile digest can be megabytes: show its start only


class InvalidDigest(ValueError):
    """Not a digest we accept; the message shows (the start of) the value and why."""


def check(value: object, what: str = "digest") -> str:
    """``value`` if it is ``<alg>:<hex>`` with a supported alg and the right length, else InvalidDigest."""
    if not isinstance(value, str):
        raise InvalidDigest(f"{what} is not a string: {type(value).__name__}")
    alg, sep, hexd = value.partition(":")
    shown = repr(value[:_SHOWN]) + ("..." if len(value) > _SHOWN else "")
    if not sep or alg not in HEX_LENGTHS:
        raise InvalidDigest(f"{what} {shown}: not <algorithm>:<hex> with algorithm "
                            + " or ".join(HEX_LENGTHS))
    if len(hexd) != HEX_LENGTHS[alg] or not _HEX.fullmatch(hexd):
        raise InvalidDigest(f"{what} {shown}: {alg} needs {HEX_LENGTHS[alg]} lower-case hex digits")
    return value


def hasher(digest: str) -> "hashlib._Hash":
    """A fresh hash object of the digest's algorithm (the digest must have passed `check`)."""
    return hashlib.new(check(digest).partition(":")[0])


def of(digest: str, data: bytes) -> str:
    """The digest of ``data`` in the same algorithm as ``digest``."""
    h = hasher(digest)
    h.update(data)
    return f"{h.name}:{h.hexdigest()}"
