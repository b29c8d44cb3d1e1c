"""containerd's stdio FIFOs <-> the agent's stdio channels, for one process.

containerd (ctr, CRI) creates the FIFOs and opens its ends before it calls Create/Exec, so:

* stdin is opened ``O_RDONLY|O_NONBLOCK`` (never blocks); epoll reports nothing until a
  writer has come *and gone* (Linux FIFOs only report HUP for writers seen after our open), so
  end-of-input is reported exactly when containerd closes its end -> ``close`` on the channel.
* stdout/stderr are opened ``O_WRONLY|O_NONBLOCK``; when no reader is there yet (ENXIO), as
  containerd's fifo package allows, we open ``O_RDWR`` instead, which never blocks.  Writes are
  non-blocking and buffered; a vanished reader (EPIPE) discards output.

Backpressure (the guest is untrusted, so the shim never buffers output without limit): each
output stream holds at most ``OUTPUT_CAP`` bytes not yet taken by containerd's reader.  Every
byte that leaves the buffer (written, or discarded) is handed back to the agent as window
credit (``Channel.consumed``), and the agent (protocol feature ``flow``) sends no more than the
window (= the cap) ahead: a process writing faster than its reader is slowed -- its pipe in the
agent fills and it blocks -- while other processes' streams and control messages go on.  Bytes
beyond the cap (only an agent ignoring flow control, or an older agent without it, sends them)
are dropped and counted; the count is logged once per stream and when it closes.

``output_done`` is set when the agent closed every output channel and everything was written:
the exit of a process is reported only then (``ctr run`` expects all output before the exit).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections.abc import Callable
from typing import Any

from ccpu.agent.client import DEFAULT_WINDOW

from .logging_uri import is_uri, open_log_uri

log = logging.getLogger("shim.stdio")

READ_SIZE = 64 * 1024
#: most bytes of one output stream the shim holds for a slow reader: the agent's flow-control
#: window, so an agent that keeps to it never hits the cap
OUTPUT_CAP = DEFAULT_WINDOW


class FifoWriter:
    """Non-blocking writer to an output FIFO, buffering at most ``cap`` bytes.

    ``on_consumed(n)`` is called for every byte that leaves the buffer, written or dropped (the
    agent channel's ``consumed``: window credit)."""

    def __init__(self, path: str, fd: int | None = None, cap: int = OUTPUT_CAP) -> None:
        self.path = path
        self.cap = cap
        self.dropped = 0  # bytes over the cap, discarded
        self.on_consumed: Callable[[int], None] = lambda n: None
        if fd is not None:  # an already open pipe or file (log URIs)
            os.set_blocking(fd, False)
            self.fd = fd
        else:
            try:
                self.fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self._buf = bytearray()
        self._loop = asyncio.get_running_loop()
        self._watching = False
        self._closing = False
        self.closed = asyncio.Event()

    def write(self, data: bytes) -> None:
        if self.fd < 0 or self._closing:
            self.on_consumed(len(data))  # nobody will write it: the sender may go on
            return
        room = self.cap - len(self._buf)
        if len(data) > room:
            self._drop(len(data) - max(room, 0))
            data = data[:max(room, 0)]
        if data:
            self._buf += data
            self._flush()

    def _drop(self, n: int) -> None:
        if not self.dropped:
            log.warning("stdio: %s: output over the %d-byte cap: dropping (the agent does not "
                        "keep to its flow-control window)", self.path, self.cap)
        self.dropped += n
        self.on_consumed(n)

    def close(self) -> None:
        """Close once the buffer is written (or at once if the reader is gone)."""
        self._closing = True
        self._flush()

    def abort(self) -> None:
        self._discard()
        self._closing = True
        self._finish()

    def _discard(self) -> None:
        n = len(self._buf)
        self._buf.clear()
        self.on_consumed(n)

    def _flush(self) -> None:
        while self._buf and self.fd >= 0:
            try:
                n = os.write(self.fd, self._buf)
            except BlockingIOError:
                if not self._watching:
                    self._loop.add_writer(self.fd, self._flush)
                    self._watching = True
                return
            except OSError as exc:  # EPIPE: the reader left; nobody wants the rest
                log.debug("stdio: %s: %s, dropping output", self.path, exc)
                self._discard()
                break
            del self._buf[:n]
            self.on_consumed(n)
        if self._watching:
            self._loop.remove_writer(self.fd)
            self._watching = False
        if self._closing:
            self._finish()

    def _finish(self) -> None:
        if self.dropped and self.fd >= 0:
            log.warning("stdio: %s: %d bytes of output dropped over the cap", self.path, self.dropped)
        if self.fd >= 0:
            if self._watching:
                self._loop.remove_writer(self.fd)
                self._watching = False
            os.close(self.fd)
            self.fd = -1
        self.closed.set()


class FifoReader:
    """Reads an input FIFO and forwards it to an agent channel until EOF (or stop())."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Future[None] | None = None
        self._finishing = False

    def start(self, channel: Any) -> None:
        """Forward to ``channel`` (an agent client Channel) until EOF."""
        self._task = self._loop.create_task(self._pump(channel))

    async def _readable(self) -> None:
        fd = self.fd
        fut = self._wake = self._loop.create_future()
        self._loop.add_reader(fd, lambda: fut.done() or fut.set_result(None))
        try:
            await fut
        finally:
            self._wake = None
            self._loop.remove_reader(fd)

    async def _pump(self, channel: Any) -> None:
        try:
            eof = False
            while not eof:
                # Wait for epoll first: read() on a FIFO returns b"" while NO writer has the
                # FIFO open, including before containerd's writer has arrived (its fifo package
                # opens the write end only once we, the reader, are there); epoll only reports
                # data, or HUP once a writer came and went.  After CloseIO (`finish`) there is
                # no waiting: what the FIFO holds is forwarded, then the channel is closed.
                if not self._finishing:
                    await self._readable()
                while True:
                    try:
                        data = os.read(self.fd, READ_SIZE)
                    except BlockingIOError:
                        break
                    if not data:
                        eof = True
                        break
                    await channel.write(data)
                if self._finishing:
                    break
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - agent gone etc.: stdin just ends
            log.debug("stdio: stdin %s: %s", self.path, exc)
        finally:
            self._close_fd()
        try:
            await channel.close_write()
        except Exception as exc:  # noqa: BLE001
            log.debug("stdio: closing stdin channel %d: %s", channel.number, exc)

    def finish(self) -> None:
        """CloseIO: forward what the FIFO holds now, then close the channel (stdin EOF)."""
        self._finishing = True
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def stop(self) -> None:
        """Stop forwarding (delete): nothing more is sent, not even the channel's close.

        A running pump closes the fd itself, after taking it out of the event loop: an fd
        closed while registered would leave a stale entry in asyncio's selector, which breaks
        the next registration of that fd number."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
        else:
            self._close_fd()

    def _close_fd(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _ignore(data: bytes) -> None:
    """Data from the agent on a channel that only carries data to it."""


class ProcessIO:
    """The stdio of one process: FIFOs on our side, channels of the agent client on the other."""

    def __init__(self, agent: Any, stdin: str, stdout: str, stderr: str, terminal: bool,
                 container_id: str = "", namespace: str = "") -> None:
        self.agent = agent
        self.terminal = terminal
        self.stdin_reader: FifoReader | None = None
        self.stdin_channel: Any = None
        self.writers: dict[int, FifoWriter] = {}
        self.opened: list[Any] = []  # every channel of this process (released on close)
        self.channels = {"stdin": 0, "stdout": 0, "stderr": 0}
        self.output_done = asyncio.Event()
        self._open_outputs: set[FifoWriter] = set()
        self.logger_pid: int | None = None
        try:
            if stdin:
                self.stdin_reader = FifoReader(stdin)
                # the agent never sends on a stdin channel: anything it does is dropped, not
                # buffered in a channel nobody reads
                self.stdin_channel = agent.open_channel(on_data=_ignore)
                self.opened.append(self.stdin_channel)
                self.channels["stdin"] = self.stdin_channel.number
            fds: dict[str, int] = {}
            if stdout and is_uri(stdout):  # binary:// or file://: one target for both streams
                want_err = bool(stderr) and not terminal
                target = open_log_uri(stdout, container_id, namespace, want_err)
                fds = {"stdout": target.stdout_fd, "stderr": target.stderr_fd}
                self.logger_pid = target.pid
            for name, path in (("stdout", stdout), ("stderr", "" if terminal else stderr)):
                if path:
                    w = FifoWriter(path, fds[name]) if name in fds and fds[name] >= 0 else FifoWriter(path)
                    self._open_outputs.add(w)
                    ch = agent.open_channel(on_data=w.write,
                                            on_close=lambda w=w: self._output_closed(w))
                    consumed = getattr(ch, "consumed", None)  # flow control (agent client)
                    if consumed is not None:
                        w.on_consumed = consumed
                    self.opened.append(ch)
                    self.channels[name] = ch.number
                    self.writers[ch.number] = w
        except BaseException:
            self.close()
            raise
        if not self._open_outputs:
            self.output_done.set()

    def agent_args(self) -> dict[str, int]:
        return dict(self.channels)

    def start_stdin(self) -> None:
        """Begin forwarding stdin (after the agent knows the process and its channels)."""
        if self.stdin_reader is not None and self.stdin_channel is not None:
            self.stdin_reader.start(self.stdin_channel)

    def close_stdin(self) -> None:
        """CloseIO.  It may come before Start (ctr sends it as soon as its input ended): then
        the data already in the FIFO must still go to the process, so the pump is only told to
        finish; it forwards what is there and closes the channel once Start has started it."""
        if self.stdin_reader is not None:
            self.stdin_reader.finish()

    def _output_closed(self, w: FifoWriter) -> None:
        w.close()
        self._open_outputs.discard(w)
        if not self._open_outputs and not self.output_done.is_set():
            asyncio.get_running_loop().create_task(self._drained())

    async def _drained(self) -> None:
        for w in self.writers.values():
            await w.closed.wait()
        self.output_done.set()

    async def wait_output(self, timeout: float | None) -> bool:
        """Wait until all output was relayed; False on timeout."""
        try:
            async with asyncio.timeout(timeout):
                await self.output_done.wait()
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        """Drop everything (process deleted): FIFOs closed, channels released."""
        if self.stdin_reader is not None:
            self.stdin_reader.stop()
        for w in self.writers.values():
            w.abort()
        for ch in self.opened:
            try:
                ch.release()
            except Exception:  # noqa: BLE001
                pass
        self._open_outputs.clear()
        self.output_done.set()
