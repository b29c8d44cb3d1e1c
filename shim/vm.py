"""VM mode: one QEMU guest per sandbox, the agent inside it, containers inside the guest.

:class:`VmSandbox` implements the :class:`shim.sandbox.Sandbox` interface.  The first container
of a sandbox boots the guest (``fractal guest build``'s kernel + initramfs, built on demand) as a
:class:`ccpu.vm.machine.AsyncMachine` -- the same boot as ``fractal vm run``: QEMU and its
virtiofsd, confined, everything passed as fds; a dying virtiofsd ends the VM.  The guest's init
runs the agent on the virtio-serial port ``fractal.agent``, whose host end is the shim's end of a
socketpair; the shim speaks the unchanged agent protocol over it.  When the shim daemon exits
(its last container was deleted) the agent is told to ``shutdown`` and the machine is stopped
(QEMU: a grace period, SIGTERM, then SIGKILL; then virtiofsd).

With a pool running (``vm.pool``, shim/poold.py), the sandbox first asks the pool for a ready VM
of its settings (:meth:`VmSandbox._adopt`, shim/pool.py): the pool renames that VM's run dir to
ours and passes the agent link, the console, pidfds of QEMU and virtiofsd, the volume dir and
QEMU's QMP channel; the VM is then ours exactly as if we had booted it (records, views, stop,
NICs), watched through the pidfds (ccpu/vm/adopted.py).  A pod network namespace (CRI) is
plugged into it live (:meth:`VmSandbox._pod_nic`).  Otherwise, or if anything about the
handover is wrong, it boots its own.

Per sandbox run dir ``$FRACTAL_RUN_DIR/vms/<namespace>/<group>/`` (root, 0700): ``layers/`` (the
layer view, :mod:`shim.layerview`) and its record ``layers.mounts``, ``volumes/`` (the containers'
volume binds; ``mounts.json`` records every mount made for them, see :mod:`shim.mountrecord`),
``vfs-fractallayers.sock`` (virtiofsd, if used), ``console.log`` (the guest's serial console, read
by the shim and capped with ``console.log.1``: :mod:`shim.console`; symlinked into every container
bundle as ``console.log``), ``qemu.log`` and ``virtiofsd.log`` (their stderr) and ``pids`` (QEMU's
and virtiofsd's pid + start time, for :mod:`shim.leftovers` when the shim is gone).

What the guest sees (pure translation, :mod:`shim.guestpaths`):

* the sandbox's layer view read-only at ``/repo/layers`` (9p or virtiofs): one read-only bind of
  ``<FRACTAL_ROOT>/layers/<id>`` at ``<id>`` per layer its containers stack, nothing else, so a
  host lower ``<root>/layers/<id>`` is ``/repo/layers/<id>`` in the guest;
* the container's upper/work dirs live IN the guest, on a tmpfs of their own that the agent
  mounts at ``/run/fractal/containers/<id>`` (the ``scratch`` argument) with the container's
  writable-layer limit (``vm.scratch``, annotation ``io.fractal.vm.scratch`` within
  ``vm.scratch_max``; docs/config.md).  Its copied host files (``files/``) are there too, so
  what the container writes counts against its own limit, never against the agent's ``/run``.
  Gone when the container is deleted -- container semantics for ``--rm``; the host-side active
  snapshot stays empty;
* the bundle is ``/run/fractal/bundles/<id>``, the spec passed inline (from the host bundle's
  config.json).

The spec itself is translated by :mod:`shim.guestspec` (small host files copied in, volumes
bound into ``volumes/`` of the run dir and shared (virtiofs or 9p) by :mod:`shim.volumes`, the pod's
/dev/shm a guest dir, the pod netns dropped for the VM's own network, host hooks run here by
:mod:`shim.hooks`).  A nerdctl CNI network (``--network bridge``) gets a netns made here for
nerdctl's hook (annotation ``nerdctl/network-namespace``), whose interface is then plugged into
the running guest as a NIC (:meth:`VmSandbox.attach_nic`: QMP hot-plug + the agent's ``nic`` op).  Anything the guest cannot use is refused with FailedPrecondition: a rootfs
whose lower dirs are not repo layers (e.g. the overlayfs snapshotter), bind mounts of device
nodes, sockets or missing paths, host namespaces.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from ccpu import errdefs
from ccpu.stack import LayerStack
from shim import guestspec, leftovers
from shim.guestpaths import (GUEST_LAYERS, guest_bundle, guest_layer_path, guest_rootfs, guest_scratch_dir,
                             host_layer_path)
from shim.guestspec import NotInVm
from shim.layerview import LayerView
from shim.leftovers import cleanup_dead
from shim.mountrecord import MountRecordError, remove_run_dir
from shim.rootfs import Rootfs
from shim.agentsandbox import AgentSandbox
from shim.volumes import SHARE_TAG as VOLUMES_TAG
from shim.volumes import VolumeDir

log = logging.getLogger("shim.vm")

LAYERS_TAG = "fractallayers"
AGENT_PORT = "fractal.agent"
#: NICs a sandbox's VM can get after boot (empty pcie-root-ports + QMP, ccpu/vm/qmp.py): a nerdctl
#: CNI network's, a pool-adopted pod's.  Each costs a PCI bridge in the guest, nothing on the host.
HOTPLUG_NICS = 2
#: the annotation nerdctl's OCI hook reads the netns path from (over the state's pid, QEMU's)
NERDCTL_NETNS = "nerdctl/network-namespace"

# ---------------------------------------------------------------------------------------------
# what the guest translation reads on the host (shim.guestspec decides, shim.guestpaths maps)


def _kind_of(path: str) -> tuple[str, int]:
    import stat

    try:
        st = os.stat(path)
    except FileNotFoundError:
        return guestspec.MISSING, 0
    if stat.S_ISREG(st.st_mode):
        return guestspec.FILE, st.st_size
    return (guestspec.DIR if stat.S_ISDIR(st.st_mode) else guestspec.OTHER), 0


def _file_arg(copy: guestspec.FileCopy) -> dict[str, Any]:
    """The agent's ``files`` entry: content read now (a copy, see shim.guestspec)."""
    import base64

    with open(copy.host_path, "rb") as f:
        data = f.read(guestspec.MAX_FILE + 1)
        mode = os.fstat(f.fileno()).st_mode & 0o7777
    if len(data) > guestspec.MAX_FILE:
        raise NotInVm(f"{copy.host_path} grew beyond {guestspec.MAX_FILE} bytes")
    return {"path": copy.guest_path, "data": base64.b64encode(data).decode(), "mode": mode}


