"""Which containers share a sandbox (one shim, one agent, one VM).

The same rule as containerd's runc shim, plus our own annotation for `ctr run`:
the first of `io.fractal.sandbox`, `io.kubernetes.cri.sandbox-id` (CRI puts it
on the pod's pause container and on every container of the pod), else the
container's own id.

A Kubernetes pod (a spec CRI made, :func:`from_cri`) may name another sandbox
with `io.fractal.sandbox` only if the operator allows it (shim/config.py
``allowed_annotations``): otherwise it stays in its own pod's sandbox, whose
shim then refuses the container (InvalidArgument).
"""

from __future__ import annotations

TYPE_CHECKING = False  # not typing's; and Mapping only for annotations: collections is ~2 ms
if TYPE_CHECKING:     # of the shim's `start`/`delete` interpreter (docs/performance.md)
    from collections.abc import Mapping

FRACTAL_SANDBOX = "io.fractal.sandbox"
CRI_SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
CRI_CONTAINER_TYPE = "io.kubernetes.cri.container-type"
SANDBOX_ANNOTATIONS = (FRACTAL_SANDBOX, CRI_SANDBOX_ID)


def from_cri(annotations: Mapping[str, str]) -> bool:
    """Whether containerd's CRI plugin made this spec (a Kubernetes pod's container).

    CRI (containerd 1.6 and 2.x alike) writes ``io.kubernetes.cri.container-type`` and
    ``io.kubernetes.cri.sandbox-id`` into every spec it creates, after the pod annotations it
    passes through, and a pod cannot remove them.  ``ctr``/nerdctl write neither; whoever can
    run those talks to containerd's root-only socket, i.e. is a node admin already.  A node
    admin may add these annotations by hand: that only subjects their own container to the
    pod policy."""
    return bool(annotations.get(CRI_CONTAINER_TYPE) or annotations.get(CRI_SANDBOX_ID))


def asks_to_join(container_id: str, annotations: Mapping[str, str]) -> bool:
    """A CRI container that names a sandbox other than its pod's (needs the operator's leave)."""
    want = annotations.get(FRACTAL_SANDBOX)
    return bool(want) and from_cri(annotations) and \
        want != (annotations.get(CRI_SANDBOX_ID) or container_id)


def sandbox_group(container_id: str, annotations: Mapping[str, str], *,
                  pod_may_join: bool = True) -> str:
    """The sandbox of a container.  ``pod_may_join=False``: a CRI container's
    ``io.fractal.sandbox`` is not followed (it stays in its pod's sandbox)."""
    keys = SANDBOX_ANNOTATIONS
    if not pod_may_join and from_cri(annotations):
        keys = (CRI_SANDBOX_ID,)
    for key in keys:
        value = annotations.get(key)
        if value:
            return value
    return container_id
