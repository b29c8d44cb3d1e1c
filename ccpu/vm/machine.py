"""One VM: QEMU and its helpers, booted and stopped the same way for every caller.

Both users of a VM go through here: the shim's VM sandbox (asyncio, its children collected by
the shared :class:`ccpu.linux.reaper.Reaper`: :class:`AsyncMachine`) and ``fractal vm run``
(synchronous, :class:`Machine`).  The boot sequence is written once:

1. accelerator: ``auto`` asks :func:`ccpu.vm.accel.choose` (KVM only where it works);
2. network: the netns's interfaces become the VM's NICs (:func:`ccpu.vm.net.attach`);
3. shares: a virtiofsd of its own per virtiofs share (sandboxed, :mod:`ccpu.vm.shares`),
   connected here; 9p shares are served by QEMU itself;
4. ports: one socketpair per virtio-serial port; the console: a file or the caller's socket;
5. QEMU: the command line is :func:`plan` (pure) + :func:`ccpu.vm.qemu.command`; its uid is its
   own unless it serves a 9p share (:func:`ccpu.vm.qemu.choose_creds`), under its seccomp filter
   (``-sandbox``) and the 9p guard (:mod:`ccpu.vm.fsguard`); everything it needs arrives as an
   fd, and it dies with its starter (PR_SET_PDEATHSIG, which follows the *thread* that forked:
   both runners spawn on the caller's thread).

``boot()`` returns once QEMU runs: the ports are connected from the start (socketpairs), so the
caller can talk to the guest at once (what it says there -- the agent protocol, vm run's
protocol -- is the caller's business).  The caller owns :attr:`ports` after a successful boot.

Helpers share the VM's life: a virtiofsd that dies while the VM runs leaves the guest's file
system hanging for ever, so the VM is ended (and the caller told why); ``stop`` ends the helpers
after QEMU.  :meth:`pids` feeds the shim's record for a dead shim's ``delete`` (shim/leftovers.py).

Files in ``workdir`` (a root-only dir the caller owns; QEMU's and virtiofsd's cwd): ``qemu.log`` (QEMU's stderr),
``virtiofsd.log``, and the virtiofsd sockets ``vfs-<tag>.sock``, reached relative to it (a unix
socket path has at most 107 bytes; a sandbox's run dir can be deeper).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from . import accel as accel_
from . import hostos
from .hostos import HostOS
from . import net, qemu, shares
from . import nics as nics_
from . import qmp as qmp_
from . import tpm as tpm_

log = logging.getLogger(__name__)

QEMU_LOG = "qemu.log"
VIRTIOFSD_LOG = "virtiofsd.log"
#: how long QEMU gets for SIGTERM, then for SIGKILL, and a helper for SIGKILL
TERM_WAIT, KILL_WAIT = 3.0, 5.0


class MachineError(RuntimeError):
    """The VM could not be started (or ended before its time): what failed, with context."""


# ---------------------------------------------------------------------------------------------
# what a VM is made of (pure data)


@dataclass(frozen=True)
class DirShare:
    """A host directory in the guest.  ``transport``: ``9p`` (QEMU serves it itself, so QEMU keeps
    root) or ``virtiofs`` (a virtiofsd of its own, sandboxed in the dir).  ``layers``: repo layers,
    whose xattrs (file capabilities, user.*, ACLs) reach the guest; such a share must be read-only."""

    tag: str
    host: str
    guest: str
    readonly: bool = True
    transport: str = "9p"
    layers: bool = False
    virtiofsd_args: tuple[str, ...] = ()  # more virtiofsd flags (e.g. --no-announce-submounts)


@dataclass(frozen=True)
class ConsoleFile:
    """The serial console appended to ``path`` (truncated at boot) by QEMU through an inherited
    fd.  Unbounded: for a VM that lives as long as one command (``fractal vm run``)."""

    path: str


@dataclass(frozen=True)
class ConsoleSocket:
    """The serial console written to ``fd``, QEMU's end of a connected socket whose other end the
    caller reads and caps (shim/console.py: guest root can write the console without end).  The
    caller keeps ownership of ``fd`` (it closes it once QEMU runs)."""

    fd: int


@dataclass(frozen=True)
class MachineSpec:
    """Everything that makes one VM.  ``uid_base`` 0 keeps QEMU root; otherwise QEMU runs as
    ``uid_base + owner_pid`` (default: this process) whenever it serves no 9p share."""

    kernel: str
    initramfs: str
    workdir: str
    console: ConsoleFile | ConsoleSocket
    system_image: str | None = None  # the guest build's read-only image (Guest.image), a read-only disk
    system_device: str = "blk"  # blk (the default) | pmem: how the image is attached (qemu.VMConfig)
    mode: str = "agent"  # the guest init's fractal.mode: agent (a sandbox) | run (vm run)
    accel: str = "auto"  # auto | kvm | tcg
    machine: str = "q35"  # q35 | microvm
    memory_mb: int = 512
    cpus: int | None = None  # None: qemu.default_cpus(the accelerator)
    repo: DirShare | None = None  # read-only at /repo (vm run --repo); tag qemu.REPO_TAG
    shares: tuple[DirShare, ...] = ()
    ports: tuple[str, ...] = ()  # virtio-serial port names, each a socketpair
    netns: str | None = None  # its interfaces become the guest's NICs (ccpu.vm.net)
    hotplug_nics: int = 0  # NICs that can be added after boot (attach_nic): QMP + free root ports
    uid_base: int = qemu.DEFAULT_UID_BASE
    owner_pid: int | None = None
    cmdline_extra: tuple[str, ...] = ()
    debug: bool = False  # verbose guest kernel + init
    name: str | None = None  # QEMU's -name: which QEMU is whose in ps
    virtiofsd: str | None = None  # its binary; None: shares.find_virtiofsd()
    qemu_binary: str = qemu.QEMU
    #: False: QEMU and virtiofsd do not die with the starter (PDEATHSIG): a pooled VM outlives the
    #: pool once a shim adopted it (shim/poold.py ends the un-adopted ones itself)
    die_with_starter: bool = True
    tcg: qemu.Tcg | None = None  # None: qemu.Tcg() unless FRACTAL_TCG overrides (tcg_options)
    #: QEMU's and virtiofsd's nice value from their exec on (a pooled VM's boot yields to running
    #: sandboxes: shim/poold.py; `Machine.renice` sets it back)
    nice: int = 0
    balloon: bool = True  # free page reporting (qemu.VMConfig.balloon); off only to measure it
    host: HostOS = field(default_factory=hostos.current)  # Linux, or macOS (untested: ccpu/vm/hostos.py)
    #: UEFI boot of this unified kernel image (ccpu.guest.uki) through OVMF, with a TPM of its own
    #: (an swtpm helper, EK certified by the CA in ``tpm_ca``: ccpu.vm.tpm); docs/hardware.md
    uki: str | None = None
    tpm_ca: str | None = None

    def all_shares(self) -> tuple[DirShare, ...]:
        return ((self.repo,) if self.repo else ()) + self.shares


@dataclass(frozen=True)
class Opened:
    """What the launcher opened for QEMU, by role: the fds the command line names."""

    share_fds: Mapping[str, int] = field(default_factory=dict)  # tag -> connection to its virtiofsd
    port_fds: Mapping[str, int] = field(default_factory=dict)  # name -> QEMU's end of the pair
    console_fd: int = -1
    nics: Sequence[qemu.Nic] = ()
    net_cmdline: Sequence[str] = ()
    qmp_fd: int | None = None  # QEMU's end of the QMP socketpair
    ovmf_vars: str | None = None  # the VM's copy of OVMF's variable store (spec.uki)
    tpm_fd: int | None = None  # QEMU's connection to the VM's swtpm (spec.tpm_ca)


def socket_name(tag: str) -> str:
    """A virtiofsd's socket, relative to the workdir."""
    return f"vfs-{tag}.sock"


