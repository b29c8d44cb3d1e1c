"""A container's OCI spec as the VM guest must see it: host paths out, guest paths in.

Why a pure module: containerd, nerdctl and CRI write specs for a runc on *this* host.  In VM mode
the spec runs on a runc inside the guest, which has none of the host's files, processes or
namespaces.  What each kind of host reference becomes is a policy decision worth testing on its
own, without QEMU; the shim's VM sandbox (shim/vm.py) does the I/O (reading the files it copies).

The rules (kata does much the same; docs/vm.md "Specs in the guest"):

* **bind mounts of regular files** (CRI's and nerdctl's ``/etc/hosts``, ``/etc/resolv.conf``,
  ``/etc/hostname``, ``/dev/termination-log``): copied into the guest at create time
  (``<files root>/files/<n>-<name>``; the shim passes the container's own scratch tmpfs, so a
  container appending to its /etc/hosts fills its own writable layer, not the agent's state),
  the mount's source rewritten.  A copy, not a share: later
  changes on the host are not seen (the same as kata without a shared fs).  Limited to
  :data:`MAX_FILE` bytes each, :data:`MAX_TOTAL` in all (the agent protocol's 1 MiB frames).
* **bind mounts of a directory onto /dev/shm** (CRI's per-pod shm): a guest directory per host
  source (``/run/fractal/containers/@shm/<hash>``, on guest tmpfs), so every container of the pod
  that binds the same host shm dir shares one guest dir -- the pod's shared memory, in the VM.
* **bind mounts of other host directories** (volumes: kubelet's emptyDir, configMap, secret,
  hostPath; ``ctr --mount``, ``nerdctl -v``) and of files too big to copy: :class:`Volume` entries --
  the shim bind-mounts each source under the sandbox's volume dir, which the guest sees over a
  9p share at :data:`GUEST_VOLUMES` (9p: QEMU resolves paths on the host, so binds made after
  boot are visible at once); read-only volumes are read-only on the host side too.  Shared, not
  copied: writes go both ways.
* **bind mounts of anything else** (device nodes, sockets) or of missing paths: refused
  (:class:`NotInVm`) -- the guest cannot use them.
* **a network namespace given by a host path** (CRI's ``/var/run/netns/cni-...``): dropped, so the
  container runs in the guest's own network namespace, which *is* the pod's network (the VM's
  NIC is connected to that netns, ccpu/vm/net.py); the spec's ``net.*`` sysctls (CRI's
  ``net.ipv4.ip_unprivileged_port_start``) go with it, set by the agent in the guest's network
  namespace.  A network namespace without a path (a new,
  empty one, e.g. nerdctl ``--network none``) stays -- unless nerdctl names CNI networks for
  the container (``--network bridge``, annotation ``nerdctl/networks``): then it is dropped too,
  and ``cni_networks`` tells the shim to make a netns for nerdctl's OCI hook (which sets the
  networks up in it) and to plug a NIC mirroring it into the guest (shim/vm.py).
* **namespaces given by ``/proc/<pid>/ns/<type>``** (any type): kept -- the pids
  the shim reports for VM containers are guest pids, so CRI's "join the pause container's
  ipc/uts/pid namespace" paths are right inside the guest; any other path is refused.
* **hooks**: removed from the guest spec (their binaries are on the host).  ``createRuntime``,
  ``prestart``, ``poststart`` and ``poststop`` hooks are returned to be run *on the host* by the
  shim, as kata does (nerdctl's bookkeeping hook is one); ``createContainer``/``startContainer``
  hooks must run inside the container's namespaces, which are in the guest: refused.
"""

from __future__ import annotations

import copy
import hashlib
import posixpath
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

#: spec mount types the guest makes itself (no host path involved)
GUEST_FS_TYPES = frozenset({"proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup", "cgroup2",
                            "shm", "bpf", "securityfs", "debugfs", "tracefs", "hugetlbfs"})
