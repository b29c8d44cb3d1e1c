"""QEMU's copies of the boot files, handed back to the page cache once the guest is up.

QEMU maps the ``-kernel`` ELF and the ``-initrd`` file and keeps every byte it loaded from them as
a ROM, copied into the guest's RAM again only on a machine reset (which fractal's VMs never do:
``-no-reboot``, a reset ends the sandbox).  Those clean file pages stay mapped -- resident in
QEMU's RSS -- for the VM's life: ~34 MB of Debian's kernel (text, data, after
``ccpu.guest.kernel.trim_zero_tails``) + the 5 MB initramfs, per VM (docs/vm.md "Host memory per
VM").  ``process_madvise(MADV_PAGEOUT)`` on those mappings, from outside, once the agent answered:
the kernel unmaps the pages and reclaims them (clean file pages: nothing is written anywhere);
should QEMU read them again they fault back in from the file.  The kernel skips pages another
process also maps (another QEMU that booted the same file meanwhile): those stay shared (PSS).

Linux >= 5.10; the caller needs CAP_SYS_NICE and ptrace-read access to QEMU (the shim is root).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable
from pathlib import Path

from ccpu.linux.libc import syscall

SYS_PROCESS_MADVISE = 440  # x86_64 and aarch64 (the generic table) alike
MADV_PAGEOUT = 21
IOV_MAX = 1024


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def file_ranges(maps_text: str, files: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """(start, length) of each mapping in ``/proc/PID/maps`` text of a file among ``files``
    ((st_dev, st_ino) pairs: QEMU opens the boot files through /proc/self/fd/N, so paths would
    not match).  Pure."""
    want = set(files)
    out = []
    for line in maps_text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 5:
            continue
        span, dev, inode = parts[0], parts[3], int(parts[4])
        major, _, minor = dev.partition(":")
        if inode and (os.makedev(int(major, 16), int(minor, 16)), inode) in want:
            lo, _, hi = span.partition("-")
            out.append((int(lo, 16), int(hi, 16) - int(lo, 16)))
    return out


def page_out(pid: int, paths: Iterable[str]) -> int:
    """Page out ``pid``'s mappings of ``paths``; the bytes the kernel was advised about.
    Raises OSError (no such process, no permission, a kernel without process_madvise)."""
    files = []
    for p in paths:
        st = os.stat(p)
        files.append((st.st_dev, st.st_ino))
    # The pidfd first, the maps after: should ``pid`` exit and its number be reused while the
    # maps are read, the advice goes to the pidfd's (dead) process and fails with ESRCH instead
    # of paging out another process's ranges.
    pidfd = os.pidfd_open(pid)
    try:
        ranges = file_ranges(Path(f"/proc/{pid}/maps").read_text(), files)[:IOV_MAX]
        if not ranges:
            return 0
        iov = (_Iovec * len(ranges))(*[_Iovec(start, length) for start, length in ranges])
        return syscall(SYS_PROCESS_MADVISE, ctypes.c_int(pidfd), iov, ctypes.c_size_t(len(ranges)),
                       ctypes.c_int(MADV_PAGEOUT), ctypes.c_uint(0), what="process_madvise(MADV_PAGEOUT)")
    finally:
        os.close(pidfd)