def _qemu_share(s: DirShare, fd: int | None = None) -> qemu.Share:
    return qemu.Share(s.tag, s.host, s.guest, s.readonly, s.transport, fd=fd, layers=s.layers)


def plan(spec: MachineSpec, accel: str, opened: Opened) -> qemu.VMConfig:
    """QEMU's configuration for ``spec`` once its fds are open.  Pure."""
    def share(s: DirShare) -> qemu.Share:
        return _qemu_share(s, opened.share_fds[s.tag] if s.transport == "virtiofs" else None)

    console = spec.console
    return qemu.VMConfig(
        kernel=spec.uki or spec.kernel, initramfs=spec.initramfs, system_image=spec.system_image,
        system_device=spec.system_device,
        ovmf=(tpm_.OVMF_CODE, opened.ovmf_vars) if spec.uki and opened.ovmf_vars else None, tpm_fd=opened.tpm_fd,
        console_log=console.path if isinstance(console, ConsoleFile) else "",
        console_log_fd=opened.console_fd if isinstance(console, ConsoleFile) else None,
        console_fd=opened.console_fd if isinstance(console, ConsoleSocket) else None,
        accel=accel, machine=spec.machine, memory_mb=spec.memory_mb,
        cpus=spec.cpus if spec.cpus is not None else qemu.default_cpus(accel), mode=spec.mode,
        repo=share(spec.repo) if spec.repo else None, shares=[share(s) for s in spec.shares],
        ports=[qemu.Port(p, fd=opened.port_fds[p]) for p in spec.ports], nics=list(opened.nics),
        cmdline_extra=(*opened.net_cmdline, *spec.cmdline_extra), debug=spec.debug, name=spec.name,
        qemu=spec.qemu_binary, qmp_fd=opened.qmp_fd, hotplug_slots=spec.hotplug_nics,
        tcg=spec.tcg or qemu.Tcg(), balloon=spec.balloon, host=spec.host)


