#!/usr/bin/env python3
"""Benchmark the system image's candidates (issue 12 item 1: "measure the candidates and say why
you chose one"), without containerd.

The same guest (this tree's ``fractal guest build --layout image``: kernel, initramfs, agent) boots
in agent mode with its read-only system image served each way, alternated round by round because
the machine is shared (medians are reported):

- ``erofs-blk``: the build's EROFS image on a read-only virtio-blk disk (the default, today's);
- ``squashfs-blk``: the same tree as squashfs (``mksquashfs -all-root -noappend -mkfs-time 0
  -all-time 0 -no-xattrs``), uncompressed (``-noI -noD -noF -noX``) like the EROFS image, on the
  same disk;
- ``squashfs-lz4-blk``: the same, lz4-compressed (the cheapest decompressor the kernel's squashfs
  has: under TCG every decompressed page is emulated CPU);
- ``erofs-pmem``: the EROFS image, padded to whole 2 MiB, on a read-only virtio-pmem device (QEMU
  ``memory-backend-file,readonly=on`` + ``virtio-pmem-pci``), mounted ``-o dax=always`` -- the
  init prints what the kernel made of it (``dax=always`` kept, or erofs's fallback to the page
  cache);
- ``tree-virtiofs``: the image's tree (``fsck.erofs --extract``) over virtiofs, read-only, by a
  virtiofsd of its own (the share code's settings: ``--cache auto``); the init mounts share tag
  ``fractalsys`` at /.image (``fractal.sysdev=virtiofs``); virtiofsd's RSS is added to QEMU's.

Every candidate boots the *same* initramfs: the build's, with one more cpio archive appended (the
kernel unpacks concatenated archives in order) that carries the candidates' modules
(``ccpu.guest.modules.SYSIMAGE_MODULES`` + dependencies, listed in /etc/fractal/modules.sysimage,
loaded by the init only for a non-default candidate), the guest's modules.dep with their lines,
and a run-at-boot command that prints the guest's memory every second on the console.  The init
picks the candidate from ``fractal.sysimage=`` / ``fractal.sysdev=`` (ccpu/guest/init.sh 1b).

Per boot: QEMU start -> the agent answered ``hello`` (wall, the host's clock); the guest's
uptime at "system image mounted", the agent's "imported" and "hello answered", and mounted ->
hello (python and the agent's imports, read from the image; fractal.timeline=1, on for every
candidate); then, once the init finished the boot and its memory loop printed twice (~1 s apart),
the guest's memory (MemTotal - MemAvailable; Cached: the page cache, where the image's pages land
unless DAX maps them; MemTotal - MemFree: every page the guest holds, page cache included) and
QEMU's RSS (VmRSS, split into anon / file / shmem: the guest's RAM is a shared memfd, a pmem
image's mapping is file memory), plus its helpers' (virtiofsd).

    python3 hack/bench/sysimage.py [--rounds 5] [--candidates erofs-blk,squashfs-blk,...] [--json FILE]

Needs root (QEMU, the guest build), mksquashfs (apt squashfs-tools) and fsck.erofs (erofs-utils).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO))

from ccpu.guest import cpio, initramfs, modules  # noqa: E402
from ccpu.vm import qemu  # noqa: E402
from ccpu.vm.machine import ConsoleFile, DirShare, Machine, MachineSpec  # noqa: E402
from hack.bench.common import agent_hello  # noqa: E402
from hack.bench.guest import timeline  # noqa: E402

#: reproducible squashfs: every timestamp 0, owners root, no host xattrs, never appended to
SQUASHFS_FLAGS = ("-all-root", "-noappend", "-mkfs-time", "0", "-all-time", "0", "-no-xattrs", "-quiet",
                  "-no-progress")
SQUASHFS_COMP = {"none": ("-noI", "-noD", "-noF", "-noX"), "lz4": ("-comp", "lz4")}


@dataclass(frozen=True)
class Candidate:
    name: str
    fs: str  # fractal.sysimage
    device: str  # fractal.sysdev / qemu.VMConfig.system_device
    comp: str = "none"  # squashfs compressor


CANDIDATES = {c.name: c for c in (Candidate("erofs-blk", "erofs", "blk"),
                                  Candidate("squashfs-blk", "squashfs", "blk"),
                                  Candidate("squashfs-lz4-blk", "squashfs", "blk", "lz4"),
                                  Candidate("erofs-pmem", "erofs", "pmem"),
                                  Candidate("tree-virtiofs", "tree", "virtiofs"))}

#: the guest's memory every second, builtins only but `sleep` (no awk fork per line under TCG)
MEMLOOP = ("while :; do read -r up _ </proc/uptime; while read -r k v _; do case $k in MemTotal:) t=$v;; "
           "MemFree:) f=$v;; MemAvailable:) a=$v;; Cached:) c=$v;; esac; done </proc/meminfo; "
           "echo \"sysmem: $up used_kb=$((t - a)) cached_kb=$c nonfree_kb=$((t - f))\"; sleep 1; done")
MEMLINE = re.compile(r"sysmem: (\d+\.\d+) used_kb=(\d+) cached_kb=(\d+) nonfree_kb=(\d+)")
IMAGE_LINE = re.compile(r"fractal-init: \d+\.\d+ system image: (\S+) (\S+) (\S+)")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def extended_initramfs(guest: initramfs.Guest, out: Path) -> list[str]:
    """The build's initramfs + an archive with the candidates' modules, the guest's modules.dep
    with their lines, /etc/fractal/modules.sysimage and the memory loop; returns the modules the
    init loads for a non-default candidate.

    A module the build ships among the later ones (fuse, virtiofs) is inside the image, out of
    reach before it is mounted: a copy goes to lib/modules/REL/sysimage/, and modules.dep names
    that copy (the later list's `modprobe -a` then loads it from there too)."""
    m = guest.manifest
    rel = m["kernel"]["release"]
    mdir = initramfs.fetch_kernel(lambda s: None, offline=True).modules_dir
    deps = modules.parse_modules_dep((mdir / "modules.dep").read_text())
    builtin_file = mdir / "modules.builtin"
    builtin = builtin_file.read_text().split() if builtin_file.exists() else []
    shipped = list(m["modules"])
    early = [k for k in shipped if k not in m["modules_later"]]
    names = [n for v in modules.SYSIMAGE_MODULES.values() for n in v]
    wanted = [k for k in modules.load_order(deps, names, builtin) if k not in early]
    moved = {k: f"sysimage/{Path(k).name}" for k in wanted if k in shipped}
    deps = {moved.get(k, k): [moved.get(d, d) for d in v] for k, v in deps.items()}
    shipped = [moved.get(k, k) for k in shipped]
    wanted = [moved.get(k, k) for k in wanted]
    added = [k for k in wanted if k not in shipped]
    entries = []
    for ko in added + list(moved.values()):
        src = next((a for a, b in moved.items() if b == ko), ko)
        data = (mdir / src).read_bytes()
        if src.endswith(".xz"):
            import lzma
            data = lzma.decompress(data)
        entries.append(cpio.Entry(f"lib/modules/{rel}/{ko.removesuffix('.xz')}", stat.S_IFREG | 0o644, data))
    entries.append(cpio.Entry(f"lib/modules/{rel}/modules.dep", stat.S_IFREG | 0o644,
                              modules.shipped_modules_dep(deps, shipped + added).encode()))
    entries.append(cpio.Entry("etc/fractal/modules.sysimage", stat.S_IFREG | 0o644,
                              "".join(k.removesuffix(".xz") + "\n" for k in wanted).encode()))
    entries.append(cpio.Entry("etc/fractal/run-at-boot", stat.S_IFREG | 0o644, (MEMLOOP + "\n").encode()))
    # the directories above the files exist in the first archive (the kernel keeps them; none of
    # these parents is one of its symlinks into the image: checked by the boot loading them)
    out.write_bytes(guest.initramfs.read_bytes() + cpio.write(entries))
    return wanted


def make_images(guest: initramfs.Guest, tmp: Path, wanted: list[Candidate]) -> dict[str, Path]:
    """The image file of each candidate, from the build's EROFS image."""
    assert guest.image is not None
    images: dict[str, Path] = {}
    tree = tmp / "tree"
    if any(c.fs in ("squashfs", "tree") for c in wanted):
        tree.mkdir()
        subprocess.run(["fsck.erofs", f"--extract={tree}", "--preserve", str(guest.image)], check=True,
                       capture_output=True)
    for c in wanted:
        if c.fs == "tree":
            images[c.name] = tree
            log(f"{c.name}: {tree} (the EROFS image's tree, extracted by fsck.erofs)")
            continue
        if c.fs == "erofs" and c.device == "blk":
            images[c.name] = guest.image
        elif c.fs == "erofs" and c.device == "pmem":
            padded = tmp / "system.erofs.pmem"
            shutil.copyfile(guest.image, padded)
            size = padded.stat().st_size
            os.truncate(padded, -(-size // qemu.PMEM_ALIGN) * qemu.PMEM_ALIGN)
            images[c.name] = padded
        else:
            img = tmp / f"{c.name}.squashfs"
            argv = ["mksquashfs", str(tree), str(img), *SQUASHFS_FLAGS, *SQUASHFS_COMP[c.comp]]
            subprocess.run(argv, check=True, capture_output=True)
            again = tmp / f"{c.name}.again"  # reproducible: the same tree gives the same bytes
            subprocess.run(["mksquashfs", str(tree), str(again), *argv[3:]], check=True, capture_output=True)
            if sha256(img) != sha256(again):
                raise RuntimeError(f"{c.name}: two mksquashfs runs of one tree differ")
            again.unlink()
            images[c.name] = img
        log(f"{c.name}: {images[c.name]} {images[c.name].stat().st_size / 1e6:.1f} MB sha256 "
            f"{sha256(images[c.name])[:16]}")
    return images


def tree_size(root: Path) -> float:
    """MB of the regular files below ``root``."""
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink()) / 1e6


def _status_kb(pid: int | None) -> dict[str, float]:
    text = Path(f"/proc/{pid}/status").read_text()
    return {f"qemu_{k.lower()}_mb": int(re.search(rf"{k}:\s+(\d+)", text).group(1)) / 1024  # type: ignore[union-attr]
            for k in ("VmRSS", "RssAnon", "RssFile", "RssShmem")}


def boot(c: Candidate, guest: initramfs.Guest, initrd: Path, image: Path, tmp: str) -> tuple[dict[str, float], str]:
    console = os.path.join(tmp, f"{c.name}.log")
    extra = ("fractal.timeline=1",) + ((f"fractal.sysimage={c.fs}",) if c.fs == "squashfs" else ())
    share: tuple[DirShare, ...] = ()
    if c.device == "virtiofs":  # the tree, read-only, by a virtiofsd of its own (ccpu.vm.shares)
        extra += ("fractal.sysdev=virtiofs",)
        share = (DirShare("fractalsys", str(image), "/.image", True, "virtiofs"),)
    vm = Machine(MachineSpec(kernel=str(guest.kernel), initramfs=str(initrd), workdir=tmp,
                             system_image=None if share else str(image),
                             system_device="blk" if share else c.device, shares=share,
                             console=ConsoleFile(console), mode="agent", ports=("fractal.agent",),
                             cmdline_extra=extra))
    t0 = time.monotonic()
    vm.boot()
    try:
        agent_hello(vm.ports["fractal.agent"], 180)
        out = {"ready_s": time.monotonic() - t0}
        # the memory loop starts once the init finished the boot (beside the agent, after `hello`):
        # its second line, ~1 s later, is the moment every candidate is measured at
        t1 = time.monotonic()
        while len(MEMLINE.findall(Path(console).read_text(errors="replace"))) < 2:
            if time.monotonic() - t1 > 180:
                raise RuntimeError(f"{c.name}: no memory lines on the console")
            time.sleep(0.05)
        out.update(_status_kb(vm.pid))
        out["helpers_rss_mb"] = sum(_status_kb(p.pid)["qemu_vmrss_mb"] for _, p in vm.helpers)  # virtiofsd
        text = Path(console).read_text(errors="replace")
        mem = MEMLINE.findall(text)
        out["guest_used_mb"] = int(mem[-1][1]) / 1024
        out["guest_cached_mb"] = int(mem[-1][2]) / 1024
        out["guest_nonfree_mb"] = int(mem[-1][3]) / 1024  # MemTotal - MemFree: page cache included
        phases = timeline(text)
        for key, name in (("init: system image mounted", "mounted_uptime_s"),
                          ("agent: imported", "imported_uptime_s"),
                          ("agent: hello answered", "hello_uptime_s")):
            if key in phases:
                out[name] = phases[key]
        if "hello_uptime_s" in out and "mounted_uptime_s" in out:  # python + the agent's imports, on the image
            out["mounted_to_hello_s"] = out["hello_uptime_s"] - out["mounted_uptime_s"]
        how = IMAGE_LINE.search(text)
        return out, (f"{how.group(1)} {how.group(2)} {how.group(3)}" if how else "erofs (default path)")
    except BaseException:
        log(f"{c.name}: console tail:\n{Path(console).read_text(errors='replace')[-3000:]}")
        raise
    finally:
        for s in vm.ports.values():
            s.close()
        vm.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--candidates", default=",".join(CANDIDATES), help=f"comma-separated, of {list(CANDIDATES)}")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    names = [x for x in args.candidates.split(",") if x]
    bad = [x for x in names if x not in CANDIDATES]
    if not names or bad:
        ap.error(f"--candidates: unknown {bad}; expected some of {list(CANDIDATES)}")
    if args.rounds < 1:
        ap.error("--rounds: at least 1")
    wanted = [CANDIDATES[n] for n in names]
    guest = initramfs.build(layout="image", offline=True)
    if guest.image is None:
        raise SystemExit("the guest build has no system image (layout image needs mkfs.erofs)")
    load: list[tuple[float, float, float]] = [os.getloadavg()]
    raw: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    mounted_as: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="fractal-bench-sysimage-") as tmpd:
        os.chmod(tmpd, 0o700)
        tmp = Path(tmpd)
        initrd = tmp / "initramfs.cpio"
        added = extended_initramfs(guest, initrd)
        log(f"initramfs {guest.initramfs.stat().st_size / 1e6:.2f} MB + {len(added)} modules "
            f"({', '.join(Path(a).name for a in added)}) = {initrd.stat().st_size / 1e6:.2f} MB")
        images = make_images(guest, tmp, wanted)
        for r in range(args.rounds):
            for c in wanted[r % len(wanted):] + wanted[:r % len(wanted)]:
                one, how = boot(c, guest, initrd, images[c.name], tmpd)
                mounted_as[c.name] = how
                raw[c.name].append(one)
                log(f"round {r} {c.name}: " + ", ".join(f"{k} {v:.2f}" for k, v in one.items()))
            load.append(os.getloadavg())
        sizes = {n: tree_size(images[n]) if images[n].is_dir() else images[n].stat().st_size / 1e6 for n in names}
        digests = {n: "(a tree)" if images[n].is_dir() else sha256(images[n]) for n in names}
    med = {n: {k: statistics.median(x[k] for x in v if k in x) for k in v[0]} for n, v in raw.items()}
    ref = names[0]
    print(f"{args.rounds} alternated rounds, medians; load average (1 min) "
          f"{min(x[0] for x in load):.1f}-{max(x[0] for x in load):.1f} during the run")
    print(f"{'candidate':18s} {'ready':>7s} {'vs ' + ref:>14s} {'mounted':>8s} {'imported':>8s} {'hello':>6s} {'mnt->hello':>10s} "
          f"{'guest used':>10s} {'cached':>7s} {'non-free':>8s} {'QEMU RSS':>8s} {'(anon/file/shmem)':>18s} {'+helpers':>8s} {'image':>8s}")
    for n in names:
        v = med[n]
        print(f"{n:18s} {v['ready_s']:6.2f}s {v['ready_s'] / med[ref]['ready_s']:13.2f}x "
              f"{v.get('mounted_uptime_s', 0):7.2f}s {v.get('imported_uptime_s', 0):7.2f}s "
              f"{v.get('hello_uptime_s', 0):5.2f}s {v.get('mounted_to_hello_s', 0):9.2f}s {v['guest_used_mb']:7.0f} MB {v['guest_cached_mb']:4.0f} MB "
              f"{v['guest_nonfree_mb']:5.0f} MB "
              f"{v['qemu_vmrss_mb']:5.0f} MB ({v['qemu_rssanon_mb']:.0f}/{v['qemu_rssfile_mb']:.0f}/"
              f"{v['qemu_rssshmem_mb']:.0f} MB) {v['helpers_rss_mb']:5.0f} MB {sizes[n]:5.1f} MB")
    for n in names:
        print(f"  {n}: mounted as {mounted_as[n]}; image sha256 {digests[n][:16]}")
    if args.json:
        args.json.write_text(json.dumps({"rounds": args.rounds, "load_average": load, "median": med, "raw": raw,
                                         "sizes_mb": sizes, "sha256": digests, "mounted_as": mounted_as,
                                         "modules_added": added}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
