"""Which containerd, in which namespace: flags first, then ctr's environment, then its defaults.

Stdlib only, so a command that only hands the address to `ctr` does not load grpc.
"""

from __future__ import annotations

import os

DEFAULT_ADDRESS = "/run/containerd/containerd.sock"
DEFAULT_NAMESPACE = "default"


def resolve_target(address: str | None, namespace: str | None) -> tuple[str, str]:
    """(socket path, namespace) as ctr would pick them (``unix://`` prefix dropped)."""
    addr = address or os.environ.get("CONTAINERD_ADDRESS") or DEFAULT_ADDRESS
    ns = namespace or os.environ.get("CONTAINERD_NAMESPACE") or DEFAULT_NAMESPACE
    return addr.removeprefix("unix://"), ns
