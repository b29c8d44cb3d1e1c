"""Which mode a sandbox runs in (``vm`` or ``host``) and how its VM is shaped.  Pure: no I/O
except :func:`load_file` / :func:`load` (reading the TOML files), see docs/config.md.

Sources, strongest first (the FIRST container of a sandbox decides; see :func:`resolve`):

1. annotations on the container's OCI spec (:data:`ANNOTATIONS`): ``io.fractal.mode=vm|host``,
   ``io.fractal.share=9p|virtiofs``, ``io.fractal.vm.memory=512M``, ``io.fractal.vm.cpus=2``,
   ``io.fractal.vm.scratch=128M`` (a container's writable layer, never above ``vm.scratch_max``)
   -- for Kubernetes (CRI) pods only those the operator allows (``allowed_annotations``, the VM
   maxima; :func:`check_annotations`), for ``ctr``/nerdctl users (node admins) all of them;
2. the runtime config file containerd names in the shim's runtime options
   (``ctr run --runtime-config-path FILE``, CRI ``options = {ConfigPath = "FILE"}``): containerd
   1.6 hands the options to ``start`` on its stdin as a protobuf ``Any`` of
   ``runtimeoptions.v1.Options{type_url = 1, config_path = 2}`` (:func:`config_path_from_options`);
3. ``$FRACTAL_CONFIG``, else ``/etc/fractal/config.toml``;
4. defaults: ``mode = "vm"``, 512M, 2 CPUs, accel and share type chosen automatically, a
   writable layer of a quarter of the guest's memory per container (at most half by
   annotation), 64M of guest memory kept from the containers, the agent timeouts of
   :class:`Timeouts`.

Files 2 and 3 are TOML with the same keys; when both exist they are merged key by key, the
runtime config file winning -- except ``root`` (the repo the snapshotter serves), which only the
global file may set: the snapshotter reads that file too (:func:`repo_root`), so the two agree
by construction, and a per-runtime file the snapshotter never sees could only break that.  A missing global file is fine; a missing or malformed file that
was named explicitly is an error (the shim refuses to start the sandbox rather than silently
running it somewhere else).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ccpu.grouping import FRACTAL_SANDBOX, from_cri

MODES = ("vm", "host", "remote")
ACCELS = ("auto", "kvm", "tcg")
SHARES = ("auto", "virtiofs", "9p")
DEFAULT_MODE = "vm"
DEFAULT_FILE = "/etc/fractal/config.toml"

ANN_MODE = "io.fractal.mode"
ANN_SHARE = "io.fractal.share"
ANN_MEMORY = "io.fractal.vm.memory"
ANN_CPUS = "io.fractal.vm.cpus"
ANN_SANDBOX = FRACTAL_SANDBOX  # read by ccpu/grouping.py (which shim a container joins)
ANN_SCRATCH = "io.fractal.vm.scratch"
ANN_PREFIX = "io.fractal."


@dataclass(frozen=True)
class AnnotationRule:
    """One ``io.fractal.*`` annotation the shim reads.

    ``kind`` says what its value is (and how :func:`apply_annotations` uses it; ``sandbox`` is
    read by ccpu/grouping.py instead).  ``pods``: whether a Kubernetes (CRI) pod may set it when
    the operator's ``allowed_annotations`` does not say otherwise.  Node admins (``ctr``,
    nerdctl: anything that is not CRI) may set every one of them."""

    name: str
    kind: str
    pods: bool
    what: str


#: Every annotation the shim reads, and who may set it by default.  To add one: a row here, and
#: its ``kind`` in :func:`_apply_one` (docs/config.md lists them for operators).
ANNOTATIONS: tuple[AnnotationRule, ...] = (
    AnnotationRule(ANN_MODE, "mode", False, "vm, host or remote: host runs the pod with runc on the node, "
                   "remote on a machine of [remote] endpoints"),
    AnnotationRule(ANN_SANDBOX, "sandbox", False, "join the named sandbox (its VM) instead of the pod's own"),
    AnnotationRule(ANN_SHARE, "share", True, "how the layers reach the guest: auto, virtiofs, 9p"),
    AnnotationRule(ANN_MEMORY, "memory", True, "guest RAM; pods at most vm.max_memory"),
    AnnotationRule(ANN_CPUS, "cpus", True, "guest vCPUs; pods at most vm.max_cpus"),
    AnnotationRule(ANN_SCRATCH, "scratch", True, "a container's writable layer in the guest; at most vm.scratch_max"),
)

#: the environment variable ``start`` uses to pass the runtime config path to its daemon
RUNTIME_CONFIG_ENV = "FRACTAL_RUNTIME_CONFIG"


class ConfigError(ValueError):
    """A bad configuration value or file (the message names where it came from)."""


class AnnotationDenied(ConfigError):
    """A Kubernetes pod asked, by annotation, for something the operator does not allow it
    (containerd sees InvalidArgument with this message, shim/errors.py)."""


#: the most ready VMs ``vm.pool`` may ask for (each holds its guest RAM while it waits)
MAX_POOL = 16


@dataclass(frozen=True)
class VmSettings:
    memory_mb: int = 512
    cpus: int | None = None  # None: 1 under TCG, 2 under KVM (ccpu.vm.qemu.default_cpus)
    accel: str = "auto"
    share: str = "auto"
    boot_timeout: float = 90.0  # agent `hello` after QEMU start (TCG boots take ~4-6 s)
    console_log_kib: int = 1024  # cap of console.log + console.log.1 (shim/console.py)
    scratch_mb: int | None = None  # a container's writable layer (guest tmpfs); None: memory / 4
    scratch_max_mb: int | None = None  # the most an annotation may ask for; None: memory / 2
    memory_reserve_mb: int = 64  # guest memory the containers together can never take
    #: QEMU's uid/gid is this + the shim daemon's pid (ccpu.vm.qemu.unprivileged); 0: QEMU stays root
    qemu_uid_base: int = 0x7F000000
    #: ready VMs the pool daemon keeps (shim/poold.py); a VM sandbox adopts one when the pool runs.
    #: 0: no pool (every sandbox boots its own).  1 fits a 2-core machine: a second would boot
    #: while the first is adopted, halving the CPU of the sandboxes meanwhile.
    pool: int = 1
    #: boot the guest's unified kernel image through OVMF with a TPM of its own, and create no
    #: container before its TPM quote verified what it booted (ccpu/attest.py, docs/hardware.md);
    #: such sandboxes never adopt a pooled VM (the pool's boot is not attested)
    attest: bool = False

    @property
    def scratch_limit_mb(self) -> int:
        return self.scratch_mb if self.scratch_mb is not None else max(1, self.memory_mb // 4)

    @property
    def scratch_ceiling_mb(self) -> int:
        return self.scratch_max_mb if self.scratch_max_mb is not None else max(1, self.memory_mb // 2)


@dataclass(frozen=True)
class RemoteAttest:
    """``[remote.attest]``: the machines are attested before any container (docs/hardware.md
    "The machine over a NIC"): they boot ``manifest``'s UKI with a key made at boot, and each
    endpoint's TPM quote must show that build's PCR 11, the PCR 12 of its ``cmdline`` (what the
    operator booted it with: its address and the host CA's fingerprint) and name the TLS key
    the shim is talking to.  An endpoint in ``uki`` instead boots its own UKI from a boot entry
    (``fractal guest uki``): its manifest gives PCR 4 (boot-entry order), PCR 11 (the command
    line is a section) and the command line; PCR 12 must be zeros.  ``ek_ca``: the CA
    certificates the TPMs' EK certificates chain to."""

    manifest: str | None
    ek_ca: tuple[str, ...]
    cmdlines: tuple[tuple[str, str], ...]  # (endpoint, its kernel command line)
    #: (endpoint, the manifest of its own UKI, `fractal guest uki`): a machine booting without a
    #: loader (USB stick, disk, HTTP boot), its command line built in
    ukis: tuple[tuple[str, str], ...] = ()

    def cmdline(self, endpoint: str) -> str | None:
        return dict(self.cmdlines).get(endpoint)

    def uki(self, endpoint: str) -> str | None:
        return dict(self.ukis).get(endpoint)

    def covers(self, endpoint: str) -> bool:
        """Whether the host can predict this endpoint's PCRs."""
        return self.uki(endpoint) is not None or (self.manifest is not None and self.cmdline(endpoint) is not None)


@dataclass(frozen=True)
class RemoteSettings:
    """Remote mode (docs/remote.md): the agents' addresses, tried in order (an agent busy with
    another sandbox refuses, the next is tried), and the shim's TLS dir (``ca.pem``,
    ``host.pem``, ``host.key``).  Only the operator's files set these, never an annotation."""

    endpoints: tuple[str, ...] = ()
    tls_dir: str = "/etc/fractal/pki"
    connect_timeout: float = 15.0
    attest: RemoteAttest | None = None


MAX_ENDPOINTS = 64


def parse_endpoint(value: Any, where: str) -> str:
    """``HOST:PORT`` or ``[V6]:PORT``."""
    from ccpu.agent.endpoint import parse_tcp

    if not isinstance(value, str) or len(value) > 300:
        raise ConfigError(f"{where}: expected \"HOST:PORT\", got {_brief(value)}")
    try:
        parse_tcp(value)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return value


def parse_remote(table: Any, where: str, base: RemoteSettings) -> RemoteSettings:
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: remote must be a table ([remote])")
    remote = base
    for key, value in table.items():
        w = f"{where}: remote.{key}"
        if key == "endpoints":
            if not isinstance(value, list) or not 0 < len(value) <= MAX_ENDPOINTS:
                raise ConfigError(f"{w}: expected a list of 1..{MAX_ENDPOINTS} \"HOST:PORT\" strings")
            remote = replace(remote, endpoints=tuple(parse_endpoint(v, w) for v in value))
        elif key == "tls_dir":
            remote = replace(remote, tls_dir=parse_root(value, w))
        elif key == "connect_timeout":
            remote = replace(remote, connect_timeout=parse_seconds(value, w))
        elif key == "attest":
            remote = replace(remote, attest=parse_remote_attest(value, w))
        else:
            raise ConfigError(f"{where}: unknown key remote.{key} (known: endpoints, tls_dir, connect_timeout, "
                              "attest)")
    return remote


MAX_CMDLINE = 2048  # x86's COMMAND_LINE_SIZE


def parse_remote_attest(table: Any, where: str) -> RemoteAttest:
    """``[remote.attest]`` = ek_ca (CA files); manifest (a guest build's manifest.json) with
    ``[remote.attest.cmdline]`` "HOST:PORT" = the command line that machine boots with, and/or
    ``[remote.attest.uki]`` "HOST:PORT" = the manifest of that machine's own UKI."""
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: expected a table ([remote.attest])")
    unknown = set(table) - {"manifest", "ek_ca", "cmdline", "uki"}
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} (known: manifest, ek_ca, cmdline, "
                          "uki)")
    if "ek_ca" not in table or not ("cmdline" in table or "uki" in table):
        raise ConfigError(f"{where}: needs ek_ca, and manifest with cmdline, or uki")
    if ("manifest" in table) != ("cmdline" in table):
        raise ConfigError(f"{where}: manifest and cmdline go together (the build and the command lines given to it)")
    manifest = parse_root(table["manifest"], f"{where}.manifest") if "manifest" in table else None
    cas = table["ek_ca"]
    if not isinstance(cas, list) or not 0 < len(cas) <= 16:
        raise ConfigError(f"{where}.ek_ca: expected a list of 1..16 CA certificate files")
    ek_ca = tuple(parse_root(c, f"{where}.ek_ca") for c in cas)
    cmdlines = []
    if "cmdline" in table:
        lines = table["cmdline"]
        if not isinstance(lines, Mapping) or not 0 < len(lines) <= MAX_ENDPOINTS:
            raise ConfigError(f"{where}.cmdline: expected a table \"HOST:PORT\" = \"kernel command line\"")
        for ep, line in lines.items():
            parse_endpoint(ep, f"{where}.cmdline")
            if not isinstance(line, str) or not 0 < len(line) < MAX_CMDLINE or "\0" in line or "\n" in line:
                raise ConfigError(f"{where}.cmdline.{ep}: expected a kernel command line (< {MAX_CMDLINE} bytes)")
            cmdlines.append((ep, line))
    ukis = []
    if "uki" in table:
        files = table["uki"]
        if not isinstance(files, Mapping) or not 0 < len(files) <= MAX_ENDPOINTS:
            raise ConfigError(f"{where}.uki: expected a table \"HOST:PORT\" = \"the manifest of its UKI "
                              "(fractal guest uki)\"")
        for ep, path in files.items():
            parse_endpoint(ep, f"{where}.uki")
            if ep in dict(cmdlines):
                raise ConfigError(f"{where}: {ep} is in both cmdline and uki: a machine boots one way")
            ukis.append((ep, parse_root(path, f"{where}.uki.{ep}")))
    return RemoteAttest(manifest, ek_ca, tuple(cmdlines), tuple(ukis))


