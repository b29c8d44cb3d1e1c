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
    from ..guest import extend, initramfs
    from ..guest.kernel import KernelError, cache_root

    t0 = time.monotonic()
    ext: extend.Extensions | None = None  # None: the recorded extensions
    try:
        if args.add or args.run_at_boot:
            if args.clear_extensions:
                raise extend.ExtensionError("--clear-extensions and --add/--run-at-boot exclude each other")
            ext = extend.make(args.add or (), args.run_at_boot or ())
        elif args.clear_extensions:
            ext = extend.Extensions()
        g = initramfs.build(force=args.force, progress=progress, compression=args.compression,
                             layout=args.layout, extensions=ext, kernel=args.kernel)
    except extend.ExtensionError as exc:
        print(f"fractal: {exc}", file=sys.stderr)
        return 2
    except KernelError as exc:
        print(f"fractal: {exc}", file=sys.stderr)
        return 1
    if ext is not None:  # recorded only once it built: later builds (the shim's, vm run's) make the same guest
        extend.save(cache_root(), ext)
    m = g.manifest
    if args.json:
        json.dump({"kernel": str(g.kernel), "initramfs": str(g.initramfs), "manifest": str(g.manifest_path),
                   "sha256": g.sha256, "image": str(g.image) if g.image else None,
                   "image_sha256": m["image"]["sha256"] if g.image else None,
                   "extensions": m.get("extensions"), "uki": str(g.uki) if g.uki else None,
                   "uki_sha256": m["uki"]["sha256"] if g.uki else None}, sys.stdout, indent=2)
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
    if g.uki is not None:
        u = m["uki"]
        print(f"uki:        {g.uki} ({u['size'] / 1e6:.1f} MB EFI image, sha256 {u['sha256']}, "
              f"PCR 11 {u['pcr11']})")
    for a in m.get("extensions", {}).get("add", []):
        print(f"added:      {a['host']} -> {a['guest']} ({a['entries']} entries, sha256 {a['sha256'][:16]})")
    for c in m.get("extensions", {}).get("run_at_boot", []):
        print(f"at boot:    {c}")
    print(f"manifest:   {g.manifest_path}")
    print(f"sha256:     {g.sha256}")
    print(f"time:       {time.monotonic() - t0:.1f}s")
    return 0


def cmd_guest_kernel(args: argparse.Namespace) -> int:
    """Build (or reuse) the guest kernel built for the guest (ccpu/guest/kbuild.py): opt-in, minutes."""
    from ..guest import kbuild
    from ..guest.kernel import KernelError

    try:
        kern, meta = kbuild.build(progress, force=args.force, jobs=args.jobs)
    except KernelError as exc:
        print(f"fractal: {exc}", file=sys.stderr)
        return 1
    if args.json:
        json.dump({"vmlinux": str(kern.vmlinux), "release": kern.release, **meta}, sys.stdout, indent=2)
        print()
        return 0
    b = meta["build"]
    print(f"kernel:     {kern.release} from {meta['source']['package']} {meta['source']['version']}")
    print(f"vmlinux:    {kern.vmlinux}")
    print(f"built in:   {b['seconds']:.0f}s with {b['jobs']} jobs (load average {b['loadavg_start']} at the start)")
    print("use it:     fractal guest build --kernel built  (or FRACTAL_GUEST_KERNEL=built)")
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