GUEST_SHM_ROOT = "/run/fractal/containers/@shm"
GUEST_VOLUMES = "/run/fractal/volumes"
MAX_FILE = 256 * 1024
MAX_TOTAL = 512 * 1024
HOST_HOOKS = ("prestart", "createRuntime", "poststart", "poststop")
GUEST_ONLY_HOOKS = ("createContainer", "startContainer")
_PROC_NS = re.compile(r"/proc/[0-9]+/ns/[a-z_]+")

#: what the caller's stat says a host path is
FILE, DIR, MISSING, OTHER = "file", "dir", "missing", "other"


class NotInVm(ValueError):
    """Something the guest cannot see (FailedPrecondition for containerd)."""


@dataclass(frozen=True)
class FileCopy:
    host_path: str
    guest_path: str


@dataclass(frozen=True)
class Volume:
    """A host path the guest gets through the sandbox's volume share, as ``GUEST_VOLUMES/name``."""

    host_path: str
    name: str  # "<container id>/<n>"
    is_dir: bool
    readonly: bool
    recursive: bool


@dataclass
class GuestSpec:
    spec: dict[str, Any]
    copies: list[FileCopy] = field(default_factory=list)
    volumes: list[Volume] = field(default_factory=list)
    shm_dirs: list[str] = field(default_factory=list)
    host_hooks: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    sysctls: dict[str, str] = field(default_factory=dict)  # net.* of the pod netns, for the guest
    cni_networks: list[str] = field(default_factory=list)  # nerdctl's CNI networks (shim/vm.py plugs a NIC)
    notes: list[str] = field(default_factory=list)


def is_bind(m: Mapping[str, Any]) -> bool:
    mtype = str(m.get("type") or "")
    opts = [str(o) for o in m.get("options") or []]
    return mtype == "bind" or "bind" in opts or "rbind" in opts or (mtype != "" and mtype not in GUEST_FS_TYPES)


def _shm_dir(source: str) -> str:
    key = hashlib.sha256(posixpath.normpath(source).encode()).hexdigest()[:24]
    return posixpath.join(GUEST_SHM_ROOT, key)


def _file_name(i: int, source: str) -> str:
    base = re.sub(r"[^A-Za-z0-9_.-]", "_", posixpath.basename(source.rstrip("/")))[:40] or "file"
    return f"{i}-{base}"


