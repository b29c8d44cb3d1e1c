"""`fractal boot SOURCE`: an OCI image from the repo (or a `docker export` tgz) booted as a whole
machine, its own init as PID 1 (docs/boot.md).

SOURCE is a file (a tarball, unpacked once into ``$FRACTAL_CACHE/boot/tgz/<sha256>``) or an image
name in containerd, unpacked for the fractal snapshotter: its layer dirs come from the snapshotter
through containerd (ccpu/client: the image's chain IDs, a view's lowerdirs), the same dirs the
containers of that image stack.  The plan (ccpu/boot/plan.py) checks what the image and the user
decide; the image's root is read on the host (ccpu/boot/rootview.py) only to find its init and its
/boot kernels.  ``--export tgz PATH`` writes the merged root instead of booting it.

Exit status: the machine's (0 once it powers off), 1 if it failed or panicked, 2 for bad input
(image not in the repo, no init in it, a bad value), 128+N when stopped by signal N.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .common import add_containerd_flags
from .guest import progress

EXIT_USAGE = 2


def _err(msg: str) -> int:
    print(f"fractal boot: {msg}", file=sys.stderr)
    return EXIT_USAGE


def _image_dirs(args: argparse.Namespace) -> list[str]:
    """The repo dirs of image ``args.source``'s layers, top first."""
    from ..boot.plan import BootUsageError
    from ..client.address import resolve_target
    from ..client.containerd import ContainerdClient, ContainerdError
    from ..client.images import image_layers
    from ..client.snapshots import Snapshots

    address, namespace = resolve_target(args.address, args.namespace)
    if not os.path.exists(address):
        raise BootUsageError(f"{args.source!r} is not a file, and containerd is not at {address} to look it up")
    with ContainerdClient(address, namespace) as client:
        try:
            layers = image_layers(client, args.source)
        except ContainerdError as exc:
            raise BootUsageError(f"{exc} (and it is not a file)") from None
        if not layers.chain_ids:
            raise BootUsageError(f"image {args.source!r} has no layers")
        try:
            return Snapshots(client, args.snapshotter).layers_of(layers.chain_ids[-1])
        except ContainerdError as exc:
            raise BootUsageError(
                f"image {args.source!r} is not unpacked for snapshotter {args.snapshotter!r} in namespace "
                f"{namespace!r} (ctr -n {namespace} images pull --snapshotter {args.snapshotter} ...): {exc}") from None


def _fractal_cache() -> Path:
    return Path(os.environ.get("FRACTAL_CACHE", "/var/cache/fractal"))


def _cache() -> Path:
    return _fractal_cache() / "boot" / "tgz"