def cmd_guest_uki(args: argparse.Namespace) -> int:
    """A machine's own UKI (docs/hardware.md "On a real machine"): the build's kernel, initramfs
    and os-release with the machine's command line built in, its manifest beside it, and with
    --esp a disk image to write to a USB stick."""
    from pathlib import Path

    from ..guest import esp, initramfs, uki

    g = initramfs.build(progress=progress, offline=args.offline)  # the build for this tree: cached, as a VM's
    if g.uki is None:
        print(f"fractal: the guest build has no UKI ({g.manifest.get('uki_missing') or uki.NO_STUB})", file=sys.stderr)
        return 1
    out = Path(args.output)
    try:
        made = uki.with_cmdline(g.uki, out, args.cmdline)
        disk = esp.build(out, Path(args.esp)) if args.esp else None
    except (uki.UkiError, esp.EspError) as exc:
        print(f"fractal: {exc}", file=sys.stderr)
        return 1
    manifest = uki.machine_manifest(made, guest_sha256=g.sha256, kernel_release=g.manifest["kernel"]["release"],
                                    esp=disk.describe() if disk else None)
    mpath = Path(args.manifest or f"{out}.json")
    tmp = mpath.with_name(mpath.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.rename(mpath)
    if args.json:
        json.dump({"uki": str(out), "manifest": str(mpath), "esp": str(disk.path) if disk else None,
                   "system_image": str(g.image) if g.image else None, **manifest},
                  sys.stdout, indent=2)
        print()
        return 0
    u = manifest["uki"]
    print(f"uki:        {out} ({u['size'] / 1e6:.1f} MB, sha256 {u['sha256']})")
    print(f"cmdline:    {u['cmdline']}")
    print(f"PCR 4:      {u.get('pcr4', '?')} (booted from a boot entry: disk, USB, HTTP boot)")
    print(f"PCR 11:     {u['pcr11']}")
    if disk is not None:
        print(f"esp:        {disk.path} ({disk.size >> 20} MiB, sha256 {disk.sha256}, {esp.PATH})")
    if g.image is not None:
        print(f"image:      {g.image} (the system image: the machine needs it on a disk with serial fractal-sys)")
    print(f"manifest:   {mpath} (the host's [remote.attest.uki])")
    return 0


def register(guest: argparse.ArgumentParser) -> None:
    sub = guest.add_subparsers(dest="guest_command", metavar="COMMAND")
    p = sub.add_parser("build", help="fetch Debian's kernel and build the initramfs (cached by inputs)",
                       description="Build the guest.  --add/--run-at-boot are recorded in the cache "
                                   "(guest/extensions.json): every later build -- the shim's, fractal vm run's, "
                                   "a plain `fractal guest build` -- keeps them until replaced by new "
                                   "--add/--run-at-boot flags or removed with --clear-extensions.")
    p.add_argument("--force", action="store_true", help="rebuild even if an identical build exists")
    p.add_argument("--compression", choices=("none", "gzip"), default="none",
                   help="initramfs compression (default none: boots faster under TCG)")
    p.add_argument("--layout", choices=("image", "initramfs"), default=None,
                   help="image: python/agent/runc on a read-only EROFS disk, a small initramfs; initramfs: "
                        "everything in the initramfs (default: $FRACTAL_GUEST_LAYOUT, else the build's default)")
    p.add_argument("--add", action="append", metavar="HOST_PATH:GUEST_PATH",
                   help="add a host file or directory (a static binary, a tree) to the guest at GUEST_PATH "
                        "(repeatable; hashed into the build like every other file)")
    p.add_argument("--run-at-boot", action="append", metavar="CMD",
                   help="a shell command the guest's init starts at boot beside the agent, restarted when it "
                        "exits, its output on the console (repeatable)")
    p.add_argument("--clear-extensions", action="store_true",
                   help="build the plain guest again (forget earlier --add/--run-at-boot)")
    p.add_argument("--kernel", choices=("debian", "built"), default=None,
                   help="debian: the distribution's kernel; built: the one `fractal guest kernel` built "
                        "(default: $FRACTAL_GUEST_KERNEL, else debian)")
    add_json_flag(p)
    p.set_defaults(func=cmd_guest_build)
    p = sub.add_parser("kernel", help="build a guest kernel for the guest from Debian's source (opt-in, minutes)",
                       description="Download Debian's kernel source of the stock guest kernel's release, "
                                   "configure it from allnoconfig + ccpu/guest/kconfig/*.config (everything the "
                                   "guest uses built in) and compile it, cached by source + fragments.  Needs "
                                   "flex bison libelf-dev bc and a C compiler.  Boot it with "
                                   "`fractal guest build --kernel built`.")
    p.add_argument("--force", action="store_true", help="rebuild even if this kernel is built")
    p.add_argument("--jobs", type=int, default=None, help="make -j (default: the CPU count)")
    add_json_flag(p)
    p.set_defaults(func=cmd_guest_kernel)
    p = sub.add_parser("uki", help="a machine's own EFI image: the build's with a command line built in",
                       description="Write a UKI for one machine booting without a loader (USB stick, disk, UEFI "
                                   "HTTP boot): the guest build's (made or reused as `fractal guest build` would) kernel, initramfs and os-release with "
                                   "--cmdline as its built-in command line, and its manifest (PCR 4 in the "
                                   "boot-entry order, PCR 11) for the host's [remote.attest.uki].")
    p.add_argument("--cmdline", required=True, help="the machine's kernel command line (fractal.listen=, "
                                                    "fractal.net=, fractal.ca=, ...: docs/hardware.md)")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="the EFI image to write")
    p.add_argument("--manifest", metavar="FILE", help="where its manifest goes (default: FILE.json)")
    p.add_argument("--offline", action="store_true", help="the newest kernel already cached, without asking apt")
    p.add_argument("--esp", metavar="IMG", help="also a disk image (MBR, one FAT EFI System partition) with the "
                                                "UKI as EFI/BOOT/BOOTX64.EFI, to dd to a USB stick")
    add_json_flag(p)
    p.set_defaults(func=cmd_guest_uki)
    p = sub.add_parser("show", help="the manifest of the current guest build (JSON)")
    add_json_flag(p, "machine-readable output (the default: the manifest is JSON)")
    p.set_defaults(func=cmd_guest_show)
