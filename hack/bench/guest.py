#!/usr/bin/env python3
"""Benchmark the guest's layouts against the bare kernel (issue 12 item 1), without containerd.

Three kinds of boot, same QEMU flags (``ccpu.vm.machine``: q35 + qboot, the accelerator
``ccpu.vm.accel`` picks, ``-m 512M -smp 2``), alternated round by round because the machine is
shared (report medians):

- **bare**: the same kernel with a tiny initramfs (busybox + an /init that prints its uptime and
  MemTotal - MemAvailable, then waits to be stopped): the kernel's own limit.
- **initramfs** / **image**: the two layouts of ``fractal guest build`` (ccpu/guest/initramfs.py).
  *agent ready*: QEMU start -> the agent answered ``hello`` on its port (what the shim waits
  for); QEMU's RSS then.  *guest used*: a second boot in ``vm run`` mode running
  ``python3.11 -c 'import ccpu.agent.__main__'`` and then reading /proc/meminfo
  (MemTotal - MemAvailable: the agent has no op that reports the guest's memory).

    python3 hack/bench/guest.py [--rounds 5] [--layouts initramfs,image] [--no-memory] [--baseline DIR]
                                [--kernels debian,built] [--timeline] [--json FILE]

``--kernels debian,built``: every layout (and the bare reference) once per guest kernel -- Debian's
and the one built for the guest (``fractal guest kernel``, ccpu/guest/kbuild.py) -- in the same
alternated rounds, each guest's ratio against the bare boot of *its own* kernel; also each kernel's
vmlinux size and bss (``size``) and the guest's MemTotal and reserved (RAM - MemTotal) under the
bare init.  Kinds are named ``LAYOUT@KERNEL``.  Without it: the kernel $FRACTAL_GUEST_KERNEL selects.

``--baseline DIR``: also boot the guest built in DIR (its manifest.json), as "baseline" -- e.g.
one built from another tree to compare agents in the same run:
``FRACTAL_CACHE=... PYTHONPATH=/work/main python3 -c 'from ccpu.guest import initramfs;
print(initramfs.build(layout="image", offline=True).initramfs.parent)'``.
``--layouts image --no-memory``: only the boot -> agent ready ratio of the default layout (the
guest-used boot in ``vm run`` mode is skipped).

``--timeline``: the guests boot with ``fractal.timeline=1`` -- the init prints every step's uptime
and the agent its own (imported, `hello` answered) on the console (a few lines more than a plain
boot: for the per-phase figures, not for the ratio); the medians of each phase are printed,
on the guest's clock (kernel -> init -> each step -> exec agent -> imported -> `hello`).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import stat
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO))

from ccpu.guest import cpio, initramfs  # noqa: E402
from ccpu.vm import run as vmrun  # noqa: E402
from ccpu.vm.machine import ConsoleFile, Machine, MachineSpec  # noqa: E402
from hack.bench.common import agent_hello  # noqa: E402

BARE_INIT = b"""#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
read up _ </proc/uptime
t=$(/bin/busybox awk '/MemTotal/{t=$2}/MemAvailable/{a=$2}END{print t-a " memtotal_kb=" t}' /proc/meminfo)
echo "bare: $up used_kb=$t"
/bin/busybox sleep 60  # the host reads QEMU's RSS, then stops it
/bin/busybox poweroff -f
"""
MEM_CMD = ("python3.11 -S -I -c 'import ccpu.agent.__main__' && "
           "awk '/MemTotal/{t=$2}/MemAvailable/{a=$2}END{print \"used_kb=\" t-a}' /proc/meminfo")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def bare_initramfs(path: Path) -> None:
    entries = [cpio.Entry("init", stat.S_IFREG | 0o755, BARE_INIT),
               cpio.Entry("bin/busybox", stat.S_IFREG | 0o755, Path(initramfs.BUSYBOX).read_bytes()),
               cpio.Entry("proc", stat.S_IFDIR | 0o755, b"")]
    path.write_bytes(cpio.write(entries))


def _rss_kb(pid: int | None) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", text).group(1))  # type: ignore[union-attr]


def kernel_size(path: str) -> dict[str, float]:
    """binutils ``size`` of a kernel ELF (text, data, bss: what the guest reserves for the kernel
    image) and its file size (what QEMU maps)."""
    import subprocess
    out = subprocess.run(["size", path], check=True, capture_output=True, text=True).stdout.splitlines()
    text, data, bss = (int(x) for x in out[1].split()[:3])
    return {"text_mb": text / 1e6, "data_mb": data / 1e6, "bss_mb": bss / 1e6,
            "file_mb": os.path.getsize(path) / 1e6}


def boot_bare(kernel: str, initrd: Path, tmp: str) -> dict[str, float]:
    console = os.path.join(tmp, "bare.log")
    vm = Machine(MachineSpec(kernel=kernel, initramfs=str(initrd), workdir=tmp, console=ConsoleFile(console),
                             mode="run"))
    t0 = time.monotonic()
    vm.boot()
    try:
        while time.monotonic() - t0 < 120:
            m = re.search(r"bare: (\d+\.\d+) used_kb=(\d+) memtotal_kb=(\d+)",
                          Path(console).read_text(errors="replace"))
            if m:
                return {"ready_s": time.monotonic() - t0, "uptime_s": float(m.group(1)),
                        "guest_used_mb": int(m.group(2)) / 1024, "qemu_rss_mb": _rss_kb(vm.pid) / 1024,
                        "memtotal_mb": int(m.group(3)) / 1024,
                        "reserved_mb": vm.spec.memory_mb - int(m.group(3)) / 1024}
            time.sleep(0.02)
        raise RuntimeError("bare kernel: no line on the console")
    finally:
        vm.stop()


#: the console lines of a timeline: the init's milestones and the agent's (ccpu/agent/__main__.py)
TIMELINE = re.compile(r"^fractal-(init|agent): (\d+\.\d+) (.*?)\s*$", re.M)


def timeline(text: str) -> dict[str, float]:
    """{phase: guest uptime} from a console log; a phase name is its line's first words (a repeated
    one keeps its first time)."""
    out: dict[str, float] = {}
    for who, up, what in TIMELINE.findall(text):
        words = what.split(" on ")[0].split(" (")[0]
        out.setdefault(f"{who}: {words}", float(up))
    return out


def boot_agent(guest: initramfs.Guest, tmp: str, with_timeline: bool = False) -> dict[str, float]:
    vm = Machine(MachineSpec(kernel=str(guest.kernel), initramfs=str(guest.initramfs), workdir=tmp,
                             system_image=str(guest.image) if guest.image else None,
                             console=ConsoleFile(os.path.join(tmp, "agent.log")), mode="agent",
                             ports=("fractal.agent",),
                             cmdline_extra=("fractal.timeline=1",) if with_timeline else ()))
    t0 = time.monotonic()
    vm.boot()
    try:
        agent_hello(vm.ports["fractal.agent"], 120)
        ready = time.monotonic() - t0
        time.sleep(1)
        out = {"ready_s": ready, "qemu_rss_mb": _rss_kb(vm.pid) / 1024}
        # guest uptimes of the init's milestones: kernel -> init -> python started
        text = Path(tmp, "agent.log").read_text(errors="replace")
        for up, what in vmrun.console_milestones(text):
            if what.startswith("init started"):
                out["init_uptime_s"] = up
            elif what.startswith("exec agent"):
                out["exec_agent_uptime_s"] = up
        if with_timeline:
            out.update({f"@ {k}": v for k, v in timeline(text).items()})
        return out
    finally:
        for s in vm.ports.values():
            s.close()
        vm.stop()


def guest_used(guest: initramfs.Guest) -> float:
    out = io.BytesIO()
    res = vmrun.run(guest, ["sh", "-c", MEM_CMD], stdout=out, stderr=io.BytesIO(), timeout=300)
    m = re.search(rb"used_kb=(\d+)", out.getvalue())
    if res.exit_code != 0 or not m:
        raise RuntimeError(f"vm run: exit {res.exit_code}, {out.getvalue()!r}")
    return int(m.group(1)) / 1024


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--layouts", default="initramfs,image", help="comma-separated (default initramfs,image)")
    ap.add_argument("--no-memory", action="store_true", help="skip the guest-used boots")
    ap.add_argument("--baseline", type=Path, metavar="DIR", help="also boot the guest built in DIR")
    ap.add_argument("--timeline", action="store_true", help="boot with fractal.timeline=1: per-phase uptimes")
    ap.add_argument("--kernels", default="", help="comma-separated guest kernels to compare (debian,built); "
                                                  "default: the one $FRACTAL_GUEST_KERNEL selects")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    layouts = [x for x in args.layouts.split(",") if x]
    if not layouts or any(x not in ("initramfs", "image") for x in layouts):
        ap.error("--layouts: initramfs and/or image")
    kernels = [x for x in args.kernels.split(",") if x] or [None]
    if any(k not in (None, "debian", "built") for k in kernels):
        ap.error("--kernels: debian and/or built")
    guests: dict[str, initramfs.Guest] = {}
    bare_kernel: dict[str, str] = {}  # bare kind -> the kernel it boots
    bare_of: dict[str, str] = {}  # kind -> the bare kind its ratio is against
    order: list[str] = []
    for kern in kernels:
        tag = f"@{kern}" if kern else ""
        for layout in layouts:
            guests[layout + tag] = initramfs.build(layout=layout, offline=True, kernel=kern)
        bare_kernel["bare" + tag] = str(guests[layouts[0] + tag].kernel)
        order += ["bare" + tag, *(layout + tag for layout in layouts)]
        bare_of.update({k: "bare" + tag for k in ["bare" + tag, *(layout + tag for layout in layouts)]})
    if args.baseline is not None:
        kernel = bare_kernel[order[0]]
        manifest = json.loads((args.baseline / "manifest.json").read_text())
        guests["baseline"] = initramfs._guest(Path(kernel), args.baseline, manifest)
        order.append("baseline")
        bare_of["baseline"] = order[0]
    sizes_k = {b: kernel_size(k) for b, k in bare_kernel.items()}
    raw: dict[str, list[dict[str, float]]] = {k: [] for k in order}
    with tempfile.TemporaryDirectory(prefix="fractal-bench-guest-") as tmp:
        os.chmod(tmp, 0o700)
        bare = Path(tmp, "bare.cpio")
        bare_initramfs(bare)
        for r in range(args.rounds):
            for kind in order[r % len(order):] + order[:r % len(order)]:
                if kind in bare_kernel:
                    one = boot_bare(bare_kernel[kind], bare, tmp)
                else:
                    one = boot_agent(guests[kind], tmp, args.timeline)
                    if not args.no_memory:
                        one["guest_used_mb"] = guest_used(guests[kind])
                raw[kind].append(one)
                log(f"round {r} {kind}: " + ", ".join(f"{k} {v:.2f}" for k, v in one.items()))
    med = {k: {m: statistics.median(x[m] for x in v if m in x) for m in v[0]} for k, v in raw.items()}
    sizes = {k: {"initramfs_mb": g.manifest["initramfs"].get("uncompressed_size", 0) / 1e6,
                 "image_mb": g.manifest["image"]["size"] / 1e6 if g.image else 0.0} for k, g in guests.items()}
    result = {"rounds": args.rounds, "load_average": os.getloadavg(), "median": med, "sizes": sizes,
              "kernels": {b: {"path": bare_kernel[b], **sizes_k[b]} for b in bare_kernel}, "raw": raw}
    print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}, {args.rounds} alternated rounds")
    for b, kpath in bare_kernel.items():
        z = sizes_k[b]
        print(f"{b:14s} kernel {kpath}: text {z['text_mb']:.1f} MB  data {z['data_mb']:.1f} MB  "
              f"bss {z['bss_mb']:.1f} MB  file {z['file_mb']:.1f} MB  guest MemTotal "
              f"{med[b]['memtotal_mb']:.1f} MB  reserved {med[b]['reserved_mb']:.1f} MB")
    for k, v in med.items():
        ratio = v["ready_s"] / med[bare_of[k]]["ready_s"]
        size = sizes.get(k, {})
        used = f"guest used {v['guest_used_mb']:.0f} MB  " if "guest_used_mb" in v else ""
        print(f"{k:10s} ready {v['ready_s']:.2f} s ({ratio:.2f}x bare)  {used}"
              f"QEMU RSS {v['qemu_rss_mb']:.0f} MB  " + "  ".join(f"{a} {b:.1f}" for a, b in size.items()))
    if args.timeline:
        print("guest timeline (uptime medians, s; + since the previous line):")
        for k, v in med.items():
            if k in bare_kernel:
                print(f"  {k:10s} its /init's line {v['uptime_s']:.2f}")
                continue
            phases = sorted(((t, m[2:]) for m, t in v.items() if m.startswith("@ ")))
            prev = 0.0
            for t, name in phases:
                print(f"  {k:10s} {name:32s} {t:6.2f}  +{t - prev:.2f}")
                prev = t
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