def first_netns(bundle: str) -> str | None:
    """The pod network namespace in ``bundle``'s spec (None: none, or no readable spec)."""
    from ccpu.agent import jsonbound

    try:
        with open(os.path.join(bundle, "config.json"), "rb") as f:
            return guestspec.network_namespace(jsonbound.loads(f.read()))
    except (OSError, ValueError):
        return None


#: the most hot-plug slots a pooled VM may announce (QEMU's root ports are numbered below it)
MAX_HOTPLUG_SLOTS = 8


def _hotplug_slots(value: Any) -> list[int]:
    """The pool's free hot-plug slots, checked (a list of distinct small ints).  Pure."""
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_HOTPLUG_SLOTS or \
            not all(type(v) is int and 0 <= v < MAX_HOTPLUG_SLOTS for v in value) or len(set(value)) != len(value):
        raise ValueError(f"bad hotplug_slots from the pool: {str(value)[:100]}")
    return list(value)


def _check_pidfd(pidfd: int, pid: int) -> None:
    """That ``pidfd`` (handed over) is a pidfd of ``pid``: its fdinfo says so."""
    with open(f"/proc/self/fdinfo/{pidfd}") as f:
        for line in f:
            if line.startswith("Pid:"):
                if int(line.split()[1]) == pid:
                    return
                break
    raise ValueError(f"fd {pidfd} is not a pidfd of pid {pid}")


def warm_verdict(warmed: Any, asked: bool = True) -> str | None:
    """None if the agent's ``warm`` answer says its throw-away container ran, exited 0 and left
    nothing (or an older agent that has no such container); else what went wrong -- starting
    with ``left `` when something stayed in the guest.  Judged on :func:`warm_summary`, so an
    untrusted guest's words are bounded in one place."""
    if not isinstance(warmed, dict):
        return "left an unreadable report"
    if "container" not in warmed:
        return None
    c = warm_summary(warmed).get("container")
    if c is None:
        return "left an unreadable report"
    left = c.get("left")
    if left is None:
        return "left an unreadable report (no list of leftovers)"
    if left:
        return ("left " + "; ".join(left))[:1005]
    if not asked:
        return None
    if c.get("skipped"):
        return f"was skipped: {c['skipped']}"
    if c.get("ok") is not True:
        return f"failed: {c.get('error') or ('exit status ' + str(c.get('status')))}"
    return None


def warm_summary(warmed: Any) -> dict[str, Any]:
    """What of the agent's ``warm`` answer the host keeps (the pool's status, the handover, the
    sandbox record): known fields, bounded -- the answer is an untrusted guest's, up to a frame
    (1 MiB), and the pool's messages are ≤ 64 KiB."""
    if not isinstance(warmed, dict):
        return {}
    out: dict[str, Any] = {}
    for key, kind in (("runc", str), ("read_bytes", int), ("seconds", (int, float))):
        v = warmed.get(key)
        if isinstance(v, kind) and not isinstance(v, bool):
            out[key] = v[:200] if isinstance(v, str) else v
    c = warmed.get("container")
    if isinstance(c, dict):
        kept: dict[str, Any] = {}
        for key in ("ok",):
            if isinstance(c.get(key), bool):
                kept[key] = c[key]
        for key in ("status", "seconds"):
            if isinstance(c.get(key), (int, float)) and not isinstance(c.get(key), bool):
                kept[key] = c[key]
        for key, n in (("container", 64), ("error", 300), ("skipped", 200)):
            if isinstance(c.get(key), str):
                kept[key] = c[key][:n]
        if isinstance(c.get("left"), list):
            kept["left"] = [str(x)[:200] for x in c["left"][:8]]
        out["container"] = kept
    return out


def vm_run_dir(run_dir: str, namespace: str, group: str) -> str:
    for v in (namespace, group):
        if not v or "/" in v or v in (".", ".."):
            raise ValueError(f"unsafe name {v!r}")
    return os.path.join(run_dir, "vms", namespace, group)


# ---------------------------------------------------------------------------------------------
# the sandbox


def _machine_errors() -> tuple[type[BaseException], ...]:
    from ccpu.vm.machine import MachineError
    from ccpu.vm.net import NetError

    return (MachineError, NetError)