#: agent request kinds with a timeout of their own (every other request: ``default``)
TIMEOUT_KINDS = ("create", "start", "delete", "restack", "default")


@dataclass(frozen=True)
class Timeouts:
    """Seconds the shim waits for the agent's answer to a request (docs/shim.md).  ``create``
    mounts the rootfs and runs ``runc create``, ``start`` runs ``runc start``/``runc exec``,
    ``delete`` waits for the process's output to drain; under TCG each is seconds, not ms."""

    create: float = 120.0
    start: float = 60.0
    delete: float = 60.0
    restack: float = 50.0  # below the CLI's own 60 s (ccpu/cli/layers.py), so the shim says why
    default: float = 30.0

    def for_op(self, op: str) -> float:
        return float(getattr(self, op)) if op in TIMEOUT_KINDS else self.default


@dataclass(frozen=True)
class Policy:
    """What the operator lets Kubernetes (CRI) pods ask for by annotation.

    ``allowed``: regular expressions, each matched against the WHOLE annotation name without
    its ``io.fractal.`` prefix (``"vm\\..*"`` allows ``io.fractal.vm.memory`` and
    ``io.fractal.vm.cpus``); None = the ``pods`` column of :data:`ANNOTATIONS`.
    ``max_memory_mb`` / ``max_cpus``: the largest VM a pod's annotation may ask for; None = the
    host's RAM / CPU count (as kata's ``default_maxmemory`` / ``default_maxvcpus``)."""

    allowed: tuple[str, ...] | None = None
    max_memory_mb: int | None = None
    max_cpus: int | None = None


