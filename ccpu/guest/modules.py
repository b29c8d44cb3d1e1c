"""Kernel modules for the guest: which ones, in which order.  Pure functions.

Debian builds every virtio driver and the filesystems we need (9p, virtiofs,
overlay) as modules, so the initramfs has to carry them and the init has to
insmod them dependencies first.  busybox's insmod does not resolve
dependencies, hence the order is computed here, at build time, from
``modules.dep`` (the format depmod writes: ``path: dep-path dep-path ...``).

Debian generates ``modules.dep`` in the package's postinst, so an extracted
``.deb`` has none; ``modinfo_depends`` reads the ``depends=`` field straight
from a ``.ko``'s ``.modinfo`` ELF section and ``render_modules_dep`` writes the
equivalent file -- no kmod/depmod needed on the build host.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence

# What the guest needs, by module name (dashes and underscores are the same to the kernel):
# - virtio_pci / virtio_mmio: the transports (q35/pc use PCI; microvm uses MMIO)
# - virtio_console: virtio-serial ports (the agent channel, `vm run`'s stdio)
# - 9pnet_virtio + 9p, virtiofs (+ fuse): the repo share and `vm run --share`
# - overlay: the agent stacks image layers as overlayfs
# - virtio_rng: entropy early (Python's os.urandom/getrandom must not stall)
# - virtio_balloon: free page reporting -- pages the guest frees go back to the host (QEMU's RSS
#   falls after a container exits; the kernel's CONFIG_PAGE_REPORTING is built in)
# - virtio_net (+ net_failover, failover): the pod's NIC (ccpu.vm.net), when the sandbox has a netns
# - bridge (+ stp, llc): privileged containers that make bridges (critest's capability specs); the
#   guest has no modprobe, so what is not loaded at boot is not there
# cgroups, namespaces, seccomp, devtmpfs and the 8250 console are built in.
GUEST_MODULES: tuple[str, ...] = (
    "virtio_pci",
    "virtio_mmio",
    "virtio_console",
    "virtio_rng",
    "virtio_balloon",
    "virtio_net",
    "9pnet_virtio",
    "9p",
    "fuse",
    "virtiofs",
    "overlay",
    "bridge",
)


#: What the guest's agent needs before it can answer `hello` (the init loads these first): the
#: transports, the ports, entropy.  The rest of GUEST_MODULES (shares, NICs, overlay, bridge,
#: balloon) the init loads while the agent starts (ccpu/guest/init.sh finish_boot): under TCG
#: each insmod is tens of ms of the boot -> ready time (docs/vm.md "The guest's boot timeline").
BOOT_MODULES: tuple[str, ...] = ("virtio_pci", "virtio_mmio", "virtio_console", "virtio_rng")


def split_order(deps: Mapping[str, Sequence[str]], first: Iterable[str], wanted: Iterable[str],
                builtin: Iterable[str] = ()) -> tuple[list[str], list[str]]:
    """(load first, load later): the load order of ``first`` (module names, with their
    dependencies), then the rest of ``wanted``'s, each list dependencies first -- the first list
    is closed under dependencies, so the second one loaded after it is a valid order too."""
    built = list(builtin)
    head = load_order(deps, first, built)
    done = set(head)
    return head, [k for k in load_order(deps, [*first, *wanted], built) if k not in done]


#: What the system image's other candidates need before the image is mounted, by the init's
#: fractal.sysimage / fractal.sysdev value (docs/vm.md "The candidates, measured").  The default
#: build ships none of them (erofs on virtio-blk needs only initramfs.IMAGE_MODULES; these are
#: ~0.75 MB more to unpack at every boot): hack/bench/sysimage.py appends them, with their
#: dependencies, to the initramfs it boots, listed in /etc/fractal/modules.sysimage.
SYSIMAGE_MODULES: dict[str, tuple[str, ...]] = {
    "squashfs": ("squashfs",),
    "pmem": ("virtio_pmem", "nd_pmem"),  # + libnvdimm, nd_btt, nd_virtio
    "virtiofs": ("virtiofs",),  # + fuse: shipped, but as later modules inside the image itself
}


class ModuleError(ValueError):
    """A wanted module or one of its dependencies is missing."""


def module_name(path: str) -> str:
    """`kernel/fs/9p/9p.ko[.xz]` -> `9p`; `virtio-rng.ko` -> `virtio_rng` (the kernel's spelling)."""
    base = path.rsplit("/", 1)[-1]
    for suffix in (".xz", ".zst", ".gz"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    if base.endswith(".ko"):
        base = base[:-3]
    return base.replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, list[str]]:
    """`modules.dep` text -> {module path: [dependency paths]} (paths relative to /lib/modules/VER)."""
    deps: dict[str, list[str]] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path, sep, rest = line.partition(":")
        if not sep:
            raise ModuleError(f"modules.dep line {lineno}: no ':' in {line!r}")
        deps[path.strip()] = rest.split()
    return deps


def render_modules_dep(direct: Mapping[str, Sequence[str]]) -> str:
    """{module path: [direct dependency *names*]} -> modules.dep text (sorted, deterministic).

    depmod lists the full transitive closure on each line; so do we, nearest first.
    """
    by_name = {module_name(p): p for p in direct}

    def closure(path: str, seen: set[str]) -> list[str]:
        out: list[str] = []
        for dep in direct[path]:
            dpath = by_name.get(dep.replace("-", "_"))
            if dpath is None or dpath in seen:
                continue
            seen.add(dpath)
            out.append(dpath)
            out.extend(closure(dpath, seen))
        return out

    lines = [f"{p}: {' '.join(closure(p, {p}))}".rstrip() for p in sorted(direct)]
    return "\n".join(lines) + "\n"


def shipped_modules_dep(deps: Mapping[str, Sequence[str]], order: Sequence[str]) -> str:
    """The guest's own modules.dep: a line for each module the initramfs carries (``order``, paths
    as in ``deps``), its dependencies as the kernel's modules.dep lists them (nearest first), every
    ``.xz`` dropped (the build stores the modules decompressed for busybox).  busybox ``modprobe -a``
    reads it to load a whole list in one process (ccpu/guest/init.sh load_modules): under TCG a
    fork + exec of busybox per module is ~10 ms.  Deterministic: lines in load order."""
    shipped = set(order)
    lines = []
    for path in order:
        ds = [d.removesuffix(".xz") for d in deps.get(path, ()) if d in shipped]
        lines.append(f"{path.removesuffix('.xz')}: {' '.join(ds)}".rstrip())
    return "\n".join(lines) + "\n"


def load_order(deps: Mapping[str, Sequence[str]], wanted: Iterable[str],
               builtin: Iterable[str] = ()) -> list[str]:
    """Module paths to insmod, every module after all of its dependencies.

    `wanted` are module names; names in `builtin` (modules.builtin) are skipped
    silently because the kernel already has them.  Deterministic: dependencies
    are visited in sorted order, wanted modules in the given order.
    """
    by_name = {module_name(p): p for p in deps}
    built = {module_name(b) for b in builtin}
    order: list[str] = []
    done: set[str] = set()
    visiting: set[str] = set()

    def visit(path: str, chain: tuple[str, ...]) -> None:
        if path in done:
            return
        if path in visiting:
            raise ModuleError("dependency cycle: " + " -> ".join(chain + (path,)))
        visiting.add(path)
        for dep in sorted(deps.get(path, ())):
            if dep not in deps:
                raise ModuleError(f"{path} needs {dep}, which modules.dep does not list")
            visit(dep, chain + (path,))
        visiting.discard(path)
        done.add(path)
        order.append(path)

    for name in wanted:
        key = name.replace("-", "_")
        if key in by_name:
            visit(by_name[key], ())
        elif key not in built:
            raise ModuleError(f"module {name} is neither in modules.dep nor built in")
    return order


def modinfo_depends(ko: bytes) -> list[str]:
    """The `depends=` names from a (64-bit little-endian ELF) kernel module's `.modinfo` section."""
    if ko[:4] != b"\x7fELF" or ko[4] != 2 or ko[5] != 1:
        raise ModuleError("not a 64-bit little-endian ELF module")
    shoff, = struct.unpack_from("<Q", ko, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ko, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, off, size = struct.unpack_from("<IIQQQQ", ko, shoff + i * shentsize)
        return name, off, size

    _, stroff, _ = section(shstrndx)
    for i in range(shnum):
        name, off, size = section(i)
        end = ko.index(b"\0", stroff + name)
        if ko[stroff + name:end] == b".modinfo":
            for field in ko[off:off + size].split(b"\0"):
                if field.startswith(b"depends="):
                    value = field[len(b"depends="):].decode()
                    return [d for d in value.split(",") if d]
            return []
    raise ModuleError("no .modinfo section")
