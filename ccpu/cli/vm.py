"""`fractal vm run`: boot a guest, run a command in it, return its exit code (over ccpu.vm.run)."""

from __future__ import annotations

import argparse
import os
import sys

from .common import add_containerd_flags
from .guest import progress


def cmd_vm_run(args: argparse.Namespace) -> int:
    from ..guest import initramfs
    from ..vm import hostos, run

    argv = list(args.cmd)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        print("fractal vm run: no command (fractal vm run [options] -- CMD...)", file=sys.stderr)
        return 2
    if args.tty and args.interactive and not os.isatty(sys.stdin.fileno()):
        print("fractal vm run: the input device is not a TTY (-it needs a terminal on stdin)", file=sys.stderr)
        return 2
    note = progress if args.verbose else (lambda s: None)
    repo, lowers = args.repo, ()
    if args.image:
        from ..errdefs import InvalidArgument
        try:
            repo, lowers = _image_root(args)
        except (ValueError, InvalidArgument) as exc:  # BootUsageError, RootViewError: the image, not the VM
            print(f"fractal vm run: {exc}", file=sys.stderr)
            return 2
    guest = initramfs.build(progress=note)
    specs = args.share or [os.getcwd()]
    try:
        share_dirs = [run.parse_share(s, i) for i, s in enumerate(specs)]
    except ValueError as exc:
        print(f"fractal: {exc}", file=sys.stderr)
        return 2
    timeout = args.timeout if args.timeout is not None else (None if args.tty else 600.0)
    try:
        res = run.run(guest, argv, share_dirs=share_dirs, repo=repo, image_lowers=lowers, memory_mb=args.mem, cpus=args.cpus,
                      share_type=args.share_type, machine=args.machine, timeout=timeout,
                      console_log=args.console_log, debug=args.debug_guest, netns=args.netns, note=note,
                      tty=args.tty, stdin_fd=sys.stdin.fileno() if args.interactive else None)
    except hostos.HostPolicyError as exc:  # a share the host's policy refuses: the caller's to fix
        print(f"fractal: {exc}", file=sys.stderr)
        return 2
    except (run.VMError, ValueError) as exc:
        print(f"fractal: {exc}", file=sys.stderr)
        return 125
    if args.verbose:
        times = ", ".join(f"{k} {v:.2f}s" for k, v in res.timings.items())
        rss = f"; QEMU peak RSS {res.qemu_maxrss_kb / 1024:.0f} MiB" if res.qemu_maxrss_kb else ""
        print(f"vm: exit {res.exit_code}; {times}{rss}", file=sys.stderr)
    return res.exit_code


def _image_root(args: argparse.Namespace) -> tuple[str, tuple[str, ...]]:
    """``--image``: (the repo layers dir to share at /repo, the image's layer names, top first),
    found as `fractal boot` finds them (through containerd, ccpu/cli/boot.py), its /bin/sh checked
    on the host before anything boots."""
    from ..boot import plan, rootview
    from .boot import _image_dirs

    if args.repo:
        raise plan.BootUsageError("--image and --repo both name what /repo is: give one")
    dirs = _image_dirs(argparse.Namespace(source=args.image, address=args.address, namespace=args.namespace,
                                          snapshotter=args.snapshotter))
    layers = plan.layers_of(dirs)
    sh = rootview.RootView(layers.host_dirs()).lookup("/bin/sh")
    if sh is None or not sh.executable:
        raise plan.BootUsageError(f"image {args.image!r} has no executable /bin/sh to run the command with")
    return layers.root, layers.names


def register(vm: argparse.ArgumentParser) -> None:
    sub = vm.add_subparsers(dest="vm_command", metavar="COMMAND")
    p = sub.add_parser("run", help="boot a guest, run CMD (sh -c, cwd /work), return its exit code",
                       description="Boot a fresh guest, run CMD in it with the shared directories mounted, "
                                   "stream its stdout/stderr, power off and return CMD's exit code.")
    p.add_argument("--share", action="append", metavar="HOST[:GUEST[:ro|rw]]",
                   help="share a host directory read-write (repeatable; the first goes to /work, the "
                        "command's cwd; default: the current directory)")
    p.add_argument("--repo", metavar="DIR", help="share DIR read-only at /repo (the layer repo)")
    p.add_argument("--image", metavar="IMAGE",
                   help="run CMD in IMAGE's root (its layers from the repo, no copy; a tmpfs on top) instead of "
                        "the fractal guest's; IMAGE must be unpacked for the fractal snapshotter")
    add_containerd_flags(p)
    p.add_argument("--snapshotter", default="fractal", help="with --image: its snapshotter (default %(default)s)")
    p.add_argument("--mem", type=int, default=512, metavar="MB", help="guest memory (default %(default)s)")
    p.add_argument("--cpus", type=int, default=None, help="guest CPUs (default: 1 under TCG, 2 under KVM)")
    p.add_argument("--share-type", choices=("9p", "virtiofs"), default=None,
                   help="share transport (default: virtiofs when virtiofsd is available, else 9p; "
                        "env FRACTAL_SHARE)")
    p.add_argument("--machine", choices=("q35", "microvm"), default=os.environ.get("FRACTAL_MACHINE", "q35"),
                   help="QEMU machine (default %(default)s)")
    p.add_argument("--netns", metavar="PATH",
                   help="give the guest the network of this namespace (/var/run/netns/NAME, /proc/PID/ns/net): "
                        "its interface's MAC, MTU, IPv4 addresses and routes, traffic redirected through a tap")
    p.add_argument("-i", "--interactive", action="store_true", help="relay stdin (with -t: -it)")
    p.add_argument("-t", "--tty", action="store_true",
                   help="run CMD on a terminal in the guest: raw keystrokes, window size, ^C to the guest's "
                        "foreground process, its exit status back (like docker run -it)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds before the VM is killed (default 600; none with -t)")
    p.add_argument("--console-log", metavar="FILE", help="keep the guest's serial console in FILE")
    p.add_argument("--debug-guest", action="store_true", help="verbose kernel + init logging on the console")
    p.add_argument("-v", "--verbose", action="store_true", help="progress and boot timings on stderr")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD...")
    p.set_defaults(func=cmd_vm_run)
