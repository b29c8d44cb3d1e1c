"""`fractal guest build|show`: the VM guest image (kernel + initramfs), over ccpu.guest."""

from __future__ import annotations

import argparse
import json
import sys
import time

from .common import add_json_flag


def progress(msg: str) -> None:
    """Build and boot progress on stderr, where it does not mix with a command's output."""
    print(f"guest: {msg}", file=sys.stderr, flush=True)


def cmd_guest_build(args: argparse.Namespace) -> int:
    from ..guest import initramfs

    t0 = time.monotonic()
    g = initramfs.build(force=args.force, progress=progress, compression=args.compression,
                         layout=args.layout)
    m = g.manifest
    if args.json:
        json.dump({"kernel": str(g.kernel), "initramfs": str(g.initramfs), "manifest": str(g.manifest_path),
                   "sha256": g.sha256, "image": str(g.image) if g.image else None,
                   "image_sha256": m["image"]["sha256"] if g.image else None}, sys.stdout, indent=2)
        print()
        return 0
    ini = m["initramfs"]
    print(f"kernel:     {g.kernel} ({m['kernel']['package']} {m['kernel']['version']}, {m['kernel_image']['format']})")
    print(f"initramfs:  {g.initramfs} ({ini['size'] / 1e6:.1f} MB, {ini['uncompressed_size'] / 1e6:.1f} MB "
          f"unpacked, {ini['entries']} entries, {ini['compression']})")
    if g.image is not None:
        img = m["image"]
        print(f"image:      {g.image} ({img['size'] / 1e6:.1f} MB {img['format']}, {img['files']} files, "
              f"sha256 {img['sha256']})")
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


def register(guest: argparse.ArgumentParser) -> None:
    sub = guest.add_subparsers(dest="guest_command", metavar="COMMAND")
    p = sub.add_parser("build", help="fetch Debian's kernel and build the initramfs (cached by inputs)")
    p.add_argument("--force", action="store_true", help="rebuild even if an identical build exists")
    p.add_argument("--compression", choices=("none", "gzip"), default="none",
                   help="initramfs compression (default none: boots faster under TCG)")
    p.add_argument("--layout", choices=("image", "initramfs"), default=None,
                   help="image: python/agent/runc on a read-only EROFS disk, a small initramfs; initramfs: "
                        "everything in the initramfs (default: $FRACTAL_GUEST_LAYOUT, else the build's default)")
    add_json_flag(p)
    p.set_defaults(func=cmd_guest_build)
    p = sub.add_parser("show", help="the manifest of the current guest build (JSON)")
    add_json_flag(p, "machine-readable output (the default: the manifest is JSON)")
    p.set_defaults(func=cmd_guest_show)
