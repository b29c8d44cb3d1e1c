"""A process's stdio: pipes or a pseudo-terminal, relayed to and from protocol channels.

Why pipes handed to runc: for a non-terminal process runc passes its own stdio through to the
container process (as containerd's runc shim relies on), so the agent spawns `runc create` /
`runc exec` with pipe ends as fds 0-2 and keeps the other ends.  With a terminal, runc sends the
pty master over a `--console-socket` and the agent relays the master instead.

Output is relayed with backpressure (`Outbox.data` waits for the connection to drain), and
`drain()` tells when all output up to EOF was sent -- the exit event must come after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import socket
import struct
import termios
from collections.abc import Awaitable
from typing import Protocol

from ..linux.reaper import DEVNULL, read_some, wake, write_all

log = logging.getLogger(__name__)


class Outbox(Protocol):
    """Where output goes: the current client connection (see server.py)."""

    async def data(self, channel: int, data: bytes) -> None: ...

    def close(self, channel: int) -> None: ...


_CLOSE = object()


class StdinQueue:
    """Stdin data received for a channel, in order, until the process's stdin exists.

    Why a queue: data frames are handled synchronously by the connection's reader in arrival
    order, but the pipe (or pty) they go to appears only once runc has run.
    """

    def __init__(self) -> None:
        self._q: asyncio.Queue[object] = asyncio.Queue()
        self.closed = False

    def put(self, data: bytes) -> None:
        if not self.closed:
            self._q.put_nowait(data)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._q.put_nowait(_CLOSE)

    async def pump(self, fd: int, close_fd: bool) -> None:
        """Write queued data to `fd` until closed; close `fd` then if `close_fd`."""
        broken = False
        try:
            while True:
                item = await self._q.get()
                if item is _CLOSE:
                    return
                if broken:
                    continue
                try:
                    await write_all(fd, item)  # type: ignore[arg-type]
                except (BrokenPipeError, OSError) as e:
                    log.debug("stdin write to fd %d failed: %s", fd, e)
                    broken = True  # keep draining the queue; the process no longer reads
        finally:
            if close_fd:
                os.close(fd)


class Stdio:
    """Base: channel numbers, the stdin queue and the output relay tasks."""

    terminal = False

    def __init__(self, stdin: int, stdout: int, stderr: int, stdin_queue: StdinQueue | None) -> None:
        self.stdin_ch, self.stdout_ch, self.stderr_ch = stdin, stdout, stderr
        self.stdin_queue = stdin_queue if stdin else None
        self._tasks: list[asyncio.Task[None]] = []
        self._relays: list[asyncio.Task[None]] = []

    def _spawn(self, coro: Awaitable[None], relay: bool) -> None:
        task = asyncio.ensure_future(coro)
        (self._relays if relay else self._tasks).append(task)

    async def _relay_out(self, fd: int, channel: int, outbox: Outbox) -> None:
        try:
            while True:
                data = await read_some(fd)
                if not data:
                    return
                await outbox.data(channel, data)
        except OSError as e:
            log.debug("output relay for channel %d ended: %s", channel, e)
        finally:
            os.close(fd)

    async def drain(self, timeout: float | None) -> None:
        """Wait until all output was relayed (EOF on every output), at most `timeout` s.

        Why a timeout: a background process that inherited the stdout of an exec'd process can
        keep the pipe open forever; after the timeout the rest of its output is dropped.
        """
        if not self._relays:
            return
        done, pending = await asyncio.wait(self._relays, timeout=timeout)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending)

    def output_channels(self) -> list[int]:
        return [ch for ch in (self.stdout_ch, self.stderr_ch) if ch]

    def close_stdin(self) -> None:
        if self.stdin_queue is not None:
            self.stdin_queue.close()

    def close(self) -> None:
        """Stop everything (the process was deleted)."""
        self.close_stdin()
        for t in self._tasks + self._relays:
            t.cancel()

    def resize(self, width: int, height: int) -> None:
        pass  # no terminal: nothing to resize (as the runc shim does)

    def release(self) -> None:
        """Close fds held for a process that was never started (nothing here)."""

    def child_fds(self) -> tuple[int, int, int]:
        """What runc gets as fds 0-2."""
        return DEVNULL, DEVNULL, DEVNULL

    def close_child_ends(self) -> None:
        """Drop our copies of the child's fds once runc was spawned (nothing here)."""

    def start(self, outbox: Outbox) -> None:
        """Begin relaying (nothing to relay here)."""