@dataclass(frozen=True)
class HostLimits:
    """The host's RAM and CPUs: the default maxima of :class:`Policy` (``probe`` reads them)."""

    memory_mb: int | None = None
    cpus: int | None = None

    @staticmethod
    def probe() -> "HostLimits":
        memory_mb = None
        try:
            with open("/proc/meminfo", encoding="ascii") as f:
                for line in f:
                    if line.startswith("MemTotal:"):
                        memory_mb = int(line.split()[1]) // 1024
                        break
        except (OSError, ValueError, IndexError):
            pass
        return HostLimits(memory_mb=memory_mb, cpus=os.cpu_count())


@dataclass(frozen=True)
class Config:
    mode: str = DEFAULT_MODE
    root: str | None = None  # the fractal repo (global file only); None: see repo_root()
    vm: VmSettings = VmSettings()
    sources: tuple[str, ...] = ()  # where the values came from, for the log
    timeouts: Timeouts = Timeouts()
    policy: Policy = field(default_factory=Policy)
    host: HostLimits = field(default_factory=HostLimits)
    remote: RemoteSettings = RemoteSettings()

    @property
    def max_memory_mb(self) -> int | None:
        return self.policy.max_memory_mb if self.policy.max_memory_mb is not None else self.host.memory_mb

    @property
    def max_cpus(self) -> int | None:
        return self.policy.max_cpus if self.policy.max_cpus is not None else self.host.cpus

    def describe(self) -> str:
        if self.mode == "remote":
            return (f"mode remote; endpoints {', '.join(self.remote.endpoints)}, TLS dir {self.remote.tls_dir} "
                    f"(from {', '.join(self.sources) or 'defaults'})")
        return (f"mode {self.mode}; vm memory {self.vm.memory_mb}M cpus {self.vm.cpus or 'auto'} accel "
                f"{self.vm.accel} share {self.vm.share} scratch {self.vm.scratch_limit_mb}M (max "
                f"{self.vm.scratch_ceiling_mb}M) reserve {self.vm.memory_reserve_mb}M "
                f"(from {', '.join(self.sources) or 'defaults'})")


