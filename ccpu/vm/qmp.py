"""QEMU's machine protocol (QMP) over a connected unix socket: enough to hot-add and remove a NIC.

Why QMP and this much of it: a NIC that arrives after boot (a pooled VM adopted by a CRI pod, a
nerdctl CNI network set up by its OCI hook once the container exists) is a tap fd QEMU has never
seen.  QMP is the only way in: ``getfd`` hands QEMU the fd (SCM_RIGHTS on the same sendmsg as the
command), ``netdev_add`` makes a tap backend of it, ``device_add virtio-net-pci`` plugs a NIC into
one of the free ``pcie-root-port`` slots reserved at boot (q35 hot-plugs only into such ports).
The reverse is ``device_del``, which only *asks* the guest to let go: the device is gone when
QEMU emits ``DEVICE_DELETED`` for it; then ``netdev_del`` drops the backend (and QEMU's copy of the
tap fd with it).

The channel is one end of a socketpair whose other end QEMU got at boot (``-chardev
socket,fd=N`` + ``-mon mode=control``): no socket path on the host, nothing another process can
connect to.  Pure parts (:func:`encode`, :func:`parse`, :func:`hotplug_commands`,
:func:`unplug_commands`, :func:`nic_ids`) are unit-tested; :class:`Qmp` is a small blocking
client (the asyncio runner calls it from a worker thread, one command at a time under a lock).
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: the longest QMP reply or event line we accept (QEMU's are a few KiB at most)
MAX_LINE = 1 << 20
#: how long QEMU may take to answer one command (it answers at once; TCG may be slow to get to it)
REPLY_TIMEOUT = 30.0
#: how long the guest may take to release a device after ``device_del`` (Linux's pciehp waits 5 s
#: after the attention button before it powers the slot off; TCG adds to that)
UNPLUG_TIMEOUT = 60.0

_ID = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


class QmpError(RuntimeError):
    """QEMU refused a command, or the channel broke."""


# ---------------------------------------------------------------------------------------------
# pure


def encode(command: str, arguments: Mapping[str, Any] | None = None) -> bytes:
    """One QMP command line."""
    msg: dict[str, Any] = {"execute": command}
    if arguments:
        msg["arguments"] = dict(arguments)
    return json.dumps(msg, separators=(",", ":")).encode() + b"\n"


def parse(line: bytes) -> dict[str, Any]:
    """One line from QEMU: a greeting, a ``return``, an ``error`` or an ``event``."""
    if len(line) > MAX_LINE:
        raise QmpError(f"QMP line of {len(line)} bytes")
    try:
        msg = json.loads(line)
    except ValueError as exc:
        raise QmpError(f"QMP sent invalid JSON: {exc}") from None
    if not isinstance(msg, dict):
        raise QmpError(f"QMP sent {type(msg).__name__}, not an object")
    return msg


@dataclass(frozen=True)
class NicIds:
    """QEMU's names for one hot-added NIC: the fd (``getfd``), the backend and the device."""

    fd: str
    netdev: str
    device: str


def nic_ids(slot: int) -> NicIds:
    """The names of the NIC in hot-plug slot ``slot`` (boot NICs are ``net<i>``: no clash)."""
    return NicIds(f"hpfd{slot}", f"hpnet{slot}", f"hpnic{slot}")


def root_port_id(slot: int) -> str:
    """The ``pcie-root-port`` reserved at boot for hot-plug slot ``slot`` (ccpu.vm.qemu.command)."""
    return f"hp{slot}"


def hotplug_commands(slot: int, mac: str, mtu: int) -> list[tuple[str, dict[str, Any]]]:
    """After ``getfd`` (:func:`nic_ids`'s ``fd``): the backend, then the device on its root port."""
    ids = nic_ids(slot)
    if not _MAC.match(mac):
        raise ValueError(f"MAC {mac!r} is not a lower-case MAC address")
    if not 68 <= mtu <= 65535:
        raise ValueError(f"MTU {mtu} out of range")
    # host_mtu: the guest driver learns the MTU from the device; romfile "": no option ROM
    return [("netdev_add", {"type": "tap", "id": ids.netdev, "fd": ids.fd, "vhost": False}),
            ("device_add", {"driver": "virtio-net-pci", "id": ids.device, "netdev": ids.netdev,
                            "bus": root_port_id(slot), "mac": mac, "host_mtu": mtu, "romfile": ""})]


