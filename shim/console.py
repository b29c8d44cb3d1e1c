"""A VM's serial console, kept on the host with a fixed cap.

Why not QEMU's ``-serial file:``: the guest writes the console, and guest root can write it
without end, so a file QEMU appends to grows until the host's disk is full.  Instead QEMU gets
one end of a socketpair as its console chardev (``-chardev socket,fd=N``), the shim reads the
other end in its event loop and keeps the output in two files that rotate:

* ``console.log``   the newest output, at most ``max_bytes / 2``;
* ``console.log.1`` the half before it (replaced at each rotation).

So the newest ``max_bytes / 2`` bytes or more are always on disk and the pair never holds more
than ``max_bytes``.  Everything older is dropped; the number of bytes dropped is logged when the
console closes.  If the shim stops reading, QEMU's serial port stops sending (the socket
buffer fills) -- the guest's console writes wait, nothing is buffered on the host.

:func:`tail` reads the last bytes across both files (for error messages and ``diagnose``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket

log = logging.getLogger("shim.console")

#: default cap of console.log + console.log.1
DEFAULT_MAX = 1 << 20
READ_SIZE = 64 * 1024
_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC


class ConsoleLog:
    """Reads the console socket, writes the rotating pair (see the module docstring)."""

    def __init__(self, path: str, max_bytes: int = DEFAULT_MAX) -> None:
        if max_bytes < 2:
            raise ValueError(f"console log cap {max_bytes} is too small")
        self.path = path
        self.half = max_bytes // 2
        self.written = 0  # bytes received from the guest
        self.dropped = 0  # bytes rotated away
        self._size = 0
        self._fd = -1
        self._ours: socket.socket | None = None
        self._theirs: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closed = asyncio.Event()

    def qemu_fd(self) -> int:
        """The fd to hand to QEMU (``pass_fds``); our end is read once :meth:`start` ran."""
        self._ours, self._theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._ours.setblocking(False)
        self._theirs.set_inheritable(True)
        self._fd = os.open(self.path, _FLAGS, 0o600)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path + ".1")  # a predecessor's
        return self._theirs.fileno()

    def adopt(self, sock: socket.socket) -> None:
        """Read the console socket another process read so far (a pooled VM's: shim/pool.py);
        what it wrote stays at the start of :attr:`path`, appended to from here."""
        self._ours = sock
        sock.setblocking(False)
        self._fd = os.open(self.path, (_FLAGS & ~os.O_TRUNC) | os.O_APPEND, 0o600)
        self._size = os.fstat(self._fd).st_size

    def start(self) -> None:
        """QEMU has its end: drop our copy of it and read ours."""
        assert self._ours is not None
        if self._theirs is not None:
            self._theirs.close()
            self._theirs = None
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._ours.fileno(), self._readable)

    def release(self) -> socket.socket:
        """Stop reading and give up the console socket (handed to a shim adopting the VM); the
        log file is closed, not removed (it goes with the VM's run dir)."""
        assert self._ours is not None
        if self._loop is not None:
            self._loop.remove_reader(self._ours.fileno())
        sock, self._ours = self._ours, None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        return sock

    def _readable(self) -> None:
        assert self._ours is not None
        try:
            data = self._ours.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.debug("console %s: %s", self.path, exc)
            data = b""
        if not data:
            self.close()
            return
        self.write(data)

    def write(self, data: bytes) -> None:
        """Append `data`, rotating whenever the current file is full."""
        self.written += len(data)
        view = memoryview(data)
        while view and self._fd >= 0:
            if self._size >= self.half:
                self._rotate()
            n = min(len(view), self.half - self._size)
            try:
                os.write(self._fd, view[:n])
            except OSError as exc:  # e.g. the disk is full: the console is not worth failing for
                log.warning("console %s: %s; dropping console output", self.path, exc)
                self.dropped += len(view)
                return
            self._size += n
            view = view[n:]

    def _rotate(self) -> None:
        self.dropped += _size_of(self.path + ".1")
        os.close(self._fd)
        self._fd = -1
        os.replace(self.path, self.path + ".1")
        self._fd = os.open(self.path, _FLAGS, 0o600)
        self._size = 0

    def close(self) -> None:
        """Stop reading (what the socket still holds is read first) and close the file."""
        if self._ours is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._ours.fileno())
            with contextlib.suppress(OSError):
                while data := self._ours.recv(READ_SIZE):
                    self.write(data)
            self._ours.close()
            self._ours = None
        if self._theirs is not None:
            self._theirs.close()
            self._theirs = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            if self.dropped:
                log.info("console %s: %d of %d bytes rotated away (cap %d)", self.path,
                         self.dropped, self.written, 2 * self.half)
        self.closed.set()


def _size_of(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def tail(path: str, n: int) -> bytes:
    """The last `n` bytes of the console: the end of ``path.1`` and then ``path``."""
    out = b""
    for p in (path, path + ".1"):
        want = n - len(out)
        if want <= 0:
            break
        try:
            with open(p, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - want))
                out = f.read() + out
        except OSError:
            continue
    return out
