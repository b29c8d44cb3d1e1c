"""The process's own fds 0-2 (its own module: the agent calls it before its reaper exists)."""

from __future__ import annotations

import os


def ensure_stdio_open() -> None:
    """Open /dev/null on any of fds 0-2 that are closed, so new fds are never 0-2."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            nfd = os.open(os.devnull, os.O_RDWR)
            if nfd != fd:
                os.dup2(nfd, fd)
                os.close(nfd)
