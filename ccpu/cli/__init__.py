"""`fractal`: the user's view of the repo and of containerd integration.

Thin by design: parse, call ccpu, print.  Errors from ccpu become one line on
stderr and a non-zero exit; tracebacks only with --debug.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from .defaults import DEFAULT_ROOT
from .containerd import ContainerdError
from .repo import Repo, RepoError
from .repo.fsutil import disk_usage
from .vm.cli import add_guest_commands, add_vm_commands


def human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError


def cmd_repo_ls(args: argparse.Namespace) -> int:
    repo = Repo.open_readonly(args.root)
    try:
        layers = repo.layers()
    finally:
        repo.close()
    if args.json:
        json.dump([{
            "id": la.id, "chain_id": la.chain_id, "parent": la.parent_id, "size": la.size,
            "inodes": la.inodes, "users": list(la.users), "path": la.path,
        } for la in layers], sys.stdout, indent=2)
        print()
        return 0
    print(f"{'ID':>5}  {'CHAIN ID':<19}  {'PARENT':>6}  {'SIZE':>10}  USERS")
    for la in layers:
        chain = (la.chain_id or "-")[:19]
        parent = str(la.parent_id) if la.parent_id is not None else "-"
        users = ", ".join(la.users) if la.users else "-"
        print(f"{la.id:>5}  {chain:<19}  {parent:>6}  {human(la.size):>10}  {users}")
    return 0


def cmd_repo_du(args: argparse.Namespace) -> int:
    repo = Repo.open_readonly(args.root)
    try:
        layers = repo.layers()
        snapshots = list(repo.list())
    finally:
        repo.close()
    stored = sum(la.size for la in layers)
    # what per-snapshot copies (containerd's overlayfs snapshotter) would need for the same snapshots
    would_be = sum(la.size * max(1, sum(1 for u in la.users if not u.startswith("pin:"))) for la in layers)
    on_disk = disk_usage(repo.root).size  # includes ROOT/reserve (docs/snapshotter.md)
    print(f"repo:       {repo.root}")
    print(f"layers:     {len(layers)} ({human(stored)} unpacked)")
    print(f"snapshots:  {len(snapshots)}")
    print(f"on disk:    {human(on_disk)} (layers, active snapshots, metadata, reserve)")
    print(f"one copy per snapshot would take {human(would_be)}; shared layers save {human(would_be - stored)}")
    return 0


def cmd_ps(args: argparse.Namespace) -> int:
    from . import sandboxes
    from .containerd import FRACTAL_RUNTIME, ContainerdClient, resolve_target
    from .grouping import sandbox_group

    address, namespace = resolve_target(args.address, args.namespace)
    with ContainerdClient(address, namespace) as client:
        containers = client.containers(runtime=FRACTAL_RUNTIME)
        tasks = client.tasks()
    records = sandboxes.read_all(namespace)
    groups: dict[str, list] = {}
    for c in containers:
        groups.setdefault(sandbox_group(c.id, c.annotations), []).append(c)
    if args.json:
        json.dump([{
            "sandbox": g,
            "mode": records[g].mode if g in records else None,
            "shim_pid": records[g].shim_pid if g in records and records[g].alive else None,
            "agent_pid": records[g].agent_pid if g in records else None,
            "vm": records[g].vm if g in records else None,
            "containers": [{"id": c.id, "image": c.image, "status": tasks[c.id].status if c.id in tasks else "no task",
                            "pid": tasks[c.id].pid if c.id in tasks else None} for c in cs],
        } for g, cs in sorted(groups.items())], sys.stdout, indent=2)
        print()
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
            if i == 0 and rec and rec.vm:
                vm = rec.vm
                print(f"{'':<20} vm pid {vm.get('pid')} accel {vm.get('accel')} memory {vm.get('memory')} "
                      f"share {vm.get('share')}")
    return 0


def add_containerd_flags(p: argparse.ArgumentParser) -> None:
    """The same flags and environment as ctr."""
    p.add_argument("-a", "--address", default=None,
                   help="containerd address (env CONTAINERD_ADDRESS, default /run/containerd/containerd.sock)")
    p.add_argument("-n", "--namespace", default=None,
                   help="containerd namespace (env CONTAINERD_NAMESPACE, default 'default')")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fractal", description="fractal: many containers, one VM, one copy of every layer")
    ap.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("install", help="wire fractal into containerd (config, systemd unit, shim)")
    from .install import add_install_arguments

    add_install_arguments(p)
    from .doctor import add_doctor_command

    add_doctor_command(sub)

    p = sub.add_parser("ps", help="fractal sandboxes, their mode, containers and pids")
    add_containerd_flags(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_ps)

    repo = sub.add_parser("repo", help="inspect the layer repo").add_subparsers(dest="repo_command", required=True)
    root_help = "repo directory (default %(default)s; env FRACTAL_ROOT)"
    root_default = os.environ.get("FRACTAL_ROOT", DEFAULT_ROOT)
    p = repo.add_parser("ls", help="layers, their sizes and the snapshots using them")
    p.add_argument("--root", default=root_default, help=root_help)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_repo_ls)
    p = repo.add_parser("du", help="disk used by the repo and what sharing saves")
    p.add_argument("--root", default=root_default, help=root_help)
    p.set_defaults(func=cmd_repo_du)
    add_guest_commands(sub)
    add_vm_commands(sub)
    from .layers import add_commands as add_layers_commands  # fractal layers ls|add|rm

    add_layers_commands(sub, add_containerd_flags)
    from .imports import add_image_commands  # fractal image import|pull

    add_image_commands(sub, add_containerd_flags)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING)
    try:
        return int(args.func(args))
    except (RepoError, ContainerdError) as e:
        if args.debug:
            raise
        print(f"fractal: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
