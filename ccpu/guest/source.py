"""`Source`: one file of the guest build (the initramfs, the system image, the user's additions)."""

from __future__ import annotations

import stat
from dataclasses import dataclass


@dataclass(frozen=True)
class Source:
    """A file to put in the archive: where it comes from (or its bytes) and where it goes."""

    dest: str
    mode: int
    path: str | None = None
    data: bytes | None = None
    link: str | None = None

    def read(self) -> bytes:
        if stat.S_ISDIR(self.mode):
            return b""
        if self.link is not None:
            return self.link.encode()
        if self.data is not None:
            return self.data
        assert self.path is not None
        with open(self.path, "rb") as f:
            return f.read()
