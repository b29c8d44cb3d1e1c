"""containerd API stubs (generated, never committed).

The Python protobuf/gRPC stubs for the containerd API live in ``ccpu.api.gen`` and
are produced on each machine by ``python3 hack/gen_protos.py`` (run by
``hack/setup.sh`` / ``make setup``) from the .proto files Debian ships in
golang-github-containerd-containerd-dev. They are not committed because
protobuf's generated code checks the runtime library version it was generated
for: stubs produced by one grpcio-tools release break on machines with another,
so they are always produced by the grpcio-tools installed next to the runtime.

Import paths (the ``github.com/containerd/containerd/api`` prefix becomes
``ccpu.api.gen.containerd``; proto package / wire names are unchanged)::

    from ccpu.api.gen.containerd.services.snapshots.v1 import snapshots_pb2, snapshots_pb2_grpc
    from ccpu.api.gen.containerd.services.tasks.v1 import tasks_pb2, tasks_pb2_grpc
    from ccpu.api.gen.containerd.services.ttrpc.events.v1 import events_pb2  # shim -> containerd
    from ccpu.api.gen.containerd.events import task_pb2                     # TaskExit etc.
    from ccpu.api.gen.containerd.types import mount_pb2
    from ccpu.api.gen.containerd.runtime.v2.task import shim_pb2            # runtime/v2/task/shim.proto
    from ccpu.api.gen.containerd.runtime.v2.runc.options import oci_pb2
    from ccpu.api.gen.containerd.pkg.runtimeoptions.v1 import api_pb2
    from ccpu.api.gen.gogoproto import gogo_pb2

Every module also has a ``.pyi`` stub for type checkers.
"""

from __future__ import annotations

import importlib.util

__all__ = ["require_generated"]

_HINT = "run `make setup` (or `python3 hack/gen_protos.py`) in the repository root"


def require_generated() -> None:
    """Fail early with an actionable message when the stubs were never generated.

    A bare ``ModuleNotFoundError: ccpu.api.gen`` deep in a server start-up says
    nothing about the fix; call this at entry points before importing stubs.
    """
    if importlib.util.find_spec(f"{__name__}.gen") is None:
        raise ImportError(f"containerd API stubs ({__name__}.gen) are missing: {_HINT}")
