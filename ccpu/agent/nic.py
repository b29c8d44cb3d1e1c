"""The agent's ``nic`` op: configure a NIC the host plugged into the guest after boot.

Why in the agent: a NIC added after boot (ccpu/vm/machine.py ``attach_nic``: a pooled VM adopted
by a CRI pod, a nerdctl CNI network set up by its OCI hook) misses the boot path, where the
guest init applies ``fractal.net=`` from the kernel command line.  The shim sends the same
facts -- the interface's MAC (how the guest finds the device), its name, MTU, IPv4 addresses
and routes -- and the agent applies them with busybox ``ip``, in the same order as the init
(on-link routes before the routes through them, the default route last).

Why ``ip`` and not rtnetlink from Python: busybox ``ip`` is already in every guest and is what the
boot path uses, so both paths run the same, tested commands; packing rtnetlink messages by hand
(stdlib has no netlink helpers) would be a second implementation to get right for a call made
once per NIC.  Each command is an argv list (no shell), run through the agent's reaper.

The values come from the host and are checked here all the same (the agent is the guest's
gate): a plain interface name, a unicast MAC, an MTU in 68..65535, at most :data:`MAX_ADDRS`
IPv4 addresses and :data:`MAX_ROUTES` routes, all parsed by :mod:`ipaddress`.  Only agents
started with ``--nics`` (the guest's, by the init) serve the op: on the host it would
reconfigure the host's own interfaces.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from . import protocol

MAX_ADDRS = 16
MAX_ROUTES = 32
#: how long the guest kernel may take to probe a NIC just plugged (TCG is slow)
PROBE_TIMEOUT = 30.0
SYS_NET = "/sys/class/net"

_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


@dataclass(frozen=True)
class Route:
    dst: str  # "default" or a network "a.b.c.d/n"
    gateway: str | None = None  # None: on link


@dataclass(frozen=True)
class NicConfig:
    mac: str
    name: str
    mtu: int
    addrs: tuple[str, ...]
    routes: tuple[Route, ...]


def parse(args: Mapping[str, Any]) -> NicConfig:
    """The op's arguments, validated (InvalidArgument naming the bad value)."""
    mac = protocol.arg_str(args, "mac").lower()
    if not _MAC.match(mac) or mac == "00:00:00:00:00:00" or int(mac[:2], 16) & 1:
        raise protocol.InvalidArgument(f"mac {mac[:40]!r} is not a unicast MAC address")
    name = protocol.arg_str(args, "name")
    if not _IFNAME.match(name) or name in (".", "..") or name == "lo":
        raise protocol.InvalidArgument(f"name {name[:40]!r} is not a plain interface name")
    mtu = protocol.arg_int(args, "mtu", 1500)
    if not 68 <= mtu <= 65535:
        raise protocol.InvalidArgument(f"mtu {mtu} out of range 68..65535")
    raw_addrs = protocol.arg_list(args, "addrs", [])
    raw_routes = protocol.arg_list(args, "routes", [])
    if len(raw_addrs) > MAX_ADDRS or len(raw_routes) > MAX_ROUTES:
        raise protocol.InvalidArgument(f"at most {MAX_ADDRS} addresses and {MAX_ROUTES} routes")
    addrs = []
    for a in raw_addrs:
        try:
            if not isinstance(a, str) or "/" not in a:
                raise ValueError
            addrs.append(str(ipaddress.IPv4Interface(a)))
        except ValueError:
            raise protocol.InvalidArgument(f"address {str(a)[:60]!r} is not IPv4 ADDR/PREFIX") from None
    routes = []
    for r in raw_routes:
        if not isinstance(r, Mapping):
            raise protocol.InvalidArgument("a route is an object {dst, gateway}")
        dst, gw = r.get("dst"), r.get("gateway")
        try:
            if not isinstance(dst, str) or (gw is not None and not isinstance(gw, str)):
                raise ValueError
            dst = dst if dst == "default" else str(ipaddress.IPv4Network(dst, strict=False))
            gw = str(ipaddress.IPv4Address(gw)) if gw is not None else None
        except ValueError:
            raise protocol.InvalidArgument(f"route {str(dict(r))[:80]} is not an IPv4 route") from None
        if dst == "default" and gw is None:
            raise protocol.InvalidArgument("a default route needs a gateway")
        routes.append(Route(dst, gw))
    return NicConfig(mac, name, mtu, tuple(addrs), tuple(routes))


def plan(cfg: NicConfig, dev: str) -> list[list[str]]:
    """``ip`` argv lists (without ``ip``) that make device ``dev`` the interface ``cfg`` says."""
    cmds: list[list[str]] = []
    if dev != cfg.name:
        cmds.append(["link", "set", "dev", dev, "name", cfg.name])
    cmds.append(["link", "set", "dev", cfg.name, "mtu", str(cfg.mtu), "up"])
    cmds += [["addr", "add", a, "dev", cfg.name] for a in cfg.addrs]
    cmds += [["route", "add", r.dst, "dev", cfg.name, "scope", "link"] for r in cfg.routes if r.gateway is None]
    cmds += [["route", "add", r.dst, "via", r.gateway, "dev", cfg.name, "onlink"]
             for r in cfg.routes if r.gateway is not None and r.dst != "default"]
    cmds += [["route", "add", "default", "via", r.gateway, "dev", cfg.name, "onlink"]
             for r in cfg.routes if r.gateway is not None and r.dst == "default"][:1]
    return cmds


def device_by_mac(mac: str, root: str = SYS_NET) -> str | None:
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return None
    for name in names:
        try:
            with open(os.path.join(root, name, "address")) as f:
                if f.read().strip().lower() == mac:
                    return name
        except OSError:
            continue
    return None


async def _ip(reaper: Any, argv: list[str]) -> None:
    import shutil

    from ccpu.linux import reaper as reaper_mod

    binary = shutil.which("ip")  # posix_spawn searches no PATH
    if binary is None:
        raise protocol.FailedPrecondition("no `ip` in the agent's PATH")
    try:
        spawned = reaper_mod.spawn(reaper, [binary, *argv], stdout=reaper_mod.DEVNULL, stderr=reaper_mod.PIPE)
    except OSError as exc:
        raise protocol.Internal(f"ip: {exc.strerror or exc}") from None
    res = await spawned.result()
    if res.status != 0:
        raise protocol.FailedPrecondition(f"ip {' '.join(argv)}: "
                                          f"{res.stderr.decode(errors='replace').strip()[-300:] or res.status}")


async def nic_op(reaper: Any, args: Mapping[str, Any]) -> dict[str, Any]:
    """Wait for the NIC with ``mac`` to appear (the kernel probes it after the plug), configure it."""
    cfg = parse(args)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PROBE_TIMEOUT
    while (dev := device_by_mac(cfg.mac)) is None:
        if loop.time() > deadline:
            raise protocol.NotFound(f"no NIC with MAC {cfg.mac} in the guest after {PROBE_TIMEOUT:g}s")
        await asyncio.sleep(0.05)
    for argv in plan(cfg, dev):
        await _ip(reaper, argv)
    return {"name": cfg.name, "device": dev}
