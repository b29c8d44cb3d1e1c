"""OOM kills of containers, noticed without an extra process per container.

containerd reports `/tasks/oom` when the kernel's OOM killer strikes inside a
container's memory cgroup (runc's shim watches the cgroup the same way).
Stdlib only, so it works in the guest as well as on the host:

- cgroup v1 (this host's memory controller): an eventfd registered on the
  cgroup's `memory.oom_control` through `cgroup.event_control`; the kernel
  signals it on every OOM in that cgroup.  The fd sits in the event loop.
- cgroup v2 (the guest): `memory.events` counts `oom_kill`; it is read when the
  init process exits (an OOM kill ends the container's init with SIGKILL), and
  an increase since the watch began is reported before the exit.

The cgroup is found from /proc/<pid>/cgroup of the container's init, so no
assumption about runc's cgroup layout is needed.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")


def memory_cgroup(pid: int, root: Path = CGROUP_ROOT) -> tuple[str, Path] | None:
    """('v1'|'v2', directory) of the memory cgroup of `pid`, or None if there is none."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    unified: str | None = None
    for line in lines:
        hier, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if "memory" in controllers.split(","):
            d = root / "memory" / path.lstrip("/")
            if (d / "memory.oom_control").exists():
                return "v1", d
        if hier == "0" and controllers == "":
            unified = path
    if unified is not None:
        for base in (root, root / "unified"):
            d = base / unified.lstrip("/")
            if (d / "memory.events").exists():
                return "v2", d
    return None


def oom_kills(events_file: Path) -> int:
    try:
        for line in events_file.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


@dataclass
class _Watch:
    kind: str
    path: Path
    efd: int | None = None
    baseline: int = 0


class OomWatcher:
    """One per agent; `on_oom(container)` is called on the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_oom: Callable[[str], None]) -> None:
        self._loop = loop
        self._on_oom = on_oom
        self._watches: dict[str, _Watch] = {}

    def watch(self, container: str, pid: int) -> bool:
        """Start watching the memory cgroup of `pid`; False if it has none we can watch."""
        self.unwatch(container)
        found = memory_cgroup(pid)
        if found is None:
            return False
        kind, path = found
        w = _Watch(kind, path)
        if kind == "v1":
            try:
                efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                ofd = os.open(path / "memory.oom_control", os.O_RDONLY | os.O_CLOEXEC)
                try:
                    with open(path / "cgroup.event_control", "w") as ctl:
                        ctl.write(f"{efd} {ofd}")
                finally:
                    os.close(ofd)  # the kernel holds its own reference once registered
            except OSError as e:
                log.warning("cannot watch %s for OOM: %s", path, e)
                return False
            w.efd = efd
            self._loop.add_reader(efd, self._fired, container)
        else:
            w.baseline = oom_kills(path / "memory.events")
        self._watches[container] = w
        return True

    def _fired(self, container: str) -> None:
        w = self._watches.get(container)
        if w is None or w.efd is None:
            return
        try:
            os.eventfd_read(w.efd)
        except BlockingIOError:
            return
        except OSError:  # the cgroup went away: the eventfd reports it once
            self.unwatch(container)
            return
        if (w.path / "memory.oom_control").exists():
            self._on_oom(container)
        else:
            self.unwatch(container)

    def check_exit(self, container: str) -> None:
        """Called when the init exited: report a v2 OOM kill that ended it."""
        w = self._watches.get(container)
        if w is not None and w.kind == "v2":
            now = oom_kills(w.path / "memory.events")
            if now > w.baseline:
                w.baseline = now
                self._on_oom(container)

    def unwatch(self, container: str) -> None:
        w = self._watches.pop(container, None)
        if w is not None and w.efd is not None:
            self._loop.remove_reader(w.efd)
            os.close(w.efd)

    def close(self) -> None:
        for c in list(self._watches):
            self.unwatch(c)