def unplug_commands(slot: int) -> tuple[tuple[str, dict[str, Any]], tuple[str, dict[str, Any]]]:
    """``device_del`` (then wait for DEVICE_DELETED), then ``netdev_del``."""
    ids = nic_ids(slot)
    return ("device_del", {"id": ids.device}), ("netdev_del", {"id": ids.netdev})


def is_deleted_event(msg: Mapping[str, Any], device: str) -> bool:
    data = msg.get("data")
    return msg.get("event") == "DEVICE_DELETED" and isinstance(data, Mapping) and data.get("device") == device


# ---------------------------------------------------------------------------------------------
# the client


class Qmp:
    """A blocking QMP client on a connected unix stream socket (ours from boot).

    :meth:`connect` reads the greeting and leaves negotiation mode; commands are serialized by a
    lock (replies carry no id here: one command in flight at a time).  Events that arrive while
    waiting are kept (bounded) for :meth:`wait_event`."""

    MAX_EVENTS = 256

    def __init__(self, sock: socket.socket, *, negotiated: bool = False) -> None:
        """``negotiated``: the greeting was read and capabilities negotiated on this channel
        already (by the process that handed it over: a pooled VM's)."""
        self.sock = sock
        self._buf = b""
        self._events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._ready = negotiated

    @property
    def negotiated(self) -> bool:
        return self._ready

    def close(self) -> None:
        self.sock.close()

    def _read_line(self, deadline: float) -> bytes:
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise QmpError("QEMU did not answer on QMP in time")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as exc:
                raise QmpError(f"QMP channel: {exc}") from None
            if not chunk:
                raise QmpError("QMP channel closed (QEMU exited?)")
            self._buf += chunk
            if len(self._buf) > MAX_LINE and b"\n" not in self._buf:
                raise QmpError("QMP line too long")
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def _keep(self, msg: dict[str, Any]) -> None:
        self._events.append(msg)
        del self._events[:-self.MAX_EVENTS]

    def connect(self) -> None:
        with self._lock:
            if self._ready:
                return
            deadline = time.monotonic() + REPLY_TIMEOUT
            greeting = parse(self._read_line(deadline))
            if "QMP" not in greeting:
                raise QmpError(f"not a QMP greeting: {str(greeting)[:200]}")
            self._execute("qmp_capabilities", None, None, deadline)
            self._ready = True

    def execute(self, command: str, arguments: Mapping[str, Any] | None = None, *,
                fd: int | None = None) -> Any:
        """Run one command (``fd``: passed with it by SCM_RIGHTS, for ``getfd``); its ``return``."""
        self.connect()
        with self._lock:
            return self._execute(command, arguments, fd, time.monotonic() + REPLY_TIMEOUT)

    def _execute(self, command: str, arguments: Mapping[str, Any] | None, fd: int | None,
                 deadline: float) -> Any:
        data = encode(command, arguments)
        try:
            if fd is not None:
                socket.send_fds(self.sock, [data], [fd])
            else:
                self.sock.sendall(data)
        except OSError as exc:
            raise QmpError(f"QMP channel: {exc}") from None
        while True:
            msg = parse(self._read_line(deadline))
            if "event" in msg:
                self._keep(msg)
            elif "return" in msg:
                return msg["return"]
            elif "error" in msg:
                err = msg["error"] if isinstance(msg["error"], Mapping) else {}
                raise QmpError(f"{command}: {err.get('desc', msg['error'])}")

    def wait_event(self, match: Any, timeout: float) -> dict[str, Any]:
        """The first event (kept or new) for which ``match(event)`` is true."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                for i, ev in enumerate(self._events):
                    if match(ev):
                        return self._events.pop(i)
                msg = parse(self._read_line(deadline))
                if "event" in msg:
                    self._keep(msg)