def cmd_boot(args: argparse.Namespace) -> int:
    from ..boot import machine, plan, rootview, tgz

    note = progress if args.verbose else (lambda s: None)
    try:
        memory = plan.parse_mem(args.mem)
        plan.check_cpus(args.cpus)
        init = plan.check_init(args.init)
        shares = [plan.parse_share(s) for s in args.share or []]
        for s in shares:
            if not os.path.isdir(s.host):
                raise plan.BootUsageError(f"--share {s.host}: not a directory")
        if args.netns and not os.path.exists(args.netns):
            raise plan.BootUsageError(f"--netns {args.netns}: no such network namespace")
        if args.export and args.export[0] != "tgz":
            raise plan.BootUsageError(f"--export {args.export[0]!r}: the one format is tgz")
        if os.path.isfile(args.source):
            note(f"unpacking {args.source} (once, into {_cache()})")
            try:
                root = tgz.unpack(args.source, str(_cache()))
            except tgz.TgzError as exc:
                raise plan.BootUsageError(str(exc)) from None
            dirs = [os.path.join(root, tgz.ROOT)]
        else:
            dirs = _image_dirs(args)
        if args.export:
            tgz.export(dirs, args.export[1])
            print(f"fractal boot: wrote the merged root of {args.source} to {args.export[1]}", file=sys.stderr)
            return 0
        view = rootview.RootView(dirs)
        try:
            entry = view.lookup(init)
            boot_names = view.listdir("/boot")
        except rootview.RootViewError as exc:
            raise plan.BootUsageError(f"{args.source}: {exc}") from None
        if entry is None or not entry.executable:
            raise plan.BootUsageError(f"no init {init} in {args.source}"
                                      + ("" if entry is None else f" ({entry.path} is not an executable file)")
                                      + " (--init PATH names another)")
        from ..guest import initramfs

        if args.kernel not in plan.KERNEL_CHOICES:
            raise plan.BootUsageError(f"--kernel {args.kernel!r}: expected one of {', '.join(plan.KERNEL_CHOICES)}")
        built, why_not = None, ""
        versions = plan.image_kernels(boot_names)
        if versions and args.kernel != "fractal":
            from ..boot import initrd

            note(f"preparing the image's kernel {versions[0]} and its modules for the boot stage")
            try:
                built = initrd.build(view, versions[0], str(_fractal_cache()))
            except initrd.InitrdError as exc:
                why_not = str(exc)
        guest = initramfs.build(progress=note)
        release = str(guest.manifest.get("kernel", {}).get("release", ""))
        kernel = plan.choose_kernel(boot_names, str(guest.kernel), release, args.kernel, built, why_not)
        bplan = plan.make(dirs, init, kernel, memory, args.cpus, shares)
    except plan.BootUsageError as exc:
        return _err(exc.message)
    print(f"fractal boot: {kernel.note}", file=sys.stderr)
    note(f"booting {args.source}: {len(bplan.layers.names)} layer(s), init {init} ({entry.path})")
    if kernel.initrd is not None:  # the image's kernel: its boot stage is busybox only, no system image
        initrd_path, system_image = kernel.initrd, None
    else:
        initrd_path, system_image = str(guest.initramfs), str(guest.image) if guest.image else None
    outcome = machine.boot(bplan, initramfs=initrd_path, system_image=system_image,
                           interactive=args.console, share_type=args.share_type, note=note, debug=args.debug_guest,
                           netns=args.netns)
    if outcome.exit_status != 0:
        print(f"\nfractal boot: {outcome.why}", file=sys.stderr)
    else:
        note(outcome.why)
    return outcome.exit_status


def register(p: argparse.ArgumentParser) -> None:
    p.description = ("Boot an image as a whole machine: its layers in the repo become the root (read-only "
                     "shares + a tmpfs upper, no copy), its own init runs as PID 1; the command ends when "
                     "the machine powers off.  SOURCE: an image unpacked for the fractal snapshotter, or a "
                     "`docker export`-style tarball.")
    p.add_argument("source", metavar="SOURCE", help="image name (in containerd, unpacked for fractal) or a .tgz file")
    add_containerd_flags(p)
    p.add_argument("--snapshotter", default="fractal", help="the snapshotter the image is unpacked for (default %(default)s)")
    p.add_argument("--console", action="store_true",
                   help="interactive serial console on this terminal (raw; ^] stops the machine)")
    p.add_argument("--mem", default="512", metavar="SIZE", help="guest memory, MiB or 512M/2G (default %(default)s)")
    p.add_argument("--cpus", type=int, default=None, help="guest CPUs (default: 1 under TCG, 2 under KVM)")
    p.add_argument("--share", action="append", metavar="HOST[:GUEST[:ro|rw]]",
                   help="a host directory in the machine (default at /mnt/<its name>, read-write; repeatable)")
    p.add_argument("--kernel", default="auto", metavar="auto|image|fractal",
                   help="the image's own /boot/vmlinuz-* (image), fractal's kernel (fractal), or the image's when "
                        "it can be booted, else fractal's (auto, the default)")
    p.add_argument("--init", default="/sbin/init", metavar="PATH", help="the image's init (default %(default)s)")
    p.add_argument("--netns", metavar="PATH",
                   help="give the machine the network of this namespace (/var/run/netns/NAME, /proc/PID/ns/net): "
                        "its interfaces become the machine's NICs, addresses and routes configured before the "
                        "image's init starts (needs root)")
    p.add_argument("--share-type", choices=("9p", "virtiofs"), default=None,
                   help="share transport (default: virtiofs when virtiofsd is available, else 9p)")
    p.add_argument("--export", nargs=2, metavar=("tgz", "PATH"),
                   help="write the image's merged root as a gzipped tar to PATH instead of booting it")
    p.add_argument("--debug-guest", action="store_true", help="verbose kernel + boot stage on the console")
    p.add_argument("-v", "--verbose", action="store_true", help="progress on stderr")
    p.set_defaults(func=cmd_boot)
