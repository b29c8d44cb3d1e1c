"""`fractal vm run -t` in the guest: the command on a pseudo-terminal, relayed over virtio-serial.

Started by the init (run mode, ``fractal.tty=TERM`` on the kernel command line) as
``python3 -S -I -m ccpu.agent.vmtty CMD`` with
  fd 3  fractal.run     the rest of the control stream: ``W <rows> <cols>`` lines (window sizes)
  fd 4  fractal.stdout  everything the terminal shows
  fd 6  fractal.stdin   the user's keystrokes, raw (the host's terminal is in raw mode)
Why a pty in the guest: the guest's line discipline does what a local terminal would -- echo,
line editing, ^C as SIGINT to the foreground process group, ^Z, window-size SIGWINCH -- so the
host only relays bytes.  The exit status (128+N for a signal) is this process's, which the init
reports to the host as for any command.  Stdlib only: it ships in the guest.
"""

from __future__ import annotations

import fcntl
import os
import select
import struct
import sys
import termios

MAX_DIM = 10000  # rows/columns beyond any real terminal: refused, not passed to the kernel


def parse_winsize(line: bytes) -> tuple[int, int] | None:
    """``W <rows> <cols>`` -> (rows, cols); anything else (or out of range) -> None.  Pure."""
    parts = line.split()
    if len(parts) != 3 or parts[0] != b"W" or not all(p.isdigit() and len(p) <= 5 for p in parts[1:]):
        return None
    rows, cols = int(parts[1]), int(parts[2])
    return (rows, cols) if 0 < rows <= MAX_DIM and 0 < cols <= MAX_DIM else None


def set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


def _read_line(fd: int, limit: int = 64) -> bytes:
    line = b""
    while len(line) < limit:
        c = os.read(fd, 1)
        if not c or c == b"\n":
            break
        line += c
    return line


def _spawn(cmd: str, slave: int) -> int:
    pid = os.fork()
    if pid == 0:  # the child: a session of its own with the pty as controlling terminal
        try:
            os.setsid()
            fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
            for fd in (0, 1, 2):
                os.dup2(slave, fd)
            os.closerange(3, 1024)
            try:
                os.chdir("/work")
            except OSError:
                os.chdir("/")
            os.execv("/bin/sh", ["sh", "-c", cmd])
        finally:
            os._exit(127)
    return pid


def relay(cmd: str, ctl: int = 3, out: int = 4, inp: int = 6) -> int:
    """Run ``cmd`` on a new pty until it exits; returns its exit status."""
    master, slave = os.openpty()
    first = _read_line(ctl)  # the host sends the window size first: the command starts with it
    size = parse_winsize(first)
    if size is not None:
        set_winsize(master, *size)
    pid = _spawn(cmd, slave)
    os.close(slave)
    ctl_buf = b""
    watch = [master, ctl, inp]
    status: int | None = None
    while True:
        # the child's exit is polled: a background process keeping the pty open must not hold us
        ready, _, _ = select.select(watch, [], [], 0.1 if status is None else 0)
        if not ready and status is not None:
            break  # exited and nothing more to read
        for fd in ready:
            try:
                data = os.read(fd, 65536)
            except OSError:  # EIO: every slave end is closed
                data = b""
            if fd == master:
                if not data:
                    watch.remove(master)
                    continue
                _write_all(out, data)
            elif fd == inp:
                if data:
                    _write_all(master, data)
                else:
                    watch.remove(inp)
            else:
                if not data:
                    watch.remove(ctl)
                    continue
                ctl_buf = (ctl_buf + data)[-4096:]  # bounded: window sizes are short lines
                while b"\n" in ctl_buf:
                    line, ctl_buf = ctl_buf.split(b"\n", 1)
                    size = parse_winsize(line)
                    if size is not None:
                        set_winsize(master, *size)
        if status is None:
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                status = os.waitstatus_to_exitcode(st)
        if master not in watch and status is None:
            status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        if master not in watch:
            break
    os.close(master)
    assert status is not None
    return 128 - status if status < 0 else status


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python3 -m ccpu.agent.vmtty CMD", file=sys.stderr)
        return 2
    return relay(argv[1])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
