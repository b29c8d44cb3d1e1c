"""Connect a network namespace (a pod's, made by CNI) to the VM: kata's "tcfilter" model.

For every non-loopback interface of the netns that has an IPv4 address (``eth0`` for a CNI pod):

* record its MAC, MTU, IPv4 addresses and IPv4 routes (``Interface``);
* create a tap device ``tap<i>_fractal`` in the same netns by opening ``/dev/net/tun`` with
  TUNSETIFF while that netns is active (the device lives as long as an fd of it is open: ours, then
  QEMU's), single queue, no packet-info header, no vnet header;
* wire the two together with tc: an ingress qdisc on ``eth0`` whose u32 match-all filter redirects
  every frame to the tap's egress (= to QEMU = into the guest), and the same on the tap towards
  ``eth0``'s egress (= out of the pod's veth);
* give QEMU the tap fd and ``eth0``'s MAC, and the guest init ``fractal.net=...`` on the kernel
  command line, so the guest's NIC takes over the pod's MAC, MTU, addresses and routes.

The addresses stay configured on the netns's ``eth0`` (as kata leaves them): every frame arriving on
``eth0`` is redirected at ingress before the netns's IP stack sees it, so that stack never answers
for the pod's IP; the guest does.  Tools that read the pod IP from the netns (CRI's
PodSandboxStatus, ``ip -n``) keep working.

Pure parts (``parse_*``, ``guest_arg``, ``plan_tc``) are separated from the I/O (``attach``,
``Attachment.detach``) and unit-tested.  All I/O in the netns runs in a short-lived thread that
``setns(2)``s into it: netns membership is per thread, the ``ip``/``tc`` it starts inherit it, and the
tap fd it opens works from any netns afterwards.  Only iproute2's ``ip -j`` and ``tc`` are used.
"""

from __future__ import annotations

import ctypes
import fcntl
import ipaddress
import json
import logging
import os
import re
import struct
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from .qemu import Nic

log = logging.getLogger(__name__)

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
TAP_SUFFIX = "_fractal"
MAX_CMDLINE_NET = 1024  # the x86 kernel command line is 2048 bytes in all; leave room for the rest

_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


class NetError(RuntimeError):
    """The network namespace cannot be connected to the VM."""


# ---------------------------------------------------------------------------------------------
# data model (pure)


@dataclass(frozen=True)
class Route:
    """An IPv4 route of one interface: ``dst`` is ``default`` or ``a.b.c.d/n``; no gateway = on link."""

    dst: str
    gateway: str | None = None


@dataclass(frozen=True)
class Interface:
    """What the guest's NIC must look like to be the pod's interface."""

    name: str
    mac: str
    mtu: int
    addrs: tuple[str, ...]  # "10.0.0.2/24"
    routes: tuple[Route, ...] = ()


def tap_name(index: int) -> str:
    return f"tap{index}{TAP_SUFFIX}"


def parse_links(addr_json: str) -> list[Interface]:
    """``ip -j addr show`` -> the interfaces worth giving the guest (IPv4, not loopback, not our taps).

    Routes are filled in by ``with_routes``.  Order: as ``ip`` lists them (by ifindex)."""
    out = []
    for link in json.loads(addr_json or "[]"):
        name = link.get("ifname", "")
        if link.get("link_type") == "loopback" or "LOOPBACK" in link.get("flags", ()) or name.endswith(TAP_SUFFIX):
            continue
        addrs = tuple(f"{a['local']}/{a['prefixlen']}" for a in link.get("addr_info", ())
                      if a.get("family") == "inet" and "local" in a)
        if not addrs:
            continue
        out.append(Interface(name=name, mac=str(link.get("address", "")).lower(), mtu=int(link.get("mtu", 1500)),
                             addrs=addrs))
    return out