# ---------------------------------------------------------------------------------------------
# values


def parse_memory(value: Any, where: str = "memory", low: int = 64) -> int:
    """MiB from ``512``, ``"512"``, ``"512M"``, ``"1G"`` (K/M/G/T, optional ``iB``/``B``), at
    least ``low`` MiB."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a size like \"512M\", got {value!r}")
    if isinstance(value, int):
        mb = value
    elif isinstance(value, str):
        s = value.strip().upper()
        for suffix in ("IB", "B"):
            if s.endswith(suffix) and len(s) > len(suffix) and s[-len(suffix) - 1] in "KMGT":
                s = s[: -len(suffix)]
                break
        mult = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}
        try:
            if len(s) > 32:  # no size needs more; int() of a huge string is slow
                raise ValueError
            if s and s[-1] in mult:
                number = float(s[:-1]) * mult[s[-1]]
                if not math.isfinite(number):  # "1e400M", "infG", "nanM"
                    raise ValueError
                mb = int(number)
            else:
                mb = int(s)
        except ValueError:
            raise ConfigError(f"{where}: expected a size like \"512M\", got {_brief(value)}") from None
    else:
        raise ConfigError(f"{where}: expected a size like \"512M\", got {value!r}")
    if not low <= mb <= 1024 * 1024:
        raise ConfigError(f"{where}: {_brief(value)} is out of range ({low}M..1T)")
    return mb


def parse_seconds(value: Any, where: str) -> float:
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or not 0 < value <= 86400):
        raise ConfigError(f"{where}: expected a positive number of seconds (at most a day), got {_brief(value)}")
    return float(value)


def check_vm(vm: VmSettings, where: str) -> VmSettings:
    """Relations between VM values: the writable layer within its maximum.  (A reserve too big
    for a small guest is not an error: the agent then gives the containers half of what the
    guest has, ccpu/agent/limits.py.)"""
    if vm.scratch_limit_mb > vm.scratch_ceiling_mb:
        raise ConfigError(f"{where}: vm.scratch ({vm.scratch_limit_mb}M) is above vm.scratch_max "
                          f"({vm.scratch_ceiling_mb}M)")
    return vm


def scratch_for(vm: VmSettings, annotations: Mapping[str, str]) -> int:
    """MiB of writable layer for one container: its own ``io.fractal.vm.scratch`` annotation
    (a pod's, passed to each container) within ``vm.scratch_max``, else the sandbox's."""
    value = annotations.get(ANN_SCRATCH)
    if not value:
        return vm.scratch_limit_mb
    mb = parse_memory(value, f"annotation {ANN_SCRATCH}", low=1)
    if mb > vm.scratch_ceiling_mb:
        raise AnnotationDenied(f"annotation {ANN_SCRATCH}={_brief(value)} is above the operator's limit "
                               f"vm.scratch_max ({vm.scratch_ceiling_mb}M)")
    return mb


def parse_cpus(value: Any, where: str = "cpus") -> int:
    try:
        if isinstance(value, bool) or (isinstance(value, str) and len(value) > 32):
            raise ValueError
        n = int(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(float("inf")) from TOML
        raise ConfigError(f"{where}: expected a number of CPUs, got {_brief(value)}") from None
    if not 1 <= n <= 255:
        raise ConfigError(f"{where}: {_brief(value)} is out of range (1..255)")
    return n


def _brief(value: Any, limit: int = 64) -> str:
    """``repr`` of a value for an error message, cut short (annotations come from pod authors)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...(" + str(len(text)) + " chars)"


def parse_uid_base(value: Any, where: str = "qemu_uid_base") -> int:
    """0 (QEMU runs as root) or the first uid of QEMU's per-VM users: the largest pid (2**22) must
    still fit below 2**32 - 1, and uids below 65536 are left to the node's accounts."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: expected a uid number, got {_brief(value)}")
    if value != 0 and not 65536 <= value <= 0xFFFFFFFE - (1 << 22):
        raise ConfigError(f"{where}: {value} is out of range (0, or 65536..{0xFFFFFFFE - (1 << 22)})")
    return value


def _choice(value: Any, allowed: tuple[str, ...], where: str) -> str:
    if not isinstance(value, str) or value.strip().lower() not in allowed:
        raise ConfigError(f"{where}: expected one of {', '.join(allowed)}, got {_brief(value)}")
    return value.strip().lower()


def parse_mode(value: Any, where: str = "mode") -> str:
    return _choice(value, MODES, where)


def parse_root(value: Any, where: str = "root") -> str:
    """An absolute directory path, normalised (the agent compares real paths below it)."""
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value or len(value) > 4096:
        raise ConfigError(f"{where}: expected an absolute directory path, got {_brief(value)}")
    return os.path.normpath(value)


# ---------------------------------------------------------------------------------------------
# files


def from_table(data: Mapping[str, Any], where: str, base: Config | None = None) -> Config:
    """Apply a parsed TOML document on top of ``base``.  Unknown keys are errors (typos would
    otherwise silently do nothing)."""
    cfg = base or Config()
    vm = cfg.vm
    policy = cfg.policy
    for key in data:
        if key not in ("mode", "root", "vm", "allowed_annotations", "timeouts", "remote"):
            raise ConfigError(f"{where}: unknown key {key!r} (known: mode, root, allowed_annotations, [vm], "
                              "[timeouts], [remote])")
    remote = parse_remote(data["remote"], where, cfg.remote) if "remote" in data else cfg.remote
    timeouts = cfg.timeouts
    ttable = data.get("timeouts", {})
    if not isinstance(ttable, Mapping):
        raise ConfigError(f"{where}: timeouts must be a table ([timeouts])")
    for key, value in ttable.items():
        if key not in TIMEOUT_KINDS:
            raise ConfigError(f"{where}: unknown key timeouts.{key} (known: {', '.join(TIMEOUT_KINDS)})")
        timeouts = replace(timeouts, **{key: parse_seconds(value, f"{where}: timeouts.{key}")})
    mode = parse_mode(data["mode"], f"{where}: mode") if "mode" in data else cfg.mode
    root = parse_root(data["root"], f"{where}: root") if "root" in data else cfg.root
    if "allowed_annotations" in data:
        policy = replace(policy, allowed=parse_allowed(data["allowed_annotations"],
                                                       f"{where}: allowed_annotations"))
    table = data.get("vm", {})
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: vm must be a table ([vm])")
    for key, value in table.items():
        w = f"{where}: vm.{key}"
        if key == "memory":
            vm = replace(vm, memory_mb=parse_memory(value, w))
        elif key == "cpus":
            vm = replace(vm, cpus=parse_cpus(value, w))
        elif key == "max_memory":
            policy = replace(policy, max_memory_mb=parse_memory(value, w))
        elif key == "max_cpus":
            policy = replace(policy, max_cpus=parse_cpus(value, w))
        elif key == "accel":
            vm = replace(vm, accel=_choice(value, ACCELS, w))
        elif key == "share":
            vm = replace(vm, share=_choice(value, SHARES, w))
        elif key == "qemu_uid_base":
            vm = replace(vm, qemu_uid_base=parse_uid_base(value, w))
        elif key == "console_log_kib":
            if isinstance(value, bool) or not isinstance(value, int) or not 16 <= value <= 1 << 20:
                raise ConfigError(f"{w}: expected an integer from 16 to {1 << 20} (KiB), got {value!r}")
            vm = replace(vm, console_log_kib=value)
        elif key == "boot_timeout":
            vm = replace(vm, boot_timeout=parse_seconds(value, w))
        elif key == "scratch":
            vm = replace(vm, scratch_mb=parse_memory(value, w, low=1))
        elif key == "scratch_max":
            vm = replace(vm, scratch_max_mb=parse_memory(value, w, low=1))
        elif key == "pool":
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_POOL:
                raise ConfigError(f"{w}: expected an integer from 0 (no pool) to {MAX_POOL} (ready VMs), "
                                  f"got {value!r}")
            vm = replace(vm, pool=value)
        elif key == "memory_reserve":
            vm = replace(vm, memory_reserve_mb=parse_memory(value, w, low=16))
        elif key == "attest":
            if not isinstance(value, bool):
                raise ConfigError(f"{w}: expected true or false, got {value!r}")
            vm = replace(vm, attest=value)
        else:
            raise ConfigError(f"{where}: unknown key vm.{key} (known: memory, cpus, max_memory, "
                              "max_cpus, accel, share, boot_timeout, console_log_kib, scratch, scratch_max, "
                              "memory_reserve, qemu_uid_base, pool, attest)")
    return replace(cfg, mode=mode, root=root, vm=check_vm(vm, where), policy=policy, timeouts=timeouts,
                   remote=remote, sources=cfg.sources + (where,))


def parse_allowed(value: Any, where: str) -> tuple[str, ...]:
    """``allowed_annotations``: a list of regular expressions (checked to compile here, so a
    typo fails the sandbox instead of silently allowing nothing)."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: expected a list of strings (regular expressions matched "
                          f"against annotation names without {ANN_PREFIX!r}), got {_brief(value)}")
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"{where}: {pattern!r} is not a regular expression: {exc}") from None
    return tuple(value)


