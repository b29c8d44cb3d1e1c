"""`fractal vm run -it` driven through a pty as a person would (issue 17 part 2), and `vm run` as a
user without root.

The test is the person at the terminal: it starts `fractal vm run -it` on a pty of its own with a
window size, types into it, resizes the window, presses ^C, and reads the screen.  Each check has a
failure mode it catches: the host terminal not raw (the typed line would be echoed twice, once by
the host and once by the guest, and not sent before Enter), the window size not relayed (`stty
size`), ^C handled by the host (fractal would die instead of the guest's command trap), the exit
status lost, the terminal left raw afterwards.
"""

from __future__ import annotations

import fcntl
import os
import pty
import pwd
import select
import shutil
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from tests.integration.test_vm_run import guest, qemu_processes  # noqa: F401 -- the session's guest build

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs qemu-system-x86_64")


class Screen:
    """The pty master: what the 'person' sees, and their keyboard."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.text = b""

    def expect(self, what: bytes, timeout: float = 180) -> bytes:
        """Read until `what` is on the screen (after the last expect's match); the text up to it."""
        deadline = time.monotonic() + timeout
        while what not in self.text:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{what!r} not on the screen; it shows:\n{self.text[-2000:]!r}")
            r, _, _ = select.select([self.fd], [], [], min(left, 1))
            if r:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:  # EIO: the program closed the terminal
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"terminal closed before {what!r}; it showed:\n{self.text[-2000:]!r}")
                self.text += chunk
        before, _, self.text = self.text.partition(what)
        return before

    def type(self, keys: bytes) -> None:
        os.write(self.fd, keys)

    def rest(self, timeout: float = 60) -> bytes:
        """Everything until the program closes the terminal."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r, _, _ = select.select([self.fd], [], [], 1)
            if r:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                self.text += chunk
        return self.text


def winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def test_interactive_tty_through_a_pty(guest: Path, tmp_path: Path) -> None:  # noqa: F811
    work = tmp_path / "work"
    work.mkdir()
    (work / "here-9c1e").write_text("")
    script = ("stty size; pwd; ls; echo READY; read line; echo \"got:$line\"; "
              "read x; stty size; trap 'echo TRAPPED-INT; exit 42' INT; echo ARMED; sleep 1000; echo NOT-REACHED")
    master, slave = pty.openpty()
    winsize(slave, 33, 101)
    proc = subprocess.Popen(
        [sys.executable, "-m", "ccpu.cli", "vm", "run", "-it", "--share-type", "9p", "--", "sh", "-c", script],
        cwd=work, stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
        preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
        env={**os.environ, "PYTHONPATH": str(REPO), "TERM": "xterm"})
    try:
        screen = Screen(master)
        before = screen.expect(b"READY")
        assert b"33 101" in before, before  # the initial window size
        assert b"/work" in before and b"here-9c1e" in before, before  # the cwd, shared, is where it starts
        # typing: while nothing has been sent, the host must not echo (raw); the guest's pty echoes
        screen.type(b"hel")
        time.sleep(1)  # not a timing assertion: just let a (wrong) local echo show up before we look
        screen.type(b"lo\r")
        echoed = screen.expect(b"got:hello")
        assert echoed.count(b"hello") == 1, echoed  # echoed once, by the guest
        # resize the window: SIGWINCH on the host, the new size in the guest
        winsize(master, 40, 120)  # the kernel sends SIGWINCH to fractal, the terminal's foreground
        time.sleep(1)
        screen.type(b"\r")
        assert b"40 120" in screen.expect(b"ARMED")
        screen.type(b"\x03")  # ^C: to the guest's foreground process, not to fractal
        screen.expect(b"TRAPPED-INT")
        rest = screen.rest()
        assert proc.wait(timeout=120) == 42, rest
        assert b"NOT-REACHED" not in rest
        attrs = termios.tcgetattr(slave)
        assert attrs[3] & termios.ECHO and attrs[3] & termios.ICANON, "the terminal was left raw"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
        os.close(slave)
    assert qemu_processes(str(work)) == []


def test_tty_needs_a_terminal_and_i_needs_t(guest: Path, tmp_path: Path) -> None:  # noqa: F811
    for flags, msg in ((["-it"], "not a TTY"), (["-i"], "-i needs -t")):
        res = subprocess.run([sys.executable, "-m", "ccpu.cli", "vm", "run", *flags, "--", "true"], cwd=tmp_path,
                             stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
        assert res.returncode in (2, 125) and msg in res.stderr, res.stderr
