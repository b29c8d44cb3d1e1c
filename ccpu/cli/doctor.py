"""`fractal doctor`: is this host ready for fractal, and what to do about each miss.

Two halves: :func:`gather` probes the host and containerd into a :class:`Facts` (impure, each
probe catches its own errors), :func:`evaluate` turns Facts into checks (pure, unit-tested with
fake Facts).  Each check is ok / warn / fail with a one-line fix; the exit code is 1 when any
check fails.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..defaults import DEFAULT_ROOT, DEFAULT_SNAPSHOTTER_ADDRESS, SNAPSHOTTER_NAME
from .common import add_containerd_flags, add_json_flag
from .install import SHIM_BINARY, containerd_version, parse_containerd_version
from .wiring import (CRI_RUNTIME_V2, CRI_V1, FRACTAL_RUNTIME_TYPE, POD_ANNOTATIONS, TRANSFER,
                     effective_cri_snapshotter)

SNAPSHOT_PLUGIN_TYPE = "io.containerd.snapshotter.v1"
OK, WARN, FAIL = "ok", "warn", "fail"


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail
    detail: str
    fix: str = ""


@dataclass
class Facts:
    """Everything evaluate() needs; gather() fills it from the host."""

    address: str
    snapshotter_address: str
    root: str
    containerd_bin: str | None = None  # path of `containerd` on PATH
    containerd_bin_version: str = ""  # its --version line, or why none
    daemon_version: str | None = None  # containerd's Version API
    daemon_error: str | None = None  # why the socket did not answer
    plugin: dict | None = None  # {"type","id","init_err"} of the fractal snapshot plugin, if listed
    snapshotter_error: str | None = None  # None: the snapshotter socket accepted a connection
    runc: str | None = None
    runc_version: str = ""
    shim_path: str | None = None  # where the shim is found on containerd's PATH
    shim_search_path: str = ""
    shim_path_source: str = ""  # "containerd pid N" or "this shell"
    shim_interpreter: str = ""  # the shim's #! line (a shell there = a wrapper such as pyenv's)
    qemu: str | None = None
    accel: str = ""
    accel_reason: str = ""
    filesystems: list[str] = field(default_factory=list)
    virtiofsd: str | None = None
    guest: dict | None = None  # {"initramfs","sha256","kernel"}
    root_writable: bool = False
    root_exists: bool = False
    cgroup2: bool = False
    cgroup_controllers: list[str] = field(default_factory=list)
    tun: bool = False  # /dev/net/tun (VM pods: the tap in the pod netns)
    net_tools: list[str] = field(default_factory=list)  # of "ip", "tc": the ones found
    handler: str = "fractal"  # the CRI runtime handler to check
    config_dump: dict | None = None  # `containerd --config X config dump` of the running daemon
    config_dump_error: str = ""  # why there is none


def _version_at_least(text: str, want: tuple[int, int]) -> bool | None:
    v = parse_containerd_version(text)
    return None if v is None else v >= want



#: interpreters that make a script a wrapper around the real shim rather than the shim itself
SHELLS = ("sh", "bash", "dash", "zsh", "ksh")


def interpreter_line(path: str) -> str:
    """The ``#!`` line of ``path`` ("" for a binary, an unreadable file or no ``#!``)."""
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError:
        return ""
    if not head.startswith(b"#!"):
        return ""
    return head[2:].split(b"\n", 1)[0].decode(errors="replace").strip()


def shell_wrapper(interpreter: str) -> bool:
    """Whether a ``#!`` line runs a shell (``/bin/bash``, ``/usr/bin/env bash``): the shim on
    containerd's PATH is then a wrapper (pyenv's shims are), not the console script."""
    words = interpreter.split()
    if not words:
        return False
    prog = words[1] if os.path.basename(words[0]) == "env" and len(words) > 1 else words[0]
    return os.path.basename(prog) in SHELLS