def parse_toml(text: str, where: str, base: Config | None = None) -> Config:
    import tomllib

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    return from_table(data, where, base)


def load_file(path: str, base: Config | None = None, *, required: bool = True) -> Config:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        if required:
            raise ConfigError(f"config file {path} does not exist") from None
        return base or Config()
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    return parse_toml(text, path, base)


# ---------------------------------------------------------------------------------------------
# annotations and who may set them


def pod_may_set(policy: Policy, rule: AnnotationRule) -> bool:
    """Whether a Kubernetes (CRI) pod may set ``rule``'s annotation.

    As kata's ``enable_annotations``: each entry is a regular expression over the name without
    the common prefix; unlike kata's (Go ``regexp.MatchString``, unanchored, so ``"path"`` also
    enables ``jailer_path``) the whole name must match -- an allow-list should allow exactly
    what it names."""
    if policy.allowed is None:
        return rule.pods
    short = rule.name[len(ANN_PREFIX):]
    return any(re.fullmatch(p, short) for p in policy.allowed)


def check_annotations(cfg: Config, annotations: Mapping[str, str]) -> None:
    """Refuse (:class:`AnnotationDenied`) a Kubernetes pod's annotation that the operator does
    not allow.  Node admins (anything that is not CRI, see ccpu/grouping.py ``from_cri``) may set
    them all.  Refused rather than ignored, as kata does ("annotation X is not enabled"): a pod
    that silently got another mode or size than it asked for would fail later and elsewhere."""
    if not from_cri(annotations):
        return
    for rule in ANNOTATIONS:
        if annotations.get(rule.name) and not pod_may_set(cfg.policy, rule):
            raise AnnotationDenied(
                f"annotation {rule.name} is not allowed for Kubernetes pods on this node (the "
                "operator can allow it with allowed_annotations in the fractal config)")


