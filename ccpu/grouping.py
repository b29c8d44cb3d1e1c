"""Which containers share a sandbox (one shim, one agent, one VM).

The same rule as containerd's runc shim, plus our own annotation for `ctr run`:
the first of `io.fractal.sandbox`, `io.kubernetes.cri.sandbox-id` (CRI puts it
on the pod's pause container and on every container of the pod), else the
container's own id.
"""

from __future__ import annotations

from collections.abc import Mapping

SANDBOX_ANNOTATIONS = ("io.fractal.sandbox", "io.kubernetes.cri.sandbox-id")


def sandbox_group(container_id: str, annotations: Mapping[str, str]) -> str:
    for key in SANDBOX_ANNOTATIONS:
        value = annotations.get(key)
        if value:
            return value
    return container_id
