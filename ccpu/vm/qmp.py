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
from collections.abc import Callable, Mapping
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


#: events that mean the guest is gone: with ``-no-reboot`` (ccpu.vm.qemu.command) a reset -- also the
#: reboot of a kernel panic (``panic=-1``) -- ends QEMU as a shutdown does; GUEST_PANICKED needs a
#: pvpanic device, which these guests do not have (the panic's reboot is seen as SHUTDOWN)
GUEST_END_EVENTS = frozenset({"SHUTDOWN", "RESET", "GUEST_PANICKED"})


def guest_end(msg: Mapping[str, Any]) -> str | None:
    """What a QMP event says about the guest's end, in words; None for any other event.  Only a
    guest's own end counts: a SHUTDOWN QEMU reports for a signal (``"guest": false``) is ours."""
    event = msg.get("event")
    if event not in GUEST_END_EVENTS:
        return None
    data = msg.get("data")
    data = data if isinstance(data, Mapping) else {}
    if event == "GUEST_PANICKED":
        return "the guest kernel panicked"
    if data.get("guest") is False:
        return None  # a host signal, a quit, the monitor: whoever did it knows
    reason = str(data.get("reason", ""))[:64]
    if event == "RESET" or reason == "guest-reset":
        return "the guest reset itself (a reboot, or a kernel panic: panic=-1)"
    if reason == "guest-panic":
        return "the guest kernel panicked"
    return f"the guest shut down ({reason or 'no reason given'})"


def is_deleted_event(msg: Mapping[str, Any], device: str) -> bool:
    data = msg.get("data")
    return msg.get("event") == "DEVICE_DELETED" and isinstance(data, Mapping) and data.get("device") == device


# ---------------------------------------------------------------------------------------------
# the client