def tcg_options(env: Mapping[str, str] | None = None) -> qemu.Tcg:
    """TCG's settings: the defaults (docs/vm.md "Accelerator"), or ``FRACTAL_TCG`` (e.g.
    ``thread=multi,tb-size=128``) for measuring another configuration; a bad value is an error."""
    text = (os.environ if env is None else env).get("FRACTAL_TCG", "")
    try:
        return qemu.parse_tcg(text)
    except qemu.ConfigError as e:
        raise qemu.ConfigError(f"FRACTAL_TCG={text!r}: {e}") from None


def virtiofsd_argv(binary: str, share: DirShare) -> list[str]:
    """One share's virtiofsd (its socket relative to the workdir).  Pure."""
    return shares.virtiofsd_argv(binary, _qemu_share(share), socket_name(share.tag), share.virtiofsd_args)


def choose_accel(requested: str) -> accel_.Choice:
    """``auto``: probe the host; otherwise what was configured."""
    if requested == "auto":
        return accel_.choose()
    import platform
    here = accel_.HOST_ACCELS.get(platform.system(), accel_.ACCELS)
    if requested not in here:
        raise qemu.ConfigError(f"accel {requested!r}: expected auto or one of {here} on {platform.system()}")
    return accel_.Choice(requested, "configured")


# ---------------------------------------------------------------------------------------------
# the launch, shared by both runners


Spawned = Callable[[str, subprocess.Popen], None]