class VmSandbox(AgentSandbox):
    """One QEMU guest running the agent (see the module docstring); the agent-protocol side
    (timeouts, the create sequence, restacks) is :class:`shim.agentsandbox.AgentSandbox`'s."""

    mode = "vm"
    agent_mode = "vm"

    def __init__(self, *, reaper: Any, namespace: str, group: str, repo_root: str, run_dir: str,
                 settings: Any, on_event: Any = None, netns: str | None = None,
                 timeouts: Any = None) -> None:
        super().__init__(namespace=namespace, timeouts=timeouts)  # timeouts: shim.config.Timeouts
        self.reaper = reaper
        self.namespace = namespace
        self.group = group
        self.repo_root = repo_root
        self.host_layers = os.path.join(repo_root, "layers")
        self.settings = settings  # shim.config.VmSettings
        self.dir = vm_run_dir(run_dir, namespace, group)
        self.console_log = os.path.join(self.dir, "console.log")
        self._console: Any = None  # shim.console.ConsoleLog while QEMU runs
        self.on_event = on_event
        self.pid: int | None = None
        self.accel = ""
        self.accel_reason = ""
        self.share = ""
        self.exit_status: int | None = None
        self.lost = False
        self.timings: dict[str, float] = {}
        self.guest_kernel = ""
        self._machine: Any = None  # ccpu.vm.machine.AsyncMachine once booting: QEMU + virtiofsd
        self._client: Any = None
        self._ready: Any = None
        self._stopping = False
        self.netns = netns  # the pod's network namespace the VM is attached to (CRI)
        self._hooks: dict[str, Any] = {}  # cid -> shim.hooks.ContainerHooks
        self._cni: dict[str, int] = {}  # cid -> fd of the netns made for its nerdctl CNI networks
        self.nics: list[str] = []  # netns connected after boot (attach_nic)
        self.volumes = VolumeDir(self.dir)  # <dir>/volumes, shared over 9p (shim/volumes.py)
        self.view = LayerView(self.dir, self.host_layers)  # the layers its guest sees (shim/layerview.py)
        self.qemu_user = ""
        self.cpus = 0  # the guest's vCPUs once booted (settings.cpus, or the accelerator's default)
        self._dir_ready = False
        self.run_root = run_dir
        #: False for the pool's own VMs (shim/poold.py): QEMU outlives the pool once adopted
        self.die_with_shim = True
        #: the nice value QEMU and virtiofsd boot at (the pool's: its boots yield to sandboxes)
        self.boot_nice = 0
        self._handover: Any = None  # shim.pool.Handover: a pooled VM renamed into self.dir
        self.pool_vm: dict[str, Any] | None = None  # what the pool said about the VM adopted
        self.hello: dict[str, Any] = {}
        self.attested: dict[str, Any] | None = None  # the verified measurement (vm.attest)
        self.warmed: dict[str, Any] | None = None  # the agent's `warm` answer (a pooled VM's)
        self._refill_told = False  # the pool was told our first container runs (its refill may boot)

    # -- interface --------------------------------------------------------------------------

    def layer_path(self, host_dir: str) -> str:
        try:
            return guest_layer_path(host_dir, self.host_layers)
        except NotInVm as exc:
            raise errdefs.FailedPrecondition(str(exc)) from None

    def host_layer_path(self, agent_dir: str) -> str:
        return host_layer_path(agent_dir, self.host_layers)

    def placement(self, cid: str, bundle: str, rootfs: Rootfs,
                  spec: dict[str, Any] | None) -> dict[str, Any]:
        from shim import config

        if spec is None:
            raise errdefs.InvalidArgument(f"bundle {bundle} has no readable config.json")
        gbundle = guest_bundle(cid)
        annotations = spec.get("annotations")
        try:
            scratch_mb = config.scratch_for(self.settings, annotations if isinstance(annotations, dict) else {})
        except config.ConfigError as exc:
            raise errdefs.InvalidArgument(f"container {cid}: {exc}") from None
        try:
            grootfs = guest_rootfs(rootfs, cid, self.host_layers)
            assert isinstance(rootfs, LayerStack)  # guest_rootfs refuses any other root
            translated = guestspec.translate(spec, cid, guest_scratch_dir(cid), _kind_of)
            files = [_file_arg(c) for c in translated.copies]
        except NotInVm as exc:
            raise errdefs.FailedPrecondition(str(exc)) from None
        except OSError as exc:
            raise errdefs.FailedPrecondition(
                f"container {cid}: cannot copy {exc.filename} into the VM: {exc.strerror}") from None
        netns = guestspec.network_namespace(spec)
        if netns is not None and netns != self.netns:
            if self._ready is None:
                self.netns = netns  # not booted yet: the first container brings the pod network
            else:
                raise errdefs.FailedPrecondition(
                    f"container {cid} joins network namespace {netns}, but this VM is "
                    f"attached to {self.netns or 'no network namespace'}")
        for note in translated.notes:
            log.debug("container %s: %s", cid, note)
        hook_annotations = dict(spec.get("annotations") or {})
        if translated.cni_networks:  # first: undone below if what follows fails
            hook_annotations[NERDCTL_NETNS] = self._cni_netns(cid, translated.cni_networks)
        try:
            try:
                self._prepare_dir()
                self.view.set(cid, list(rootfs.lowers))  # its layers become visible to the guest
            except (RuntimeError, OSError) as exc:  # LayerViewError, a repo without layers/
                raise errdefs.FailedPrecondition(f"container {cid}: cannot give the VM its "
                                                 f"layers: {exc}") from None
            try:  # last: nothing after it can fail (else Create never reaches deleted() to undo it)
                self.volumes.attach(cid, translated.volumes)
            except BaseException as exc:
                self.view.drop(cid)
                if isinstance(exc, MountRecordError):  # VolumeError too
                    raise errdefs.FailedPrecondition(str(exc)) from None
                raise
        except BaseException:
            fd = self._cni.pop(cid, None)
            if fd is not None:
                os.close(fd)
            raise
        if translated.host_hooks:
            from shim.hooks import ContainerHooks

            self._hooks[cid] = ContainerHooks(cid, translated.host_hooks, bundle, self.reaper, hook_annotations)
        try:
            os.symlink(self.console_log, os.path.join(bundle, "console.log"))
        except OSError:
            pass
        return {"bundle": gbundle, "rootfs": grootfs.to_wire(), "spec": translated.spec,
                "scratch": {"path": guest_scratch_dir(cid), "size": scratch_mb << 20},
                "files": files, "dirs": translated.shm_dirs, "sysctls": translated.sysctls}

    # -- nerdctl CNI networks: a netns for nerdctl's hook, mirrored into the guest --------------

    def _cni_netns(self, cid: str, networks: list[str]) -> str:
        """A new netns for ``cid``'s CNI networks, held by an fd of ours: the path nerdctl's
        createRuntime hook (annotation :data:`NERDCTL_NETNS`) sets the networks up in, and that
        :meth:`created` then connects to the guest.  One such container per VM: its interfaces
        become the guest's."""
        from ccpu.vm import net

        if self.netns is not None or self._cni:
            raise errdefs.FailedPrecondition(
                f"container {cid}: nerdctl network(s) {', '.join(networks)} need the VM's network, which "
                f"{'pod network ' + self.netns if self.netns else 'another container'} has; run it in a "
                "VM of its own (another io.fractal.group)")
        try:
            fd = net.new_netns()
        except net.NetError as exc:
            raise errdefs.FailedPrecondition(f"container {cid}: {exc}") from None
        self._cni[cid] = fd
        return self._cni_path(fd)

    @staticmethod
    def _cni_path(fd: int) -> str:
        return f"/proc/{os.getpid()}/fd/{fd}"

    async def attach_nic(self, netns: str) -> list[Any]:
        """Connect ``netns`` (its interfaces, as CNI left them) to the running VM: a NIC per
        interface plugged live (ccpu.vm.machine.AsyncMachine.attach_nic), then configured by the
        agent (its ``nic`` op: name, MTU, addresses, routes).  A pooled VM gets its pod's network
        this way; so does a nerdctl CNI network.  All or nothing."""
        await self.start()
        ifaces = await self._machine.attach_nic(netns)
        try:
            from ccpu.vm import net

            for iface in ifaces:
                await self.call("nic", net.agent_args(iface))
        except BaseException:
            await self._machine.detach_nic(netns)
            raise
        self.nics.append(netns)
        log.info("network %s connected after boot: %s", netns,
                 ", ".join(f"{i.name} {i.mac} {','.join(i.addrs)}" for i in ifaces) or "no IPv4 interface")
        return ifaces

    async def detach_nic(self, netns: str) -> None:
        """Unplug ``netns``'s NICs (the guest lets go of them) and remove their taps."""
        if netns in self.nics:
            self.nics.remove(netns)
            if self._machine is not None:
                await self._machine.detach_nic(netns)

    # OCI hooks on the host; the state's pid is QEMU's (shim/hooks.py)
    async def created(self, cid: str, pid: int) -> None:
        if cid in self._hooks:
            await self._hooks[cid].on_created(self.pid or 0)
        if cid in self._cni:  # nerdctl's hook has set its networks up in the netns: into the guest
            try:
                await self.attach_nic(self._cni_path(self._cni[cid]))
            except _machine_errors() as exc:
                raise errdefs.FailedPrecondition(f"container {cid}: its nerdctl network: {exc}") from None

    async def started(self, cid: str, pid: int) -> None:
        if self.pool_vm is not None and not self._refill_told:  # an adopted VM runs its first container
            self._refill_told = True
            self._tell_pool_refill()
        if cid in self._hooks:
            await self._hooks[cid].on_started(self.pid or 0)

    async def deleted(self, cid: str) -> None:
        try:
            fd = self._cni.get(cid)
            if fd is not None:
                try:
                    await self.detach_nic(self._cni_path(fd))
                except _machine_errors() as exc:  # e.g. the VM is gone: its NICs went with it
                    log.warning("container %s: unplugging its network: %s", cid, exc)
            hooks = self._hooks.pop(cid, None)
            if hooks is not None:
                await hooks.on_deleted(self.pid or 0)  # nerdctl's: CNI DEL in the netns, still held
        finally:
            fd = self._cni.pop(cid, None)
            if fd is not None:
                os.close(fd)  # the netns goes, and what CNI left in it (the veth's end)
            try:
                self.volumes.detach(cid)
            finally:
                self.view.drop(cid)  # layers no other container stacks leave the guest's view

    def layers_adding(self, cid: str, host_dirs: list[str]) -> None:
        self.view.add(cid, host_dirs)

    def layers_now(self, cid: str, host_dirs: list[str]) -> None:
        self.view.set(cid, host_dirs)

    async def start(self) -> None:
        import asyncio

        if self._ready is None:
            self._ready = asyncio.get_running_loop().create_task(self._start())
        await asyncio.shield(self._ready)

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, "agent": self.agent_mode, "agent_pid": self.pid,
                "vm": self.vm_info()}

    def vm_info(self) -> dict[str, Any]:
        return {"pid": self.pid, "accel": self.accel, "memory": f"{self.settings.memory_mb}M",
                "cpus": self.cpus, "share": self.share, "kernel": self.guest_kernel,
                "qemu_user": self.qemu_user, "layers_visible": sorted(self.view.bound),
                "run_dir": self.dir, "console": self.console_log, "netns": self.netns, "nics": list(self.nics),
                "boot_seconds": self.timings.get("agent_ready"), "attested": self.attested,
                "pooled": None if self.pool_vm is None else {
                    "id": self.pool_vm.get("id"), "boot_seconds": self.pool_vm.get("boot_seconds"),
                    "warm": self.pool_vm.get("warm"),
                    "adopt_seconds": self.timings.get("adopted")}}

    # -- boot -------------------------------------------------------------------------------

    def _guest(self) -> Any:
        """The built guest (kernel + initramfs), built now if this tree's is missing."""
        from ccpu.guest import initramfs
        from ccpu.guest.kernel import KernelError

        def progress(msg: str) -> None:
            log.info("guest build: %s", msg)

        try:
            return initramfs.build(progress=progress, offline=True)
        except KernelError:
            return initramfs.build(progress=progress)  # no kernel cached yet: ask apt

    def _record_pids(self) -> None:
        leftovers.record(self.dir, self._machine.pids())

    def _prepare_dir(self) -> None:
        """The run dir, once: a dead predecessor's (same namespace and group) cleaned up first."""
        if self._dir_ready:
            return
        if os.path.isdir(self.dir):
            killed = cleanup_dead(self.dir)
            if killed:
                log.warning("killed leftover VM processes %s of %s", killed, self.dir)
        if self._adopt():
            self._dir_ready = True
            return
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        self.volumes.create()
        self.view.create()
        self._dir_ready = True

    # -- a pooled VM (shim/pool.py, shim/poold.py) ------------------------------------------

    def _adopt(self) -> bool:
        """Ask the pool for a ready VM (renamed to our run dir by the pool); False: boot our own.
        A pod network (CRI) is connected once the VM is ours (:meth:`_start_adopted`)."""
        from shim import pool

        if self.settings.pool <= 0 or self.settings.attest or not self.die_with_shim:
            return False
        os.makedirs(os.path.dirname(self.dir), mode=0o700, exist_ok=True)
        t0 = time.monotonic()
        h, why = pool.adopt(self.run_root, self.settings, self.dir)
        if h is None:
            log.info("booting a VM of its own: %s", why)
            if os.path.isdir(self.dir):  # renamed here, then not handed over whole
                cleanup_dead(self.dir)
            return False
        try:
            _check_pidfd(h.fds["qemu"], int(h.vm["qemu_pid"]))
            helper_pids = [int(p) for p in h.vm.get("helper_pids", [])]
            if len(helper_pids) != len(h.helpers):
                raise ValueError("helper pids and pidfds differ")
            for (_n, fd), pid in zip(h.helpers, helper_pids):
                _check_pidfd(fd, pid)
            if self.netns is not None and "qmp" not in h.fds:
                raise ValueError("no QMP channel handed over: the pod network cannot be connected")
            h.vm["hotplug_slots"] = _hotplug_slots(h.vm.get("hotplug_slots"))
            self.view.adopt()
            self.volumes.adopt(h.fds.pop("volumes"))
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            log.error("pooled VM %s not usable (%s): ending it, booting our own", h.vm.get("id"), exc)
            import signal

            for fd in [h.fds.get("qemu", -1)] + [fd for _n, fd in h.helpers]:
                if fd >= 0:
                    try:
                        signal.pidfd_send_signal(fd, signal.SIGKILL)
                    except OSError:
                        pass
            h.close()
            self.view.forget()
            self.volumes.close()
            cleanup_dead(self.dir)
            return False
        self._handover = h
        self.timings["adopted"] = time.monotonic() - t0
        warm = h.vm.get("warm") if isinstance(h.vm.get("warm"), dict) else {}
        log.info("adopted pooled VM %s (QEMU pid %s, booted in %.2fs, %s) in %.3fs", h.vm.get("id"),
                 h.vm.get("qemu_pid"), float(h.vm.get("boot_seconds") or 0),
                 f"warmed in {warm.get('seconds')}s" if warm else "not warmed", self.timings["adopted"])
        return True

    async def _start_adopted(self, t0: float) -> Any:
        import socket

        from ccpu.agent.client import DEFAULT_WINDOW, AgentClient
        from ccpu.vm.adopted import AdoptedAccel, AdoptedMachine, AdoptedProcess
        from ccpu.vm.qmp import Qmp
        from shim.console import ConsoleLog

        h, self._handover = self._handover, None
        vm = h.vm
        self.pool_vm = vm
        try:
            self._console = ConsoleLog(self.console_log, self.settings.console_log_kib * 1024)
            self._console.adopt(socket.socket(fileno=h.fds.pop("console")))
            self._console.start()
            helpers = [AdoptedProcess(n, int(pid), fd) for (n, fd), pid in zip(h.helpers, vm["helper_pids"])]
            h.helpers = []
            qemu = AdoptedProcess("qemu", int(vm["qemu_pid"]), h.fds.pop("qemu"))
            qmp_fd = h.fds.pop("qmp", None)
            monitor = Qmp(socket.socket(fileno=qmp_fd), negotiated=vm.get("qmp_negotiated") is True) \
                if qmp_fd is not None else None
            self._machine = m = AdoptedMachine(qemu, helpers, AdoptedAccel(str(vm.get("accel", "")),
                                               str(vm.get("accel_reason", ""))),
                                               str(vm.get("qemu_user", "")), on_end=self._vm_ended,
                                               qmp=monitor, hotplug_slots=tuple(vm["hotplug_slots"]))
            self.pid = m.pid
            m.watch_guest()
            self.accel, self.accel_reason, self.qemu_user = m.accel.accel, m.accel.reason, m.qemu_user
            self.share = str(vm.get("share", ""))
            self.guest_kernel = str(vm.get("kernel", ""))
            self._record_pids()
            ours = socket.socket(fileno=h.fds.pop("agent"))
            ours.setblocking(False)
            client = await AgentClient.connect_socket(ours)
        except BaseException:
            if self._machine is None:  # not watched yet: end it through the pidfds we still hold
                import signal

                for fd in [h.fds.get("qemu", -1)] + [fd for _n, fd in h.helpers]:
                    if fd >= 0:
                        try:
                            signal.pidfd_send_signal(fd, signal.SIGKILL)
                        except OSError:
                            pass
            h.close()
            await self._kill_all()
            raise
        hello = vm.get("hello") if isinstance(vm.get("hello"), dict) else {}
        features = hello.get("features")
        if isinstance(features, list) and "flow" in features:
            client.window = DEFAULT_WINDOW  # the pool's hello offered it (one hello per connection)
        client.set_event_handler(lambda e: self.on_event(e) if self.on_event else None)
        client.add_lost_handler(self._link_lost)
        self._client = client
        if self.netns is not None:
            await self._pod_nic(m, client)
        self.timings["agent_ready"] = time.monotonic() - t0
        log.info("VM adopted from the pool: QEMU pid %s, accel %s, layers over %s; run dir %s",
                 self.pid, self.accel, self.share, self.dir)
        return client

    async def _pod_nic(self, m: Any, client: Any) -> None:
        """The pod's network on an adopted VM (booted with none): its interfaces plugged live and
        configured by the agent, as a boot-time NIC is by the guest's init (fractal.net=).  A
        failure ends the VM: the sandbox does not start without its pod network.  (The agent is
        called directly: the sandbox is not started until this returns.)"""
        import asyncio

        from ccpu.vm import net

        assert self.netns is not None
        try:
            ifaces = await m.attach_nic(self.netns)
            for iface in ifaces:
                await asyncio.wait_for(client.call("nic", net.agent_args(iface)), self.timeouts.for_op("nic"))
        except BaseException as exc:
            await self._kill_all()
            if isinstance(exc, Exception):
                raise RuntimeError(f"pod network {self.netns} on the pooled VM (QEMU pid {self.pid}): {exc}") from None
            raise
        log.info("pod network %s connected after adoption: %s", self.netns,
                 ", ".join(f"{i.name} {i.mac} {','.join(i.addrs)}" for i in ifaces) or "no IPv4 interface")

    async def warm(self, timeout: float, container: bool = True) -> dict[str, Any]:
        """Warm the booted guest's create path (the agent's ``warm`` op: the container modules,
        the Supervisor, runc read and run once, a throw-away container's life cycle) -- the
        pool's, before it offers the VM, so the adopting sandbox's first container does not pay
        it (docs/vm.md "The pool").

        RuntimeError (the pool then discards the VM) if the throw-away container left anything
        in the guest (``container.left``): a guest is offered only as clean as a fresh one.  A
        warm-up container that failed but left nothing is only logged: that guest is a fresh
        guest, merely not warmed, and discarding it would cost a whole boot."""
        import asyncio

        if self._client is None:
            raise RuntimeError("the VM's agent is not connected")
        answer = await asyncio.wait_for(self._client.call("warm", **({} if container else {"container": False})),
                                        timeout)
        self.warmed = warm_summary(answer)
        verdict = warm_verdict(answer, container)
        if verdict is not None:
            if verdict.startswith("left "):
                raise RuntimeError(f"the warm-up container {verdict}: the VM is not offered")
            log.warning("VM %s (QEMU pid %s): the warm-up container %s; offered unwarmed", self.group, self.pid, verdict)
        return self.warmed

    def _tell_pool_refill(self) -> None:
        """The pool holds its refill back while the sandbox that adopted a VM makes its first
        container (so that create has the cores to itself): say it runs now.  Off the Start
        answer's path (a thread; a pool that does not answer lets its hold expire)."""
        import asyncio

        from shim import pool

        vid = str((self.pool_vm or {}).get("id", ""))
        fut = asyncio.get_running_loop().run_in_executor(None, pool.refill, self.run_root, vid)
        fut.add_done_callback(lambda f: log.info("told the pool to refill for %s: %s", vid,
                                                 f.result() if not f.exception() else f.exception()))

    def renice(self, value: int) -> None:
        """QEMU's and virtiofsd's threads to nice ``value`` (a pooled VM once ready: 0)."""
        if self._machine is not None and hasattr(self._machine, "renice"):  # booted here, not adopted
            self._machine.renice(value)

    def handover_fds(self) -> tuple[dict[str, Any], list[str], list[int]]:
        """The pool's side of a handover (this VM booted with ``die_with_shim`` False and ready):
        what the adopter is told, and the fds it gets (dups or new pidfds: the caller closes
        them once sent).  The VM's console stops being read here."""
        m = self._machine
        assert m is not None and self._client is not None and m.qemu is not None
        names: list[str] = []
        fds: list[int] = []
        try:
            sock = self._client._writer.transport.get_extra_info("socket")
            fds.append(os.dup(sock.fileno()))
            names.append("agent")
            fds.append(self._console.release().detach())
            names.append("console")
            fds.append(os.pidfd_open(m.qemu.pid))
            names.append("qemu")
            helper_pids = []
            for name, p in m.helpers:
                fds.append(os.pidfd_open(p.pid))
                names.append(name)
                helper_pids.append(p.pid)
            assert self.volumes._rw is not None
            fds.append(os.dup(self.volumes._rw))
            names.append("volumes")
            nics = m.nics
            if nics is not None and nics.qmp is not None:
                fds.append(os.dup(nics.qmp.sock.fileno()))
                names.append("qmp")
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        vm = {"qemu_pid": m.qemu.pid, "helper_pids": helper_pids, "accel": self.accel,
              "accel_reason": self.accel_reason, "qemu_user": self.qemu_user, "share": self.share,
              "kernel": self.guest_kernel, "hello": self.hello,
              "boot_seconds": self.timings.get("agent_ready"), "warm": self.warmed,
              "hotplug_slots": m.nics.free_slots() if m.nics is not None else [],
              "qmp_negotiated": bool(m.nics is not None and m.nics.qmp is not None and m.nics.qmp.negotiated)}
        return vm, names, fds

    async def forget(self) -> None:
        """The pool's side once the VM is handed over: close our ends, leave the VM running and
        its mounts in place (the adopter's now).  Its exit is still reaped here (our child)."""
        self._stopping = True
        if self._machine is not None:
            self._machine._stopping = True
            self._machine._close_ports()
        if self._client is not None:
            await self._client.close()
        self.view.forget()
        self.volumes.close()

    async def _start(self) -> Any:
        import asyncio

        from ccpu.agent.client import AgentClient
        from ccpu.vm import machine, shares
        from shim.console import ConsoleLog

        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        self._prepare_dir()
        if self._handover is not None:
            return await self._start_adopted(t0)
        guest = await loop.run_in_executor(None, self._guest)
        self.guest_kernel = str(guest.manifest.get("kernel", {}).get("version", ""))
        self.timings["guest"] = time.monotonic() - t0

        s = self.settings
        vfsd = shares.find_virtiofsd()
        self.share, why = shares.decide(None if s.share == "auto" else s.share,
                                        os.environ.get("FRACTAL_SHARE") or None, vfsd)
        # What QEMU uses arrives opened (it may run as a uid that can reach nothing here): the
        # agent's channel is one end of a socketpair, the virtiofsd connection is made by the
        # machine, the console is a connected socket read by shim/console.py, capped.
        self._console = ConsoleLog(self.console_log, s.console_log_kib * 1024)
        try:
            spec = machine.MachineSpec(
                kernel=str(guest.kernel), initramfs=str(guest.initramfs), workdir=self.dir,
                system_image=str(guest.image) if guest.image else None,
                console=machine.ConsoleSocket(self._console.qemu_fd()), mode="agent", accel=s.accel,
                memory_mb=s.memory_mb, cpus=s.cpus, ports=(AGENT_PORT,), netns=self.netns,
                hotplug_nics=HOTPLUG_NICS,
                uid_base=s.qemu_uid_base, name=self.dir, virtiofsd=vfsd, die_with_starter=self.die_with_shim,
                nice=self.boot_nice,
                debug=logging.getLogger().isEnabledFor(logging.DEBUG),  # shim -debug: guest too
                # attested: the init hashes the system image disk against the (measured) initramfs
                cmdline_extra=(f"fractal.reserve={s.memory_reserve_mb}",) +
                              (("fractal.verify_image=1",) if s.attest else ()),
                **self._attest_spec(guest),
                shares=(
                    # the layer view is a tmpfs with one bind per layer: announced as submounts,
                    # each layer would be an automount point in the guest, which overlayfs refuses
                    # as a lower dir ("filesystem not supported").  Not announced: one file system.
                    machine.DirShare(LAYERS_TAG, self.view.path, GUEST_LAYERS, readonly=True,
                                     transport=self.share, layers=True,
                                     virtiofsd_args=("--no-announce-submounts",)),
                    # read-write, 9p: served by QEMU under ccpu.vm.fsguard (shim/volumes.py)
                    machine.DirShare(VOLUMES_TAG, self.volumes.root, guestspec.GUEST_VOLUMES,
                                     readonly=False, transport="9p")))
            self._machine = machine.AsyncMachine(spec, self.reaper, on_end=self._vm_ended)
            await self._machine.boot()
        except BaseException:
            self._console.close()
            raise
        m = self._machine
        self._console.start()  # QEMU holds its end
        self.pid = m.pid
        self.accel, self.accel_reason, self.qemu_user = m.accel.accel, m.accel.reason, m.qemu_user
        self.cpus = m.cpus
        self._record_pids()
        if self.die_with_shim:  # ours for good (a pool's VM is watched by the sandbox adopting it)
            m.watch_guest()  # a guest poweroff/reset/panic is the sandbox's end at once
        self.timings["qemu_started"] = time.monotonic() - t0
        if m.net is not None:
            log.info("pod network %s: %s", self.netns,
                     ", ".join(f"{i.name} {i.mac} {','.join(i.addrs)}" for i in m.net.interfaces) or "no IPv4 interface")
        log.info("VM started: QEMU pid %s, accel %s (%s), %dM, %d cpus, layers over %s (%s), QEMU as %s; "
                 "run dir %s", self.pid, self.accel, self.accel_reason, s.memory_mb, self.cpus, self.share, why,
                 self.qemu_user, self.dir)

        deadline = t0 + s.boot_timeout
        try:
            ours = m.ports.pop(AGENT_PORT)  # ours now: the client closes it
            ours.setblocking(False)
            client = await AgentClient.connect_socket(ours)
            self.timings["connected"] = time.monotonic() - t0
            client.set_event_handler(lambda e: self.on_event(e) if self.on_event else None)
            client.add_lost_handler(self._link_lost)
            self._client = client
            hello = self.hello = await self._await_boot(client.hello(), deadline)
        except BaseException as exc:
            tail = self.console_tail()
            await self._kill_all()
            if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
                raise RuntimeError(f"VM agent not ready within {s.boot_timeout:.0f}s; console: "
                                   f"{tail}") from None
            if isinstance(exc, Exception):
                raise RuntimeError(f"VM did not start: {exc}; console: {tail}") from None
            raise
        if s.attest:
            try:
                self.attested = await self._await_boot(self._attest(client, guest, m.argv), deadline)
            except BaseException as exc:
                await self._kill_all()
                if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
                    raise RuntimeError(f"VM attestation not done within {s.boot_timeout:.0f}s") from None
                raise
            self.timings["attested"] = time.monotonic() - t0
        self.timings["agent_ready"] = time.monotonic() - t0
        await loop.run_in_executor(None, self._page_out_boot_files, spec)
        log.info("VM agent up in %.2fs (guest %.2fs, qemu %.2fs, connected %.2fs): %s",
                 self.timings["agent_ready"], self.timings["guest"], self.timings["qemu_started"],
                 self.timings["connected"], hello)
        return client

    def _page_out_boot_files(self, spec: Any) -> None:
        """QEMU's ROM copies of the kernel and initramfs back to the page cache once the guest is
        up (ccpu/vm/pageout.py: ~40 MB of RSS per VM).  Best effort: a failure costs memory only."""
        from ccpu.vm import pageout

        if self.pid is None:
            return
        try:
            n = pageout.page_out(self.pid, [p for p in (spec.kernel, spec.initramfs) if p])
            log.debug("paged out %d MiB of QEMU's boot files", n >> 20)
        except OSError as exc:
            log.warning("QEMU's boot files stay resident: %s", exc)

    def _attest_spec(self, guest: Any) -> dict[str, Any]:
        """MachineSpec fields of an attested VM: the UKI through OVMF, a TPM (ccpu/vm/tpm.py)."""
        if not self.settings.attest:
            return {}
        from ccpu.guest.kernel import cache_root
        from ccpu.vm import tpm

        if guest.uki is None:
            from ccpu.guest import uki

            why = guest.manifest.get("uki_missing") or uki.NO_STUB
            raise errdefs.FailedPrecondition(f"vm.attest: the guest build has no unified kernel image ({why})")
        missing = tpm.missing_tools()
        if missing:
            raise errdefs.FailedPrecondition(f"vm.attest: missing {', '.join(missing)} "
                                             "(apt-get install ovmf swtpm swtpm-tools tpm2-tools)")
        return {"uki": str(guest.uki), "tpm_ca": str(tpm.ca_dir(cache_root().parent))}

    async def _attest(self, client: Any, guest: Any, argv: list[str]) -> dict[str, Any]:
        """The guest's TPM quote checked against its build's manifest before any container
        (ccpu/attest.py); an AttestationError names the PCR that differed."""
        from ccpu import attest
        from ccpu.guest.kernel import cache_root
        from ccpu.vm import tpm

        if "attest" not in (self.hello.get("features") or []):
            raise attest.AttestationError("vm.attest: the guest's agent offers no attest (no TPM or no tpm2-tools "
                                          "in the guest)")
        t0 = time.monotonic()
        cmdline = argv[argv.index("-append") + 1] if "-append" in argv else None
        ca = tpm.ensure_ca(tpm.ca_dir(cache_root().parent))
        verified = await attest.attest(client.call, [ca.root_cert, ca.issuer_cert],
                                       attest.expected(guest.manifest, cmdline))
        took = time.monotonic() - t0
        out = {**verified.describe(), "uki_sha256": guest.manifest["uki"]["sha256"], "seconds": round(took, 3)}
        log.info("VM attested in %.3fs: TPM quote verified, EK %s, %s", took, verified.ek_subject,
                 ", ".join(f"PCR {k} {v}" for k, v in out["pcrs"].items()))
        return out

    async def _await_boot(self, coro: Any, deadline: float) -> Any:
        """``coro`` unless QEMU exits first or the deadline passes."""
        import asyncio

        exited = self._machine.exited
        task = asyncio.ensure_future(coro)
        done, _ = await asyncio.wait({task, exited}, timeout=max(0.1, deadline - time.monotonic()),
                                     return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        if exited in done:
            raise RuntimeError(f"QEMU exited with {exited.result()} during boot")
        raise TimeoutError

    def diagnose(self) -> str:
        return (f"VM pid {self.pid} ({'alive' if self.exit_status is None else f'exited {self.exit_status}'}); "
                f"guest console (tail):\n{self.console_tail()}")

    def console_tail(self, n: int = 1500) -> str:
        from shim.console import tail

        text = tail(self.console_log, n)
        return text.decode(errors="replace").strip() if text else "(no console log)"

    # -- loss and stop ----------------------------------------------------------------------

    def _vm_ended(self, reason: str) -> None:
        """The machine ended by itself: QEMU exited, or a virtiofsd died (the guest's layer share
        no longer answers and every file access in its containers would hang for ever, so the
        machine stopped the VM) -- report the containers exited."""
        self.exit_status = self._machine.exit_status
        if self._stopping:  # the agent was told to shut down: the guest powers off
            log.info("QEMU pid %s: %s", self.pid, reason)
            return
        log.error("VM of %s ended unexpectedly (QEMU pid %s): %s; guest console (tail):\n%s",
                  self.dir, self.pid, reason, self.console_tail())
        self._report_lost(reason)

    def _link_lost(self, reason: str) -> None:
        if not self._stopping:
            self._report_lost(f"agent link lost: {reason}")

    def _report_lost(self, reason: str) -> None:
        if self.lost:
            return
        self.lost = True
        if self.on_lost is not None:
            self.on_lost(reason)
        if self.exit_status is None and self.pid is not None:  # link gone, QEMU alive: end it
            import asyncio

            asyncio.get_running_loop().create_task(self._kill_all())

    async def _kill_all(self, grace: float = 0.0) -> None:
        """The machine: QEMU (after ``grace`` s for it to exit by itself) and its helpers, all
        waited for (our reaper collects them); then the console, once QEMU is gone."""
        m = self._machine
        if m is not None:
            await m.stop(grace)
            self.exit_status = m.exit_status
        if m is None or m.exited is None or m.exited.done():
            if self._console is not None:
                self._console.close()  # what QEMU wrote last is read first

    async def discard(self) -> None:
        """The sandbox's end after containerd's Shutdown with no container left: QEMU is ended at
        once (SIGTERM, then SIGKILL), without the agent's ``shutdown`` and the 2 s for the guest
        to power off by itself; then the helpers, the views and the run dir as in :meth:`stop`.

        Why that is safe: nothing of the sandbox is left in the guest -- every container was
        deleted (its processes, output and exit reported), and what they wrote to a volume or
        the shares reached the host as it was written (9p without a cache, virtiofs without
        writeback caching); the guest itself is never reused.  Why it matters: containerd runs
        the ``delete`` verb as soon as our connection closes and ``ctr run --rm`` waits for it;
        it finds the socket gone and ends the VM from its records (shim/leftovers.py) -- SIGKILL,
        wait, unmount -- unless we are faster, which we are now (it first starts a Python), so it
        finds no VM dir and returns (docs/vm.md "The VM's stop at --rm's end")."""
        log.info("no container left: the VM is discarded at once (QEMU pid %s)", self.pid)
        await self.stop(graceful=False)

    async def stop(self, timeout: float = 5.0, graceful: bool = True) -> None:
        import asyncio

        self._stopping = True
        if self._ready is not None and not self._ready.done():
            self._ready.cancel()
        if graceful and self._client is not None and not self._client.closed and not self.lost:
            try:
                await asyncio.wait_for(self._client.call("shutdown"), timeout)
            except Exception as exc:  # noqa: BLE001 - e.g. containers left (SIGTERMed shim)
                log.warning("agent shutdown: %s", exc)
        # the agent exits -> the guest's init is gone -> panic -> QEMU exits (-no-reboot)
        await self._kill_all(grace=2.0 if graceful else 0.0)
        if self._client is not None:
            await self._client.close()
        for fd in self._cni.values():  # containers never deleted: their netns go with the VM
            os.close(fd)
        self._cni.clear()
        self.volumes.close()
        problems = self.view.close()  # exactly the view's recorded mounts
        if problems:
            log.error("layer view %s: %s", self.view.path, "; ".join(problems))
        try:
            remove_run_dir(self.dir)  # unmounts the recorded volume binds first; never removes host data
        except MountRecordError as exc:  # VolumeError too
            log.error("%s", exc)
        try:
            os.rmdir(os.path.dirname(self.dir))
        except OSError:
            pass