class Qmp:
    """A blocking QMP client on a connected unix stream socket (ours from boot).

    :meth:`connect` reads the greeting and leaves negotiation mode; commands are serialized by a
    lock (replies carry no id here: one command in flight at a time).  Events that arrive while
    waiting are kept (bounded) for :meth:`wait_event`.

    :meth:`watch` (the VM's owner, once it runs) moves all reading to a thread: every line is read
    as QEMU writes it, so an event that ends the guest (:func:`guest_end`) is seen at once --
    before QEMU has exited, and whether or not a command is in flight -- and reported once to
    ``on_end``; commands then wait for their reply from that thread.  A channel handed to another
    process (a pooled VM's) is never watched by the giver: two readers would split its lines."""

    MAX_EVENTS = 256

    def __init__(self, sock: socket.socket, *, negotiated: bool = False) -> None:
        """``negotiated``: the greeting was read and capabilities negotiated on this channel
        already (by the process that handed it over: a pooled VM's)."""
        self.sock = sock
        self._buf = b""
        self._events: list[dict[str, Any]] = []
        self._lock = threading.Lock()  # one command at a time (and, unwatched, one reader)
        self._ready = negotiated
        self._cond = threading.Condition()  # watched: the reader's news (replies, events, its end)
        self._replies: list[dict[str, Any]] = []
        self._watcher: threading.Thread | None = None
        self._broken: str | None = None  # watched: why the reader stopped

    @property
    def negotiated(self) -> bool:
        return self._ready

    @property
    def watched(self) -> bool:
        return self._watcher is not None

    def close(self) -> None:
        if self._watcher is not None:
            # ours alone (a watched channel is never handed over): the watcher blocked in recv
            # wakes up on the shutdown and ends
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.sock.close()

    def _read_line(self, deadline: float | None) -> bytes:
        while b"\n" not in self._buf:
            if deadline is None:
                self.sock.settimeout(None)
            else:
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
        if self._watcher is not None:
            with self._cond:
                if self._broken is not None:
                    raise QmpError(self._broken)  # QEMU is gone: say why, not EPIPE
                self._replies.clear()  # a reply nobody waited for (a command that timed out)
        try:
            if fd is not None:
                socket.send_fds(self.sock, [data], [fd])
            else:
                self.sock.sendall(data)
        except OSError as exc:
            raise QmpError(f"QMP channel: {exc}") from None
        while True:
            msg = self._next_reply(deadline) if self._watcher is not None else parse(self._read_line(deadline))
            if "event" in msg:
                self._keep(msg)
            elif "return" in msg:
                return msg["return"]
            elif "error" in msg:
                err = msg["error"] if isinstance(msg["error"], Mapping) else {}
                raise QmpError(f"{command}: {err.get('desc', msg['error'])}")

    def _next_reply(self, deadline: float) -> dict[str, Any]:
        return self._wait_for(lambda: self._replies.pop(0) if self._replies else None, deadline)

    def _wait_for(self, take: Callable[[], Any], deadline: float) -> Any:
        """Under the watcher: wait until ``take()`` (called holding the condition) returns
        something other than None; the reader's end or the deadline is an error."""
        with self._cond:
            while True:
                got = take()
                if got is not None:
                    return got
                if self._broken is not None:
                    raise QmpError(self._broken)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise QmpError("QEMU did not answer on QMP in time")
                self._cond.wait(left)

    def wait_event(self, match: Any, timeout: float) -> dict[str, Any]:
        """The first event (kept or new) for which ``match(event)`` is true."""
        deadline = time.monotonic() + timeout
        def take() -> dict[str, Any] | None:
            for i, ev in enumerate(self._events):
                if match(ev):
                    return self._events.pop(i)
            return None
        if self._watcher is not None:
            return self._wait_for(take, deadline)
        with self._lock:
            while True:
                if (ev := take()) is not None:
                    return ev
                msg = parse(self._read_line(deadline))
                if "event" in msg:
                    self._keep(msg)

    def watch(self, on_end: Callable[[str], None]) -> None:
        """Read every line in a thread from now on; ``on_end(words)`` once, from that thread, when
        QEMU reports the guest's end (:func:`guest_end`).  Negotiates first if nobody did (in the
        thread, holding the command lock meanwhile: QEMU may still be starting).  Idempotent."""
        self._lock.acquire()
        if self._watcher is not None:
            self._lock.release()
            return
        negotiate = not self._ready
        self._watcher = threading.Thread(target=self._watch, args=(on_end, negotiate), name="qmp-events",
                                         daemon=True)
        if not negotiate:
            self._lock.release()
        self._watcher.start()  # with ``negotiate`` the thread releases the lock once negotiated

    def _watch(self, on_end: Callable[[str], None], negotiate: bool) -> None:
        reported = False
        try:
            if negotiate:
                try:
                    deadline = time.monotonic() + REPLY_TIMEOUT
                    greeting = parse(self._read_line(deadline))
                    if "QMP" not in greeting:
                        raise QmpError(f"not a QMP greeting: {str(greeting)[:200]}")
                    self.sock.sendall(encode("qmp_capabilities"))
                    while True:
                        msg = parse(self._read_line(deadline))
                        if "return" in msg:
                            break
                        if "error" in msg:
                            raise QmpError(f"qmp_capabilities: {str(msg['error'])[:200]}")
                        if "event" in msg:
                            with self._cond:
                                self._keep(msg)
                    self._ready = True
                except OSError as exc:
                    raise QmpError(f"QMP channel: {exc}") from None
                finally:
                    self._lock.release()
            while True:
                msg = parse(self._read_line(None))
                words = guest_end(msg) if "event" in msg else None
                with self._cond:
                    if "event" in msg:
                        self._keep(msg)
                    elif "return" in msg or "error" in msg:
                        self._replies.append(msg)
                    self._cond.notify_all()
                if words is not None and not reported:
                    reported = True
                    on_end(words)
        except (QmpError, OSError) as exc:  # OSError: the channel closed under it (EBADF)
            with self._cond:
                self._broken = str(exc) if isinstance(exc, QmpError) else f"QMP channel: {exc}"
                self._cond.notify_all()


def watch_in_loop(client: Qmp, loop: Any, on_end: Callable[[str], None]) -> None:
    """:meth:`Qmp.watch` with ``on_end`` called on ``loop``'s thread (an asyncio owner's)."""

    def report(words: str) -> None:
        try:
            loop.call_soon_threadsafe(on_end, words)
        except RuntimeError:  # the loop is closed: its owner is gone, nobody to tell
            pass

    client.watch(report)