def apply_annotations(cfg: Config, annotations: Mapping[str, str]) -> Config:
    """``cfg`` with the container's ``io.fractal.*`` annotations applied (after
    :func:`check_annotations`); a CRI pod's VM size is also held to the operator's maxima."""
    check_annotations(cfg, annotations)
    limited = from_cri(annotations)
    used = []
    for rule in ANNOTATIONS:
        value = annotations.get(rule.name)
        if value and rule.kind != "sandbox":
            cfg = _apply_one(cfg, rule, value, limited)
            used.append(rule.name)
    if not used:
        return cfg
    return replace(cfg, vm=check_vm(cfg.vm, "annotations"), sources=cfg.sources + ("annotations " + ",".join(used),))


def _apply_one(cfg: Config, rule: AnnotationRule, value: str, limited: bool) -> Config:
    where = f"annotation {rule.name}"
    if rule.kind == "mode":
        return replace(cfg, mode=parse_mode(value, where))
    if rule.kind == "share":
        return replace(cfg, vm=replace(cfg.vm, share=_choice(value, SHARES, where)))
    if rule.kind == "memory":
        mb = parse_memory(value, where)
        _within(limited, mb, cfg.max_memory_mb, where, value, "vm.max_memory", "M")
        return replace(cfg, vm=replace(cfg.vm, memory_mb=mb))
    if rule.kind == "cpus":
        n = parse_cpus(value, where)
        _within(limited, n, cfg.max_cpus, where, value, "vm.max_cpus", "")
        return replace(cfg, vm=replace(cfg.vm, cpus=n))
    if rule.kind == "scratch":  # the sandbox's default; each container may ask for its own (scratch_for)
        return replace(cfg, vm=replace(cfg.vm, scratch_mb=scratch_for(cfg.vm, {ANN_SCRATCH: value})))
    raise AssertionError(f"annotation kind {rule.kind!r} has no handler")