def parse_routes(route_json: str) -> dict[str, list[Route]]:
    """``ip -4 -j route show table main`` -> {device: [Route]}.

    Left out: the prefix routes the kernel derives from addresses (``proto kernel``; the guest's
    kernel derives them too), non-unicast types, multipath routes (no single ``dev``)."""
    by_dev: dict[str, list[Route]] = {}
    for r in json.loads(route_json or "[]"):
        if r.get("protocol") == "kernel" or r.get("type", "unicast") != "unicast" or "dev" not in r:
            continue
        if "nexthops" in r:
            log.warning("multipath route %s ignored", r.get("dst"))
            continue
        dst = r.get("dst", "default")
        if dst != "default" and "/" not in dst:
            dst += "/32"
        by_dev.setdefault(r["dev"], []).append(Route(dst, r.get("gateway")))
    return by_dev


def with_routes(ifaces: Sequence[Interface], routes: dict[str, list[Route]]) -> list[Interface]:
    return [Interface(i.name, i.mac, i.mtu, i.addrs, tuple(routes.get(i.name, ()))) for i in ifaces]


def validate(iface: Interface) -> None:
    """Everything that ends up on the kernel command line and in QEMU's argv must be plain."""
    if not _IFNAME.match(iface.name):
        raise NetError(f"interface name {iface.name!r} is not a plain Linux interface name")
    if not _MAC.match(iface.mac):
        raise NetError(f"{iface.name}: MAC {iface.mac!r} is not a MAC address")
    if iface.mac == "00:00:00:00:00:00" or int(iface.mac[:2], 16) & 1:
        raise NetError(f"{iface.name}: MAC {iface.mac} is not a unicast address")
    if not 68 <= iface.mtu <= 65535:
        raise NetError(f"{iface.name}: MTU {iface.mtu} out of range")
    try:
        for a in iface.addrs:
            ipaddress.IPv4Interface(a)
        for r in iface.routes:
            if r.dst != "default":
                ipaddress.IPv4Network(r.dst, strict=False)
            if r.gateway is not None:
                ipaddress.IPv4Address(r.gateway)
    except ValueError as exc:
        raise NetError(f"{iface.name}: {exc}") from None


def guest_arg(iface: Interface) -> str:
    """The guest init's ``fractal.net=NAME,MAC,MTU,ITEM...`` for one interface.

    Items, applied in this order: ``A.B.C.D/N`` (an address), ``r=DST`` (an on-link route),
    ``r=DST@GW`` (a route via GW), ``gw=GW`` (the default route).  On-link routes come before the
    routes that need them (Calico's ``default via 169.254.1.1`` needs ``169.254.1.1 dev eth0``)."""
    validate(iface)
    items = [iface.name, iface.mac, str(iface.mtu), *iface.addrs]
    items += [f"r={r.dst}" for r in iface.routes if r.gateway is None]
    items += [f"r={r.dst}@{r.gateway}" for r in iface.routes if r.gateway is not None and r.dst != "default"]
    items += [f"gw={r.gateway}" for r in iface.routes if r.gateway is not None and r.dst == "default"][:1]
    return "fractal.net=" + ",".join(items)


def agent_args(iface: Interface) -> dict[str, object]:
    """The agent's ``nic`` op arguments for ``iface`` (ccpu/agent/nic.py): a NIC added after boot
    gets what the boot path's ``fractal.net=`` gives."""
    validate(iface)
    return {"mac": iface.mac, "name": iface.name, "mtu": iface.mtu, "addrs": list(iface.addrs),
            "routes": [{"dst": r.dst, "gateway": r.gateway} for r in iface.routes]}


def guest_cmdline(ifaces: Sequence[Interface]) -> list[str]:
    args = [guest_arg(i) for i in ifaces]
    if sum(len(a) + 1 for a in args) > MAX_CMDLINE_NET:
        raise NetError(f"the network configuration needs {sum(len(a) + 1 for a in args)} bytes of kernel "
                       f"command line (at most {MAX_CMDLINE_NET}): too many addresses or routes")
    return args


