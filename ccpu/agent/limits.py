"""What keeps a guest's containers from taking the guest down: a memory reserve, OOM scores and
each container's own writable-layer tmpfs.

Why (issue 18): in a VM every container's writes and memory come out of the one guest's RAM,
which the agent needs too.  So, when the agent runs as the guest's agent (the init passes
``--cgroup-parent``):

* **memory**: every container's cgroup goes below one parent cgroup whose ``memory.max`` is what
  the guest had available when the agent started minus a reserve (``--memory-reserve-mb``) for
  the kernel, the agent and runc.  Containers without a limit of their own can use all of it
  together, never the reserve: when they run out, the kernel's memory-cgroup OOM killer picks
  a victim *inside* the parent (the agent and init are outside it), the victim's cgroup counts
  ``oom_kill`` and the agent reports ``/tasks/oom`` and the exit.  tmpfs pages a container
  writes are charged to its cgroup as well, so full writable layers count against the same
  limit.
* **OOM scores**: init and the agent run at ``oom_score_adj`` -1000 (a global OOM, if one
  happens despite the parent, never picks them).  runc and ``runc init`` inherit that, so a
  container spec without ``process.oomScoreAdj`` gets 0, as on a host where containerd's shim
  runs at 0; runc applies it to the container's init and its execs.
* **writable layers**: each container's upper/work dirs live on a tmpfs of their own, mounted
  by the agent at ``create`` (the ``scratch`` argument, see docs/agent-protocol.md) with the
  size the shim asks for and one inode per KiB of it.  A container that fills it gets ENOSPC from its own filesystem; the
  agent's state (bundles, runc's root) is on another tmpfs the containers cannot write.

Compare kubelet (ephemeral-storage limits, eviction) and kata (the container's rootfs in the
guest, sandbox memory with a reserve for the agent).  Pure parts: :func:`containers_memory_max`,
:func:`guest_cgroups_path`, :func:`adjust_spec`; the I/O is :func:`setup_guest`.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import protocol

log = logging.getLogger(__name__)

MiB = 1 << 20
CGROUP_ROOT = Path("/sys/fs/cgroup")
#: the smallest parent limit worth setting; below that the reserve is too big for this guest
MIN_CONTAINERS_MEMORY = 32 * MiB
#: a container's writable layer: at least a few MiB (copy-ups of /etc), at most 1 TiB
MIN_SCRATCH = 1 * MiB
MAX_SCRATCH = 1 << 40

_SEGMENT = re.compile(r"[A-Za-z0-9_.@-]{1,128}")


def meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo as bytes per key."""
    out = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key.strip()] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return out


def containers_memory_max(info: Mapping[str, int], reserve: int) -> int:
    """The containers' parent ``memory.max``: available memory minus ``reserve``; if the reserve
    would leave less than :data:`MIN_CONTAINERS_MEMORY`, half of what is available (a guest that
    small is misconfigured, but its containers must still run)."""
    available = info.get("MemAvailable", info.get("MemFree", 0))
    limit = available - reserve
    if limit < MIN_CONTAINERS_MEMORY:
        limit = available // 2
    return max(limit, MiB) // 4096 * 4096


def guest_cgroups_path(original: Any, cid: str, parent: str) -> str:
    """The container's ``linux.cgroupsPath`` below ``parent``.

    A cgroupfs path from the host (ctr's ``/<namespace>/<id>``, CRI's ``/kubepods/.../<id>``)
    keeps its shape under the parent; anything else (empty, systemd's ``slice:prefix:name``,
    odd characters) becomes ``<parent>/<id>``."""
    parent = "/" + parent.strip("/")
    if isinstance(original, str) and ":" not in original:
        segments = [s for s in original.split("/") if s]
        if segments and all(_SEGMENT.fullmatch(s) and s not in (".", "..") for s in segments):
            return posixpath.join(parent, *segments)
    return posixpath.join(parent, protocol.validate_id(cid, "container id"))


def adjust_spec(spec: dict[str, Any], cid: str, parent: str) -> None:
    """A guest container's spec: its cgroup below ``parent``, an OOM score of its own."""
    linux = spec.get("linux")
    if not isinstance(linux, dict):
        linux = spec["linux"] = {}
    linux["cgroupsPath"] = guest_cgroups_path(linux.get("cgroupsPath"), cid, parent)
    process = spec.get("process")
    if isinstance(process, dict) and process.get("oomScoreAdj") is None:
        process["oomScoreAdj"] = 0  # not the agent's -1000, which runc would pass on


def setup_guest(parent: str, reserve: int, root: Path = CGROUP_ROOT) -> int:
    """At agent start in a guest: OOM score -1000 for the agent, the containers' parent cgroup
    with its ``memory.max``.  Returns that limit (bytes)."""
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write("-1000")
    with open("/proc/meminfo") as f:
        limit = containers_memory_max(meminfo(f.read()), reserve)
    with open(root / "cgroup.subtree_control", "w") as f:
        f.write("+memory")
    path = root / parent.strip("/")
    os.makedirs(path, exist_ok=True)
    (path / "memory.max").write_text(str(limit))
    log.info("containers' memory: at most %d MiB (cgroup %s), %d MiB reserved for the guest",
             limit // MiB, path, reserve // MiB)
    return limit


def scratch_options(size: int) -> str:
    """tmpfs options of a container's writable layer: ``size`` bytes and one inode per KiB of
    it (an inode costs the kernel about that much memory, so creating empty files cannot use
    more of the guest than the limit allows; 128M gives 131072 files)."""
    return f"size={size},nr_inodes={max(1024, size // 1024)},mode=0755"


def forget_old_stack() -> None:
    """After a live restack in a guest: drop the dentry and inode caches, so the container's
    previous overlay (detached, but alive while a running binary maps a file of it) lets go of
    the upper files it had looked up.  Without this, a file the container deletes through its
    new root keeps its space on the writable layer's tmpfs for as long as the old overlay
    lives -- a full layer would not heal.  Only in a guest (small caches, all ours); on a host
    this would flush everyone's caches."""
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("2")
    except OSError as e:
        log.warning("cannot drop the old overlay's caches: %s", e)


def scratch_arg(args: Mapping[str, Any], layer_roots: list[str]) -> tuple[str, int] | None:
    """The validated ``scratch`` argument of ``create``: (dir, size in bytes) or None."""
    scratch = args.get("scratch")
    if scratch is None:
        return None
    if not isinstance(scratch, Mapping):
        raise protocol.InvalidArgument("scratch must be an object {path, size}")
    path = protocol.resolve_inside(scratch.get("path"), layer_roots, "scratch dir")
    size = protocol.arg_int(scratch, "size")
    if not MIN_SCRATCH <= size <= MAX_SCRATCH:
        raise protocol.InvalidArgument(f"scratch size {size} is outside {MIN_SCRATCH}..{MAX_SCRATCH} bytes")
    return path, size