def evaluate(f: Facts) -> list[Check]:
    """Facts -> checks.  Pure."""
    c: list[Check] = []
    # containerd binary
    if f.containerd_bin is None:
        c.append(Check("containerd", FAIL, "containerd not found on PATH",
                       "apt-get install containerd (Debian 12 ships 1.6)"))
    else:
        ok = _version_at_least(f.containerd_bin_version, (1, 6))
        if ok is False:
            c.append(Check("containerd", FAIL, f"{f.containerd_bin}: {f.containerd_bin_version}",
                           "fractal needs containerd 1.6 or newer; upgrade containerd"))
        else:
            c.append(Check("containerd", OK if ok else WARN, f"{f.containerd_bin}: {f.containerd_bin_version}",
                           "" if ok else "could not read containerd's version; check `containerd --version`"))
    # the daemon
    if f.daemon_version is None:
        c.append(Check("containerd socket", FAIL, f"{f.address}: {f.daemon_error or 'no answer'}",
                       "start containerd (systemctl start containerd) or pass -a/CONTAINERD_ADDRESS"))
    else:
        ok = _version_at_least(f.daemon_version, (1, 6))
        c.append(Check("containerd socket", OK if ok is not False else FAIL,
                       f"{f.address}: containerd {f.daemon_version}",
                       "" if ok is not False else "the running containerd is older than 1.6; upgrade it"))
    # the proxy plugin
    if f.daemon_version is None:
        c.append(Check("proxy plugin", FAIL, "containerd not reachable, cannot list its plugins",
                       "fix the containerd socket first"))
    elif f.plugin is None:
        c.append(Check("proxy plugin", FAIL, f"containerd has no {SNAPSHOT_PLUGIN_TYPE} plugin '{SNAPSHOTTER_NAME}'",
                       "fractal install, then systemctl restart containerd"))
    elif f.plugin.get("init_err"):
        c.append(Check("proxy plugin", FAIL, f"plugin {SNAPSHOTTER_NAME}: {f.plugin['init_err']}",
                       "check [proxy_plugins.fractal] in containerd's config (fractal install --print)"))
    else:
        c.append(Check("proxy plugin", OK, f"{SNAPSHOT_PLUGIN_TYPE} {SNAPSHOTTER_NAME}: ok"))
    # the snapshotter
    if f.snapshotter_error is None:
        c.append(Check("snapshotter socket", OK, f"{f.snapshotter_address} accepts connections"))
    else:
        c.append(Check("snapshotter socket", FAIL, f"{f.snapshotter_address}: {f.snapshotter_error}",
                       "systemctl start fractal-snapshotter (fractal install --systemd writes the unit) or run "
                       f"fractal-snapshotter --root {f.root} --address {f.snapshotter_address}"))
    # runc
    if f.runc is None:
        c.append(Check("runc", FAIL, "runc not found on PATH", "apt-get install runc"))
    else:
        c.append(Check("runc", OK, f"{f.runc} {f.runc_version}".strip()))
    # the shim
    if f.shim_path is None:
        c.append(Check("shim", FAIL, f"{SHIM_BINARY} not on containerd's PATH ({f.shim_path_source})",
                       f"fractal install (writes it into /usr/local/bin), or put {SHIM_BINARY} on containerd's PATH"))
    elif shell_wrapper(f.shim_interpreter):
        c.append(Check("shim", WARN, f"{f.shim_path} (PATH of {f.shim_path_source}) is a shell wrapper "
                       f"({f.shim_interpreter}): every shim start and delete pays a shell and the "
                       "wrapper's lookups first (pyenv's: ~+65 ms CPU each, twice per container; "
                       "docs/performance.md)",
                       "fractal install writes a launcher for the venv's own python; point containerd's "
                       "PATH at that"))
    elif f.shim_interpreter and " -S" not in f" {f.shim_interpreter} ":
        c.append(Check("shim", OK, f"{f.shim_path} (PATH of {f.shim_path_source}) is a console script: "
                       "`site` runs at every shim start and delete; `fractal install` writes a `python -S` "
                       "launcher instead (docs/install.md)"))
    else:
        c.append(Check("shim", OK, f"{f.shim_path} (PATH of {f.shim_path_source})"))
    # VM mode
    if f.qemu is None:
        c.append(Check("qemu", WARN, "qemu-system not found: VM mode unavailable (host mode works)",
                       "apt-get install qemu-system-x86"))
    else:
        c.append(Check("qemu", OK, f.qemu))
    if f.accel == "kvm":
        c.append(Check("accel", OK, f"kvm: {f.accel_reason}"))
    else:
        c.append(Check("accel", WARN, f"{f.accel or 'tcg'}: {f.accel_reason} (VMs boot in seconds, not ~100 ms)",
                       "enable hardware/nested virtualisation and make /dev/kvm read-writable for root"))
    if "overlay" in f.filesystems:
        c.append(Check("overlayfs", OK, "overlay in /proc/filesystems"))
    else:
        c.append(Check("overlayfs", FAIL, "overlay not in /proc/filesystems (host mode stacks layers with it)",
                       "modprobe overlay"))
    if f.virtiofsd:
        c.append(Check("share", OK, f"virtiofs: virtiofsd at {f.virtiofsd}"))
    else:
        c.append(Check("share", WARN, "no virtiofsd: VMs share the repo over 9p (slower)",
                       "apt-get install virtiofsd (bookworm-backports) or hack/setup.sh, or set FRACTAL_VIRTIOFSD"))
    if f.guest:
        c.append(Check("guest", OK, f"{f.guest['initramfs']} sha256 {f.guest['sha256'][:16]}"))
    else:
        c.append(Check("guest", WARN, "no guest built yet (the first VM builds it, ~10 s)", "fractal guest build"))
    if f.root_writable:
        c.append(Check("repo dir", OK, f"{f.root} {'writable' if f.root_exists else 'can be created'}"))
    else:
        c.append(Check("repo dir", FAIL, f"{f.root} is not writable",
                       f"run as root, or pass --root to fractal-snapshotter and here"))
    c += cri_checks(f)
    missing_net = ([] if f.tun else ["/dev/net/tun"]) + [t for t in ("ip", "tc") if t not in f.net_tools]
    if missing_net:
        c.append(Check("pod network", WARN, f"missing {', '.join(missing_net)}: VM pods cannot be connected "
                       "to their network namespace (host mode and host-network pods are unaffected)",
                       "apt-get install iproute2; modprobe tun"))
    else:
        c.append(Check("pod network", OK, "/dev/net/tun, ip, tc (VM pods: tap + tc redirect in the pod netns)"))
    if f.cgroup2:
        missing = [x for x in ("cpu", "memory", "pids") if x not in f.cgroup_controllers]
        if missing:
            c.append(Check("cgroups", WARN, f"cgroup v2 without controllers {', '.join(missing)}",
                           "enable them in the root cgroup's cgroup.subtree_control"))
        else:
            c.append(Check("cgroups", OK, "cgroup v2 (" + " ".join(f.cgroup_controllers) + ")"))
    else:
        c.append(Check("cgroups", WARN, "cgroup v1 or hybrid (runc works; memory accounting differs)",
                       "boot with systemd.unified_cgroup_hierarchy=1 for cgroup v2"))
    return c