def plan_tc(dev: str, tap: str) -> list[list[str]]:
    """The ``tc`` commands (argv without ``tc``) that connect ``dev`` and ``tap`` both ways."""
    cmds = []
    for src, dst in ((dev, tap), (tap, dev)):
        cmds += [["qdisc", "add", "dev", src, "ingress"],
                 ["filter", "add", "dev", src, "parent", "ffff:", "protocol", "all", "u32", "match", "u8", "0", "0",
                  "action", "mirred", "egress", "redirect", "dev", dst]]
    return cmds


def plan_teardown(dev: str, tap: str, owns_qdisc: bool = True) -> list[list[str]]:
    """argv lists that undo ``plan_tc`` and remove the tap; each may fail harmlessly (already gone).

    The tap's own ingress qdisc goes with the tap; ``dev``'s is removed only if we added it."""
    return ([["tc", "qdisc", "del", "dev", dev, "ingress"]] if owns_qdisc else []) + [["ip", "link", "del", "dev", tap]]


# ---------------------------------------------------------------------------------------------
# I/O

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int, nstype: int) -> None:
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def in_netns(ns_fd: int, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a fresh thread that has joined the netns ``ns_fd``; processes it starts inherit it.

    A dedicated thread, because network-namespace membership is per thread: the caller's threads (an
    asyncio loop, say) never change netns, and the thread ends with the work."""
    box: dict[str, object] = {}

    def body() -> None:
        try:
            _setns(ns_fd, CLONE_NEWNET)
            box["value"] = fn()
        except BaseException as exc:  # re-raised in the caller
            box["error"] = exc

    t = threading.Thread(target=body, name="fractal-netns", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def _run(argv: Sequence[str]) -> str:
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        raise NetError(f"{' '.join(argv)}: {res.stderr.strip() or f'exit {res.returncode}'}")
    return res.stdout


def inspect_current() -> list[Interface]:
    """The interfaces of the calling thread's netns (call through ``in_netns``)."""
    ifaces = parse_links(_run(["ip", "-j", "addr", "show"]))
    return with_routes(ifaces, parse_routes(_run(["ip", "-4", "-j", "route", "show", "table", "main"])))


