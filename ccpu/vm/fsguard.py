"""A seccomp filter for QEMU: whatever the guest asks of a read-write 9p share, no setuid/setgid
file, no device node and no extended attribute (file capabilities!) lands on the host.

Why a filter and not a 9p security model: QEMU's 9p server runs as root and, with
``security_model=none`` (or ``passthrough``), does what the guest asks with real syscalls: guest
root's ``chmod u+s`` becomes a setuid-root file in a host dir (a hostPath, an emptyDir under
/var/lib/kubelet) that any local user can run; its ``mknod`` a device node there; its
``setfattr security.capability`` a binary with file capabilities.  ``mapped-xattr`` would stop
that but breaks what volumes are for: host symlinks (every configMap/secret volume is built of
them) cannot be read by the guest, and every file the guest writes is 0600 root on the host
(docs/security-notes-volumes.md).  The filter keeps ``none``'s faithful ownership and modes and
refuses exactly the dangerous requests: the guest gets EPERM.

What is refused (x86_64 and aarch64 numbers; on other architectures :func:`program` raises):

* ``chmod``/``fchmod``/``fchmodat``/``fchmodat2`` with S_ISUID or S_ISGID in the mode;
* ``open``/``openat``/``creat`` with S_ISUID or S_ISGID in the mode (glibc passes 0 unless
  creating), ``openat2`` altogether (ENOSYS: its mode is in memory the filter cannot read; glibc
  and QEMU fall back to openat);
* ``mknod``/``mknodat`` of a character or block device, or with S_ISUID/S_ISGID;
* ``setxattr``/``lsetxattr``/``fsetxattr``/``removexattr``/... (the name is in memory too);
* any system call of another ABI (i386 ``int 0x80``, x32): ENOSYS.

QEMU itself needs none of these (it opens, creates sockets and log files with plain modes).
The filter is installed in the child between fork and exec, after ``PR_SET_NO_NEW_PRIVS``; it
stacks with QEMU's own ``-sandbox`` filter (the stricter answer wins).
"""

from __future__ import annotations

import ctypes
import errno
import platform
import struct
from collections.abc import Callable

# BPF opcodes (linux/filter.h) and seccomp return values (linux/seccomp.h)
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_AND_K = 0x54
_RET_K = 0x06
RET_ALLOW = 0x7FFF0000
RET_ERRNO = 0x00050000
_NR, _ARCH = 0, 4


def _arg(i: int) -> int:
    """Offset of the low 32 bits of syscall argument ``i`` in seccomp_data (little endian)."""
    return 16 + 8 * i


S_IFMT, S_IFCHR, S_IFBLK = 0o170000, 0o020000, 0o060000
SETID = 0o6000


#: per machine: audit arch, x32 bit (0: none), {syscall: (kind, mode arg index)}
#: kinds: "setid" (mode has no S_ISUID/S_ISGID), "mknod" (setid + no char/block device),
#: "deny" (EPERM), "enosys"
_ARCHES: dict[str, tuple[int, int, dict[int, tuple[str, int]]]] = {
    "x86_64": (0xC000003E, 0x40000000, {
        90: ("setid", 1), 91: ("setid", 1), 268: ("setid", 2), 452: ("setid", 2),  # chmod fchmod fchmodat fchmodat2
        2: ("setid", 2), 257: ("setid", 3), 85: ("setid", 1),  # open openat creat
        437: ("enosys", 0),  # openat2
        133: ("mknod", 1), 259: ("mknod", 2),  # mknod mknodat
        188: ("deny", 0), 189: ("deny", 0), 190: ("deny", 0),  # setxattr lsetxattr fsetxattr
        197: ("deny", 0), 198: ("deny", 0), 199: ("deny", 0),  # removexattr lremovexattr fremovexattr
    }),
    "aarch64": (0xC00000B7, 0, {
        52: ("setid", 1), 53: ("setid", 2), 452: ("setid", 2),  # fchmod fchmodat fchmodat2
        56: ("setid", 3),  # openat
        437: ("enosys", 0),  # openat2
        33: ("mknod", 2),  # mknodat
        5: ("deny", 0), 6: ("deny", 0), 7: ("deny", 0),  # setxattr lsetxattr fsetxattr
        14: ("deny", 0), 15: ("deny", 0), 16: ("deny", 0),  # removexattr lremovexattr fremovexattr
    }),
}


def _ins(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def _block(nr: int, kind: str, arg: int) -> list[bytes]:
    deny = RET_ERRNO | errno.EPERM
    if kind == "deny":
        return [_ins(_JEQ_K, nr, 0, 1), _ins(_RET_K, deny)]
    if kind == "enosys":
        return [_ins(_JEQ_K, nr, 0, 1), _ins(_RET_K, RET_ERRNO | errno.ENOSYS)]
    if kind == "setid":
        return [_ins(_JEQ_K, nr, 0, 4), _ins(_LD_W_ABS, _arg(arg)), _ins(_JSET_K, SETID, 0, 1),
                _ins(_RET_K, deny), _ins(_RET_K, RET_ALLOW)]
    if kind == "mknod":
        return [_ins(_JEQ_K, nr, 0, 7), _ins(_LD_W_ABS, _arg(arg)), _ins(_JSET_K, SETID, 4, 0),
                _ins(_AND_K, S_IFMT), _ins(_JEQ_K, S_IFCHR, 2, 0), _ins(_JEQ_K, S_IFBLK, 1, 0),
                _ins(_RET_K, RET_ALLOW), _ins(_RET_K, deny)]
    raise ValueError(kind)


def program(machine: str | None = None) -> bytes:
    """The filter as raw ``struct sock_filter`` instructions (pure)."""
    machine = machine or platform.machine()
    if machine not in _ARCHES:
        raise OSError(errno.ENOSYS, f"no 9p guard syscall table for {machine}")
    audit_arch, x32, rules = _ARCHES[machine]
    enosys = RET_ERRNO | errno.ENOSYS
    ins = [_ins(_LD_W_ABS, _ARCH), _ins(_JEQ_K, audit_arch, 1, 0), _ins(_RET_K, enosys), _ins(_LD_W_ABS, _NR)]
    if x32:
        ins += [_ins(_JGE_K, x32, 0, 1), _ins(_RET_K, enosys)]
    for nr, (kind, arg) in sorted(rules.items()):
        ins += _block(nr, kind, arg)
    ins.append(_ins(_RET_K, RET_ALLOW))
    if len(ins) > 4096:  # BPF_MAXINSNS
        raise ValueError("filter too long")
    return b"".join(ins)


class _Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2


def installer(machine: str | None = None) -> Callable[[], None]:
    """A function that installs the filter in the calling process (for a ``preexec_fn``: all
    allocation happens now, in the parent; the child only makes two prctl calls)."""
    code = program(machine)
    buf = ctypes.create_string_buffer(code, len(code))
    prog = _Fprog(len(code) // 8, ctypes.addressof(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    prctl = libc.prctl

    def install() -> None:
        _keep = buf  # noqa: F841  (the program must outlive the call)
        if prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
        if prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")

    return install
