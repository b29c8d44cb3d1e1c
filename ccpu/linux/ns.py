"""Namespaces: setns(2) (Python 3.11 has no ``os.setns``).

The agent's live restack enters a container's mount namespace from a forked helper, the VM
setup a pod's network namespace; the ``CLONE_NEW*`` value says which kind the fd must be.
"""

from __future__ import annotations

import ctypes

from .libc import check, libc

CLONE_NEWNS = 0x20000  # the agent's live restack: a container's mount namespace
CLONE_NEWNET = 0x40000000  # ccpu/vm/net.py: the pod's network namespace

libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]


def setns(fd: int, nstype: int = CLONE_NEWNS) -> None:
    """Move the calling thread into the namespace ``fd`` refers to (``nstype``: which kind it must be)."""
    check(libc.setns(fd, nstype), "setns")
