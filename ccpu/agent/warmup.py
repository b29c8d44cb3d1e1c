"""A throw-away container life cycle in a pooled guest, before the pool offers it (agent op ``warm``).

Why: under TCG a fresh guest's first ``runc create`` / ``runc init`` / start / ``runc delete``
costs ~0.5 s more than the Nth (docs/performance.md, "The pool"): QEMU translates runc's and the
kernel's container paths (nsexec, the namespaces, cgroup creation, the overlay and proc/sysfs
mounts, pivot_root, the exec fifo, cgroup removal) once per QEMU and keeps the code; the guest's
page cache fills with runc's pages and the agent's own create/start/wait/delete code faults in
its pages from the system image.  ``runc --version`` (Runc.warm) covers only Go's start.  So the
warm-up runs a real container through the Supervisor's own create / start / wait / delete --
the same code a sandbox's first container runs -- before any sandbox exists in the guest.

Why it is safe (pooled VMs never carry state from one sandbox to the next):

* its inputs are the guest's own: the rootfs is an overlay whose only lower is the guest's
  ``/bin`` (busybox; read-only to the overlay), its upper/work on a tmpfs of its own, the bundle
  and spec made here in a private ``mkdtemp`` dir; nothing from the host, no share, no network
  (a new, empty network namespace), no sandbox data, no client argument;
* it runs in a Supervisor of its own (its exit event goes nowhere, it is never in the agent's
  container table: a client never sees it), with the agent's runc root, reaper and cgroup parent
  -- the same paths a sandbox's containers take;
* afterwards everything is removed and checked gone: runc's state dir, the container's cgroup,
  every mount under the private dir (rootfs overlay, scratch tmpfs), the dir itself.  Anything
  still there is reported in ``left``; the pool then discards the guest (shim/poold.py) rather
  than offer a guest that holds anything.  What stays is page cache and TCG's translated code,
  which every sandbox's first container would make the same way.

Bounded: the whole life cycle has :data:`WARM_CONTAINER_TIMEOUT`; a failure (or the timeout) is
reported (``ok: false`` and the error), the clean-up still runs, and a guest left clean is still
offered -- it is exactly a fresh guest, only not warmed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from typing import Any

from ..linux import mountinfo
from ..linux.mount import MNT_DETACH, umount
from . import limits
from .container import Supervisor

log = logging.getLogger(__name__)

#: seconds the whole throw-away life cycle may take (under TCG it takes ~1-2 s)
WARM_CONTAINER_TIMEOUT = 60.0
#: the dir whose content is the container's read-only lower layer: the guest's busybox
WARM_LOWER = "/bin"
#: the container's process: busybox's ``true``, at the rootfs's root (the lower is /bin)
WARM_ARGS = ("/busybox", "true")
#: where the private dir is made (a tmpfs in the guest: ccpu/guest/init.sh)
WARM_BASE = "/run"
#: the container's writable-layer tmpfs
WARM_SCRATCH_SIZE = 16 << 20

_CAPS = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
         "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
         "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE"]


def warm_spec() -> dict[str, Any]:
    """The warm-up container's OCI spec: the shape of containerd's default one (``ctr run``:
    pid/ipc/uts/mount/network namespaces, proc, /dev, devpts, shm, mqueue, sysfs, cgroup, the
    masked and read-only paths), so runc takes the paths a sandbox's container takes."""
    nosuid = ["nosuid", "noexec", "nodev"]
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False, "user": {"uid": 0, "gid": 0}, "args": list(WARM_ARGS),
            "env": ["PATH=/"], "cwd": "/",
            "capabilities": {k: list(_CAPS) for k in ("bounding", "effective", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs"},
        "hostname": "fractal-warm",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc", "options": nosuid},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": nosuid + ["mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": nosuid},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": nosuid + ["ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
             "options": nosuid + ["relatime", "ro"]},
        ],
        "linux": {
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network")],
            "maskedPaths": ["/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                            "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
                            "/sys/firmware"],
            "readonlyPaths": ["/proc/asound", "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                              "/proc/sysrq-trigger"],
        },
    }


def create_args(cid: str, base: str) -> dict[str, Any]:
    """The ``create`` arguments of the warm-up container in the private dir ``base``: the shape
    a VM sandbox's create has (shim/vm.py placement: inline spec, a ``layers`` rootfs whose
    upper/work are on the container's ``scratch`` tmpfs), stdio to /dev/null."""
    scratch = os.path.join(base, "scratch")
    return {
        "container": cid, "bundle": os.path.join(base, "bundle"), "spec": warm_spec(),
        "rootfs": {"kind": "layers", "lowers": [WARM_LOWER],
                   "upper": os.path.join(scratch, "upper"), "work": os.path.join(scratch, "work")},
        "scratch": {"path": scratch, "size": WARM_SCRATCH_SIZE},
        "stdin": 0, "stdout": 0, "stderr": 0, "terminal": False,
    }


def mounts_below(base: str, mounts: Iterable[mountinfo.MountInfo]) -> list[str]:
    """Mount points at or below ``base``, deepest (last mounted) first: the order to undo them."""
    root = os.path.normpath(base)
    found = [m.mountpoint for m in mounts if m.mountpoint == root or m.mountpoint.startswith(root + "/")]
    return list(reversed(found))