def cri_checks(f: Facts) -> list[Check]:
    """The CRI wiring of the running containerd, from its ``config dump`` (what it really uses,
    imports merged, unknown keys dropped): the handler with fractal's runtime and snapshotter
    (1.6: the node-wide one, its only kind; 1.7/2.x: the handler's own, else the node-wide),
    pod annotations, and on 2.x the transfer service's unpack entry for fractal."""
    fix_install = "fractal install, then systemctl restart containerd"
    if f.config_dump is None:
        return [Check("cri handler", WARN, f"could not read containerd's config: {f.config_dump_error or 'no containerd'}",
                      "run as root, or check `containerd config dump` by hand (docs/cri.md)")]
    version = parse_containerd_version(f.daemon_version or "") or (1, 6)
    d = f.config_dump
    disabled = set(d.get("disabled_plugins") or [])
    plugins = d.get("plugins") if isinstance(d.get("plugins"), dict) else {}
    out: list[Check] = []
    cri_id = CRI_RUNTIME_V2 if CRI_RUNTIME_V2 in plugins or version[0] >= 2 else CRI_V1
    if disabled & {CRI_V1, CRI_RUNTIME_V2}:
        out.append(Check("cri handler", WARN, f"containerd's CRI plugin is disabled ({cri_id}): Kubernetes "
                         "cannot run fractal pods (ctr and nerdctl can)",
                         "remove it from disabled_plugins if this node runs Kubernetes"))
    else:
        rt = (plugins.get(cri_id, {}).get("containerd", {}).get("runtimes", {}) or {}).get(f.handler)
        snap, where = effective_cri_snapshotter(d, f.handler)
        if not isinstance(rt, dict):
            out.append(Check("cri handler", FAIL, f"no CRI runtime handler '{f.handler}' (RuntimeClass handler)",
                             fix_install))
        elif rt.get("runtime_type") != FRACTAL_RUNTIME_TYPE:
            out.append(Check("cri handler", FAIL, f"handler '{f.handler}' runs {rt.get('runtime_type')!r}, "
                             f"not {FRACTAL_RUNTIME_TYPE}", "fractal install --runtime-handler NAME with a free name"))
        elif snap != SNAPSHOTTER_NAME:
            why = ("containerd 1.6 has no per-runtime snapshotter, so CRI uses the node-wide one for every pod"
                   if version < (1, 7) else f"handler '{f.handler}' has no snapshotter of its own")
            out.append(Check("cri handler", FAIL, f"'{f.handler}' pods would get snapshotter {snap!r} ({where}; "
                             f"{why}): VM pods fail, their mounts are not fractal repo layers", fix_install))
        else:
            ann = rt.get("pod_annotations") or []
            detail = f"handler '{f.handler}': {FRACTAL_RUNTIME_TYPE}, snapshotter {snap} ({where})"
            if not set(POD_ANNOTATIONS) <= set(ann):
                out.append(Check("cri handler", WARN, detail + f"; pod_annotations {ann} do not pass "
                                 f"{', '.join(POD_ANNOTATIONS)} (pods cannot choose VM sizes)", fix_install))
            else:
                out.append(Check("cri handler", OK, detail + f", pod annotations {', '.join(POD_ANNOTATIONS)}"))
    if version[0] >= 2:
        entries = (plugins.get(TRANSFER, {}) or {}).get("unpack_config") or []
        mine = [e for e in entries if isinstance(e, dict) and e.get("snapshotter") == SNAPSHOTTER_NAME]
        if mine:
            out.append(Check("unpack config", OK, f"{TRANSFER} unpacks into {SNAPSHOTTER_NAME} for "
                             + ", ".join(str(e.get("platform")) for e in mine)))
        else:
            out.append(Check("unpack config", FAIL, f"no unpack_config entry for {SNAPSHOTTER_NAME} in {TRANSFER}: "
                             f"`ctr image pull --snapshotter {SNAPSHOTTER_NAME}` fails with \"no unpack platforms "
                             "defined\"", fix_install))
    return out


