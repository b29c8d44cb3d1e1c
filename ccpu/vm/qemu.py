"""The QEMU command line (a pure function of `VMConfig`) and a launcher that cannot leak QEMU.

Shape of the VM: no graphics, no default devices, no disk but the guest's read-only system image.
The guest gets a kernel + initramfs (ccpu.guest) and, with the "image" layout, the read-only
EROFS image with python, the agent and runc as a read-only virtio-blk disk (``system_image``,
found by the guest through its serial), a serial console written
to a log file, virtio-serial ports as its only channels to the host
(host side: UNIX sockets), file shares over 9p or virtiofs, and optionally
virtio-net NICs on tap fds opened by the caller (ccpu.vm.net: a pod's netns).

Two machine types:
- ``q35``: PCI virtio devices; firmware is qboot when available (SeaBIOS
  spends seconds under TCG before it jumps to the kernel).
- ``microvm``: virtio-mmio devices, no PCI, qboot built in.
See docs/vm.md for measured boot times of both.

The launcher sets PR_SET_PDEATHSIG(SIGKILL) in the child: when the process
that started QEMU dies, for whatever reason, the kernel kills QEMU too.

Confinement (docs/vm.md, "QEMU's sandbox and user"): QEMU runs under its seccomp filter
(``-sandbox``, :data:`SANDBOX`) and, when it serves no 9p share (every file share is a virtiofsd's),
as an unprivileged uid/gid of its own (:func:`unprivileged`) that owns no file on the host.  The
credentials are dropped by the launcher before exec, as libvirt does: QEMU's own ``-runas`` calls
setuid, which ``elevateprivileges=deny`` forbids.  Everything such a QEMU needs arrives opened:
the channels and the console as connected sockets (or the console log as an ``-add-fd`` fd),
the kernel, initramfs and system image as ``/proc/self/fd/N`` (:func:`open_boot_files`), the NICs
as tap fds.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from .hostos import LINUX, HostOS

QEMU = "qemu-system-x86_64"
QBOOT = LINUX.qboot_paths[0]
MACHINES = ("q35", "microvm")
SHARE_TYPES = ("9p", "virtiofs")
REPO_TAG = "fractalrepo"
#: QEMU's seccomp filter: no obsolete syscalls, no set*id (privileges only go down), no
#: fork/exec (QEMU here never runs a helper: taps arrive opened, no -netdev script), no
#: scheduler/affinity changes.  A denied syscall kills QEMU (it is a bug or an attack).
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
CONSOLE_FDSET = 1  # -add-fd set id of console_log_fd
HOST_ACCELS = {"linux": ("kvm", "tcg"), "darwin": ("hvf", "tcg")}  # TCG runs everywhere


class ConfigError(ValueError):
    """A VMConfig that cannot be turned into a working command line."""


def default_cpus(accel: str) -> int:
    """vCPUs when nobody asked: 2 under KVM; 1 under TCG, where one host thread runs the vCPUs in
    turn (``thread=single``): a second vCPU adds no throughput, and every wait of one vCPU for the
    other (a spinlock, an IPI, Go's runtime spinning) lasts until the round-robin switches, up to
    100 ms.  Measured in docs/vm.md "Accelerator" (hack/bench/tcg.py)."""
    return 1 if accel == "tcg" else 2


TCG_THREADS = ("single", "multi")
TCG_CPUS = ("max", "qemu64", "Skylake-Client-v4", "EPYC-v3")  # models QEMU 7.2's TCG runs a 6.1 kernel on
TB_SIZE_MAX_MB = 2048


@dataclass(frozen=True)
class Tcg:
    """How TCG runs the guest (ignored under KVM).  Defaults: docs/vm.md "Accelerator".

    ``threads``: ``single`` (one host thread runs every vCPU in turn) or ``multi`` (a host thread per
    vCPU).  ``tb_size_mb``: the translation-block cache (QEMU 7.2 reserves 1 GiB by default and
    fills it as it translates; full, it is flushed).  Bounding it bounds QEMU's RSS: 256 MiB is above
    the working sets seen (a fresh guest ~26 MiB; a sandbox after 10 containers filled 64 MiB, so 64
    would keep flushing; 108 MiB in a long-lived sandbox), docs/vm.md "TCG's settings".  ``cpu``: the CPU model."""

    threads: str = "single"
    tb_size_mb: int | None = 256
    cpu: str = "max"

    def check(self) -> None:
        if self.threads not in TCG_THREADS:
            raise ConfigError(f"tcg thread={self.threads!r}: expected one of {TCG_THREADS}")
        if self.tb_size_mb is not None and not 1 <= self.tb_size_mb <= TB_SIZE_MAX_MB:
            raise ConfigError(f"tcg tb-size={self.tb_size_mb}: expected 1..{TB_SIZE_MAX_MB} (MiB)")
        if self.cpu not in TCG_CPUS:
            raise ConfigError(f"tcg cpu={self.cpu!r}: expected one of {TCG_CPUS}")

    def accel_arg(self) -> str:
        tb = f",tb-size={self.tb_size_mb}" if self.tb_size_mb is not None else ""
        return f"tcg,thread={self.threads}{tb}"


def parse_tcg(text: str, base: Tcg = Tcg()) -> Tcg:
    """``thread=multi,tb-size=128,cpu=qemu64`` (any subset; ``tb-size=default`` is QEMU's own) ->
    Tcg over ``base``; the FRACTAL_TCG override, for measuring (hack/bench/guest.py, hack/vm_soak.py)."""
    out = base
    for item in filter(None, (i.strip() for i in text.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"tcg option {item!r}: expected KEY=VALUE (thread, tb-size, cpu)")
        if key == "thread":
            out = replace(out, threads=value)
        elif key == "tb-size":
            if value == "default":
                out = replace(out, tb_size_mb=None)
            elif value.isdigit() and len(value) <= 6:
                out = replace(out, tb_size_mb=int(value))
            else:
                raise ConfigError(f"tcg tb-size={value!r}: expected MiB or 'default'")
        elif key == "cpu":
            out = replace(out, cpu=value)
        else:
            raise ConfigError(f"tcg option {key!r}: expected thread, tb-size or cpu")
    out.check()
    return out


@dataclass(frozen=True)
class Share:
    """A host directory seen by the guest.  virtiofs shares need a running virtiofsd at `socket`."""

    tag: str
    host_path: str
    guest_path: str
    readonly: bool = True
    type: str = "9p"
    socket: str | None = None  # virtiofsd's vhost-user socket
    fd: int | None = None  # or an inherited socket already connected to virtiofsd (QEMU needs no path)
    # repo layers: their xattrs (file capabilities, user.*, ACLs, opaque markers) reach the
    # guest, read-only (docs/vm.md, "Layer fidelity"); other shares carry none
    layers: bool = False


@dataclass(frozen=True)
class Port:
    """A named virtio-serial port; the host end is a UNIX socket QEMU listens on (``socket``) or
    an inherited socket already connected to the host's end (``fd``, e.g. one of a socketpair)."""

    name: str
    socket: str | None = None
    fd: int | None = None


@dataclass(frozen=True)
class Nic:
    """A virtio-net NIC backed by an already open tap fd (QEMU inherits it: spawn(pass_fds=...))."""

    fd: int
    mac: str
    mtu: int = 1500


@dataclass(frozen=True)
class VMConfig:
    kernel: str
    initramfs: str
    console_log: str
    accel: str = "tcg"
    machine: str = "q35"
    memory_mb: int = 512
    cpus: int = 2
    mode: str = "agent"  # fractal.mode= of the guest init
    repo: Share | None = None  # always mounted read-only at /repo
    shares: Sequence[Share] = ()
    ports: Sequence[Port] = ()
    nics: Sequence[Nic] = ()
    cmdline_extra: Sequence[str] = ()
    qemu: str = QEMU
    firmware: str | None = None  # None: qboot if present (q35); microvm has it built in
    debug: bool = False
    name: str | None = None  # -name: tells operators (ps) which QEMU is whose, e.g. the sandbox's run dir
    sandbox: bool = True  # -sandbox SANDBOX (QEMU's seccomp filter)
    rng: bool = True  # virtio-rng: the guest's CRNG is ready at once (Python's os.urandom never waits)
    # the serial console on this connected socket (spawn(pass_fds=...)) instead of console_log:
    # the reader bounds what it keeps (shim/console.py)
    console_fd: int | None = None
    # or the console log as an open file QEMU inherits (-add-fd: it needs no path to it)
    console_log_fd: int | None = None
    # the guest's read-only system image (ccpu.guest layout "image"): a read-only virtio-blk disk
    # with serial SYSTEM_DISK_SERIAL, which the guest init mounts
    system_image: str | None = None
    # how the system image is attached (docs/vm.md "The candidates, measured"): "blk", the read-only
    # virtio-blk disk (the default), or "pmem", a read-only virtio-pmem device backed by the file
    # (mapped into QEMU; the guest mounts it with DAX where it can); pmem needs the file's size
    # (``system_image_size``, set by open_boot_files), a multiple of PMEM_ALIGN
    system_device: str = "blk"
    system_image_size: int | None = None
    # QMP (ccpu.vm.qmp) on this connected socket: QEMU's end of a socketpair (spawn(pass_fds=...))
    qmp_fd: int | None = None
    # free pcie-root-ports reserved for NICs added after boot (q35 only; ccpu.vm.qmp)
    hotplug_slots: int = 0
    tcg: Tcg = Tcg()
    # virtio-balloon with free page reporting: pages the guest frees are discarded on the host
    balloon: bool = True
    # the host's OS (ccpu.vm.hostos): Linux, or macOS (hvf, 9p only, no seccomp; untested)
    host: HostOS = LINUX
    # UEFI boot (docs/hardware.md): OVMF's code and this VM's own copy of its variable store, as
    # pflash; ``kernel`` is then a unified kernel image (ccpu.guest.uki) with its own initramfs
    # (no -initrd) and the command line below overrides its built-in one (measured into PCR 12)
    ovmf: tuple[str, str] | None = None
    # a TPM: -tpmdev emulator on this connected socket to its swtpm's control channel (ccpu.vm.tpm)
    tpm_fd: int | None = None


SYSTEM_DISK_SERIAL = "fractal-sys"  # how the init finds the disk (/sys/block/vdX/serial)
SYSTEM_DEVICES = ("blk", "pmem")
#: a virtio-pmem region's size and place in the guest's memory map: whole 2 MiB blocks (QEMU's
#: memory devices are aligned to the host's huge page size; the guest maps them in sub-sections)
PMEM_ALIGN = 2 << 20
MAX_HOTPLUG_SLOTS = 8  # each root port takes a PCI bus number and bridge windows


def _check(cfg: VMConfig) -> None:
    cfg.tcg.check()
    if cfg.machine not in MACHINES:
        raise ConfigError(f"machine {cfg.machine!r}: expected one of {MACHINES}")
    if cfg.accel not in ("kvm", "tcg", "hvf"):
        raise ConfigError(f"accel {cfg.accel!r}: expected kvm, tcg or hvf")
    if cfg.accel not in HOST_ACCELS[cfg.host.name]:
        raise ConfigError(f"accel {cfg.accel} does not exist on {cfg.host.name} (kvm: Linux, hvf: macOS)")
    if uses_virtiofs(cfg) and not cfg.host.virtiofs:
        raise ConfigError(f"virtiofs needs virtiofsd and vhost-user, which {cfg.host.name} lacks: use 9p shares")
    if cfg.nics and not cfg.host.tap:
        raise ConfigError(f"tap NICs (a network namespace's) do not exist on {cfg.host.name}")
    tags = set()
    for s in ([cfg.repo] if cfg.repo else []) + list(cfg.shares):
        if s.type not in SHARE_TYPES:
            raise ConfigError(f"share type {s.type!r}: expected one of {SHARE_TYPES}")
        if s.type == "virtiofs" and not s.socket and s.fd is None:
            raise ConfigError(f"virtiofs share {s.tag} needs virtiofsd's socket")
        # the init splits share specs on ':' and the kernel cmdline on whitespace
        for v in (s.tag, s.guest_path):
            if not v or any(c in v for c in ":, \t\n\"'\\"):
                raise ConfigError(f"share tag/guest path {v!r} must not be empty or contain ':', ',', quotes or spaces")
        if not s.guest_path.startswith("/"):
            raise ConfigError(f"guest path {s.guest_path!r} must be absolute")
        if s.layers and not s.readonly:
            raise ConfigError(f"share {s.tag} carries layers: it must be read-only (the guest must not set host xattrs)")
        if s.tag in tags:
            raise ConfigError(f"duplicate share tag {s.tag}")
        tags.add(s.tag)
    if cfg.repo and cfg.repo.tag != REPO_TAG:
        raise ConfigError(f"the repo share must use tag {REPO_TAG}")
    if any(s.tag == REPO_TAG for s in cfg.shares):
        raise ConfigError(f"tag {REPO_TAG} is reserved for the repo")
    for n in cfg.nics:
        if not re.fullmatch(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}", n.mac):
            raise ConfigError(f"NIC MAC {n.mac!r} is not a MAC address")
        if not 68 <= n.mtu <= 65535:
            raise ConfigError(f"NIC MTU {n.mtu} out of range")
        if n.fd < 0:
            raise ConfigError(f"NIC fd {n.fd} is not a file descriptor")
    if not 0 <= cfg.hotplug_slots <= MAX_HOTPLUG_SLOTS:
        raise ConfigError(f"hotplug slots {cfg.hotplug_slots}: expected 0..{MAX_HOTPLUG_SLOTS}")
    if cfg.hotplug_slots and cfg.machine != "q35":
        raise ConfigError(f"NICs added after boot need PCIe root ports: machine q35, not {cfg.machine}")
    if cfg.ovmf and (cfg.machine != "q35" or cfg.firmware):
        raise ConfigError("UEFI boot (OVMF) needs machine q35 and no other firmware")
    if cfg.tpm_fd is not None and cfg.tpm_fd < 0:
        raise ConfigError(f"TPM fd {cfg.tpm_fd} is not a file descriptor")
    if cfg.hotplug_slots and cfg.qmp_fd is None:
        raise ConfigError("hotplug slots without a QMP channel cannot be used")
    if cfg.system_device not in SYSTEM_DEVICES:
        raise ConfigError(f"system image device {cfg.system_device!r}: expected one of {SYSTEM_DEVICES}")
    if cfg.system_device == "pmem":
        if not cfg.system_image:
            raise ConfigError("a virtio-pmem system image needs the image (system_image)")
        size = cfg.system_image_size
        if size is None or size <= 0 or size % PMEM_ALIGN:
            raise ConfigError(f"a virtio-pmem system image must be a non-empty multiple of {PMEM_ALIGN >> 20} MiB "
                              f"(pad the file), not {size} bytes")
        if cfg.machine != "q35":
            raise ConfigError(f"virtio-pmem is a PCI device: machine q35, not {cfg.machine}")
    for p in cfg.ports:
        if (p.socket is None) == (p.fd is None):
            raise ConfigError(f"port {p.name}: give a socket path or a connected fd (one of them)")


def inherited_fds(cfg: VMConfig) -> list[int]:
    """The fds the command line names: QEMU must inherit them under these numbers (spawn(pass_fds))."""
    fds = [n.fd for n in cfg.nics] + [p.fd for p in cfg.ports if p.fd is not None]
    fds += [s.fd for s in ([cfg.repo] if cfg.repo else []) + list(cfg.shares) if s.fd is not None]
    return fds + [fd for fd in (cfg.console_fd, cfg.console_log_fd, cfg.qmp_fd, cfg.tpm_fd) if fd is not None]


def needs_root(cfg: VMConfig) -> str | None:
    """Why QEMU must keep root for ``cfg`` (None: it can run unprivileged).  A 9p share is served by
    QEMU itself, reading and writing host files as its own user: root-only repo layers, volume
    dirs of any owner.  virtiofs shares are served by virtiofsd; QEMU then touches no host file."""
    nine = [s.tag for s in ([cfg.repo] if cfg.repo else []) + list(cfg.shares) if s.type == "9p"]
    return f"QEMU serves 9p share(s) {', '.join(nine)} itself" if nine else None


def security_model(share: Share) -> str:
    """9p: `passthrough` for (read-only) layers, `none` otherwise.  Both pass `user.*` xattrs
    (opaque markers, image xattrs); only `passthrough` passes POSIX ACLs (`none` hides them).
    No model passes `security.*` or `trusted.*`: QEMU's local backend has no handler for them."""
    return "passthrough" if share.layers and share.readonly else "none"


def uses_virtiofs(cfg: VMConfig) -> bool:
    return any(s.type == "virtiofs" for s in ([cfg.repo] if cfg.repo else []) + list(cfg.shares))


# The guest's free page reporting order (docs/vm.md "Host memory per VM"): the kernel reports free
# blocks of 2^order pages to the balloon, which discards them on the host.  The kernel's default is
# the pageblock order (9: 2 MiB), so free memory scattered in smaller blocks stayed resident on the
# host; 0 reports every free page.  Measured with hack/bench/tcg.py (5 runc run + delete, then 200 MiB
# touched and freed, same run): guest RAM resident 108.6 -> 102.8 MB, the runc loop no slower; in an
# idle sandbox ~0 (what its guest holds is in use or page cache, not free).  The guest's init writes
# it again after the balloon registers (a 6.1 kernel resets it then: ccpu/guest/init.sh).
PAGE_REPORTING_ORDER = 0


def kernel_cmdline(cfg: VMConfig) -> str:
    """The guest kernel's command line: console on the serial port, no reboot on panic, our init's knobs."""
    # no_timer_check: the kernel's boot-time check that the PIT ticks through the IO-APIC busy-waits
    # a few ticks; under TCG on a loaded host the ticks come late and the kernel panics ("IO-APIC +
    # timer doesn't work!", seen by hack/bench/tcg.py at load average 30).  QEMU's timer is known good.
    args = ["console=ttyS0", "panic=-1", "reboot=t" if cfg.machine == "microvm" else "",
            "quiet" if not cfg.debug else "loglevel=7", "rdinit=/init", "no_timer_check",
            "i8042.noaux", "i8042.nomux", "i8042.nopnp", "i8042.dumbkbd",
            f"fractal.mode={cfg.mode}", f"fractal.repo={cfg.repo.type if cfg.repo else 'none'}"]
    if cfg.balloon:
        args.append(f"page_reporting.page_reporting_order={PAGE_REPORTING_ORDER}")
    if cfg.debug:
        args.append("fractal.debug=1")
    if cfg.system_image and cfg.system_device != "blk":  # the init looks for the image there
        args.append(f"fractal.sysdev={cfg.system_device}")
    for s in cfg.shares:
        args.append(f"fractal.share={s.tag}:{s.type}:{'ro' if s.readonly else 'rw'}:{s.guest_path}")
    args += list(cfg.cmdline_extra)
    return " ".join(a for a in args if a)


def memory_arg(cfg: VMConfig) -> str:
    """``-m``: the guest's RAM; with a virtio-pmem system image also room above it for the device
    (a memory device needs ``maxmem`` beyond the RAM, and a slot)."""
    if cfg.system_device == "pmem" and cfg.system_image_size:
        return f"{cfg.memory_mb}M,slots=1,maxmem={cfg.memory_mb * (1 << 20) + cfg.system_image_size}"
    return f"{cfg.memory_mb}M"


def command(cfg: VMConfig, qboot_exists: bool = False) -> list[str]:
    """argv for QEMU.  Pure: `qboot_exists` is the only fact about the host it needs."""
    _check(cfg)
    micro = cfg.machine == "microvm"
    bus = "device" if micro else "pci"  # virtio-X-device (mmio) vs virtio-X-pci
    argv = [cfg.qemu, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]
    if cfg.name:
        argv += ["-name", "guest=" + cfg.name.replace(",", ",,")]
    vfs = uses_virtiofs(cfg)
    # The guest's RAM is a shared memfd wherever the host has one (Linux): vhost-user daemons
    # (virtiofsd) must map it, and even without them it keeps the RAM in 4 KiB pages.  QEMU
    # madvises every RAM block MADV_HUGEPAGE; anonymous RAM then faults in 2 MiB transparent huge
    # pages, so each page the guest touches makes 2 MiB resident on the host (the bare kernel: 96 MB
    # resident for 29 MB the guest used).  Shared memory follows shmem_enabled (Debian: never).
    # docs/vm.md "Host memory per VM".
    memfd = vfs or cfg.host.virtiofs
    mem = ",memory-backend=mem" if memfd else ""
    if micro:
        argv += ["-machine", f"microvm,isa-serial=on,rtc=on,pit=on,pic=on,acpi=on{mem}"]
    else:
        argv += ["-machine", f"q35,vmport=off,sata=off,smbus=off,usb=off,graphics=off{mem}"]
        fw = cfg.firmware or (qboot_path(cfg.host) if qboot_exists and not cfg.ovmf else None)
        if cfg.ovmf:
            code, vars_ = (p.replace(",", ",,") for p in cfg.ovmf)
            argv += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
                     "-drive", f"if=pflash,format=raw,unit=1,file={vars_}"]
        elif fw:
            argv += ["-bios", fw]
    if memfd:
        argv += ["-object", f"memory-backend-memfd,id=mem,size={cfg.memory_mb}M,share=on"]
    # TCG: docs/vm.md "Accelerator" (why thread=single by default, why the cache is bounded)
    hw = cfg.accel in ("kvm", "hvf")  # hardware virtualisation: the guest sees the host's CPU
    argv += ["-accel", cfg.accel if hw else cfg.tcg.accel_arg(),
             "-cpu", "host" if hw else cfg.tcg.cpu,
             "-m", memory_arg(cfg), "-smp", str(cfg.cpus),
             "-kernel", cfg.kernel]
    # a UKI carries its initramfs (systemd-stub hands it over; a -initrd would be a second one)
    argv += ([] if cfg.ovmf else ["-initrd", cfg.initramfs]) + ["-append", kernel_cmdline(cfg)]
    if cfg.tpm_fd is not None:
        argv += ["-chardev", f"socket,id=tpmchr,fd={cfg.tpm_fd}", "-tpmdev", "emulator,id=tpm0,chardev=tpmchr",
                 "-device", "tpm-tis,tpmdev=tpm0"]
    if cfg.console_fd is not None:
        argv += ["-chardev", f"socket,id=con0,fd={cfg.console_fd},server=off", "-serial", "chardev:con0"]
    elif cfg.console_log_fd is not None:  # QEMU opens /dev/fdset/N by dup()ing the fd
        argv += ["-add-fd", f"fd={cfg.console_log_fd},set={CONSOLE_FDSET}",
                 "-serial", f"file:/dev/fdset/{CONSOLE_FDSET}"]
    else:
        argv += ["-serial", f"file:{cfg.console_log}"]
    if cfg.sandbox and cfg.host.seccomp:  # QEMU builds its seccomp filter on Linux only
        argv += ["-sandbox", SANDBOX]
    if cfg.rng:
        argv += ["-object", "rng-random,id=rng0,filename=/dev/urandom", "-device", f"virtio-rng-{bus},rng=rng0"]
    if cfg.balloon:
        # the guest reports freed 2 MiB+ blocks; QEMU discards them (MADV_DONTNEED, or a hole punched
        # in the shared memfd with virtiofs): the host gets the memory of exited containers back
        argv += ["-device", f"virtio-balloon-{bus},id=balloon0,free-page-reporting=on"]
    if cfg.ports:
        argv += ["-device", f"virtio-serial-{bus},id=vser0,max_ports={max(2, len(cfg.ports) + 1)}"]
        for i, p in enumerate(cfg.ports):
            sock = f"fd={p.fd}" if p.fd is not None else f"path={p.socket},server=on,wait=off"
            argv += ["-chardev", f"socket,id=port{i},{sock}",
                     "-device", f"virtserialport,bus=vser0.0,chardev=port{i},name={p.name}"]
    for i, s in enumerate(([cfg.repo] if cfg.repo else []) + list(cfg.shares)):
        if s.type == "9p":
            ro = ",readonly=on" if s.readonly else ""
            argv += ["-fsdev", f"local,id=fs{i},path={s.host_path},security_model={security_model(s)},multidevs=remap{ro}",
                     "-device", f"virtio-9p-{bus},fsdev=fs{i},mount_tag={s.tag}"]
        else:
            dev = "vhost-user-fs-device" if micro else "vhost-user-fs-pci"
            sock = f"fd={s.fd}" if s.fd is not None else f"path={s.socket}"
            argv += ["-chardev", f"socket,id=vfs{i},{sock}",
                     "-device", f"{dev},chardev=vfs{i},tag={s.tag},queue-size=1024"]
    if cfg.system_image and cfg.system_device == "pmem":
        # read-only and private: QEMU opens the file O_RDONLY and maps it PROT_READ, MAP_PRIVATE
        path = cfg.system_image.replace(",", ",,")
        argv += ["-object", f"memory-backend-file,id=sysmem,mem-path={path},size={cfg.system_image_size},"
                            "share=off,readonly=on",
                 "-device", "virtio-pmem-pci,memdev=sysmem,id=syspmem"]
    elif cfg.system_image:
        # read-only at every level: the guest cannot write it, QEMU opens it O_RDONLY and takes
        # only a shared lock (every VM on the host attaches the same file)
        path = cfg.system_image.replace(",", ",,")
        argv += ["-drive", f"file={path},if=none,id=sys,format=raw,readonly=on,media=disk,cache=writeback",
                 "-device", f"virtio-blk-{bus},drive=sys,serial={SYSTEM_DISK_SERIAL}"]
    if cfg.qmp_fd is not None:
        argv += ["-chardev", f"socket,id=qmp,fd={cfg.qmp_fd},server=off", "-mon", "chardev=qmp,mode=control"]
    for i in range(cfg.hotplug_slots):
        # empty root ports on the root complex, one per NIC that may arrive later: q35 hot-plugs
        # only into a port (ccpu.vm.qmp.root_port_id names them)
        argv += ["-device", f"pcie-root-port,id=hp{i},bus=pcie.0,chassis={i + 1}"]
    for i, n in enumerate(cfg.nics):
        # host_mtu: the guest driver learns the MTU from the device; romfile= (PCI): no iPXE option ROM
        rom = "" if micro else ",romfile="
        argv += ["-netdev", f"tap,id=net{i},fd={n.fd},vhost=off",
                 "-device", f"virtio-net-{bus},netdev=net{i},mac={n.mac.lower()},host_mtu={n.mtu}{rom}"]
    return argv


# ---------------------------------------------------------------------------------------------
# launching

PR_SET_PDEATHSIG = 1
LINUX_HOST = sys.platform.startswith("linux")


def die_with_parent() -> None:
    """preexec_fn: SIGKILL this child when its parent dies (QEMU/virtiofsd must never outlive us).

    Linux only: macOS has no PR_SET_PDEATHSIG, so there a QEMU whose starter is SIGKILLed lives on
    until its guest powers off (the launcher's ``finally`` still stops it on every other exit)."""
    if not LINUX_HOST:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    # the parent may already be gone between fork and prctl
    if os.getppid() == 1:
        os._exit(1)


@dataclass(frozen=True)
class Creds:
    """Who a child runs as: set by the launcher between fork and exec (supplementary groups,
    gid, then uid: all capabilities go with the uid change)."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()


#: default first uid of QEMU's per-VM users: above systemd's container ranges
#: (0x80000-0x6FFFFFFF) and below its "foreign" range (0x7FFE0000); pids add at most 2**22
DEFAULT_UID_BASE = 0x7F000000
PID_MAX_LIMIT = 1 << 22  # the kernel's upper bound for pid_max on 64-bit


def unprivileged(uid_base: int, owner_pid: int, accel: str = "tcg", kvm_gid: int | None = None) -> Creds:
    """QEMU's credentials for a VM started by process ``owner_pid``: uid = gid = ``uid_base`` +
    that pid.  Pure.

    Why a uid per VM: two QEMUs of one uid could ptrace or signal each other, so one escaped
    guest would reach every other VM's memory.  Why base + pid: each VM has its own starting
    process (a shim daemon, a ``fractal vm run``) and QEMU dies with it (PDEATHSIG), so no two
    live QEMUs share a uid, with no allocation state to leak when a shim is SIGKILLed; no
    passwd entry is needed (the uid owns no file).  ``kvm_gid``: /dev/kvm's group, added when
    ``accel`` is kvm so the device opens."""
    if not 0 < owner_pid < PID_MAX_LIMIT:
        raise ValueError(f"pid {owner_pid} out of range")
    if not 0 < uid_base <= 0xFFFFFFFE - PID_MAX_LIMIT:
        raise ValueError(f"uid base {uid_base} out of range")
    groups = (kvm_gid,) if accel == "kvm" and kvm_gid is not None else ()
    return Creds(uid_base + owner_pid, uid_base + owner_pid, groups)


def choose_creds(cfg: VMConfig, uid_base: int, owner_pid: int, euid: int | None = None) -> tuple[Creds | None, str]:
    """(QEMU's credentials, why): None keeps root -- when configured (``uid_base`` 0) or when QEMU
    serves a 9p share (:func:`needs_root`) -- or, not started by root, the caller's own user (a
    rootless `vm run`: nothing to drop, and QEMU serves the user's 9p shares as the user)."""
    euid = os.geteuid() if euid is None else euid
    if euid != 0:
        return None, f"the calling user (uid {euid}; not root: nothing to drop)"
    if uid_base == 0:
        return None, "root (qemu_uid_base = 0)"
    why = needs_root(cfg)
    if why:
        return None, f"root: {why}"
    creds = unprivileged(uid_base, owner_pid, cfg.accel, kvm_group())
    return creds, f"uid/gid {creds.uid}"


def kvm_group() -> int | None:
    try:
        return os.stat("/dev/kvm").st_gid
    except OSError:
        return None


def open_boot_files(cfg: VMConfig) -> tuple[VMConfig, list[int]]:
    """``cfg`` with its kernel, initramfs and system image read through fds opened here
    (``/proc/self/fd/N``; ``/dev/fd/N`` on macOS), and those fds: a QEMU without root reads them whatever the
    permissions of the dirs above them (the guest cache may be root-only).  The caller closes
    the fds after spawning."""
    import dataclasses

    paths = [cfg.kernel, cfg.initramfs] + ([cfg.system_image] if cfg.system_image else [])
    fds: list[int] = []
    try:
        for path in paths:
            fds.append(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    named = [f"{cfg.host.fd_dir}/{fd}" for fd in fds]
    size = os.fstat(fds[2]).st_size if cfg.system_image and cfg.system_device == "pmem" else cfg.system_image_size
    return dataclasses.replace(cfg, kernel=named[0], initramfs=named[1],
                               system_image=named[2] if cfg.system_image else None, system_image_size=size), fds


def spawn(argv: Sequence[str], *, stdout: int | None = subprocess.DEVNULL,
          stderr: int | None = subprocess.PIPE, cwd: str | None = None,
          pass_fds: Sequence[int] = (), guard_shares: bool = False,
          creds: Creds | None = None, die_with_parent_: bool = True, nice: int = 0) -> subprocess.Popen:
    """Start a helper (QEMU, virtiofsd) that dies with us; stdin is /dev/null.

    ``cwd``: relative socket paths in ``argv`` are relative to it (unix socket paths are limited
    to 108 bytes; a sandbox's run dir can be deeper than that).
    ``pass_fds``: fds the child inherits under the same numbers (the NICs' tap fds); all others are closed.
    ``guard_shares``: QEMU serving a read-write 9p share runs under :mod:`ccpu.vm.fsguard` (no
    setuid/setgid file, device node or xattr written for the guest).
    ``creds``: drop to these before exec (PDEATHSIG and the guard are set up after the drop: a
    credential change clears PDEATHSIG).
    ``die_with_parent_``: False for a VM that outlives its starter (a pooled VM, handed to the
    shim that adopts it: shim/poold.py, which ends un-adopted ones itself).
    ``nice``: the child's nice value, before exec, so every thread it makes inherits it (a pooled
    VM boots at a low priority: shim/poold.py); raising it needs no privilege after the drop."""
    install = None
    if guard_shares:
        from ccpu.vm import fsguard

        install = fsguard.installer()

    def preexec() -> None:
        if die_with_parent_:
            die_with_parent()
        if nice:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
        if install is not None:
            install()
    preexec_fn: Callable[[], None] | None = preexec if die_with_parent_ or install is not None or nice else None
    kw: dict[str, object] = {}
    if creds is not None:
        kw = {"user": creds.uid, "group": creds.gid, "extra_groups": list(creds.groups)}
    return subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                            preexec_fn=preexec_fn, close_fds=True, cwd=cwd, pass_fds=tuple(pass_fds),
                            **kw)  # type: ignore[call-overload]


def qboot_path(host: HostOS = LINUX) -> str:
    """Where qboot.rom is on ``host`` (its first candidate when none exists)."""
    return next((p for p in host.qboot_paths if os.path.exists(p)), host.qboot_paths[0])


def qboot_available(host: HostOS = LINUX) -> bool:
    return any(os.path.exists(p) for p in host.qboot_paths)
