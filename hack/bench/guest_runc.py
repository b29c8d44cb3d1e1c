#!/usr/bin/env python3
"""Benchmark the agent's own overhead against ``runc run`` of the same bundle inside the same guest
(issue 12: "Nth container in a running VM / runc run directly in the guest <= 1.3x").

Under TCG every guest-side step is ~10x what KVM gives, so the VM's Nth-container figure against
the host (hack/bench/vm.py) mixes the agent's cost with TCG's.  Here both sides run in ONE guest
(``fractal vm run`` mode, the same kernel and guest build the sandboxes use):

- **runc**: ``runc --root R run --bundle B ID`` of a busybox bundle whose command is ``true``
  (posix_spawn + wait, from the guest's Python);
- **runc steps**: what the agent has runc do for it: ``runc create`` + ``runc start`` + the
  init's exit (a pidfd) + ``runc delete`` -- each runc invocation is a Go binary's start, ~0.3-0.5 s
  under TCG, so this separates the agent's own (Python) cost from runc's; each step is also timed
  alone, with ``runc --version`` (a Go start and nothing else) beside them;
- **agent**: the guest's own agent (``python3 -m ccpu.agent --listen unix:...``, as the init
  starts it, without the virtio-serial link) driven by ``ccpu.agent.client`` in the guest:
  ``create`` (stdout/stderr channels, rootfs ``none``: the same bundle dir and rootfs, a copy of
  busybox on the guest's /run tmpfs) +
  ``start`` + the exit event + ``delete``.

Rounds alternate (one warm-up each first); medians, the ratio agent / runc.  What this leaves
out, and hack/bench/vm.py's Nth figure holds: containerd, the shim, the host <-> guest link.

    python3 hack/bench/guest_runc.py [--rounds 10] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO))

from ccpu.guest import initramfs  # noqa: E402
from hack.bench.common import run_in_guest  # noqa: E402

#: runs in the guest (its python, -S -I), the share at /work: prints one JSON line
IN_GUEST = r'''
import asyncio, json, os, statistics, subprocess, sys, time
from ccpu.agent.client import AgentClient

rounds = int(sys.argv[1])
base = "/run/bench"
bundle = base + "/b"
os.makedirs(bundle, exist_ok=True)
subprocess.run(["cp", "-a", "/work/img/rootfs", bundle + "/rootfs"], check=True)  # on the guest's tmpfs
spec = json.load(open("/work/img/config.json"))
spec["process"]["args"] = ["true"]
spec["process"]["terminal"] = False
spec["root"] = {"path": "rootfs", "readonly": False}
open(bundle + "/config.json", "w").write(json.dumps(spec))
runc = subprocess.run(["sh", "-c", "command -v runc"], capture_output=True, text=True).stdout.strip()
sock = base + "/agent.sock"
agent = subprocess.Popen([sys.executable, "-S", "-I", "-m", "ccpu.agent", "--listen", "unix:" + sock,
                          "--runc-root", base + "/agent-runc", "--runc", runc, "--bundle-root", base,
                          "--log", base + "/agent.log"])
while not os.path.exists(sock):
    time.sleep(0.05)

def runc_run(i):
    t0 = time.monotonic()
    subprocess.run([runc, "--root", base + "/runc", "run", "--bundle", bundle, f"r{i}"], check=True,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return time.monotonic() - t0

steps = {"create": [], "start": [], "exit": [], "delete": [], "go_start": []}

def runc_steps(i):
    """What the agent has runc do: create, start, the init's exit, delete (each step timed)."""
    import select
    t0 = time.monotonic()
    r = [runc, "--root", base + "/runc"]
    cid, pidfile = f"s{i}", f"{base}/s{i}.pid"
    subprocess.run(r + ["create", "--bundle", bundle, "--pid-file", pidfile, cid], check=True,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    t1 = time.monotonic()
    fd = os.pidfd_open(int(open(pidfile).read()))
    subprocess.run(r + ["start", cid], check=True)
    t2 = time.monotonic()
    select.select([fd], [], [], 120)
    os.close(fd)
    t3 = time.monotonic()
    subprocess.run(r + ["delete", cid], check=True)
    t4 = time.monotonic()
    if i >= 0:
        for k, v in zip(("create", "start", "exit", "delete"), (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            steps[k].append(v)
        # one Go binary's start and exit, nothing else: what each runc invocation costs at least
        t5 = time.monotonic()
        subprocess.run([runc, "--version"], check=True, stdout=subprocess.DEVNULL)
        steps["go_start"].append(time.monotonic() - t5)
    return t4 - t0

async def main():
    client = await AgentClient.connect_unix(sock)
    await client.hello()

    async def agent_run(i):
        t0 = time.monotonic()
        out, err = client.open_channel(), client.open_channel()
        cid = f"a{i}"
        await client.call("create", container=cid, bundle=bundle, rootfs={"kind": "none"},
                          stdout=out.number, stderr=err.number)
        await client.call("start", container=cid)
        while True:
            ev = await client.next_event(120)
            if ev.get("event") == "exit" and ev["container"] == cid:
                break
        await out.read_all()
        await err.read_all()
        await client.call("delete", container=cid)
        return time.monotonic() - t0

    times = {"runc": [], "runc_steps": [], "agent": []}
    runc_run(-1)
    runc_steps(-1)
    await agent_run(-1)
    order = list(times)
    for i in range(rounds):
        for k in order[i % 3:] + order[:i % 3]:
            times[k].append(runc_run(i) if k == "runc" else runc_steps(i) if k == "runc_steps" else await agent_run(i))
    await client.close()
    return {**times, "steps": steps}

times = asyncio.run(main())
agent.terminate()
agent.wait()
print("RESULT " + json.dumps(times), flush=True)
'''


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if shutil.which("umoci") is None:
        raise SystemExit("umoci is needed to unpack the busybox test image (hack/setup.sh)")
    from hack import testimages

    guest = initramfs.build(offline=True)
    with tempfile.TemporaryDirectory(prefix="fractal-bench-runc-") as work:
        os.chmod(work, 0o755)
        layout = testimages.build("busybox")
        subprocess.run(["umoci", "unpack", "--image", f"{layout}:latest", os.path.join(work, "img")], check=True,
                       capture_output=True)
        Path(work, "bench.py").write_text(IN_GUEST)
        times = run_in_guest(guest, work, str(args.rounds))
    steps = times.pop("steps", {})
    import statistics

    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["agent"] / med["runc"]
    steps_ratio = med["agent"] / med["runc_steps"]
    load = os.getloadavg()
    print(f"in one guest ({guest.manifest.get('kernel', {}).get('version', '?')}, {args.rounds} alternated rounds, "
          f"load average {' '.join(f'{x:.1f}' for x in load)}):")
    for k in ("runc", "runc_steps", "agent"):
        v = times[k]
        print(f"  {k:10s} median {med[k]:.3f} s  min {min(v):.3f}  max {max(v):.3f}")
    for k, v in steps.items():
        if v:
            print(f"    runc steps: {k:8s} median {statistics.median(v):.3f} s  min {min(v):.3f}  max {max(v):.3f}")
    print(f"  ratio agent / runc run: {ratio:.2f}x (goal <= 1.3x)")
    print(f"  ratio agent / runc create+start+delete (the agent's own cost): {steps_ratio:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"rounds": args.rounds, "load_average": load, "times": times,
                                         "median": med, "ratio": ratio, "steps": steps,
                                         "steps_ratio": steps_ratio}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