# ------------------------------------------------------------------------------------------
# probes


def _run(argv: list[str]) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=15)
        return (r.stdout or r.stderr).strip().splitlines()[0] if (r.stdout or r.stderr).strip() else ""
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)


def _socket_inode(path: str) -> str | None:
    try:
        with open("/proc/net/unix") as fh:
            next(fh)
            for line in fh:
                parts = line.split()
                if len(parts) >= 8 and parts[7] == path:
                    return parts[6]
    except OSError:
        pass
    return None


def listener_pid(path: str) -> int | None:
    """The pid of the process holding the listening unix socket ``path`` (root sees all)."""
    inode = _socket_inode(path)
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            for fd in (d / "fd").iterdir():
                if os.readlink(fd) == target:
                    return int(d.name)
        except OSError:
            continue
    return None


def process_path(pid: int) -> str | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for kv in env:
        if kv.startswith(b"PATH="):
            return kv[5:].decode(errors="replace")
    return ""


def _probe_containerd(f: Facts) -> None:
    import grpc

    from ..api.gen.containerd.services.introspection.v1 import introspection_pb2, introspection_pb2_grpc
    from ..api.gen.containerd.services.version.v1 import version_pb2_grpc
    from google.protobuf import empty_pb2

    if not os.path.exists(f.address):
        f.daemon_error = "no such socket"
        return
    ch = grpc.insecure_channel(f"unix:{f.address}")
    try:
        v = version_pb2_grpc.VersionStub(ch).Version(empty_pb2.Empty(), timeout=5)
        f.daemon_version = v.version
        resp = introspection_pb2_grpc.IntrospectionStub(ch).Plugins(
            introspection_pb2.PluginsRequest(filters=[f"type=={SNAPSHOT_PLUGIN_TYPE},id=={SNAPSHOTTER_NAME}"]), timeout=5)
        for p in resp.plugins:
            if p.type == SNAPSHOT_PLUGIN_TYPE and p.id == SNAPSHOTTER_NAME:
                f.plugin = {"type": p.type, "id": p.id,
                            "init_err": p.init_err.message if p.HasField("init_err") else "",
                            "address": dict(p.exports).get("address", "")}
    except grpc.RpcError as e:
        f.daemon_error = f"{e.code().name.lower()}: {e.details()}"  # type: ignore[attr-defined]
    finally:
        ch.close()


