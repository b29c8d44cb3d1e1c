"""`fractal ps`: fractal's sandboxes, their mode, shim/agent/VM pids and containers.

containerd knows containers and tasks but nothing of shims, agents or VMs; the shims write a
record per sandbox (ccpu/sandboxes.py).  This command joins the two.
"""

from __future__ import annotations

import argparse
from typing import Any

from .common import add_containerd_flags, add_json_flag, print_json


def cmd_ps(args: argparse.Namespace) -> int:
    from .. import sandboxes
    from ..client.address import resolve_target
    from ..client.containerd import FRACTAL_RUNTIME, ContainerdClient
    from ..grouping import sandbox_group

    address, namespace = resolve_target(args.address, args.namespace)
    with ContainerdClient(address, namespace) as client:
        containers = client.containers(runtime=FRACTAL_RUNTIME)
        tasks = client.tasks()
    records = sandboxes.read_all(namespace)
    groups: dict[str, list[Any]] = {}
    for c in containers:
        groups.setdefault(sandbox_group(c.id, c.annotations), []).append(c)
    if args.json:
        print_json([{
            "sandbox": g,
            "mode": records[g].mode if g in records else None,
            "shim_pid": records[g].shim_pid if g in records and records[g].alive else None,
            "agent_pid": records[g].agent_pid if g in records else None,
            "vm": records[g].vm if g in records else None,
            "containers": [{"id": c.id, "image": c.image, "status": tasks[c.id].status if c.id in tasks else "no task",
                            "pid": tasks[c.id].pid if c.id in tasks else None} for c in cs],
        } for g, cs in sorted(groups.items())])
        return 0
    print(f"{'SANDBOX':<20} {'MODE':<5} {'SHIM':>7} {'AGENT':>7}  {'CONTAINER':<20} {'STATUS':<9} {'PID':>7}  IMAGE")
    for g, cs in sorted(groups.items()):
        rec = records.get(g)
        mode = rec.mode if rec else "-"
        shim = str(rec.shim_pid) if rec and rec.alive else ("stale" if rec else "-")
        agent = str(rec.agent_pid) if rec and rec.agent_pid else "-"
        for i, c in enumerate(sorted(cs, key=lambda c: c.id)):
            t = tasks.get(c.id)
            status, pid = (t.status, str(t.pid)) if t else ("no task", "-")
            head = f"{g[:20]:<20} {mode:<5} {shim:>7} {agent:>7}" if i == 0 else " " * 42
            print(f"{head}  {c.id[:20]:<20} {status:<9} {pid:>7}  {c.image}")
            if i == 0 and rec and rec.vm and "machine" in rec.vm:  # an attested remote machine
                att = rec.vm.get("attested") or {}
                pcrs = att.get("pcrs") if isinstance(att, dict) else None
                print(f"{'':<20} machine {rec.vm.get('machine')} attested: "
                      + (f"PCR 11 {str(pcrs.get('11'))[:16]}... PCR 12 {str(pcrs.get('12'))[:16]}..."
                         if isinstance(pcrs, dict) else "no"))
            elif i == 0 and rec and rec.vm:
                vm = rec.vm
                print(f"{'':<20} vm pid {vm.get('pid')} accel {vm.get('accel')} memory {vm.get('memory')} "
                      f"share {vm.get('share')}")
    return 0


def register(p: argparse.ArgumentParser) -> None:
    add_containerd_flags(p)
    add_json_flag(p)
    p.set_defaults(func=cmd_ps)
