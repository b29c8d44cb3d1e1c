"""NICs added to a running VM: QEMU's monitor (QMP) and the hot-plug slots it was booted with.

Written once for both owners of a VM: :class:`ccpu.vm.machine._Launcher` (a VM this process
booted) and :class:`ccpu.vm.adopted.AdoptedMachine` (a pooled VM handed over, with the pool's
QMP channel and the slots it left free).  A netns's interfaces get taps (ccpu.vm.net.attach);
each tap fd goes to QEMU (``getfd``) and is plugged as a virtio-net NIC with the interface's MAC
into a free ``pcie-root-port``.  Blocking: the asyncio owners call it from a worker thread.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from . import net
from . import qmp as qmp_

log = logging.getLogger(__name__)


class NicError(RuntimeError):
    """A NIC could not be added or removed (the owners turn it into their MachineError)."""


@dataclass
class HotNics:
    """A netns connected after boot: its attachment (taps, tc) and the hot-plug slots its NICs use."""

    attachment: net.Attachment
    slots: list[int]


class Nics:
    """The NICs a running VM got after boot.

    ``slots``: the hot-plug root ports this owner may use (those reserved at boot, minus any a
    previous owner used); ``alive()``: whether QEMU still runs (each owner knows how)."""

    def __init__(self, qmp: qmp_.Qmp, slots: Iterable[int], alive: Callable[[], bool],
                 booted_netns: str | None = None) -> None:
        self.qmp: qmp_.Qmp | None = qmp
        self.slots = sorted(set(slots))
        self.alive = alive
        self.booted_netns = booted_netns  # the netns whose NICs QEMU got on its command line
        self.hot: dict[str, HotNics] = {}  # netns -> the NICs attach added for it
        self._lost: set[int] = set()  # a device the guest never released: its port stays taken

    def free_slots(self) -> list[int]:
        used = {s for h in self.hot.values() for s in h.slots} | self._lost
        return [s for s in self.slots if s not in used]

    def attach(self, netns: str) -> list[net.Interface]:
        """Connect ``netns`` to the running VM; the interfaces the guest now has NICs for.  All
        or nothing: on failure what was plugged is unplugged again and the taps removed."""
        if self.qmp is None or not self.alive():
            raise NicError("NICs can be added only to a running VM booted with hotplug_nics")
        if netns in self.hot or netns == self.booted_netns:
            raise NicError(f"network namespace {netns} is already connected to this VM")
        free = self.free_slots()
        try:
            att = net.attach(netns)
        except net.NetError as exc:
            raise NicError(f"cannot connect network namespace {netns} to the VM: {exc}") from None
        hot = HotNics(att, [])
        try:
            if len(att.links) > len(free):
                raise NicError(f"network namespace {netns} has {len(att.links)} interfaces; this VM has "
                               f"{len(free)} free NIC slots (of {len(self.slots)})")
            for link, slot in zip(att.links, free):
                ids = qmp_.nic_ids(slot)
                assert link.fd is not None
                self.qmp.execute("getfd", {"fdname": ids.fd}, fd=link.fd)
                try:
                    for cmd, args in qmp_.hotplug_commands(slot, link.iface.mac, link.iface.mtu):
                        self.qmp.execute(cmd, args)
                except BaseException:
                    with contextlib.suppress(qmp_.QmpError):
                        self.qmp.execute("netdev_del", {"id": ids.netdev})
                    with contextlib.suppress(qmp_.QmpError):
                        self.qmp.execute("closefd", {"fdname": ids.fd})
                    raise
                hot.slots.append(slot)
            att.close_fds()  # QEMU holds the taps now
        except BaseException as exc:
            self._unplug(hot)
            att.detach()
            if isinstance(exc, qmp_.QmpError):
                raise NicError(f"cannot add the NIC of {netns}: {exc}") from None
            raise
        self.hot[netns] = hot
        return att.interfaces

    def _unplug(self, hot: HotNics) -> None:
        """device_del, wait for the guest to release it (DEVICE_DELETED), netdev_del; a device the
        guest keeps is logged and its slot never reused (its backend is deleted all the same, which
        closes the tap)."""
        if self.qmp is None:
            return
        for slot in hot.slots:
            (dev_cmd, dev_args), (net_cmd, net_args) = qmp_.unplug_commands(slot)
            try:
                self.qmp.execute(dev_cmd, dev_args)
                self.qmp.wait_event(lambda ev, d=dev_args["id"]: qmp_.is_deleted_event(ev, d), qmp_.UNPLUG_TIMEOUT)
            except qmp_.QmpError as exc:
                log.warning("NIC %s: %s; its slot stays taken", dev_args["id"], exc)
                self._lost.add(slot)
            try:
                self.qmp.execute(net_cmd, net_args)
            except qmp_.QmpError as exc:
                log.warning("NIC backend %s: %s", net_args["id"], exc)
        hot.slots.clear()

    def detach(self, netns: str) -> None:
        """Unplug ``netns``'s NICs from the running VM, then remove its taps and tc redirects."""
        hot = self.hot.pop(netns, None)
        if hot is None:
            raise NicError(f"network namespace {netns} is not connected to this VM after boot")
        try:
            if self.alive():
                self._unplug(hot)
        finally:
            hot.attachment.detach()

    def close(self) -> None:
        """Once QEMU is gone: the taps and redirects of every NIC added after boot, and QMP."""
        for netns in list(self.hot):
            self.hot.pop(netns).attachment.detach()
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None

    def release(self) -> None:
        """Close our end of QMP, leaving QEMU and its NICs as they are (a handover: the pool's
        copy of the channel goes; the adopter has its own)."""
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None