def _probe_snapshotter(f: Facts) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(3)
    try:
        s.connect(f.snapshotter_address)
        f.snapshotter_error = None
    except OSError as e:
        f.snapshotter_error = e.strerror or str(e)
    finally:
        s.close()


def config_arg(cmdline: list[str]) -> str:
    """containerd's ``--config``/``-c`` (either form), else its default path."""
    for i, a in enumerate(cmdline):
        if a in ("--config", "-c") and i + 1 < len(cmdline):
            return cmdline[i + 1]
        for flag in ("--config=", "-c="):
            if a.startswith(flag):
                return a[len(flag):]
    return "/etc/containerd/config.toml"


def _probe_config_dump(f: Facts, pid: int | None) -> None:
    """``<containerd's own binary> --config <its config> config dump``: the merged config it runs
    with (a binary on PATH may be another version than the daemon)."""
    import tomllib

    if pid is None:
        f.config_dump_error = f"no process listens on {f.address}"
        return
    try:
        exe = os.readlink(f"/proc/{pid}/exe").removesuffix(" (deleted)")
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError as e:
        f.config_dump_error = f"containerd pid {pid}: {e.strerror or e}"
        return
    argv = [exe if os.path.exists(exe) else (f.containerd_bin or "containerd"),
            "--config", config_arg(cmdline), "config", "dump"]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=20)
        if r.returncode != 0:
            f.config_dump_error = f"{' '.join(argv)}: {(r.stderr or r.stdout).strip()[-300:]}"
            return
        f.config_dump = tomllib.loads(r.stdout)
    except (OSError, subprocess.TimeoutExpired, tomllib.TOMLDecodeError) as e:
        f.config_dump_error = f"{' '.join(argv)}: {e}"


