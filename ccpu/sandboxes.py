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

TYPE_CHECKING = False  # `fractal layers add` finds its shim here: dataclasses, pathlib and
if TYPE_CHECKING:      # tempfile cost it ~30 ms of imports (issue 13); they load when written
    from pathlib import Path

DEFAULT_RUN_DIR = "/run/fractal"


def run_dir() -> Path:
    from pathlib import Path

    return Path(_run_dir())


def _run_dir() -> str:
    return os.environ.get("FRACTAL_RUN_DIR", DEFAULT_RUN_DIR)


class SandboxRecord:
    """One sandbox's record.  A plain class, not a dataclass (see the imports above); the
    fields are :attr:`FIELDS`, in the order of the constructor's positional arguments."""

    FIELDS = ("group", "namespace", "mode", "shim_pid", "agent_pid", "containers", "vm", "address")
    __slots__ = FIELDS

    def __init__(self, group: str, namespace: str, mode: str, shim_pid: int,
                 agent_pid: int | None = None, containers: list[str] | None = None,
                 vm: dict[str, object] | None = None, address: str = "") -> None:
        self.group = group
        self.namespace = namespace
        self.mode = mode  # "host", "vm" or "remote"
        self.shim_pid = shim_pid
        self.agent_pid = agent_pid
        self.containers: list[str] = [] if containers is None else containers
        self.vm = vm  # pid, accel, memory, share type (VM mode)
        self.address = address  # the shim's ttrpc address (unix://...): `fractal layers` calls it

    def as_dict(self) -> dict[str, object]:
        return {k: getattr(self, k) for k in self.FIELDS}

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self.as_dict() == other.as_dict()  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        return "SandboxRecord(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in self.FIELDS) + ")"

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
    from pathlib import Path

    # group ids and namespaces come from containerd and are path-safe there, but make sure
    if "/" in group or "/" in namespace or group in ("", ".", "..") or namespace in ("", ".", ".."):
        raise ValueError(f"unsafe sandbox name {namespace!r}/{group!r}")
    return Path(base or _run_dir()) / "sandboxes" / namespace / f"{group}.json"


def write(record: SandboxRecord, base: Path | None = None) -> Path:
    import tempfile

    path = _path(record.namespace, record.group, base)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        json.dump(record.as_dict(), f)
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
    """Every record of ``namespace`` (by group); unreadable ones are skipped.  os only: the
    CLI's ``layers add`` reads these on its way to the shim."""
    d = os.path.join(os.fspath(base or _run_dir()), "sandboxes", namespace)
    out: dict[str, SandboxRecord] = {}
    try:
        names = sorted(n for n in os.listdir(d) if n.endswith(".json"))
    except OSError:  # no sandbox yet (or not ours to read)
        return out
    known = set(SandboxRecord.FIELDS)  # fields of newer writers are ignored
    for name in names:
        try:
            with open(os.path.join(d, name), encoding="utf-8") as f:
                data = json.load(f)
            rec = SandboxRecord(**{k: v for k, v in data.items() if k in known})
        except (OSError, ValueError, TypeError, AttributeError):
            continue
        out[rec.group] = rec
    return out