class PipeStdio(Stdio):
    """Pipes for a non-terminal process; `child_fds()` are what runc gets as fds 0-2."""

    def __init__(self, stdin: int, stdout: int, stderr: int, stdin_queue: StdinQueue | None) -> None:
        super().__init__(stdin, stdout, stderr, stdin_queue)
        self._child: list[int] = [DEVNULL, DEVNULL, DEVNULL]
        self._parent: list[int | None] = [None, None, None]
        try:
            if stdin:
                r, w = os.pipe()
                self._child[0], self._parent[0] = r, w
            for i, ch in ((1, stdout), (2, stderr)):
                if ch:
                    r, w = os.pipe()
                    self._child[i], self._parent[i] = w, r
        except BaseException:
            self.release()
            raise

    def child_fds(self) -> tuple[int, int, int]:
        return self._child[0], self._child[1], self._child[2]

    def close_child_ends(self) -> None:
        """Drop our copies of the child's ends once runc has them (else no EOF ever comes)."""
        for i, fd in enumerate(self._child):
            if fd >= 0:
                os.close(fd)
                self._child[i] = DEVNULL

    def start(self, outbox: Outbox) -> None:
        self.close_child_ends()
        if self._parent[0] is not None and self.stdin_queue is not None:
            os.set_blocking(self._parent[0], False)
            self._spawn(self.stdin_queue.pump(self._parent[0], close_fd=True), relay=False)
            self._parent[0] = None
        for i, ch in ((1, self.stdout_ch), (2, self.stderr_ch)):
            fd = self._parent[i]
            if fd is not None:
                os.set_blocking(fd, False)
                self._spawn(self._relay_out(fd, ch, outbox), relay=True)
                self._parent[i] = None

    def release(self) -> None:
        """Close every fd still held (create failed, or nothing was started)."""
        self.close_child_ends()
        for i, fd in enumerate(self._parent):
            if fd is not None:
                os.close(fd)
                self._parent[i] = None


class ConsoleStdio(Stdio):
    """A pseudo-terminal: runc sends its master over a console socket we listen on."""

    terminal = True

    def __init__(self, stdin: int, stdout: int, stderr: int, stdin_queue: StdinQueue | None) -> None:
        super().__init__(stdin, stdout, 0, stdin_queue)
        import tempfile  # here: only a console needs it, not the agent's start (docs/vm.md)

        self._dir = tempfile.mkdtemp(prefix="fractal-console-")
        self.socket_path = os.path.join(self._dir, "c.sock")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(self.socket_path)
        self._sock.listen(1)
        self._sock.setblocking(False)
        self.master: int | None = None

    async def receive_master(self) -> int:
        """Accept runc's connection and take the pty master it sends (SCM_RIGHTS)."""
        loop = asyncio.get_running_loop()
        conn, _ = await loop.sock_accept(self._sock)
        with conn:
            conn.setblocking(False)
            while True:
                try:
                    _msg, fds, _flags, _addr = socket.recv_fds(conn, 4096, 4)
                    break
                except BlockingIOError:
                    fut: asyncio.Future[None] = loop.create_future()
                    loop.add_reader(conn.fileno(), wake, fut)
                    try:
                        await fut
                    finally:
                        loop.remove_reader(conn.fileno())
        if not fds:
            raise OSError("runc sent no terminal master over the console socket")
        for extra in fds[1:]:
            os.close(extra)
        self.master = fds[0]
        os.set_inheritable(self.master, False)
        self._close_socket()
        return self.master

    def _close_socket(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.socket_path)
        with contextlib.suppress(OSError):
            os.rmdir(self._dir)

    def start(self, outbox: Outbox) -> None:
        assert self.master is not None
        master = self.master
        os.set_blocking(master, False)
        # the master is shared by both directions: the output relay owns (closes) it, and stdin
        # writes use a dup so a close of stdin never closes the output side
        if self.stdin_queue is not None:
            self._spawn(self.stdin_queue.pump(os.dup(master), close_fd=True), relay=False)
        if self.stdout_ch:
            self._spawn(self._owning_master(self._relay_out(master, self.stdout_ch, outbox)), relay=True)
        else:
            self._spawn(self._owning_master(self._discard(master)), relay=True)

    async def _owning_master(self, relay: Awaitable[None]) -> None:
        try:
            await relay
        finally:
            self.master = None  # the relay closed it: no resize on a stale fd number

    async def _discard(self, fd: int) -> None:
        # nobody listens, but the terminal must still be read or the process blocks on output
        try:
            while await read_some(fd):
                pass
        finally:
            os.close(fd)

    def resize(self, width: int, height: int) -> None:
        if self.master is not None:
            fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))

    def release(self) -> None:
        self._close_socket()
        if self.master is not None and not self._relays:
            os.close(self.master)
            self.master = None
