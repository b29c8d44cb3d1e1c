"""The ``-info`` flag of containerd 2.x: print the shim's ``containerd.types.RuntimeInfo``.

containerd 2.x (core/runtime/v2/task_manager.go ``getRuntimeInfo``) runs ``<shim> -info`` with
the runtime options (a serialized ``google.protobuf.Any``, possibly empty) on stdin and reads
stdout as a binary ``containerd.types.RuntimeInfo`` (containerd/api ``types/introspection.proto``;
generated from hack/protos/ by hack/gen_protos.py).  A non-zero exit is an error; containerd
shows our stderr in it.  It is asked through the Introspection service's ``PluginInfo`` for
plugin ``io.containerd.runtime.v2``/``task`` (``ctr plugins inspect-runtime --runtime R``),
by CRI for every runtime handler at start-up (user namespaces and recursive read-only mounts
are offered to the kubelet only if the features say so), and before a Create whose spec uses
idmap mounts.

What we answer, like containerd's runc shim (cmd/containerd-shim-runc-v2/manager ``Info``):

* ``name``: the runtime name, ``io.containerd.fractal.v1``;
* ``version``: ``{version: <fractal version>, revision: ""}``;
* ``options``: the runtime options we were given, echoed, when they are ours
  (``runtimeoptions.v1.Options``: the runtime config path); otherwise unset;
* ``features``: the OCI runtime features document (runtime-spec ``features.md``) of the runc
  that runs the containers (``runc features``: host mode uses the host's runc and the guest
  image carries the same binary), as an ``Any`` with containerd's type URL for
  ``features.Features`` and the JSON as value -- containerd's typeurl decodes registered Go
  (non-proto) types as JSON.  Left unset when runc cannot tell (as the runc shim does);
* ``annotations``: none.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

RUNTIME_NAME = "io.containerd.fractal.v1"
VERSION = "0.1.0"
#: containerd's typeurl registration of runtime-spec's features.Features (core/runtime/typeurl.go:
#: prefix "types.containerd.io", "opencontainers/runtime-spec", major version, "features").
FEATURES_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/features/Features"
RUNTIME_OPTIONS_TYPE = "runtimeoptions.v1.Options"


def runc_features(runc: str | None = None, timeout: float = 5.0) -> bytes | None:
    """``runc features`` output (JSON bytes), or None if runc is missing or does not know it."""
    binary = runc or shutil.which("runc")
    if not binary:
        return None
    try:
        res = subprocess.run([binary, "features"], stdin=subprocess.DEVNULL, capture_output=True,
                             timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if res.returncode != 0 or not res.stdout.strip().startswith(b"{"):
        return None
    return res.stdout


def runtime_info(options: bytes, features: bytes | None):  # noqa: ANN201
    """The RuntimeInfo message for runtime options ``options`` (serialized Any, maybe empty)."""
    from google.protobuf import any_pb2

    from ccpu.api.gen.containerd.types import introspection_pb2 as pb

    info = pb.RuntimeInfo(name=RUNTIME_NAME, version=pb.RuntimeVersion(version=VERSION))
    if options:
        opts = any_pb2.Any()
        try:
            opts.ParseFromString(options)
        except Exception:  # noqa: BLE001 - garbage options: nothing to echo
            opts = None
        if opts is not None and opts.type_url.rsplit("/", 1)[-1] == RUNTIME_OPTIONS_TYPE:
            info.options.CopyFrom(opts)
    if features:
        info.features.CopyFrom(any_pb2.Any(type_url=FEATURES_TYPE_URL, value=features))
    return info


def run(opts) -> int:  # noqa: ANN001, ARG001 - same signature as the verbs
    try:
        options = sys.stdin.buffer.read()
    except (OSError, ValueError, AttributeError):
        options = b""
    try:
        data = runtime_info(options, runc_features()).SerializeToString()
    except Exception as exc:  # containerd shows stderr in its error
        sys.stderr.write(f"containerd-shim-fractal-v1 -info: {exc}\n")
        return 1
    sys.stdout.buffer.write(data)
    sys.stdout.flush()
    return 0