class GuestWatch:
    """The guest's own end (QMP SHUTDOWN/RESET/GUEST_PANICKED, ccpu.vm.qmp.guest_end), reported as
    QEMU announces it rather than when QEMU has exited -- for a VM the shim booted and for one
    it adopted from the pool alike.  The host class provides ``nics``, ``pid``, ``ended``,
    ``_stopping``, ``_alive()`` and ``_end(words)``."""

    def watch_guest(self) -> bool:
        """Start watching; False: no QMP channel to watch.  Only the VM's final owner watches
        (never a pool that hands the channel over: two readers would split QEMU's lines)."""
        me: Any = self
        if me.nics is None or me.nics.qmp is None:
            return False
        qmp_.watch_in_loop(me.nics.qmp, asyncio.get_running_loop(), self._guest_ended)
        return True

    def _guest_ended(self, words: str) -> None:
        me: Any = self
        if me._stopping or me.ended is not None or not me._alive():
            log.info("QEMU pid %s: %s", me.pid, words)
            return
        log.warning("QEMU pid %s: %s", me.pid, words)
        me._end(words)


class _Launcher:
    """State and steps common to :class:`Machine` and :class:`AsyncMachine`."""

    def __init__(self, spec: MachineSpec) -> None:
        self.spec = spec
        self.accel: accel_.Choice | None = None
        self.qemu_user = ""  # e.g. "uid/gid 2130706433", or why root
        self.cpus = 0  # the guest's vCPUs, once launched
        self.argv: list[str] = []
        self.net: net.Attachment | None = None
        self.nics: nics_.Nics | None = None  # with spec.hotplug_nics: QMP and the NICs added after boot
        self.ports: dict[str, socket.socket] = {}  # our ends; the caller's after boot
        self.qemu: subprocess.Popen | None = None
        self.helpers: list[tuple[str, subprocess.Popen]] = []
        self.exit_status: int | None = None
        self.ended: str | None = None  # why it ended by itself (None: it did not, or stop() ended it)
        self._stopping = False

    @property
    def pid(self) -> int | None:
        return self.qemu.pid if self.qemu is not None else None

    def pids(self) -> list[tuple[str, int]]:
        """(name, pid) of QEMU and its helpers, for the record a dead shim's ``delete`` reads."""
        return ([("qemu", self.qemu.pid)] if self.qemu is not None else []) + \
            [(name, p.pid) for name, p in self.helpers]

    def renice(self, value: int) -> None:
        """Every thread of QEMU and its helpers to nice ``value`` (a pooled VM, ready: back to
        the sandboxes' priority; see ``MachineSpec.nice``)."""
        from ccpu.linux import proc

        for _name, pid in self.pids():
            proc.renice(pid, value)

    def _attach_net(self) -> None:
        if self.spec.netns is None:
            return
        try:
            self.net = net.attach(self.spec.netns)
        except net.NetError as exc:
            raise MachineError(f"cannot connect network namespace {self.spec.netns} to the VM: {exc}") from None

    def _detach_net(self) -> None:
        """Taps and tc redirects out of the netns: only once QEMU is gone (they are ours then)."""
        if self.net is not None:
            attached, self.net = self.net, None
            attached.detach()

    def _close_ports(self) -> None:
        for s in self.ports.values():
            s.close()
        self.ports.clear()
        if self.nics is not None:
            self.nics.release()

    def _alive(self) -> bool:
        """Whether QEMU runs (each runner knows how without reaping it)."""
        raise NotImplementedError

    # -- NICs after boot (blocking: the async runner calls these in a worker thread) ----------

    def _hot_attach(self, netns: str) -> list[net.Interface]:
        """Connect ``netns`` to the running VM (ccpu.vm.nics.Nics.attach)."""
        if self.nics is None:
            raise MachineError("NICs can be added only to a running VM booted with hotplug_nics")
        try:
            return self.nics.attach(netns)
        except nics_.NicError as exc:
            raise MachineError(str(exc)) from None

    def _hot_detach(self, netns: str) -> None:
        """Unplug ``netns``'s NICs from the running VM, then remove its taps and tc redirects."""
        if self.nics is None:
            raise MachineError(f"network namespace {netns} is not connected to this VM after boot")
        try:
            self.nics.detach(netns)
        except nics_.NicError as exc:
            raise MachineError(str(exc)) from None

    def _detach_hot(self) -> None:
        """Once QEMU is gone: the taps and redirects of every NIC added after boot, and QMP."""
        if self.nics is not None:
            self.nics.close()

    def _launch(self, spawned: Spawned) -> None:
        """virtiofsds, ports, console, QEMU -- on the caller's thread.  ``spawned(name, proc)`` is
        called right after each start (the async runner registers the pid with its reaper there,
        before its loop can reap it).  On failure the helpers started are killed (not waited for:
        the runner does that) and the ports closed."""
        spec = self.spec
        assert self.accel is not None
        for s in spec.all_shares():
            if not os.path.isdir(s.host):
                raise MachineError(f"share {s.host} is not a directory")
        passed: list[socket.socket] = []  # QEMU's: virtiofsd connections, its ends of the ports
        fds: list[int] = []  # QEMU's log, the console file, kernel, initramfs and system image
        opened_shares: dict[str, int] = {}
        try:
            virtiofs = [s for s in spec.all_shares() if s.transport == "virtiofs"]
            if virtiofs:
                binary = spec.virtiofsd or shares.find_virtiofsd()
                if binary is None:
                    raise MachineError("virtiofs shares need virtiofsd, and none was found (hack/setup.sh builds one)")
                with _DirAddress(spec.workdir) as where:
                    for s in virtiofs:
                        proc = self._start_virtiofsd(binary, s)
                        spawned("virtiofsd", proc)
                        try:  # QEMU gets the connection, not the path (it may run without the right to reach it)
                            passed.append(shares.connect(where(socket_name(s.tag))))
                        except OSError as exc:
                            raise MachineError(f"virtiofsd pid {proc.pid} for share {s.tag} does not accept "
                                               f"on {os.path.join(spec.workdir, socket_name(s.tag))}: {exc}") from None
                        opened_shares[s.tag] = passed[-1].fileno()
            tpm_fd = None
            if spec.tpm_ca is not None:
                proc = self._start_swtpm()
                spawned("swtpm", proc)
                try:
                    with _DirAddress(spec.workdir) as where:
                        passed.append(shares.connect(where(tpm_.SOCKET)))
                except OSError as exc:
                    raise MachineError(f"swtpm pid {proc.pid} does not accept: {exc}") from None
                tpm_fd = passed[-1].fileno()
            ovmf_vars = tpm_.vars_copy(spec.workdir) if spec.uki else None
            qmp_fd = None
            if spec.hotplug_nics:
                ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                self.nics = nics_.Nics(qmp_.Qmp(ours), range(spec.hotplug_nics), self._alive, spec.netns)
                passed.append(theirs)
                qmp_fd = theirs.fileno()
            port_fds = {}
            for name in spec.ports:
                ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                self.ports[name] = ours
                passed.append(theirs)
                port_fds[name] = theirs.fileno()
            fds.append(_open_log(os.path.join(spec.workdir, QEMU_LOG)))
            if isinstance(spec.console, ConsoleFile):
                fds.append(os.open(spec.console.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600))
                console_fd = fds[-1]
            else:
                console_fd = spec.console.fd
            opened = Opened(opened_shares, port_fds, console_fd,
                            self.net.nics if self.net else (), self.net.cmdline if self.net else (), qmp_fd,
                            ovmf_vars, tpm_fd)
            cfg, boot_fds = qemu.open_boot_files(plan(replace(spec, tcg=spec.tcg or tcg_options()), self.accel.accel,
                                                       opened))
            fds += boot_fds
            owner = spec.owner_pid if spec.owner_pid is not None else os.getpid()
            creds, self.qemu_user = qemu.choose_creds(cfg, spec.uid_base, owner)
            if ovmf_vars is not None and creds is not None:  # the firmware writes its variables
                os.chown(ovmf_vars, creds.uid, creds.gid)
            self.argv = qemu.command(cfg, qboot_exists=qemu.qboot_available(cfg.host))
            self.cpus = cfg.cpus
            log.debug("qemu: %s", " ".join(self.argv))
            # cwd: the workdir, though QEMU opens nothing by path (chdir precedes the uid drop):
            # operators and tests tell whose QEMU it is by it (and by -name)
            self.qemu = qemu.spawn(self.argv, stdout=subprocess.DEVNULL, stderr=fds[0], cwd=spec.workdir, creds=creds,
                                   pass_fds=qemu.inherited_fds(cfg) + boot_fds, guard_shares=True,
                                   die_with_parent_=spec.die_with_starter, nice=spec.nice)
            spawned("qemu", self.qemu)
        except BaseException:
            for _name, p in self.helpers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
            self._close_ports()
            raise
        finally:
            for c in passed:  # QEMU holds them now (or never will)
                c.close()
            for fd in fds:
                os.close(fd)
            if self.net is not None:
                self.net.close_fds()  # QEMU holds the taps now

    def _start_swtpm(self) -> subprocess.Popen:
        """A new TPM in the workdir (manufactured now: its own EK) and its swtpm, a helper of the VM
        like a virtiofsd: it dies with the starter, and the VM ends if it dies."""
        from pathlib import Path

        assert self.spec.tpm_ca is not None
        work = Path(self.spec.workdir)
        try:
            tpm_.manufacture(work / tpm_.STATE_DIR, tpm_.ensure_ca(Path(self.spec.tpm_ca)))
        except (tpm_.TpmError, OSError) as exc:
            raise MachineError(f"cannot make the VM's TPM: {exc}") from None
        log_fd = _open_log(os.path.join(self.spec.workdir, tpm_.LOG))
        try:
            proc = qemu.spawn(tpm_.swtpm_argv(work / tpm_.STATE_DIR, tpm_.SOCKET), stdout=subprocess.DEVNULL,
                              stderr=log_fd, cwd=self.spec.workdir, die_with_parent_=self.spec.die_with_starter)
        finally:
            os.close(log_fd)
        self.helpers.append(("swtpm", proc))
        deadline = time.monotonic() + 10
        while not os.path.exists(work / tpm_.SOCKET):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise MachineError(f"swtpm did not start; {tpm_.LOG}: {log_tail(str(work / tpm_.LOG))}")
            time.sleep(0.01)
        return proc

    def _start_virtiofsd(self, binary: str, share: DirShare) -> subprocess.Popen:
        vlog = _open_log(os.path.join(self.spec.workdir, VIRTIOFSD_LOG))
        try:
            proc = shares.start_virtiofsd(binary, _qemu_share(share), socket_name(share.tag), cwd=self.spec.workdir,
                                          stderr=vlog, extra=share.virtiofsd_args,
                                          die_with_parent=self.spec.die_with_starter, nice=self.spec.nice)
        except RuntimeError as exc:
            raise MachineError(f"{exc}; {VIRTIOFSD_LOG}: {log_tail(os.path.join(self.spec.workdir, VIRTIOFSD_LOG))}") from None
        finally:
            os.close(vlog)
        self.helpers.append(("virtiofsd", proc))
        return proc

    def _helper_ended(self, name: str, pid: int, status: int) -> str | None:
        """A helper exited: the reason to end the VM, or None (stopping anyway)."""
        if self._stopping or self.ended is not None:
            return None
        self.ended = f"{name} exited with {status}"
        log.error("%s pid %s exited with %s while its VM runs: the guest's files are gone; stopping the VM",
                  name, pid, status)
        return self.ended