def translate(spec: Mapping[str, Any], cid: str, files_root: str,
              kind_of: Callable[[str], tuple[str, int]]) -> GuestSpec:
    """The guest's spec for ``spec``.  ``kind_of(host_path)`` -> (FILE|DIR|MISSING|OTHER, size)
    is the only I/O, done by the caller.  Raises :class:`NotInVm` listing *every* problem."""
    out = copy.deepcopy(dict(spec))
    result = GuestSpec(spec=out)
    problems: list[str] = []

    mounts = []
    total = 0
    for m in out.get("mounts") or []:
        if not isinstance(m, dict) or not is_bind(m):
            mounts.append(m)
            continue
        source, dest = str(m.get("source") or ""), str(m.get("destination") or "")
        kind, size = kind_of(source) if posixpath.isabs(source) else (MISSING, 0)
        if kind == FILE and size <= MAX_FILE and total + size <= MAX_TOTAL:
            total += size
            guest = posixpath.join(files_root, "files", _file_name(len(result.copies), source))
            result.copies.append(FileCopy(source, guest))
            mounts.append({**m, "source": guest})
        elif kind == DIR and posixpath.normpath(dest) == "/dev/shm":
            guest = _shm_dir(source)
            if guest not in result.shm_dirs:
                result.shm_dirs.append(guest)
            mounts.append({**m, "source": guest})
            result.notes.append(f"/dev/shm of {source} is a guest tmpfs dir shared by the pod")
        elif kind in (FILE, DIR):
            opts = [str(o) for o in m.get("options") or []]
            vol = Volume(source, f"{cid}/{len(result.volumes)}", kind == DIR, "ro" in opts, "rbind" in opts)
            result.volumes.append(vol)
            mounts.append({**m, "source": posixpath.join(GUEST_VOLUMES, vol.name)})
        else:
            what = {MISSING: "missing host path"}.get(kind, "host path (not a file or directory)")
            problems.append(f"{dest}: bind of {what} {source}")
    if "mounts" in out:
        out["mounts"] = mounts

    linux = out.get("linux")
    if isinstance(linux, dict) and isinstance(linux.get("namespaces"), list):
        kept = []
        for ns in linux["namespaces"]:
            path = str(ns.get("path") or "") if isinstance(ns, dict) else ""
            if not path:
                kept.append(ns)
            elif _PROC_NS.fullmatch(posixpath.normpath(path)):
                kept.append(ns)  # a guest pid (the shim reports guest pids in VM mode)
            elif ns.get("type") == "network":
                result.notes.append(f"network namespace {path}: the guest's (the VM is attached to it)")
                _move_net_sysctls(linux, result.sysctls)
            else:
                problems.append(f"{ns.get('type')} namespace {path} (a host namespace)")
        linux["namespaces"] = kept

    hooks = out.pop("hooks", None)
    if isinstance(hooks, dict):
        for name, entries in hooks.items():
            if not entries:
                continue
            if name in HOST_HOOKS:
                result.host_hooks[name] = [dict(h) for h in entries if isinstance(h, Mapping)]
            else:
                problems.append(f"{name} hooks ({len(entries)}) must run in the container's "
                                "namespaces, which are in the guest, where their binaries are not")
    networks = nerdctl_cni_networks(out)
    if networks:
        # nerdctl's createRuntime hook puts the CNI interfaces into a netns the shim makes; the
        # shim then plugs a NIC mirroring them into the guest: the container uses the guest's
        # own netns, like a CRI pod's containers
        result.cni_networks = networks
        if isinstance(linux, dict) and isinstance(linux.get("namespaces"), list):
            linux["namespaces"] = [ns for ns in linux["namespaces"]
                                   if not (isinstance(ns, dict) and ns.get("type") == "network")]
            _move_net_sysctls(linux, result.sysctls)
        result.notes.append(f"nerdctl network(s) {', '.join(networks)}: the guest's netns, with a NIC "
                            "plugged for them after the OCI hook")
    if problems:
        raise NotInVm(f"container {cid} cannot run in a VM: " + "; ".join(problems)
                      + " (use io.fractal.mode=host for it)")
    return result


def _move_net_sysctls(linux: dict[str, Any], into: dict[str, str]) -> None:
    """runc refuses net.* sysctls without a netns of the container's own: they belong to the
    pod's (or nerdctl network's) netns, which is the guest's -- the agent sets them there."""
    sysctl = linux.get("sysctl")
    if isinstance(sysctl, dict):
        for key in [k for k in sysctl if str(k).startswith("net.")]:
            into[str(key)] = str(sysctl.pop(key))


def nerdctl_cni_networks(spec: Mapping[str, Any]) -> list[str]:
    """nerdctl's CNI networks (annotation ``nerdctl/networks``) other than none/host/container:."""
    from ccpu.agent import jsonbound

    raw = (spec.get("annotations") or {}).get("nerdctl/networks")
    try:
        names = jsonbound.loads(raw) if raw else []
    except ValueError:
        return []
    if not isinstance(names, list):  # an annotation: any JSON may come
        return []
    return [str(n) for n in names if isinstance(n, str)
            and n.split(":", 1)[0] not in ("none", "host", "container", "ns")]


def network_namespace(spec: Mapping[str, Any]) -> str | None:
    """The path of the spec's network namespace, if it joins one (CRI's pod netns)."""
    linux = spec.get("linux") if isinstance(spec, Mapping) else None
    for ns in (linux or {}).get("namespaces") or []:
        if isinstance(ns, Mapping) and ns.get("type") == "network" and ns.get("path") \
                and not _PROC_NS.fullmatch(posixpath.normpath(str(ns["path"]))):
            return str(ns["path"])
    return None
