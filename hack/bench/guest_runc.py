#!/usr/bin/env python3
"""Benchmark the agent's own overhead against ``runc run`` of the same bundle inside the same guest
(issue 12: "Nth container in a running VM / runc run directly in the guest <= 1.3x").

Under TCG every guest-side step is ~10x what KVM gives, so the VM's Nth-container figure against
the host (hack/bench/vm.py) mixes the agent's cost with TCG's.  Here both sides run in ONE guest
(``fractal vm run`` mode, the same kernel and guest build the sandboxes use):

- **runc**: ``runc --root R run --bundle B ID`` of a busybox bundle whose command is ``true``
  (posix_spawn + wait, from the guest's Python);
- **runc steps**: what the agent had runc do for it before it did `start` itself: ``runc create`` + ``runc start`` + the
  init's exit (a pidfd) + ``runc delete`` -- each runc invocation is a Go binary's start, ~0.3-0.5 s
  under TCG, so this separates the agent's own (Python) cost from runc's; each step is also timed
  alone, with ``runc --version`` (a Go start and nothing else) beside them;
- **agent**: the guest's own agent (``python3 -m ccpu.agent --listen unix:...``, as the init
  starts it, without the virtio-serial link) driven by ``ccpu.agent.client`` in the guest:
  ``create`` (stdout/stderr channels, rootfs ``none``: the same bundle dir and rootfs, a copy of
  busybox on the guest's /run tmpfs) +
  ``start`` + the exit event + ``delete``, each op also timed alone (``start`` is the exec-fifo
  handshake, no ``runc start``; ``delete`` answers before its ``runc delete`` ends: ccpu/agent/runc.py,
  container.py).

Rounds alternate (one warm-up each first); medians, the ratio agent / runc.  What this leaves
out, and hack/bench/vm.py's Nth figure holds: containerd, the shim, the host <-> guest link.

    python3 hack/bench/guest_runc.py [--rounds 10] [--json FILE]
    python3 hack/bench/guest_runc.py --host [--base DIR] [--rounds 30]   # the same on this host
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

#: runs in the guest (its python, -S -I), the share at /work -- or on the host (``--host``: the
#: dirs and the agents from the environment): prints one JSON line
IN_GUEST = r'''
import asyncio, json, os, statistics, subprocess, sys, time
from ccpu.agent.client import AgentClient

rounds = int(sys.argv[1])
work = os.environ.get("FRACTAL_BENCH_WORK", "/work")
base = os.environ.get("FRACTAL_BENCH_RUN", "/run/bench")
# name -> PYTHONPATH of that agent's code (None: the guest's own agent, as its init starts it)
agents_wanted = json.loads(os.environ.get("FRACTAL_BENCH_AGENTS") or '{"agent": null}')
bundle = base + "/b"
os.makedirs(bundle, exist_ok=True)
subprocess.run(["cp", "-a", work + "/img/rootfs", bundle + "/rootfs"], check=True)  # on the guest's tmpfs
spec = json.load(open(work + "/img/config.json"))
spec["process"]["args"] = ["true"]
spec["process"]["terminal"] = False
spec["root"] = {"path": "rootfs", "readonly": False}
open(bundle + "/config.json", "w").write(json.dumps(spec))
runc = subprocess.run(["sh", "-c", "command -v runc"], capture_output=True, text=True).stdout.strip()
procs, socks = [], {}
for name, path in agents_wanted.items():
    sock = f"{base}/{name}.sock"
    env = dict(os.environ)
    argv = [sys.executable, "-S", "-I", "-m", "ccpu.agent"]
    if path is not None:
        env["PYTHONPATH"] = path
        argv = [sys.executable, "-m", "ccpu.agent"]
    procs.append(subprocess.Popen(argv + ["--listen", "unix:" + sock, "--runc-root", f"{base}/{name}-runc",
                                          "--runc", runc, "--bundle-root", base, "--log", f"{base}/{name}.log"],
                                  env=env, cwd=base))  # not a checkout's dir: -m would import from it
    socks[name] = sock
for sock in socks.values():
    while not os.path.exists(sock):
        time.sleep(0.05)

def runc_run(i):
    t0 = time.monotonic()
    subprocess.run([runc, "--root", base + "/runc", "run", "--bundle", bundle, f"r{i}"], check=True,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return time.monotonic() - t0

steps = {"create": [], "start": [], "exit": [], "delete": [], "go_start": []}
agent_ops = {name: {"create": [], "start": [], "exit": [], "delete": []} for name in socks}

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
    clients = {}
    for name, sock in socks.items():
        clients[name] = await AgentClient.connect_unix(sock)
        await clients[name].hello()

    async def agent_run(name, i):
        client = clients[name]
        t0 = time.monotonic()
        out, err = client.open_channel(), client.open_channel()
        cid = f"{name}{i}"
        await client.call("create", container=cid, bundle=bundle, rootfs={"kind": "none"},
                          stdout=out.number, stderr=err.number)
        t1 = time.monotonic()
        await client.call("start", container=cid)
        t2 = time.monotonic()
        while True:
            ev = await client.next_event(120)
            if ev.get("event") == "exit" and ev["container"] == cid:
                break
        await out.read_all()
        await err.read_all()
        t3 = time.monotonic()
        await client.call("delete", container=cid)
        t4 = time.monotonic()
        if i >= 0:
            for k, v in zip(("create", "start", "exit", "delete"), (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                agent_ops[name][k].append(v)
        return t4 - t0

    times = {"runc": [], "runc_steps": [], **{name: [] for name in socks}}
    runc_run(-1)
    runc_steps(-1)
    for name in socks:
        await agent_run(name, -1)
    order = list(times)
    for i in range(rounds):
        for k in order[i % len(order):] + order[:i % len(order)]:
            times[k].append(runc_run(i) if k == "runc" else runc_steps(i) if k == "runc_steps" else await agent_run(k, i))
    for client in clients.values():
        await client.close()
    return {**times, "steps": steps, "agent_ops": agent_ops}

times = asyncio.run(main())
for p in procs:
    p.terminate()
    p.wait()
print("RESULT " + json.dumps(times), flush=True)
'''


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--host", action="store_true",
                    help="run on this host (root) instead of in a guest: the agent of this checkout")
    ap.add_argument("--base", type=Path, metavar="DIR",
                    help="with --host: also the agent of another checkout (e.g. `git archive REV ccpu | tar -x -C DIR`), "
                         "alternated in the same run")
    args = ap.parse_args(argv)
    if args.base and not args.host:
        ap.error("--base needs --host (a guest runs the agent of its own build)")
    if shutil.which("umoci") is None:
        raise SystemExit("umoci is needed to unpack the busybox test image (hack/setup.sh)")
    from hack import testimages

    guest = None if args.host else initramfs.build(offline=True)
    with tempfile.TemporaryDirectory(prefix="fractal-bench-runc-") as work:
        os.chmod(work, 0o755)
        layout = testimages.build("busybox")
        subprocess.run(["umoci", "unpack", "--image", f"{layout}:latest", os.path.join(work, "img")], check=True,
                       capture_output=True)
        Path(work, "bench.py").write_text(IN_GUEST)
        if guest is not None:
            times = run_in_guest(guest, work, str(args.rounds))
        else:
            times = _run_on_host(work, args.rounds, args.base)
    steps = times.pop("steps", {})
    agent_ops = times.pop("agent_ops", {})
    import statistics

    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["agent"] / med["runc"]
    steps_ratio = med["agent"] / med["runc_steps"]
    load = os.getloadavg()
    where = "on this host" if guest is None else \
        f"in one guest ({guest.manifest.get('kernel', {}).get('version', '?')})"
    print(f"{where}, {args.rounds} alternated rounds, load average {' '.join(f'{x:.1f}' for x in load)}:")
    for k, v in times.items():
        print(f"  {k:10s} median {med[k]:.4f} s  min {min(v):.4f}  max {max(v):.4f}")
    for k, v in steps.items():
        if v:
            print(f"    runc steps: {k:8s} median {statistics.median(v):.4f} s  min {min(v):.4f}  max {max(v):.4f}")
    for name, ops in agent_ops.items():
        for k, v in ops.items():
            if v:
                print(f"    {name} op: {k:8s} median {statistics.median(v):.4f} s  min {min(v):.4f}  max {max(v):.4f}")
    print(f"  ratio agent / runc run: {ratio:.2f}x (goal <= 1.3x)")
    print(f"  ratio agent / runc create+start+delete (the runc calls the agent used to make): {steps_ratio:.2f}x")
    if "agent_base" in med:
        print(f"  ratio agent / agent_base (--base, the same run): {med['agent'] / med['agent_base']:.2f}x; "
              f"agent_base / runc run: {med['agent_base'] / med['runc']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"rounds": args.rounds, "load_average": load, "host": guest is None,
                                         "times": times, "median": med, "ratio": ratio, "steps": steps,
                                         "agent_ops": agent_ops, "steps_ratio": steps_ratio}, indent=2) + "\n")
    return 0


def _run_on_host(work: str, rounds: int, base_dir: Path | None) -> dict:
    """The in-guest script with this host's python and runc, in WORK; this checkout's agent as
    `agent` (and --base's as `agent_base`)."""
    import re

    if os.geteuid() != 0:
        raise SystemExit("--host needs root (runc)")
    agents = {"agent": str(REPO)}
    if base_dir is not None:
        agents["agent_base"] = str(base_dir.resolve())
    env = {**os.environ, "PYTHONPATH": str(REPO), "FRACTAL_BENCH_WORK": work,
           "FRACTAL_BENCH_RUN": os.path.join(work, "run"), "FRACTAL_BENCH_AGENTS": json.dumps(agents)}
    r = subprocess.run([sys.executable, os.path.join(work, "bench.py"), str(rounds)], capture_output=True,
                       env=env, timeout=1800)
    m = re.search(rb"RESULT (.*)", r.stdout)
    if r.returncode != 0 or not m:
        raise SystemExit(f"benchmark failed (exit {r.returncode}):\n{r.stdout.decode(errors='replace')}"
                         f"\n{r.stderr.decode(errors='replace')[-3000:]}")
    return json.loads(m.group(1))


if __name__ == "__main__":
    sys.exit(main())
