"""What the command groups share: ctr's containerd flags, sizes for people, JSON for programs.

Stdlib only: every group imports it, and `fractal --help` must stay cheap.
"""

from __future__ import annotations

import json
import sys

TYPE_CHECKING = False  # typing and argparse: annotations only (`fractal layers add/rm` parse
if TYPE_CHECKING:      # without argparse, ccpu/cli/fastargs.py; issue 13)
    import argparse
    from typing import Any


def add_containerd_flags(p: argparse.ArgumentParser, *, namespace: bool = True) -> None:
    """The same flags and environment as ctr (also accepted before the command, see ccpu.cli)."""
    p.add_argument("-a", "--address", default=None,
                   help="containerd address (env CONTAINERD_ADDRESS, default /run/containerd/containerd.sock)")
    if namespace:
        p.add_argument("-n", "--namespace", default=None,
                       help="containerd namespace (env CONTAINERD_NAMESPACE, default 'default')")


def add_json_flag(p: argparse.ArgumentParser, what: str = "machine-readable output") -> None:
    p.add_argument("--json", action="store_true", help=what)


def human(n: int | float | None) -> str:
    """A byte count the way `du -h` readers expect it: 512 B, 1.5 KiB, ... (GiB at most)."""
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def print_json(value: Any) -> None:
    """One JSON document on stdout, indented, newline-terminated."""
    json.dump(value, sys.stdout, indent=2)
    sys.stdout.write("\n")
