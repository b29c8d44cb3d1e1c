#!/usr/bin/env python3
"""Benchmark a machine booted from its own UKI on a disk against one booted by QEMU's loader.

Both are hack/machine.py's QEMU machine (OVMF + swtpm, reached only over a NIC in a network
namespace).  ``loader``: the build's fractal.efi as ``-kernel`` with ``-append`` (the command line
from the loader); ``esp``: the machine's own UKI (``fractal guest uki --esp``, the command line
built in) as EFI/BOOT/BOOTX64.EFI on a disk image, no -kernel and no -append (as a USB stick on
hardware).  Alternating ``--rounds`` times: the wall time from QEMU's start to the agent
listening, median, min, max, and the ratio esp / loader.  Also the time ``fractal guest uki
--esp`` takes (the per-machine UKI + manifest + disk image), which the esp boot includes.

    python3 hack/bench/machine_esp.py [--rounds 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from hack.bench.common import (  # noqa: E402
    Goals, command_line, finish, guarded, log, machine_info, require_root,
)


def report(result: dict[str, Any]) -> tuple[str, Goals]:
    lines = [f"machine boot, loader vs its own UKI on a disk ({result['rounds']} rounds; {result['command']})",
             f"machine: {result['machine']}", "",
             f"{'QEMU start -> agent listening':<40} {'median s':>9} {'min s':>7} {'max s':>7}"]
    med = {}
    for way, label in (("loader", "loader (-kernel fractal.efi -append)"),
                       ("esp", "esp (own UKI on a disk, boot manager)")):
        v = result["boot_s"][way]
        med[way] = statistics.median(v)
        lines.append(f"{label:<40} {med[way]:>9.1f} {min(v):>7.1f} {max(v):>7.1f}")
    lines.append(f"ratio esp / loader: {med['esp'] / med['loader']:.2f}")
    u = result["guest_uki_s"]
    lines.append(f"fractal guest uki --esp (part of the esp figure): median {statistics.median(u):.2f} s")
    goals: Goals = [("booting from the disk costs at most 1.5x the loader's boot",
                     med["esp"] <= 1.5 * med["loader"], f"{med['esp'] / med['loader']:.2f}x")]
    return "\n".join(lines), goals


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if not require_root("network namespaces and QEMU"):
        return 2
    from ccpu import pki
    from ccpu.guest import initramfs
    from hack import machine

    result: dict[str, Any] = {"rounds": args.rounds, "command": command_line("hack/bench/machine_esp.py", argv),
                              "machine": machine_info(), "boot_s": {"loader": [], "esp": []}, "guest_uki_s": []}

    def measure() -> None:
        guest = initramfs.build(offline=True)
        with tempfile.TemporaryDirectory(prefix="fractal-bench-esp-") as tmp:
            tls_dir = Path(tmp) / "pki"
            pki.init(str(tls_dir), ["127.0.0.1"])
            ca = (tls_dir / "ca.pem").read_bytes()
            for i in range(args.rounds):
                for way in (["loader", "esp"] if i % 2 == 0 else ["esp", "loader"]):
                    t0 = time.monotonic()
                    with machine.boot(guest, ca, Path(tmp) / f"{way}{i}", esp=way == "esp") as m:
                        if way == "esp":
                            result["guest_uki_s"].append(m.esp_seconds)
                        m.wait_listening(900)
                        result["boot_s"][way].append(time.monotonic() - t0)
                    log(f"round {i + 1}/{args.rounds}: {way} {result['boot_s'][way][-1]:.1f} s")

    rc = guarded(measure)
    return rc if rc else finish(result, report, args.json)


if __name__ == "__main__":
    sys.exit(main())