class _NoEvents:
    """The warm-up container's events outlet: its exit goes nowhere (no client knows it)."""

    async def data(self, channel: int, data: bytes) -> None:
        return None

    def close(self, channel: int) -> None:
        return None

    def event(self, message: dict[str, Any]) -> None:
        return None


def leftovers(cid: str, base: str, runc_root: str, cgroup: str | None) -> list[str]:
    """What of the warm-up container is still there (empty: nothing)."""
    left = []
    if os.path.lexists(os.path.join(runc_root, cid)):
        left.append(f"runc state {os.path.join(runc_root, cid)}")
    if cgroup is not None and os.path.exists(cgroup):
        left.append(f"cgroup {cgroup}")
    try:
        left += [f"mount {m}" for m in mounts_below(base, mountinfo.read())]
    except OSError as e:
        left.append(f"mounts unknown: {e}")
    if os.path.lexists(base):
        left.append(f"dir {base}")
    return left


async def container_life_cycle(sup: Supervisor, timeout: float = WARM_CONTAINER_TIMEOUT) -> dict[str, Any]:
    """Create, start, wait for and delete one throw-away container (module docstring); then
    remove and check everything it had.  Never raises for the container's own failure: the
    result says ``ok`` (the life cycle ran and the container exited 0), ``error`` and ``left``."""
    t0 = time.monotonic()
    if not os.path.isfile(os.path.join(WARM_LOWER, WARM_ARGS[0].lstrip("/"))):
        return {"ok": False, "skipped": f"no {WARM_LOWER}{WARM_ARGS[0]} to run", "left": []}
    cid = f"fractal-warm-{os.urandom(6).hex()}"
    base = tempfile.mkdtemp(prefix="fractal-warm-", dir=WARM_BASE)
    cgroup = None
    if sup.cgroup_parent:
        cgroup = str(limits.CGROUP_ROOT) + limits.guest_cgroups_path(None, cid, sup.cgroup_parent)
    own = Supervisor(sup.runc, sup.reaper, _NoEvents(), [base], [base, os.path.dirname(WARM_LOWER)],
                     sup.drain_timeout, cgroup_parent=sup.cgroup_parent)
    result: dict[str, Any] = {"container": cid}
    timed_out = False
    try:
        status = await asyncio.wait_for(_run(own, cid, base), timeout)
        result.update(ok=status == 0, status=status)
    except asyncio.CancelledError:
        await _clean(own, cid, base, cgroup)
        raise
    except asyncio.TimeoutError:
        # the runc call that was cancelled is not killed (Runc never kills on cancel): it may
        # still make state after the clean-up below, which `leftovers` cannot see coming
        timed_out = True
        result.update(ok=False, error=f"timed out after {timeout:.0f} s")
    except Exception as e:  # noqa: BLE001 - reported; the guest is cleaned and judged by `left`
        log.warning("warm-up container %s failed: %s", cid, e)
        result.update(ok=False, error=f"{type(e).__name__}: {e}"[:500])
    await _clean(own, cid, base, cgroup)
    result["left"] = leftovers(cid, base, sup.runc.root, cgroup)
    if timed_out:
        result["left"].append("timed out: a runc call may still be running")
    if result["left"]:
        log.error("warm-up container %s left %s", cid, "; ".join(result["left"]))
    result["seconds"] = round(time.monotonic() - t0, 3)
    return result


async def _run(sup: Supervisor, cid: str, base: str) -> int:
    """The life cycle as a sandbox's shim drives it: create, start, the exit, delete."""
    await sup.create(create_args(cid, base))
    await sup.start({"container": cid})
    init = sup.containers[cid].init
    await init.reported.wait()  # the exit was seen (and "reported" to nobody)
    out = await sup.delete({"container": cid})
    # the background `runc delete` (cgroup, state dir) done: waited for within the life cycle's
    # own bound, not settle's 3 s -- under TCG on a loaded machine it can take longer, and a
    # state dir still there would count as left (the guest discarded)
    await sup.settle(WARM_CONTAINER_TIMEOUT)
    return int(out.get("exit_status", -1))


async def _clean(sup: Supervisor, cid: str, base: str, cgroup: str | None) -> None:
    """Whatever is left after a failure (or after success, nothing): the container killed and
    deleted by runc, the mounts below ``base`` detached, ``base`` and the cgroup removed."""
    if cid in sup.containers or os.path.lexists(os.path.join(sup.runc.root, cid)):
        with contextlib.suppress(Exception):
            await sup.runc.delete(cid, force=True)
    sup.containers.pop(cid, None)
    with contextlib.suppress(OSError):
        for target in mounts_below(base, mountinfo.read()):
            with contextlib.suppress(OSError):
                umount(target, MNT_DETACH)
    if not any(m for m in _safe_mounts_below(base)):  # never delete through a mount
        shutil.rmtree(base, ignore_errors=True)
    if cgroup is not None:
        with contextlib.suppress(OSError):
            os.rmdir(cgroup)


def _safe_mounts_below(base: str) -> list[str]:
    try:
        return mounts_below(base, mountinfo.read())
    except OSError:
        return [base]