class _DirAddress:
    """Addresses of sockets in a dir, short enough for sun_path: through an fd of the dir if
    its path is too long (CRI sandbox ids alone are 64 bytes)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    def __enter__(self) -> Callable[[str], str]:
        return self.address

    def address(self, name: str) -> str:
        full = os.path.join(self.path, name)
        if len(full.encode()) < 100:
            return full
        if self._fd is None:
            self._fd = os.open(self.path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        return f"/proc/self/fd/{self._fd}/{name}"

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _open_log(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)


def log_tail(path: str, n: int = 400) -> str:
    """The last *n* bytes of a helper's log, for an error message: the reason a helper died is
    almost always in its last lines, and a bounded read keeps a guest-filled log from flooding
    the error that containerd shows."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n))
            return f.read().decode(errors="replace").strip() or "(its log is empty)"
    except OSError:
        return "(no log)"


# ---------------------------------------------------------------------------------------------
# synchronous runner (fractal vm run)


class Machine(_Launcher):
    """A VM for a synchronous caller: children waited for with ``Popen``.  Use as a context
    manager, or call :meth:`stop` in a ``finally``."""

    def boot(self) -> None:
        """accel, network, shares, QEMU; returns once QEMU runs (the ports are connected)."""
        try:
            self.accel = choose_accel(self.spec.accel)
            self._attach_net()
            self._launch(lambda name, proc: None)
        except BaseException:
            self.stop()
            raise

    def _alive(self) -> bool:
        return self.qemu is not None and self.qemu.poll() is None

    def poll(self) -> int | None:
        """QEMU's exit status (``Popen.returncode``), None while it runs.  A helper found dead
        ends the VM (see the module docstring); :attr:`ended` says why."""
        for name, p in self.helpers:
            code = p.poll()
            if code is not None and self._helper_ended(name, p.pid, code) and self.qemu is not None:
                self.qemu.kill()
        if self.qemu is not None:
            self.exit_status = self.qemu.poll()
            if self.exit_status is not None and not self._stopping and self.ended is None:
                self.ended = f"QEMU exited with {self.exit_status}"
        return self.exit_status

    def wait(self, timeout: float | None = None) -> int | None:
        """QEMU's exit status, or None if it still runs after ``timeout`` s."""
        if self.qemu is None:
            return None
        try:
            self.exit_status = self.qemu.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        return self.exit_status

    def stop(self, grace: float = 0.0) -> int | None:
        """End the VM: ``grace`` s for QEMU to exit by itself, then SIGTERM, then SIGKILL; then the
        helpers (SIGKILL); then the network.  Idempotent.  Returns QEMU's exit status."""
        self._stopping = True
        q = self.qemu
        if q is not None and q.poll() is None and self.wait(grace) is None:
            for sig, wait in ((signal.SIGTERM, TERM_WAIT), (signal.SIGKILL, KILL_WAIT)):
                with contextlib.suppress(ProcessLookupError):
                    q.send_signal(sig)
                if self.wait(wait) is not None:
                    break
        for name, p in self.helpers:
            if p.poll() is None:
                p.kill()
            try:
                p.wait(timeout=KILL_WAIT)
            except subprocess.TimeoutExpired:
                log.warning("%s pid %s did not exit after SIGKILL", name, p.pid)
        if q is None or q.poll() is not None:
            self.exit_status = None if q is None else q.returncode
            self._detach_net()
            self._detach_hot()
        if q is None:
            self._close_ports()
        return self.exit_status

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    attach_nic = _Launcher._hot_attach
    detach_nic = _Launcher._hot_detach


