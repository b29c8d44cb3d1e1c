#!/usr/bin/env python3
"""Soak VM mode's container creates through containerd: prove a TCG configuration does not hang.

Not a test (it takes tens of minutes): the evidence behind the TCG settings of docs/vm.md
"Accelerator" (issue 12 item 4).  One private :class:`~hack.containerd_env.FractalEnv` and a
local registry (as hack/bench/vm.py); containers ``ctr run --rm IMAGE idN true`` join a VM
sandbox kept running with a ``sleep`` container, and every ``--per-vm`` creates that sandbox is
replaced by a fresh one (boots are covered too).  A create that has not finished within
``--hang`` seconds is a hang: the script prints the guest console's tail (soft lockups and RCU
stalls show there) and stops with exit code 1.

    python3 hack/vm_soak.py [--creates 300] [--per-vm 50] [--cpus N] [--hang 300]
                            [--tcg thread=multi,tb-size=64] [--image busybox] [--json FILE]

``--tcg`` sets ``FRACTAL_TCG`` for containerd and so for every shim (ccpu/vm/machine.py
``tcg_options``); ``--cpus`` is the sandbox's ``io.fractal.vm.cpus`` annotation (none: the shim's default).  Progress goes to
stderr, one line per create (count, seconds, load average), so a run cut short by a deadline still
shows how far it got.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO))

from hack.bench.common import bench_env, guarded, log, require_root  # noqa: E402
from hack.bench.shim import remove, wait_running  # noqa: E402
from hack.bench.vm import NS, VM, ctr_argv  # noqa: E402
from hack.containerd_env import FractalEnv  # noqa: E402


def console_tail(env: FractalEnv, sandbox: str, lines: int = 60) -> str:
    path = env.fractal_run_dir / "vms" / NS / sandbox / "console.log"
    if not path.exists():
        return f"(no console log at {path})"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def soak(env: FractalEnv, ref: str, args: argparse.Namespace, out: dict[str, Any]) -> None:
    times: list[float] = out["seconds"]
    vm_index = 0
    while len(times) < args.creates:
        vm_index += 1
        sb = f"soak{vm_index}"
        cpus = ("--annotation", f"io.fractal.vm.cpus={args.cpus}") if args.cpus else ()
        ann = ("--annotation", f"io.fractal.sandbox={sb}", *VM, *cpus)
        t0 = time.monotonic()
        subprocess.run(ctr_argv(env, ref, sb, *ann, detach=True, cmd=("sleep", "86400")),
                       check=True, capture_output=True, timeout=args.hang)
        wait_running(env, sb, timeout=args.hang)
        out["boots"].append(time.monotonic() - t0)
        try:
            for _ in range(args.per_vm):
                if len(times) >= args.creates:
                    break
                n = len(times) + 1
                t0 = time.monotonic()
                try:
                    r = subprocess.run(ctr_argv(env, ref, f"c{n}", *ann), capture_output=True, text=True,
                                       timeout=args.hang)
                except subprocess.TimeoutExpired:
                    out["hung_at"] = n
                    log(f"create {n} HUNG (> {args.hang} s); guest console tail:\n{console_tail(env, sb)}")
                    raise RuntimeError(f"create {n} hung") from None
                dt = time.monotonic() - t0
                if r.returncode != 0:
                    out["failed_at"] = n
                    log(f"create {n} failed: {r.stderr.strip()}\nconsole:\n{console_tail(env, sb)}")
                    raise RuntimeError(f"create {n} failed")
                times.append(dt)
                log(f"create {n}/{args.creates} ok {dt:.2f} s (vm {vm_index}, load {os.getloadavg()[0]:.1f})")
        finally:
            remove(env, sb)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--creates", type=int, default=300)
    ap.add_argument("--per-vm", type=int, default=50, help="creates per VM sandbox (default 50)")
    ap.add_argument("--cpus", type=int, help="the sandbox's vCPUs (default: the shim's: 1 under TCG)")
    ap.add_argument("--hang", type=float, default=300.0, help="seconds after which a create is a hang")
    ap.add_argument("--tcg", default="", help="FRACTAL_TCG for the shims (default: the shipped settings)")
    ap.add_argument("--image", default="busybox", choices=["busybox", "edge"])
    ap.add_argument("--json", type=Path, metavar="FILE")
    args = ap.parse_args(argv)
    if not require_root():
        return 2
    from ccpu.vm import machine

    tcg = machine.tcg_options({"FRACTAL_TCG": args.tcg})  # a bad value fails here, not in a shim
    os.environ["FRACTAL_TCG"] = args.tcg
    out: dict[str, Any] = {"tcg": tcg.accel_arg(), "cpu": tcg.cpu, "cpus": args.cpus, "creates": args.creates,
                           "seconds": [], "boots": []}
    t_all = time.monotonic()

    def body() -> None:
        with bench_env(args.image) as (env, refs):
            env.pull(refs[args.image], namespace=NS)
            soak(env, refs[args.image], args, out)
            env.remove_namespace(NS)

    rc = guarded(body)
    out["wall"] = time.monotonic() - t_all
    done = len(out["seconds"])
    secs = sorted(out["seconds"])
    summary = (f"{done}/{args.creates} creates without a hang ({out['tcg']} -cpu {out['cpu']} -smp {args.cpus or 'default'}), "
               f"{len(out['boots'])} VMs, wall {out['wall']:.0f} s"
               + (f", create median {secs[done // 2]:.2f} s, max {secs[-1]:.2f} s" if secs else ""))
    print(summary)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return rc


if __name__ == "__main__":
    sys.exit(main())
