"""What `fractal boot` boots: which layers, which kernel, which init, which command line.  Pure.

Everything the image decides is untrusted here (docs/boot.md "What the image may decide"): the
layer directory names come from the snapshotter, the init path and the /boot kernel names from
the image or the user.  Each is checked once, bounded, and confined before it reaches the guest
kernel's command line, where the boot stage of the guest init (ccpu/guest/init.sh, mode
``boot``) reads them: ``fractal.boot.lowers=N:M:...`` (the repo's layer dirs, top first, below
the read-only share at /repo) and ``fractal.boot.init=PATH`` (exec'd as PID 1 in the new root).
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass

from ..errdefs import InvalidArgument

#: containerd's overlay limit (and the repo's): deeper images are refused before boot
MAX_LAYERS = 128
#: bytes the boot stage's own arguments may take on the kernel command line (x86's whole line
#: is 2048 bytes; the rest is the console, the shares and the fixed flags)
MAX_BOOT_ARGS = 1200
MAX_INIT = 255
MEM_MIN_MB, MEM_MAX_MB = 64, 256 * 1024
CPUS_MAX = 64
DEFAULT_INIT = "/sbin/init"
DEFAULT_MEM_MB = 512
#: a layer dir's name in the repo (numeric ids) or a tgz's unpacked root: nothing the init's
#: word splitting or the overlay option parser could misread
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
_KERNEL = re.compile(r"vmlinuz-([A-Za-z0-9_.+~-]{1,64})")
_SAFE_PATH = re.compile(r"[A-Za-z0-9_./+@~-]+")


class BootUsageError(InvalidArgument):
    """Bad input (an image not booted, a bad value): a one-line error, exit status 2."""


@dataclass(frozen=True, slots=True)
class Layers:
    """The machine's root: ``names`` (top first) of dirs directly below ``root`` on the host,
    shared read-only into the guest at /repo."""

    root: str
    names: tuple[str, ...]

    def host_dirs(self) -> list[str]:
        return [os.path.join(self.root, n) for n in self.names]


def layers_of(dirs: Sequence[str]) -> Layers:
    """The repo layer dirs of an image (top first, absolute, as the snapshotter names them) as
    one shared parent and names below it.  Refused: none, too many, dirs of different parents,
    names the guest could misread."""
    if not dirs:
        raise BootUsageError("the image has no layers")
    if len(dirs) > MAX_LAYERS:
        raise BootUsageError(f"the image has {len(dirs)} layers: at most {MAX_LAYERS} can be booted")
    parents = {posixpath.dirname(posixpath.normpath(d)) for d in dirs}
    if len(parents) != 1 or not all(posixpath.isabs(d) for d in dirs):
        raise BootUsageError(f"the image's layers are not all in one repo layers dir: {sorted(parents)}")
    names = tuple(posixpath.basename(posixpath.normpath(d)) for d in dirs)
    for n in names:
        if not _NAME.fullmatch(n):
            raise BootUsageError(f"layer dir name {n!r} cannot be passed to the guest")
    if len(set(names)) != len(names):
        raise BootUsageError("the image names the same layer dir twice")
    return Layers(parents.pop(), names)


def check_init(path: str) -> str:
    """``--init`` or the default: an absolute, normalised path of plain characters (it crosses
    the kernel command line, split on spaces)."""
    if not path or len(path) > MAX_INIT:
        raise BootUsageError(f"--init {path!r}: expected an absolute path of at most {MAX_INIT} bytes")
    if not path.startswith("/") or posixpath.normpath(path) != path or path == "/" or "//" in path:
        raise BootUsageError(f"--init {path!r}: expected an absolute, normalised path (no '..', no '//')")
    if not _SAFE_PATH.fullmatch(path):
        raise BootUsageError(f"--init {path!r}: only letters, digits and _./+@~- are allowed")
    return path


def parse_mem(text: str) -> int:
    """``--mem``: MiB, or with a suffix M/G (``512``, ``512M``, ``2G``); bounded."""
    m = re.fullmatch(r"(\d{1,7})([MmGg]?)(?:i?B)?", text.strip())
    if not m:
        raise BootUsageError(f"--mem {text!r}: expected MiB or a size like 512M or 2G")
    mb = int(m.group(1)) * (1024 if m.group(2).lower() == "g" else 1)
    if not MEM_MIN_MB <= mb <= MEM_MAX_MB:
        raise BootUsageError(f"--mem {text!r}: expected {MEM_MIN_MB} MiB .. {MEM_MAX_MB // 1024} GiB")
    return mb


def check_cpus(n: int | None) -> int | None:
    if n is not None and not 1 <= n <= CPUS_MAX:
        raise BootUsageError(f"--cpus {n}: expected 1..{CPUS_MAX}")
    return n


@dataclass(frozen=True, slots=True)
class Share:
    host: str
    guest: str
    readonly: bool = False


#: where no --share may go: the boot stage's own dirs, and the kernel's file systems
_RESERVED = ("/proc", "/sys", "/dev", "/run", "/repo", "/.boot")


def parse_share(spec: str) -> Share:
    """``HOST[:GUEST[:ro|rw]]``; GUEST defaults to /mnt/<basename of HOST>."""
    parts = spec.split(":")
    if len(parts) > 3 or not parts[0]:
        raise BootUsageError(f"--share {spec!r}: expected HOST[:GUEST[:ro|rw]]")
    host = os.path.abspath(parts[0])
    base = posixpath.basename(host.rstrip("/")) or "root"
    guest = parts[1] if len(parts) > 1 and parts[1] else f"/mnt/{base}"
    mode = parts[2] if len(parts) > 2 else "rw"
    if mode not in ("ro", "rw"):
        raise BootUsageError(f"--share {spec!r}: mode must be ro or rw")
    if (not guest.startswith("/") or posixpath.normpath(guest) != guest or guest == "/" or "//" in guest
            or not _SAFE_PATH.fullmatch(guest) or len(guest) > MAX_INIT):
        raise BootUsageError(f"--share {spec!r}: guest path {guest!r} must be absolute, normalised, plain characters")
    if any(guest == r or guest.startswith(r + "/") for r in _RESERVED):
        raise BootUsageError(f"--share {spec!r}: {guest} is the boot stage's or the kernel's")
    return Share(host, guest, mode == "ro")


KERNEL_CHOICES = ("auto", "image", "fractal")


@dataclass(frozen=True, slots=True)
class Kernel:
    """The kernel that boots, its initramfs (None: fractal's guest initramfs), and what the user
    must know about it."""

    path: str
    image_kernel: str | None  # the image's /boot/vmlinuz-<version> seen (None: it has none)
    note: str
    initrd: str | None = None
    own: bool = False  # the image's own kernel boots


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Debian-ish ordering of kernel versions (6.1.0-13-amd64 < 6.1.0-27-amd64 < 6.10.0-1)."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.\-+~_]", version))


def image_kernels(boot_names: Sequence[str]) -> list[str]:
    """The versions of ``/boot/vmlinuz-<version>`` among the image's /boot names (confined: a name
    is only a name), newest first."""
    versions = [m.group(1) for n in boot_names if (m := _KERNEL.fullmatch(n))]
    return sorted(versions, key=version_key, reverse=True)


def choose_kernel(boot_names: Sequence[str], fractal_kernel: str, fractal_release: str = "", want: str = "auto",
                  built: tuple[str, str] | None = None, why_not: str = "") -> Kernel:
    """Which kernel boots (docs/boot.md "Kernel").  ``want``: ``auto`` (the image's newest
    /boot/vmlinuz-* when it could be prepared, else fractal's), ``image`` (the image's or an
    error), ``fractal``.  ``built``: (kernel, initramfs) of the image's newest kernel, prepared by
    ccpu/boot/initrd.py, or None with ``why_not``.  The note says which kernel boots and why."""
    if want not in KERNEL_CHOICES:
        raise BootUsageError(f"--kernel {want!r}: expected one of {', '.join(KERNEL_CHOICES)}")
    versions = image_kernels(boot_names)
    ours = f"fractal's kernel{f' {fractal_release}' if fractal_release else ''}"
    if not versions:
        if want == "image":
            raise BootUsageError("--kernel image: the image has no /boot/vmlinuz-*")
        return Kernel(fractal_kernel, None, f"note: the image has no /boot/vmlinuz-*: booting {ours}; modules "
                      "the image expects in /lib/modules may be missing")
    v = versions[0]
    if want == "fractal":
        return Kernel(fractal_kernel, v, f"note: booting {ours} (--kernel fractal), not the image's "
                      f"/boot/vmlinuz-{v}; the image's modules (/lib/modules/{v}) will not load")
    if built is not None:
        return Kernel(built[0], v, f"note: booting the image's kernel /boot/vmlinuz-{v} (its modules for the "
                      "boot stage, from /lib/modules)", initrd=built[1], own=True)
    if want == "image":
        raise BootUsageError(f"--kernel image: the image's /boot/vmlinuz-{v} cannot be booted: {why_not}")
    return Kernel(fractal_kernel, v, f"note: the image's /boot/vmlinuz-{v} cannot be booted ({why_not}): booting "
                  f"{ours}; the image's modules (/lib/modules/{v}) will not load")


@dataclass(frozen=True, slots=True)
class BootPlan:
    layers: Layers
    init: str
    kernel: Kernel
    memory_mb: int
    cpus: int | None
    shares: tuple[Share, ...]

    def cmdline(self) -> tuple[str, ...]:
        """The boot stage's arguments on the guest kernel's command line."""
        args = (f"fractal.boot.lowers={':'.join(self.layers.names)}", f"fractal.boot.init={self.init}")
        if sum(len(a) + 1 for a in args) > MAX_BOOT_ARGS:
            raise BootUsageError(f"the image's {len(self.layers.names)} layers do not fit on the kernel command line")
        return args


def make(dirs: Sequence[str], init: str, kernel: Kernel, memory_mb: int = DEFAULT_MEM_MB,
         cpus: int | None = None, shares: Sequence[Share] = ()) -> BootPlan:
    guests = [s.guest for s in shares]
    if len(set(guests)) != len(guests):
        raise BootUsageError(f"two --share at the same guest path: {guests}")
    plan = BootPlan(layers_of(dirs), check_init(init), kernel, memory_mb, check_cpus(cpus), tuple(shares))
    plan.cmdline()
    return plan
