"""What fractal needs in containerd's main config, per containerd version (pure).

containerd 1.6, 1.7 and 2.x differ in exactly the places fractal touches (docs/install.md,
docs/cri.md; read from containerd's source, checked with ``containerd config dump``):

* **The CRI runtime handler** ``fractal`` (``runtime_type = "io.containerd.fractal.v1"``,
  ``pod_annotations = ["io.fractal.*"]``): ``[plugins."io.containerd.grpc.v1.cri".containerd.
  runtimes.fractal]`` in config version 2 (1.6, 1.7), ``[plugins."io.containerd.cri.v1.runtime".
  containerd.runtimes.fractal]`` in version 3 (2.x).
* **The CRI snapshotter.**  1.7 and 2.x have a per-runtime ``snapshotter`` (the handler's pods
  use fractal, every other pod keeps its own).  1.6 has none (its ``Runtime`` struct has no such
  field): only the global ``containerd.snapshotter`` exists, so install sets *that*, and then
  every CRI pod on the node, runc pods too, gets its rootfs from fractal's snapshotter.  Without
  it the default VM-mode pod fails ("its mounts are not fractal repo layers").  Chosen over
  refusing because a 1.6 node that installs fractal for Kubernetes wants fractal pods to work;
  install prints the consequence, and the runc pods keep working (their images are unpacked
  into fractal's repo instead of overlayfs).
* **The transfer service's unpack platforms** (2.x only): 2.x's ``ctr image pull`` goes through
  the transfer service, which refuses a snapshotter without an ``unpack_config`` entry ("no
  unpack platforms defined").  ``unpack_config`` replaces containerd's default list
  (plugins/transfer: ``if config.UnpackConfiguration == nil { defaultUnpackConfig() }``), so
  when the user had none, install writes containerd's default entry (overlayfs, differ
  walking) again next to fractal's, and plain ``ctr image pull`` keeps working.
"""

from __future__ import annotations

import platform as _platform
from dataclasses import dataclass

from .containerd_toml import Path_, Setting

FRACTAL_RUNTIME_TYPE = "io.containerd.fractal.v1"
#: pod annotations CRI passes through to the shim (docs/config.md, docs/cri.md)
POD_ANNOTATIONS = ("io.fractal.*",)
CRI_V1 = "io.containerd.grpc.v1.cri"  # config version 2: containerd 1.6, 1.7
CRI_RUNTIME_V2 = "io.containerd.cri.v1.runtime"  # config version 3: containerd 2.x
CRI_IMAGES_V2 = "io.containerd.cri.v1.images"
TRANSFER = "io.containerd.transfer.v1.local"
#: containerd's own default unpack entry on Linux (defaults.DefaultSnapshotter / DefaultDiffer)
DEFAULT_UNPACK_SNAPSHOTTER = "overlayfs"
DEFAULT_UNPACK_DIFFER = "walking"

_GOARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64/v8", "arm64": "arm64/v8",
           "armv7l": "arm/v7", "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}


def default_platform(machine: str | None = None) -> str:
    """``platforms.Format(platforms.DefaultSpec())`` with OS linux, as containerd computes it."""
    m = machine or _platform.machine()
    return f"linux/{_GOARCH.get(m, m)}"


@dataclass(frozen=True)
class Target:
    """The containerd being wired and the config version of the file being edited."""

    version: tuple[int, int]  # (major, minor) of the containerd binary
    file_version: int  # the main config's `version` (2 or 3; 4 = 2.4's, same plugin tables)

    @property
    def label(self) -> str:
        return f"containerd {self.version[0]}.{self.version[1]} (config version {self.file_version})"

    @property
    def per_runtime_snapshotter(self) -> bool:
        return self.version >= (1, 7)

    @property
    def unpack_config(self) -> bool:
        return self.version[0] >= 2

    @property
    def cri_runtime_plugin(self) -> str:
        return CRI_RUNTIME_V2 if self.file_version >= 3 else CRI_V1

    def handler_table(self, handler: str) -> Path_:
        return ("plugins", self.cri_runtime_plugin, "containerd", "runtimes", handler)

    @property
    def global_snapshotter_table(self) -> Path_:
        """Where CRI's node-wide snapshotter is (1.x: ``containerd.snapshotter``; 2.x: images)."""
        if self.file_version >= 3:
            return ("plugins", CRI_IMAGES_V2)
        return ("plugins", CRI_V1, "containerd")


def config_version_for(version: tuple[int, int]) -> int:
    return 3 if version[0] >= 2 else 2


def handler_items(t: Target, snapshotter: str) -> dict[str, object]:
    items: dict[str, object] = {"runtime_type": FRACTAL_RUNTIME_TYPE}
    if t.per_runtime_snapshotter:
        items["snapshotter"] = snapshotter
    # CRI copies only the pod annotations listed here into the sandbox's and containers' OCI
    # specs: without it io.fractal.* annotations of a Kubernetes pod never reach the shim
    items["pod_annotations"] = list(POD_ANNOTATIONS)
    return items


def global_snapshotter(t: Target, snapshotter: str) -> Setting | None:
    """1.6 only: the node-wide CRI snapshotter (the consequence: :data:`GLOBAL_NOTE`)."""
    return None if t.per_runtime_snapshotter else Setting(t.global_snapshotter_table, "snapshotter", snapshotter)


GLOBAL_NOTE = ("containerd 1.6 has no per-runtime snapshotter: CRI's node-wide snapshotter is now "
               "'{snap}', so every Kubernetes pod on this node (runc pods too) gets its rootfs from "
               "fractal's snapshotter and its images unpacked into fractal's repo; containerd 1.7+ "
               "limits this to the '{handler}' handler")


def unpack_entries(t: Target, existing: object, snapshotter: str, platform: str) -> list[dict[str, str]]:
    """The ``unpack_config`` entries to add (2.x): none if one for ``snapshotter`` exists."""
    if not t.unpack_config:
        return []
    if isinstance(existing, list) and any(isinstance(e, dict) and e.get("snapshotter") == snapshotter
                                          for e in existing):
        return []
    out = []
    if existing is None:  # containerd's default entry, which any unpack_config replaces
        out.append({"platform": platform, "snapshotter": DEFAULT_UNPACK_SNAPSHOTTER,
                    "differ": DEFAULT_UNPACK_DIFFER})
    out.append({"platform": platform, "snapshotter": snapshotter})
    return out


def effective_cri_snapshotter(dump: dict, handler: str) -> tuple[str | None, str]:
    """(the snapshotter CRI uses for ``handler``'s pods, where that came from) in a
    ``containerd config dump`` (1.6's per-runtime key does not exist, so the global one wins)."""
    plugins = dump.get("plugins", {}) if isinstance(dump.get("plugins"), dict) else {}
    if CRI_RUNTIME_V2 in plugins:
        rt = (plugins[CRI_RUNTIME_V2].get("containerd", {}).get("runtimes", {}).get(handler) or {})
        glob = plugins.get(CRI_IMAGES_V2, {}).get("snapshotter")
        where = "images plugin snapshotter"
    else:
        cri = plugins.get(CRI_V1, {}).get("containerd", {})
        rt = cri.get("runtimes", {}).get(handler) or {}
        glob = cri.get("snapshotter")
        where = "global containerd.snapshotter"
    if rt.get("snapshotter"):
        return rt["snapshotter"], f"runtimes.{handler}.snapshotter"
    return glob, where
