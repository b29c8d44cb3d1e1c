#!/usr/bin/env python3
"""Benchmark NICs added to a running VM (issue 12 item 3) against the alternative: a new VM.

A netns + veth pair like CNI's (10.217.N.0/24, removed after).  In one run:

1. **Hot-add cycle**, ``--runs`` times in one running VM (q35, agent ready, 2 hot-plug ports):
   ``attach_nic`` (tap + tc in the netns, QMP getfd + netdev_add + device_add), the agent's ``nic``
   op (the guest finds the NIC by MAC and configures it), then ``detach_nic`` (device_del until
   DEVICE_DELETED, netdev_del, taps and tc out of the netns).  Each part timed.
2. **Reference**: what getting that NIC costs without hot-plug -- boot a new VM with the netns at
   boot (QEMU start -> agent ``hello``), ``--boots`` times.

Prints medians and the ratio hot-add (plug + configure) / boot with the NIC.  Needs root, QEMU and
a built guest (``fractal guest build``).

    python3 hack/bench/nic.py [--runs 5] [--boots 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ccpu.agent.client import AgentClient  # noqa: E402
from ccpu.guest import initramfs  # noqa: E402
from ccpu.linux.reaper import Reaper  # noqa: E402
from ccpu.vm import machine, net  # noqa: E402


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def make_pod() -> tuple[str, str]:
    tag = secrets.token_hex(3)
    used = subprocess.run(["ip", "-4", "addr"], capture_output=True, text=True).stdout
    n = next(n for n in range(100, 250) if f"10.217.{n}." not in used)
    name, host_if = f"fractal-b-{tag}", f"vfb{tag}"
    ip("netns", "add", name)
    ip("link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", name)
    ip("addr", "add", f"10.217.{n}.1/24", "dev", host_if)
    ip("link", "set", host_if, "up")
    ip("-n", name, "addr", "add", f"10.217.{n}.2/24", "dev", "eth0")
    ip("-n", name, "link", "set", "eth0", "up")
    ip("-n", name, "route", "add", "default", "via", f"10.217.{n}.1")
    return name, host_if


async def boot(guest: initramfs.Guest, workdir: str, reaper: Reaper, netns: str | None,
               hotplug: int) -> tuple[machine.AsyncMachine, AgentClient, float]:
    spec = machine.MachineSpec(
        kernel=str(guest.kernel), initramfs=str(guest.initramfs), workdir=workdir,
        system_image=str(guest.image) if guest.image else None,
        console=machine.ConsoleFile(os.path.join(workdir, "console.log")), mode="agent",
        ports=("fractal.agent",), netns=netns, hotplug_nics=hotplug)
    m = machine.AsyncMachine(spec, reaper)
    t0 = time.monotonic()
    await m.boot()
    sock = m.ports.pop("fractal.agent")
    sock.setblocking(False)
    client = await AgentClient.connect_socket(sock)
    await asyncio.wait_for(client.hello(), 600)
    return m, client, time.monotonic() - t0


async def bench(runs: int, boots: int, netns_path: str) -> dict[str, list[float]]:
    guest = initramfs.build(offline=True)
    reaper = Reaper()
    reaper.start(asyncio.get_running_loop(), subreaper=False)
    out: dict[str, list[float]] = {"plug": [], "configure": [], "unplug": [], "boot_with_nic": []}
    try:
        with tempfile.TemporaryDirectory(prefix="fractal-nic-bench-") as d:
            m, client, _ = await boot(guest, d, reaper, None, 2)
            try:
                for _ in range(runs):
                    t0 = time.monotonic()
                    ifaces = await m.attach_nic(netns_path)
                    t1 = time.monotonic()
                    for iface in ifaces:
                        await client.call("nic", net.agent_args(iface))
                    t2 = time.monotonic()
                    await m.detach_nic(netns_path)
                    t3 = time.monotonic()
                    out["plug"].append(t1 - t0)
                    out["configure"].append(t2 - t1)
                    out["unplug"].append(t3 - t2)
            finally:
                await client.close()
                await m.stop()
        for _ in range(boots):
            with tempfile.TemporaryDirectory(prefix="fractal-nic-bench-") as d:
                m, client, took = await boot(guest, d, reaper, netns_path, 0)
                out["boot_with_nic"].append(took)
                await client.close()
                await m.stop()
    finally:
        reaper.stop()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--boots", type=int, default=2)
    p.add_argument("--json")
    a = p.parse_args()
    name, host_if = make_pod()
    try:
        res = asyncio.run(bench(a.runs, a.boots, f"/var/run/netns/{name}"))
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
    med = {k: statistics.median(v) for k, v in res.items()}
    hot = med["plug"] + med["configure"]
    for k in ("plug", "configure", "unplug", "boot_with_nic"):
        print(f"{k:14s} median {med[k]:7.3f} s  ({', '.join(f'{x:.3f}' for x in res[k])})")
    print(f"hot-add (plug + configure) {hot:.3f} s vs a new VM with the NIC at boot {med['boot_with_nic']:.3f} s: "
          f"ratio {hot / med['boot_with_nic']:.3f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"runs": res, "median": med, "ratio": hot / med["boot_with_nic"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
