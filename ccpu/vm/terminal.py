"""The user's terminal during `fractal vm run -t`: raw mode, its size, SIGWINCH.

Why raw: the guest's pty does the line discipline (echo, editing, ^C -> SIGINT to the guest's
foreground process group, ^Z, ^\\), so the host's must do none of it: every byte goes through
as typed, and ^C interrupts the guest's command, not `fractal`.  The terminal is restored on
the way out, whatever happened.
"""

from __future__ import annotations

import fcntl
import os
import signal
import struct
import termios
import threading
import tty
from types import TracebackType
from typing import Any


class Relay:
    """A context: ``in_fd`` (a terminal or None) raw while inside; ``winch_fd`` becomes readable
    on each SIGWINCH (main thread only; elsewhere it never does)."""

    def __init__(self, in_fd: int | None, out_fd: int | None = None) -> None:
        self.in_fd = in_fd
        self.out_fd = out_fd
        self._saved: list[Any] | None = None
        self._old_handler: Any = None
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    @property
    def winch_fd(self) -> int:
        return self._r

    def __enter__(self) -> Relay:
        if self.in_fd is not None and os.isatty(self.in_fd):
            self._saved = termios.tcgetattr(self.in_fd)
            tty.setraw(self.in_fd, termios.TCSANOW)
        if threading.current_thread() is threading.main_thread():
            self._old_handler = signal.signal(signal.SIGWINCH, self._on_winch)
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if self._old_handler is not None:
            signal.signal(signal.SIGWINCH, self._old_handler)
        if self._saved is not None and self.in_fd is not None:
            termios.tcsetattr(self.in_fd, termios.TCSADRAIN, self._saved)
        os.close(self._r)
        os.close(self._w)

    def _on_winch(self, signum: int, frame: object) -> None:
        try:
            os.write(self._w, b"w")
        except BlockingIOError:
            pass  # one pending wake-up is enough

    def winched(self) -> bool:
        """Drain the wake-ups; True if there was one."""
        try:
            return bool(os.read(self._r, 64))
        except BlockingIOError:
            return False

    def size(self) -> tuple[int, int]:
        """(rows, cols) of whichever end is a terminal; (0, 0) if neither is."""
        for fd in (self.in_fd, self.out_fd):
            if fd is not None and os.isatty(fd):
                rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
                return rows, cols
        return 0, 0