def _within(limited: bool, asked: int, maximum: int | None, where: str, value: str,
            key: str, unit: str) -> None:
    if limited and maximum is not None and asked > maximum:
        raise AnnotationDenied(f"{where}={_brief(value)} asks for more than this node allows "
                               f"Kubernetes pods ({key} = {maximum}{unit})")


def resolve(annotations: Mapping[str, str], *, runtime_config: str | None,
            global_file: str | None, read: Any = None, host: HostLimits | None = None) -> Config:
    """The sandbox's config: defaults < global file < runtime config file < annotations.

    ``global_file`` is ``$FRACTAL_CONFIG`` if set (then it must exist) else the default path
    (optional).  ``read(path, base, required)`` loads a file (default :func:`load_file`;
    injectable for tests).  ``host``: the default maxima of a pod's VM (None: no maxima)."""
    read = read or (lambda p, b, required: load_file(p, b, required=required))
    cfg = Config(host=host or HostLimits())
    if global_file:
        cfg = read(global_file, cfg, True)
    else:
        cfg = read(DEFAULT_FILE, cfg, False)
    if runtime_config:
        root = cfg.root
        cfg = read(runtime_config, cfg, True)
        if cfg.root != root:
            raise ConfigError(f"{runtime_config}: root can only be set in the global config file "
                              f"({DEFAULT_FILE} or $FRACTAL_CONFIG), which the snapshotter reads too")
    return check_remote(apply_annotations(cfg, annotations))


def check_remote(cfg: Config) -> Config:
    """Remote mode needs somewhere to go: the operator's ``[remote] endpoints``."""
    if cfg.mode == "remote" and not cfg.remote.endpoints:
        raise ConfigError(f"mode remote needs [remote] endpoints in the fractal config (from "
                          f"{', '.join(cfg.sources) or 'defaults'}; docs/remote.md)")
    att = cfg.remote.attest
    if cfg.mode == "remote" and att is not None:
        missing = [e for e in cfg.remote.endpoints if not att.covers(e)]
        if missing:
            raise ConfigError(f"[remote.attest] has no cmdline (with manifest) nor uki for endpoint(s) "
                              f"{', '.join(missing)}: the host predicts its PCRs from them (docs/hardware.md)")
    return cfg


def load(annotations: Mapping[str, str], environ: Mapping[str, str] | None = None) -> Config:
    """:func:`resolve` with the paths from the environment (the shim daemon's)."""
    env = os.environ if environ is None else environ
    return resolve(annotations, runtime_config=env.get(RUNTIME_CONFIG_ENV) or None,
                   global_file=env.get("FRACTAL_CONFIG") or None, host=HostLimits.probe())


#: where the shim and the snapshotter learn the repo root, strongest first (see repo_root)
ROOT_ENV = "FRACTAL_ROOT"


@dataclass(frozen=True)
class RepoRoot:
    """The fractal repo's directory and where that value came from (for errors and logs)."""

    path: str
    source: str
    config_file: str  # the global file that was (or would be) read

    def hint(self) -> str:
        """How an operator fixes a root the snapshotter does not use (appended to "outside the
        agent's roots" errors, shim/errors.py)."""
        return (f"the shim's repo root is {self.path} ({self.source}); it must be the snapshotter's "
                f"--root: set root = \"...\" in {self.config_file} (read by both) or {ROOT_ENV} in "
                "containerd's environment")


