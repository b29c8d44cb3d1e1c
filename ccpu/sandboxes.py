"""Where running sandboxes say who they are, for `fractal ps`.

Each shim daemon keeps one small JSON record per sandbox under
$FRACTAL_RUN_DIR/sandboxes/<namespace>/<group>.json (default /run/fractal):
mode, shim and agent pids, the VM if any, its containers.  containerd's API
knows containers and tasks but nothing of shims, agents or VMs, so the CLI
joins the two.  Records are written atomically and removed when the shim
exits; a record whose shim is gone is reported as stale, never trusted.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

DEFAULT_RUN_DIR = "/run/fractal"


def run_dir() -> Path:
    return Path(os.environ.get("FRACTAL_RUN_DIR", DEFAULT_RUN_DIR))


@dataclass
class SandboxRecord:
    group: str
    namespace: str
    mode: str  # "host", "vm" or "remote"
    shim_pid: int
    agent_pid: int | None = None
    containers: list[str] = field(default_factory=list)
    vm: dict[str, object] | None = None  # pid, accel, memory, share type (VM mode)
    address: str = ""  # the shim's ttrpc address (unix://...): `fractal layers` calls it

    @property
    def alive(self) -> bool:
        try:
            os.kill(self.shim_pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def _path(namespace: str, group: str, base: Path | None = None) -> Path:
    # group ids and namespaces come from containerd and are path-safe there, but make sure
    if "/" in group or "/" in namespace or group in ("", ".", "..") or namespace in ("", ".", ".."):
        raise ValueError(f"unsafe sandbox name {namespace!r}/{group!r}")
    return (base or run_dir()) / "sandboxes" / namespace / f"{group}.json"


def write(record: SandboxRecord, base: Path | None = None) -> Path:
    path = _path(record.namespace, record.group, base)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(record), f)
    os.replace(tmp, path)
    return path


def remove(namespace: str, group: str, base: Path | None = None, owner: int | None = None) -> None:
    """Remove the record; with ``owner``, only if it is that shim's (or unreadable): a shim
    leaving after a successor of its group started keeps its hands off the successor's."""
    path = _path(namespace, group, base)
    if owner is not None:
        try:
            if int(json.loads(path.read_text()).get("shim_pid", 0)) != owner:
                return
        except (OSError, ValueError, TypeError, AttributeError):
            pass
    path.unlink(missing_ok=True)


def read_all(namespace: str, base: Path | None = None) -> dict[str, SandboxRecord]:
    d = (base or run_dir()) / "sandboxes" / namespace
    out: dict[str, SandboxRecord] = {}
    if not d.is_dir():
        return out
    for p in sorted(d.glob("*.json")):
        try:
            data = json.loads(p.read_text())
            known = SandboxRecord.__dataclass_fields__  # fields of newer writers are ignored
            rec = SandboxRecord(**{k: v for k, v in data.items() if k in known})
        except (OSError, ValueError, TypeError):
            continue
        out[rec.group] = rec
    return out