# ---------------------------------------------------------------------------------------------
# asyncio runner (the shim's VM sandbox)


class ChildWaiter(Protocol):
    """What collects the caller's children (ccpu.linux.reaper.Reaper): a future per pid, to be
    asked for in the same loop step as the spawn."""

    def wait(self, pid: int) -> asyncio.Future[int]: ...


class AsyncMachine(_Launcher, GuestWatch):
    """A VM for an asyncio caller whose :class:`~ccpu.linux.reaper.Reaper` collects every child.

    ``on_end(reason)`` is called once if the VM ends by itself (QEMU exited, or a helper died and
    the VM was stopped for it); never for an end :meth:`stop` asked for."""

    def __init__(self, spec: MachineSpec, reaper: ChildWaiter, on_end: Callable[[str], None] | None = None) -> None:
        super().__init__(spec)
        self.reaper = reaper
        self.on_end = on_end
        self.exited: asyncio.Future[int] | None = None  # QEMU's exit status
        self._helper_exits: list[tuple[int, asyncio.Future[int]]] = []
        self._stopper: asyncio.Task[None] | None = None

    async def boot(self) -> None:
        """accel, network (in a thread: ip/tc run there), shares and QEMU (on the loop's thread:
        PDEATHSIG follows the thread that forked); returns once QEMU runs."""
        loop = asyncio.get_running_loop()
        try:
            self.accel = choose_accel(self.spec.accel)
            await loop.run_in_executor(None, self._attach_net)
            self._launch(self._watch)
        except BaseException:
            await self.stop()
            raise

    def _watch(self, name: str, proc: subprocess.Popen) -> None:
        fut = self.reaper.wait(proc.pid)
        if name == "qemu":
            self.exited = fut
            fut.add_done_callback(self._qemu_done)
        else:
            self._helper_exits.append((proc.pid, fut))
            fut.add_done_callback(lambda f, pid=proc.pid: self._helper_done(name, pid, f))

    def _qemu_done(self, fut: asyncio.Future[int]) -> None:
        if fut.cancelled():
            return
        self.exit_status = fut.result()
        if self._stopping:
            log.info("QEMU pid %s exited with %s", self.pid, self.exit_status)
        elif self.ended is None:
            self._end(f"QEMU exited with {self.exit_status}")

    def _helper_done(self, name: str, pid: int, fut: asyncio.Future[int]) -> None:
        if fut.cancelled():
            return
        reason = self._helper_ended(name, pid, fut.result())
        if reason is not None:
            self._end(reason)
            asyncio.get_running_loop().create_task(self.stop())

    def _end(self, reason: str) -> None:
        self.ended = reason
        if self.on_end is not None:
            self.on_end(reason)

    async def stop(self, grace: float = 0.0) -> None:
        """End the VM as :meth:`Machine.stop` does; concurrent calls share one stop."""
        self._stopping = True
        if self._stopper is None or self._stopper.done():
            self._stopper = asyncio.get_running_loop().create_task(self._stop(grace))
        await asyncio.shield(self._stopper)

    def _alive(self) -> bool:
        return self.exited is not None and not self.exited.done()

    def _gone(self) -> bool:
        return self.exited is None or self.exited.done()

    async def _stop(self, grace: float) -> None:
        if self.exited is not None and not self.exited.done() and self.pid is not None:
            if not await _wait(self.exited, grace):
                for sig, wait in ((signal.SIGTERM, TERM_WAIT), (signal.SIGKILL, KILL_WAIT)):
                    try:
                        os.kill(self.pid, sig)
                    except ProcessLookupError:
                        break
                    if await _wait(self.exited, wait):
                        break
        for pid, fut in self._helper_exits:
            if not fut.done():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                if not await _wait(fut, KILL_WAIT):
                    log.warning("helper pid %s did not exit after SIGKILL", pid)
        if self._gone():
            self._detach_net()
            self._detach_hot()
        if self.qemu is None:
            self._close_ports()

    async def attach_nic(self, netns: str) -> list[net.Interface]:
        """Connect ``netns`` to the running VM (see :meth:`_Launcher._hot_attach`); the interfaces
        the guest now has NICs for (configure them with the agent's ``nic`` call)."""
        return await asyncio.get_running_loop().run_in_executor(None, self._hot_attach, netns)

    async def detach_nic(self, netns: str) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._hot_detach, netns)


async def _wait(fut: asyncio.Future[int], timeout: float) -> bool:
    """Whether ``fut`` is done within ``timeout`` s (it is not cancelled when it is not)."""
    if fut.done():
        return True
    try:
        await asyncio.wait_for(asyncio.shield(fut), timeout)
        return True
    except (TimeoutError, asyncio.TimeoutError):
        return False
