"""`fractal vm run`'s wire protocol with the guest init.  Pure: bytes in, bytes/decisions out.

Three virtio-serial ports, each a byte stream:
  fractal.run     host -> guest: "<marker>\\n<base64 of the shell command>\\n"
                  guest -> host: "EXIT <code>\\n" once the command ended; host -> guest: "ok\\n"
  fractal.stdout  the command's stdout, then the marker
  fractal.stderr  the command's stderr, then the marker

With a TTY (`vm run -t`; the kernel command line has fractal.tty=TERM) a fourth port:
  fractal.stdin   host -> guest: the user's keystrokes, raw
and after the request the host writes "W <rows> <cols>\n" on fractal.run: once at once (the
command starts with that size), again at every SIGWINCH.  The guest's output is the pty's, on
fractal.stdout; fractal.stderr carries only its marker.

Why a marker: a guest closing a port does not close the host's socket, so
the end of a stream must be in-band.  The marker is 32 random hex digits
written only after the command has exited, so it cannot be confused with
output; the host forwards everything before it.  Why the ack: the guest
powers off only after the host has both markers, so no output can be lost in
QEMU's buffers when the VM goes away.
"""

from __future__ import annotations

import base64
import re
import secrets
import shlex
from collections.abc import Sequence


def new_marker() -> bytes:
    return secrets.token_hex(16).encode()


def request(marker: bytes, argv: Sequence[str]) -> bytes:
    """The host's opening message: the marker and the command (argv joined for `sh -c`)."""
    if not argv:
        raise ValueError("empty command")
    return marker + b"\n" + base64.b64encode(shlex.join(argv).encode()) + b"\n"


class StreamEnd:
    """Forwards a stream's bytes up to the marker, holding back what could be the marker's start."""

    def __init__(self, marker: bytes) -> None:
        self.marker = marker
        self.buf = b""  # held back: could be the marker's start
        self.sent = 0  # how much of buf release() already forwarded
        self.done = False

    def feed(self, data: bytes) -> bytes:
        """Bytes safe to forward now.  After the marker, further data is ignored."""
        if self.done:
            return b""
        self.buf += data
        i = self.buf.find(self.marker)
        if i >= 0:
            out, self.buf, self.sent, self.done = self.buf[self.sent:i], b"", 0, True
            return out
        cut = len(self.buf) - _partial_suffix(self.buf, self.marker)
        out = self.buf[self.sent:cut]
        self.buf, self.sent = self.buf[cut:], max(0, self.sent - cut)
        return out

    def pending(self) -> bool:
        """Whether bytes are held back that release() would forward."""
        return len(self.buf) > self.sent

    def release(self) -> bytes:
        """The held-back bytes, forwarded now but still matched against the marker.  For a TTY:
        a typed key that happens to be the marker's first hex digit must echo at once, not when
        the next key comes.  Should the marker follow after all, its already-shown start stays
        on the screen (at most 31 hex digits, the output's very end); nothing is lost or hangs."""
        out = self.buf[self.sent:]
        self.sent = len(self.buf)
        return out

    def flush(self) -> bytes:
        """What is left when the stream ends without its marker (the VM died)."""
        out, self.buf = self.buf, b""
        return out


def _partial_suffix(buf: bytes, marker: bytes) -> int:
    """Length of the longest suffix of `buf` that is a proper prefix of `marker`."""
    for n in range(min(len(buf), len(marker) - 1), 0, -1):
        if buf.endswith(marker[:n]):
            return n
    return 0


class Control:
    """The host's view of fractal.run: collects bytes until "EXIT <code>\\n"."""

    def __init__(self) -> None:
        self.buf = b""
        self.exit_code: int | None = None

    def feed(self, data: bytes) -> int | None:
        self.buf += data
        while self.exit_code is None and b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            if line.startswith(b"EXIT "):
                try:
                    self.exit_code = int(line[5:].strip())
                except ValueError as exc:
                    raise ValueError(f"bad exit line {line!r}") from exc
        return self.exit_code


ACK = b"ok\n"


MAX_DIM = 10000  # the guest refuses larger sizes (ccpu/agent/vmtty.py)
_TERM = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")


def winsize(rows: int, cols: int) -> bytes:
    """The window-size line; sizes clamped to what the guest accepts (a 0 means "unknown": 24x80)."""
    rows = min(max(rows, 1), MAX_DIM) if rows else 24
    cols = min(max(cols, 1), MAX_DIM) if cols else 80
    return f"W {rows} {cols}\n".encode()


def term_name(term: str | None) -> str:
    """$TERM for the guest's kernel command line: one plain word, else vt100 (what the guest's
    busybox knows anyway); the command line is split on spaces by the init."""
    return term if term and _TERM.fullmatch(term) else "vt100"