def repo_root(environ: Mapping[str, str] | None = None, *, strict: bool = False,
              read: Any = None) -> RepoRoot:
    """The repo root of the shim and the snapshotter's default ``--root``: ``$FRACTAL_ROOT``,
    else ``root`` of the global file (``$FRACTAL_CONFIG`` or :data:`DEFAULT_FILE`), else
    :data:`ccpu.defaults.DEFAULT_ROOT`.

    Only the operator's inputs count (containerd's environment, a root-owned file); never a
    path a client sent.  ``strict``: a global file that does not load is an error (the
    snapshotter refuses to start); otherwise (the shim) the default is used and the source says
    why -- the sandbox then fails with that file's error anyway (:func:`load`)."""
    from ccpu.defaults import DEFAULT_ROOT

    env = os.environ if environ is None else environ
    read = read or (lambda p, required: load_file(p, required=required))
    named = env.get("FRACTAL_CONFIG") or None
    path = named or DEFAULT_FILE
    if env.get(ROOT_ENV):
        return RepoRoot(env[ROOT_ENV], f"${ROOT_ENV} in the environment", path)
    try:
        cfg = read(path, bool(named))
    except ConfigError as exc:
        if strict:
            raise
        return RepoRoot(DEFAULT_ROOT, f"the default: {exc}", path)
    if cfg.root:
        return RepoRoot(cfg.root, f"root in {path}", path)
    return RepoRoot(DEFAULT_ROOT, f"the default: no root in {path}, no ${ROOT_ENV}", path)


def pod_may_join(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the operator lets Kubernetes pods join another sandbox (``io.fractal.sandbox``):
    asked by ``start`` only when a CRI container carries that annotation.  A config that does
    not load allows nothing (the sandbox then fails with the config's error anyway)."""
    try:
        cfg = load({}, environ)
    except ConfigError:
        return False
    rule = next(r for r in ANNOTATIONS if r.kind == "sandbox")
    return pod_may_set(cfg.policy, rule)


def conflict(sandbox_mode: str, annotations: Mapping[str, str]) -> str | None:
    """Why a later container cannot join a sandbox of ``sandbox_mode`` (None if it can): only
    an explicit, different ``io.fractal.mode`` conflicts."""
    want = annotations.get(ANN_MODE)
    if not want or sandbox_mode not in MODES:
        return None
    try:
        want = parse_mode(want, f"annotation {ANN_MODE}")
    except ConfigError as exc:
        return str(exc)
    if want != sandbox_mode:
        return (f"annotation {ANN_MODE}={want}, but this sandbox already runs in {sandbox_mode} "
                "mode (the first container of a sandbox decides)")
    return None


# ---------------------------------------------------------------------------------------------
# runtime options (protobuf, decoded by hand: `start` must not import protobuf)


def _varint(data: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if i >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7


def _fields(data: bytes) -> dict[int, list[bytes | int]]:
    out: dict[int, list[bytes | int]] = {}
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            v, i = _varint(data, i)
            out.setdefault(num, []).append(v)
        elif wire == 2:
            n, i = _varint(data, i)
            if i + n > len(data):
                raise ValueError("truncated field")
            out.setdefault(num, []).append(data[i:i + n])
            i += n
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
    return out


#: containerd nests the options at most once (2.3+: BootstrapParams -> Extension -> Any)
MAX_OPTIONS_NESTING = 1
#: more than containerd ever writes (a path and a type URL); start reads its whole stdin
MAX_OPTIONS_BYTES = 64 * 1024


def config_path_from_options(any_bytes: bytes, _depth: int = 0) -> str | None:
    """``config_path`` of a serialized ``Any{type_url, value}`` holding
    ``runtimeoptions.v1.Options`` (what containerd writes on ``start``'s stdin and puts in
    CreateTaskRequest.options).  None for anything else (empty, runc options, garbage,
    extensions nested deeper than containerd nests them, more than :data:`MAX_OPTIONS_BYTES`)."""
    if not any_bytes or len(any_bytes) > MAX_OPTIONS_BYTES:
        return None
    try:
        outer = _fields(any_bytes)
        if 8 in outer:  # containerd 2.3+: BootstrapParams{..., repeated Extension{Any value=1} = 8}
            if _depth >= MAX_OPTIONS_NESTING:
                return None
            for ext in outer[8]:
                if isinstance(ext, bytes):
                    inner = _fields(ext).get(1, [b""])[0]
                    found = (config_path_from_options(inner, _depth + 1)
                             if isinstance(inner, bytes) else None)
                    if found:
                        return found
            return None
        type_url = outer.get(1, [b""])[0]
        value = outer.get(2, [b""])[0]
        if not isinstance(type_url, bytes) or not isinstance(value, bytes):
            return None
        if not type_url.decode("utf-8", "replace").rsplit("/", 1)[-1] == "runtimeoptions.v1.Options":
            return None
        path = _fields(value).get(2, [b""])[0]
    except (ValueError, IndexError):
        return None
    if not isinstance(path, bytes) or not path:
        return None
    return path.decode("utf-8", "replace")