def gather(address: str, snapshotter_address: str | None, root: str, handler: str = "fractal") -> Facts:
    """``snapshotter_address`` None: the address containerd's proxy plugin exports, else the default."""
    f = Facts(address=address, snapshotter_address=snapshotter_address or DEFAULT_SNAPSHOTTER_ADDRESS, root=root,
              snapshotter_error="not probed", handler=handler)
    f.containerd_bin = shutil.which("containerd")
    if f.containerd_bin:
        _, f.containerd_bin_version = containerd_version(f.containerd_bin)
    try:
        _probe_containerd(f)
    except Exception as e:  # noqa: BLE001 - a doctor reports, it does not crash
        f.daemon_error = f.daemon_error or str(e)
    if snapshotter_address is None and f.plugin and f.plugin.get("address"):
        f.snapshotter_address = f.plugin["address"]
    _probe_snapshotter(f)
    f.tun = os.path.exists("/dev/net/tun")
    f.net_tools = [t for t in ("ip", "tc") if shutil.which(t)]
    f.runc = shutil.which("runc")
    if f.runc:
        f.runc_version = _run([f.runc, "--version"])
    pid = listener_pid(address)
    search = process_path(pid) if pid else None
    if search is not None:
        f.shim_path_source = f"containerd pid {pid}"
    else:
        search, f.shim_path_source = os.environ.get("PATH", ""), "this shell; containerd not found"
    f.shim_search_path = search
    f.shim_path = shutil.which(SHIM_BINARY, path=search)
    if f.shim_path:
        f.shim_interpreter = interpreter_line(f.shim_path)
    _probe_config_dump(f, pid)
    arch = {"x86_64": "x86_64", "aarch64": "aarch64"}.get(platform.machine(), platform.machine())
    f.qemu = shutil.which(f"qemu-system-{arch}")
    try:
        from ..vm import accel

        ch = accel.decide(accel.probe())
        f.accel, f.accel_reason = ch.accel, ch.reason
    except Exception as e:  # noqa: BLE001
        f.accel, f.accel_reason = "tcg", str(e)
    try:
        f.filesystems = [ln.split()[-1] for ln in Path("/proc/filesystems").read_text().splitlines() if ln.strip()]
    except OSError:
        pass
    try:
        from ..vm.shares import find_virtiofsd

        f.virtiofsd = find_virtiofsd()
    except Exception:  # noqa: BLE001
        pass
    try:
        from ..guest import initramfs

        g = initramfs.current()
        if g is not None and g.initramfs.exists():
            f.guest = {"initramfs": str(g.initramfs), "sha256": g.sha256, "kernel": str(g.kernel)}
    except Exception:  # noqa: BLE001
        pass
    r = Path(root)
    f.root_exists = r.exists()
    probe = r
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    f.root_writable = os.access(probe, os.W_OK | os.X_OK)
    ctl = Path("/sys/fs/cgroup/cgroup.controllers")
    f.cgroup2 = ctl.exists()
    if f.cgroup2:
        f.cgroup_controllers = ctl.read_text().split()
    return f


# ------------------------------------------------------------------------------------------
# CLI


def cmd_doctor(args) -> int:  # noqa: ANN001
    from ..client.address import resolve_target

    address, _ = resolve_target(args.address, None)
    facts = gather(address, args.snapshotter_address, args.root, args.runtime_handler)
    checks = evaluate(facts)
    failed = any(c.status == FAIL for c in checks)
    if args.json:
        json.dump([asdict(c) for c in checks], sys.stdout, indent=2)
        print()
        return 1 if failed else 0
    mark = {OK: "ok  ", WARN: "warn", FAIL: "FAIL"}
    for c in checks:
        print(f"[{mark[c.status]}] {c.name:<18} {c.detail}")
        if c.fix and c.status != OK:
            print(f"       {'':<18} fix: {c.fix}")
    n = {s: sum(1 for c in checks if c.status == s) for s in (OK, WARN, FAIL)}
    print(f"{n[OK]} ok, {n[WARN]} warnings, {n[FAIL]} failed")
    return 1 if failed else 0


def register(p) -> None:  # noqa: ANN001
    add_containerd_flags(p, namespace=False)
    p.add_argument("--root", default=os.environ.get("FRACTAL_ROOT", DEFAULT_ROOT),
                   help="the snapshotter's repo dir (default %(default)s)")
    p.add_argument("--snapshotter-address", default=os.environ.get("FRACTAL_SNAPSHOTTER_ADDRESS"),
                   help="snapshotter socket (default: the address containerd's fractal proxy plugin uses, "
                        f"else {DEFAULT_SNAPSHOTTER_ADDRESS})")
    p.add_argument("--runtime-handler", default="fractal",
                   help="the CRI runtime handler to check (default %(default)s)")
    add_json_flag(p)
    p.set_defaults(func=cmd_doctor)