def open_tap(name: str) -> int:
    """Create tap ``name`` in the calling thread's netns; the fd keeps it alive (not persistent)."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        ifr = struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI)
        fcntl.ioctl(fd, TUNSETIFF, ifr)
    except OSError as exc:
        os.close(fd)
        raise NetError(f"cannot create tap {name}: {exc.strerror}"
                       + (" (the netns is already connected to a VM?)" if exc.errno == 16 else "")) from None
    return fd


def new_netns() -> int:
    """An fd of a new, empty network namespace (it lives as long as an fd of it is open: no
    bind mount, so nothing is left behind when the holder dies).  Made in a thread that ends
    right after: unshare(2) changes the calling thread's netns only."""
    def make() -> int:
        if _libc.unshare(CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetError(f"cannot create a network namespace: {os.strerror(err)}")
        return os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)

    box: dict[str, object] = {}

    def body() -> None:
        try:
            box["value"] = make()
        except BaseException as exc:  # re-raised in the caller
            box["error"] = exc

    t = threading.Thread(target=body, name="fractal-netns-new", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def _same_netns_as_us(ns_fd: int) -> bool:
    st, ours = os.fstat(ns_fd), os.stat("/proc/self/ns/net")
    return (st.st_dev, st.st_ino) == (ours.st_dev, ours.st_ino)


@dataclass
class Link:
    """One interface of the netns connected to the VM."""

    iface: Interface
    tap: str
    fd: int | None
    owns_qdisc: bool = False  # whether the ingress qdisc on iface.name is ours (teardown removes it)


@dataclass
class Attachment:
    """A netns connected to the VM.  ``nics`` go to VMConfig.nics, ``cmdline`` to VMConfig.cmdline_extra,
    ``fds`` to QEMU's pass_fds.  ``detach()`` undoes everything (idempotent; safe if the netns or its
    interfaces are gone).  Holds an fd of the netns until then, so the namespace cannot be swapped."""

    netns: str
    links: list[Link] = field(default_factory=list)
    ns_fd: int | None = None

    @property
    def interfaces(self) -> list[Interface]:
        return [lk.iface for lk in self.links]

    @property
    def nics(self) -> list[Nic]:
        out = []
        for lk in self.links:
            if lk.fd is None:
                raise NetError("the tap fds were already closed")
            out.append(Nic(fd=lk.fd, mac=lk.iface.mac, mtu=lk.iface.mtu))
        return out

    @property
    def fds(self) -> list[int]:
        return [lk.fd for lk in self.links if lk.fd is not None]

    @property
    def cmdline(self) -> list[str]:
        return guest_cmdline(self.interfaces)

    def close_fds(self) -> None:
        """Drop our copies of the tap fds (once QEMU has them: the taps then live as long as QEMU)."""
        for lk in self.links:
            if lk.fd is not None:
                os.close(lk.fd)
                lk.fd = None

    def detach(self) -> None:
        """Remove the qdiscs and taps from the netns and close every fd.  Call after QEMU is gone."""
        self.close_fds()
        if self.ns_fd is None:
            return
        links, ns_fd = self.links, self.ns_fd

        def undo() -> None:
            for lk in links:
                for argv in plan_teardown(lk.iface.name, lk.tap, lk.owns_qdisc):
                    res = subprocess.run(argv, capture_output=True, text=True, timeout=30)
                    if res.returncode != 0:
                        log.debug("%s: %s (already gone?)", " ".join(argv), res.stderr.strip())

        try:
            in_netns(ns_fd, undo)
        except OSError as exc:
            log.warning("detaching %s: %s", self.netns, exc)
        finally:
            os.close(ns_fd)
            self.ns_fd = None

    close = detach

    def __enter__(self) -> Attachment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()


def attach(netns: str, *, max_nics: int | None = None) -> Attachment:
    """Connect the netns at ``netns`` (``/var/run/netns/NAME``, ``/proc/PID/ns/net``) to a VM to be started.

    Returns an Attachment with no links if the netns has no IPv4 interface (the guest then has only
    ``lo``).  Refuses the caller's own netns: redirecting the host's interfaces into a VM would cut
    the host off.  On error nothing is left behind."""
    try:
        ns_fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise NetError(f"netns {netns}: {exc.strerror}") from None
    att = Attachment(netns, ns_fd=ns_fd)
    try:
        if _same_netns_as_us(ns_fd):
            raise NetError(f"{netns} is this process's own network namespace (host network): not taking it over")

        def setup() -> None:
            ifaces = inspect_current()[:max_nics]
            for i, iface in enumerate(ifaces):
                validate(iface)
                tap = tap_name(i)
                lk = Link(iface, tap, open_tap(tap))
                att.links.append(lk)
                _run(["ip", "link", "set", "dev", tap, "mtu", str(iface.mtu), "up"])
                for cmd in plan_tc(iface.name, tap):
                    try:
                        _run(["tc", *cmd])
                    except NetError as exc:
                        if cmd[:2] == ["qdisc", "add"] and ("File exists" in str(exc) or "Exclusivity" in str(exc)):
                            raise NetError(f"{cmd[3]} in {netns} already has an ingress qdisc "
                                           f"(another VM, or a CNI plugin, uses it)") from None
                        raise
                    if cmd[:4] == ["qdisc", "add", "dev", iface.name]:
                        lk.owns_qdisc = True

        in_netns(ns_fd, setup)
        guest_cmdline(att.interfaces)  # fail now, not at boot, if it does not fit
    except BaseException:
        att.detach()
        raise
    log.debug("attached %s: %s", netns, [(lk.iface.name, lk.tap) for lk in att.links])
    return att
