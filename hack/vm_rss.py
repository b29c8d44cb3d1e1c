#!/usr/bin/env python3
"""Where a VM's host memory is (issue 12: host RSS per idle sandbox): QEMU's mappings, by kind.

Host RSS of a VM sandbox is QEMU's (+ virtiofsd's, + swtpm's when attested, + the sandbox's
shim daemon's: hack/bench/vm.py's memory step counts it too, this script only QEMU).  QEMU's own is the
sum of very different things, and only some of them grow with what the guest does:

- **guest RAM**: the one mapping of the guest's memory size (anonymous, or ``/memfd:mem`` when a
  vhost-user daemon -- virtiofsd -- must map it too).  What the guest touched and did not report
  free stays resident; ``AnonHugePages`` says how much of it is in 2 MiB transparent huge pages
  (one touched 4 KiB page in a THP makes all 2 MiB resident, and a free-page report of a
  2 MiB block splits it back).
- **TCG code buffer**: the one ``rwxp`` anonymous mapping (bounded by ``tb-size``).
- **files**: QEMU's binary and its libraries, firmware: shared with every other QEMU on the host,
  hence RSS and PSS.
- **heap and other anonymous**: QEMU's own allocations (device state, ROM blobs: the kernel and
  initramfs QEMU loaded, kept for reset).

Usage (root; as many of the modes as given, in order):

    python3 hack/vm_rss.py --pid PID [--memory-mb 512]        # a running QEMU (a sandbox's: its run
                                                               # dir's ``pids`` file names it)
    python3 hack/vm_rss.py --bare [--settle 20]                # the bare kernel (hack/bench/guest.py's)
    python3 hack/vm_rss.py --idle [--settle 20]                # the guest, agent mode, agent ready (booted
                                                               # here: without the shim's page-out of the
                                                               # boot files, ccpu/vm/pageout.py)
    python3 hack/vm_rss.py --vm-run [--settle 20] [--guest-cmd CMD]   # ``vm run``: the guest's meminfo
                                                               # too, after CMD (e.g. drop_caches)

``--json FILE`` writes the figures.  ``breakdown(pid, memory_mb)`` is what hack/bench/vm.py calls.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO))

KINDS = ("guest_ram", "tcg_buffer", "file", "heap_anon", "other")


@dataclass
class Part:
    rss_kb: int = 0
    pss_kb: int = 0
    anon_huge_kb: int = 0
    size_kb: int = 0
    mappings: int = 0
    files: dict[str, tuple[int, int]] = field(default_factory=dict)  # path -> (rss, pss), kind "file"


@dataclass
class Breakdown:
    pid: int
    comm: str
    rss_kb: int
    pss_kb: int
    parts: dict[str, Part]


def _mappings(pid: int) -> list[tuple[str, dict[str, int]]]:
    """(header line, its kB fields) per mapping of /proc/PID/smaps."""
    out: list[tuple[str, dict[str, int]]] = []
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            out.append((line, {}))
        elif out:
            m = re.match(r"^(\w+):\s+(\d+) kB", line)
            if m:
                out[-1][1][m.group(1)] = int(m.group(2))
    return out


def classify(header: str, fields: dict[str, int], memory_mb: int) -> str:
    """Which kind of QEMU memory one smaps mapping is (see the module's docstring)."""
    parts = header.split(None, 5)
    perms = parts[1]
    path = parts[5].strip() if len(parts) > 5 else ""
    size_kb = fields.get("Size", 0)
    if size_kb == memory_mb * 1024 and perms.startswith("rw") and (path == "" or path.startswith("/memfd:")):
        return "guest_ram"
    if perms == "rwxp" and path == "":
        return "tcg_buffer"
    if path.startswith("/") and not path.startswith("/memfd:"):
        return "file"
    if path in ("", "[heap]") or path.startswith("/memfd:"):
        return "heap_anon"
    return "other"  # [stack], [vdso], [vvar], ...


def breakdown(pid: int, memory_mb: int = 512) -> Breakdown:
    parts = {k: Part() for k in KINDS}
    for header, f in _mappings(pid):
        kind = classify(header, f, memory_mb)
        p = parts[kind]
        p.rss_kb += f.get("Rss", 0)
        p.pss_kb += f.get("Pss", 0)
        p.anon_huge_kb += f.get("AnonHugePages", 0) + f.get("ShmemPmdMapped", 0)
        p.size_kb += f.get("Size", 0)
        p.mappings += 1
        if kind == "file":
            path = header.split(None, 5)[5].strip()
            r, s = p.files.get(path, (0, 0))
            p.files[path] = (r + f.get("Rss", 0), s + f.get("Pss", 0))
    comm = Path(f"/proc/{pid}/comm").read_text().strip()
    return Breakdown(pid, comm, sum(p.rss_kb for p in parts.values()), sum(p.pss_kb for p in parts.values()), parts)


def render(b: Breakdown, title: str = "", top_files: int = 6) -> str:
    lines = [f"{title or b.comm} (pid {b.pid}): RSS {b.rss_kb / 1024:.1f} MB, PSS {b.pss_kb / 1024:.1f} MB"]
    for kind, p in b.parts.items():
        if not p.mappings:
            continue
        huge = f", in THPs {p.anon_huge_kb / 1024:.1f}" if p.anon_huge_kb else ""
        lines.append(f"  {kind:11s} RSS {p.rss_kb / 1024:7.1f} MB  PSS {p.pss_kb / 1024:7.1f} MB"
                     f"  (of {p.size_kb / 1024:.0f} MB mapped, {p.mappings} mappings{huge})")
        if kind == "file":
            for path, (r, s) in sorted(p.files.items(), key=lambda x: -x[1][0])[:top_files]:
                lines.append(f"      {r / 1024:6.1f} / {s / 1024:6.1f} MB  {path}")
    return "\n".join(lines)


def as_json(b: Breakdown) -> dict[str, Any]:
    d = asdict(b)
    for p in d["parts"].values():
        p["files"] = {k: {"rss_kb": v[0], "pss_kb": v[1]} for k, v in p["files"].items()}
    return d


def meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo's kB fields."""
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^([\w()]+):\s+(\d+)(?: kB)?$", text, re.M)}


GUEST_KEYS = ("MemTotal", "MemFree", "MemAvailable", "Buffers", "Cached", "Shmem", "AnonPages", "Slab",
              "KernelStack", "PageTables", "Percpu", "VmallocUsed")


def render_guest(info: dict[str, int]) -> str:
    used = info["MemTotal"] - info["MemAvailable"]
    nonfree = info["MemTotal"] - info["MemFree"]
    kv = "  ".join(f"{k} {info[k] / 1024:.1f}" for k in GUEST_KEYS if k in info)
    return (f"  guest: used (MemTotal-MemAvailable) {used / 1024:.1f} MB, not free (MemTotal-MemFree)"
            f" {nonfree / 1024:.1f} MB\n  guest meminfo (MB): {kv}")


# ---------------------------------------------------------------------------------------------
# the boots (TCG here): same QEMU flags as hack/bench/guest.py


def _settle_then(vm_pid: int, settle: float, memory_mb: int) -> Breakdown:
    time.sleep(settle)  # the balloon reports free blocks a few seconds after they are freed
    return breakdown(vm_pid, memory_mb)


def boot_bare(settle: float) -> tuple[Breakdown, dict[str, int]]:
    from ccpu.guest import initramfs
    from ccpu.vm.machine import ConsoleFile, Machine, MachineSpec
    from hack.bench import guest as gb

    kernel = str(initramfs.build(layout="image", offline=True).kernel)
    with tempfile.TemporaryDirectory(prefix="fractal-vm-rss-") as tmp:
        initrd = Path(tmp, "bare.cpio")
        gb.bare_initramfs(initrd)
        console = os.path.join(tmp, "bare.log")
        vm = Machine(MachineSpec(kernel=kernel, initramfs=str(initrd), workdir=tmp,
                                 console=ConsoleFile(console), mode="run"))
        vm.boot()
        try:
            t0 = time.monotonic()
            while "bare: " not in Path(console).read_text(errors="replace"):
                if time.monotonic() - t0 > 120:
                    raise RuntimeError("bare kernel: no line on the console")
                time.sleep(0.1)
            m = re.search(r"used_kb=(\d+)", Path(console).read_text(errors="replace"))
            assert vm.pid is not None
            return _settle_then(vm.pid, settle, 512), {"used_kb": int(m.group(1)) if m else -1}
        finally:
            vm.stop()


def boot_idle(settle: float) -> Breakdown:
    """The guest in agent mode, as a sandbox boots it (system image, agent port), agent ready."""
    from ccpu.guest import initramfs
    from ccpu.vm.machine import ConsoleFile, Machine, MachineSpec
    from hack.bench.common import agent_hello

    guest = initramfs.build(layout="image", offline=True)
    with tempfile.TemporaryDirectory(prefix="fractal-vm-rss-") as tmp:
        vm = Machine(MachineSpec(kernel=str(guest.kernel), initramfs=str(guest.initramfs), workdir=tmp,
                                 system_image=str(guest.image) if guest.image else None,
                                 console=ConsoleFile(os.path.join(tmp, "agent.log")), mode="agent",
                                 ports=("fractal.agent",)))
        vm.boot()
        try:
            agent_hello(vm.ports["fractal.agent"], 300)
            assert vm.pid is not None
            return _settle_then(vm.pid, settle, 512)
        finally:
            for s in vm.ports.values():
                s.close()
            vm.stop()


class _Marker(io.RawIOBase):
    """The guest command's stdout: when MARK comes by, the host reads QEMU's mappings at once
    (the guest printed its meminfo and sleeps, so both sides describe the same moment)."""
    MARK = b"@@RSS@@"

    def __init__(self, memory_mb: int) -> None:
        self.buf = bytearray()
        self.memory_mb = memory_mb
        self.result: Breakdown | None = None

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.buf += bytes(b)
        if self.result is None and self.MARK in self.buf:
            pid = _qemu_child()
            if pid:
                self.result = breakdown(pid, self.memory_mb)
        return len(b)


def _qemu_child() -> int | None:
    me = os.getpid()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            st = (d / "stat").read_text()
        except OSError:
            continue
        comm = st[st.index("(") + 1:st.rindex(")")]
        ppid = int(st[st.rindex(")") + 2:].split()[1])
        if ppid == me and comm.startswith("qemu-system"):
            return int(d.name)
    return None


def boot_vm_run(settle: float, before: str = "") -> tuple[Breakdown, dict[str, int], str]:
    from ccpu.guest import initramfs
    from ccpu.vm import run as vmrun

    guest = initramfs.build(layout="image", offline=True)
    out = _Marker(512)
    cmd = (f"{before + '; ' if before else ''}sleep {settle:.0f}; cat /proc/meminfo; "
           f"echo {_Marker.MARK.decode()}; sleep 3")
    res = vmrun.run(guest, ["sh", "-c", cmd], stdout=out, stderr=io.BytesIO(), timeout=600)  # type: ignore[arg-type]
    if res.exit_code != 0 or out.result is None:
        raise RuntimeError(f"vm run: exit {res.exit_code}, no breakdown: {bytes(out.buf)[-400:]!r}")
    text = bytes(out.buf).decode(errors="replace")
    return out.result, meminfo(text), text.split(_Marker.MARK.decode())[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pid", type=int, action="append", default=[])
    ap.add_argument("--memory-mb", type=int, default=512)
    ap.add_argument("--bare", action="store_true")
    ap.add_argument("--idle", action="store_true")
    ap.add_argument("--vm-run", action="store_true")
    ap.add_argument("--settle", type=float, default=20.0, help="seconds after ready before reading (default 20)")
    ap.add_argument("--guest-cmd", default="", help="--vm-run: a shell command the guest runs first")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if not (args.pid or args.bare or args.idle or args.vm_run):
        ap.error("give --pid, --bare, --idle and/or --vm-run")
    result: dict[str, Any] = {"load_average": os.getloadavg(),
                              "thp": Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()}
    print(f"host THP: {result['thp']}; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    for pid in args.pid:
        b = breakdown(pid, args.memory_mb)
        print(render(b))
        result[f"pid{pid}"] = as_json(b)
    if args.bare:
        b, g = boot_bare(args.settle)
        print(render(b, f"bare kernel QEMU, {args.settle:.0f} s after its line") + f"\n  guest used {g['used_kb'] / 1024:.1f} MB")
        result["bare"] = {"qemu": as_json(b), "guest": g}
    if args.idle:
        b = boot_idle(args.settle)
        print(render(b, f"agent-mode guest QEMU, {args.settle:.0f} s after hello"))
        result["idle"] = {"qemu": as_json(b)}
    if args.vm_run:
        b, info, text = boot_vm_run(args.settle, args.guest_cmd)
        print(render(b, f"vm run guest QEMU, {args.settle:.0f} s after boot") + "\n" + render_guest(info))
        other = [ln for ln in text.splitlines() if ln and not re.match(r"^[\w()]+:\s+\d+", ln)]
        if other:
            print("  guest said: " + "\n  guest said: ".join(other[:20]))
        result["vm_run"] = {"qemu": as_json(b), "guest_meminfo_kb": info}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
