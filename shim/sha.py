"""sha256 for socket names, from the interpreter's builtin module rather than hashlib: hashlib loads
OpenSSL, about 3 ms of every `start` and `delete` verb, which import nothing they can avoid."""

from __future__ import annotations


def sha256_hex(data: bytes) -> str:
    try:
        from _sha256 import sha256  # type: ignore[import-not-found]  # Python <= 3.11
    except ImportError:
        try:
            from _sha2 import sha256  # type: ignore[import-not-found, no-redef]  # 3.12+
        except ImportError:
            from hashlib import sha256  # type: ignore[assignment]
    return sha256(data).hexdigest()  # type: ignore[no-any-return]
