"""`fractal guest ...` and `fractal vm ...`: thin CLI over ccpu.guest and ccpu.vm.

Kept here (not in ccpu/cli.py) so the VM work does not collide with other
CLI edits; ccpu/cli.py only calls `add_guest_commands` and `add_vm_commands`.
Also runnable alone: `python3 -m ccpu.vm.cli guest build`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence


def _progress(msg: str) -> None:
    print(f"guest: {msg}", file=sys.stderr, flush=True)


def cmd_guest_build(args: argparse.Namespace) -> int:
    from ..guest import initramfs

    t0 = time.monotonic()
    g = initramfs.build(force=args.force, progress=_progress, compression=args.compression)
    m = g.manifest
    if args.json:
        json.dump({"kernel": str(g.kernel), "initramfs": str(g.initramfs), "manifest": str(g.manifest_path),
                   "sha256": g.sha256}, sys.stdout, indent=2)
        print()
        return 0
    ini = m["initramfs"]
    print(f"kernel:     {g.kernel} ({m['kernel']['package']} {m['kernel']['version']}, {m['kernel_image']['format']})")
    print(f"initramfs:  {g.initramfs} ({ini['size'] / 1e6:.1f} MB, {ini['uncompressed_size'] / 1e6:.1f} MB "
          f"unpacked, {ini['entries']} entries, {ini['compression']})")
    print(f"manifest:   {g.manifest_path}")
    print(f"sha256:     {g.sha256}")
    print(f"time:       {time.monotonic() - t0:.1f}s")
    return 0


def cmd_guest_show(args: argparse.Namespace) -> int:
    from ..guest import initramfs

    g = initramfs.current()
    if g is None:
        print("fractal: no guest built yet (fractal guest build)", file=sys.stderr)
        return 1
    json.dump(g.manifest, sys.stdout, indent=2)
    print()
    return 0


def cmd_vm_run(args: argparse.Namespace) -> int:
    from ..guest import initramfs
    from . import run

    argv = list(args.cmd)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        print("fractal vm run: no command (fractal vm run [options] -- CMD...)", file=sys.stderr)
        return 2
    note = _progress if args.verbose else (lambda s: None)
    guest = initramfs.build(progress=note)
    specs = args.share or [os.getcwd()]
    try:
        share_dirs = [run.parse_share(s, i) for i, s in enumerate(specs)]
    except ValueError as exc:
        print(f"fractal: {exc}", file=sys.stderr)
        return 2
    try:
        res = run.run(guest, argv, share_dirs=share_dirs, repo=args.repo, memory_mb=args.mem, cpus=args.cpus,
                      share_type=args.share_type, machine=args.machine, timeout=args.timeout,
                      console_log=args.console_log, debug=args.debug_guest, netns=args.netns, note=note)
    except (run.VMError, ValueError) as exc:
        print(f"fractal: {exc}", file=sys.stderr)
        return 125
    if args.verbose:
        times = ", ".join(f"{k} {v:.2f}s" for k, v in res.timings.items())
        rss = f"; QEMU peak RSS {res.qemu_maxrss_kb / 1024:.0f} MiB" if res.qemu_maxrss_kb else ""
        print(f"vm: exit {res.exit_code}; {times}{rss}", file=sys.stderr)
    return res.exit_code


def add_guest_commands(subparsers: argparse._SubParsersAction) -> None:
    guest = subparsers.add_parser("guest", help="the VM guest image (kernel + initramfs)")
    sub = guest.add_subparsers(dest="guest_command", required=True)
    p = sub.add_parser("build", help="fetch Debian's kernel and build the initramfs (cached by inputs)")
    p.add_argument("--force", action="store_true", help="rebuild even if an identical build exists")
    p.add_argument("--compression", choices=("none", "gzip"), default="none",
                   help="initramfs compression (default none: boots faster under TCG)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_guest_build)
    p = sub.add_parser("show", help="the manifest of the current guest build")
    p.set_defaults(func=cmd_guest_show)


def add_vm_commands(subparsers: argparse._SubParsersAction) -> None:
    vm = subparsers.add_parser("vm", help="run things in the fractal VM")
    sub = vm.add_subparsers(dest="vm_command", required=True)
    p = sub.add_parser("run", help="boot a guest, run CMD (sh -c, cwd /work), return its exit code",
                       description="Boot a fresh guest, run CMD in it with the shared directories mounted, "
                                   "stream its stdout/stderr, power off and return CMD's exit code.")
    p.add_argument("--share", action="append", metavar="HOST[:GUEST[:ro|rw]]",
                   help="share a host directory read-write (repeatable; the first goes to /work, the "
                        "command's cwd; default: the current directory)")
    p.add_argument("--repo", metavar="DIR", help="share DIR read-only at /repo (the layer repo)")
    p.add_argument("--mem", type=int, default=512, metavar="MB", help="guest memory (default %(default)s)")
    p.add_argument("--cpus", type=int, default=2, help="guest CPUs (default %(default)s)")
    p.add_argument("--share-type", choices=("9p", "virtiofs"), default=None,
                   help="share transport (default: virtiofs when virtiofsd is available, else 9p; "
                        "env FRACTAL_SHARE)")
    p.add_argument("--machine", choices=("q35", "microvm"), default=os.environ.get("FRACTAL_MACHINE", "q35"),
                   help="QEMU machine (default %(default)s)")
    p.add_argument("--netns", metavar="PATH",
                   help="give the guest the network of this namespace (/var/run/netns/NAME, /proc/PID/ns/net): "
                        "its interface's MAC, MTU, IPv4 addresses and routes, traffic redirected through a tap")
    p.add_argument("--timeout", type=float, default=600, help="seconds before the VM is killed")
    p.add_argument("--console-log", metavar="FILE", help="keep the guest's serial console in FILE")
    p.add_argument("--debug-guest", action="store_true", help="verbose kernel + init logging on the console")
    p.add_argument("-v", "--verbose", action="store_true", help="progress and boot timings on stderr")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD...")
    p.set_defaults(func=cmd_vm_run)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fractal", description="fractal guest and VM commands")
    ap.add_argument("--debug", action="store_true", help="debug logs")
    sub = ap.add_subparsers(dest="command", required=True)
    add_guest_commands(sub)
    add_vm_commands(sub)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
