"""What the host's operating system offers QEMU, as data: Linux (tested here) or macOS (untested).

Everything in the VM path that only Linux has is named here once, so that the command line
builder (:mod:`ccpu.vm.qemu`), the share chooser (:mod:`ccpu.vm.shares`) and ``fractal vm run``
ask one object instead of testing ``sys.platform`` in many places:

- ``/proc/self/fd/N``: QEMU reads the kernel, initramfs and system image through fds the launcher
  opened; macOS has no /proc but its ``/dev/fd/N`` (fdesc) gives the same dup-on-open.
- QEMU's seccomp filter (``-sandbox``) is built only on Linux.
- virtiofs needs virtiofsd and vhost-user (memfd-backed guest RAM): Linux only.  On macOS every
  share is 9p, which QEMU serves itself on macOS hosts since 7.0.
- tap NICs (a pod's netns) and PR_SET_PDEATHSIG are Linux only.
- The mac share policy: a ``vm run`` on a mac shares only the user's ``$HOME`` (the directories a
  mac user works in; nothing of /System, /Library or other users' homes), as the seed's ``virt``
  on macOS did.  Shares outside it are refused, naming the policy.

The macOS variant is **untested** (no mac here): only the command lines it produces are checked,
by tests/unit/test_vm_hostos.py.  docs/vm.md ("On macOS") says what a mac user would run.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass


class HostPolicyError(ValueError):
    """A request this host's OS cannot serve (a share outside $HOME on a mac, virtiofs on a mac)."""


@dataclass(frozen=True)
class HostOS:
    name: str  # "linux" | "darwin"
    fd_dir: str  # where an inherited fd N can be opened by path
    seccomp: bool  # QEMU's -sandbox exists
    virtiofs: bool  # virtiofsd + vhost-user
    tap: bool  # tap NICs in a network namespace
    pdeathsig: bool  # the kernel kills a child when its parent dies
    # where QEMU's qboot.rom lives when installed (Debian's package; Homebrew on Intel / Apple Silicon)
    qboot_paths: tuple[str, ...] = ("/usr/share/qemu/qboot.rom",)
    share_root: str | None = None  # shares must lie under it (None: no policy)


LINUX = HostOS("linux", "/proc/self/fd", seccomp=True, virtiofs=True, tap=True, pdeathsig=True)


def darwin(home: str) -> HostOS:
    """macOS: hvf, 9p only, no seccomp/tap/PDEATHSIG, shares confined to ``home``."""
    return HostOS("darwin", "/dev/fd", seccomp=False, virtiofs=False, tap=False, pdeathsig=False,
                  qboot_paths=("/usr/local/share/qemu/qboot.rom", "/opt/homebrew/share/qemu/qboot.rom"),
                  share_root=os.path.normpath(home))


def current() -> HostOS:
    if platform.system() == "Darwin":
        return darwin(os.path.expanduser("~"))
    return LINUX


def check_share(host: HostOS, path: str) -> None:
    """Refuse a share that the host's policy does not allow.  Pure: ``path`` must already be
    resolved (symlinks followed) by the caller, so that a link under $HOME cannot name /etc."""
    if host.share_root is None:
        return
    root = host.share_root.rstrip("/") or "/"
    norm = os.path.normpath(path)
    if norm != root and not norm.startswith(root + "/"):
        raise HostPolicyError(f"{path}: on {host.name} fractal shares only directories under {root} "
                              f"(the mac share policy: $HOME and nothing else of the host)")
