"""`fractal vm run`: boot the guest, run one shell command in it, stream its output, return its code.

The VM (ccpu.vm.machine, the same boot as a shim's sandbox) lives exactly as long as this call:
QEMU (and any virtiofsd) are started with PR_SET_PDEATHSIG, killed in a `finally`, and waited for.
Shares: the repo (optional) read-only at /repo, the user's directories
read-write (first at /work, the command's cwd).  ``netns``: the VM's NIC
becomes that network namespace's interface (ccpu.vm.net), detached afterwards.
"""

from __future__ import annotations

import logging
import os
import re
import selectors
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from ..guest.initramfs import Guest
from . import hostos, qemu, runproto, shares, terminal
from .machine import ConsoleFile, DirShare, Machine, MachineError, MachineSpec

log = logging.getLogger(__name__)

PORT_RUN, PORT_OUT, PORT_ERR, PORT_IN = "fractal.run", "fractal.stdout", "fractal.stderr", "fractal.stdin"


class VMError(MachineError):
    """The VM could not be started or died before the command finished."""


@dataclass(frozen=True)
class ShareSpec:
    host: str
    guest: str
    readonly: bool = False


def parse_share(spec: str, index: int) -> ShareSpec:
    """`HOST[:GUEST[:ro|rw]]`; the first share defaults to /work, later ones to /share<N>."""
    parts = spec.split(":")
    if len(parts) > 3 or not parts[0]:
        raise ValueError(f"--share {spec!r}: expected HOST[:GUEST[:ro|rw]]")
    guest = parts[1] if len(parts) > 1 and parts[1] else ("/work" if index == 0 else f"/share{index}")
    mode = parts[2] if len(parts) > 2 else "rw"
    if mode not in ("ro", "rw"):
        raise ValueError(f"--share {spec!r}: mode must be ro or rw")
    return ShareSpec(os.path.abspath(parts[0]), guest, mode == "ro")


@dataclass
class RunResult:
    exit_code: int
    timings: dict[str, float] = field(default_factory=dict)
    console_log: str | None = None
    qemu_maxrss_kb: int | None = None


_MILESTONE = re.compile(r"fractal-init: (\d+\.\d+) (.*)")


def console_milestones(text: str) -> list[tuple[float, str]]:
    """(guest uptime, what) for each "fractal-init:" line of the console log."""
    return [(float(m.group(1)), m.group(2)) for m in _MILESTONE.finditer(text)]


def run(guest: Guest, argv: Sequence[str], *, share_dirs: Sequence[ShareSpec] = (), repo: str | None = None,
        memory_mb: int = 512, cpus: int | None = None, share_type: str | None = None, machine: str = "q35",
        timeout: float | None = 600.0, stdout: BinaryIO | None = None, stderr: BinaryIO | None = None,
        console_log: str | None = None, debug: bool = False, netns: str | None = None,
        uid_base: int = qemu.DEFAULT_UID_BASE, note: Callable[[str], None] = lambda s: None,
        tty: bool = False, stdin_fd: int | None = None, balloon: bool = True,
        image_lowers: Sequence[str] = ()) -> RunResult:
    """Run `argv` (joined for `sh -c`) in a fresh guest; its stdout/stderr go to `stdout`/`stderr`.

    ``tty``: on a pty in the guest (``vm run -t``): ``stdin_fd`` (a terminal, or None for no input)
    is put in raw mode and relayed, window sizes follow SIGWINCH, all output goes to `stdout`.
    Without ``tty``, ``stdin_fd`` (``vm run -i``: a pipe, a file, a terminal) becomes the command's
    stdin, its end the command's EOF; None: the command's stdin is /dev/null.
    ``image_lowers``: the command runs chrooted in an image's root stacked from these dirs below
    ``repo`` (top first; ``vm run --image``), /work bound into it.
    ``timeout`` None: no limit."""
    if image_lowers and not repo:
        raise ValueError("an image root needs the repo its layers are in")
    if tty and stdin_fd is not None and not os.isatty(stdin_fd):
        raise ValueError("the input device is not a TTY (-t with -i needs a terminal on stdin)")
    out_f = stdout or sys.stdout.buffer
    err_f = stderr or sys.stderr.buffer
    host = hostos.current()
    for path in [s.host for s in share_dirs] + ([repo] if repo else []):
        hostos.check_share(host, os.path.realpath(path))  # macOS: $HOME only (ccpu/vm/hostos.py)
    stype, why = shares.choose(share_type)
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="fractal-vm-") as tmp:
        log_path = console_log or os.path.join(tmp, "console.log")

        def share(tag: str, host: str, guest_path: str, ro: bool, layers: bool = False) -> DirShare:
            return DirShare(tag, host, guest_path, ro, stype, layers=layers)

        spec = MachineSpec(
            kernel=str(guest.kernel), initramfs=str(guest.initramfs), workdir=tmp,
            system_image=str(guest.image) if guest.image else None, console=ConsoleFile(log_path),
            mode="run", accel="auto", machine=machine, memory_mb=memory_mb, cpus=cpus,
            repo=share(qemu.REPO_TAG, os.path.abspath(repo), "/repo", True, layers=True) if repo else None,
            shares=tuple(share(f"share{i}", s.host, s.guest, s.readonly) for i, s in enumerate(share_dirs)),
            ports=(PORT_RUN, PORT_OUT, PORT_ERR) + ((PORT_IN,) if tty or stdin_fd is not None else ()),
            netns=netns, uid_base=uid_base, debug=debug,
            cmdline_extra=((f"fractal.tty={runproto.term_name(os.environ.get('TERM'))}",) if tty
                           else ("fractal.stdin=1",) if stdin_fd is not None else ())
            + ((f"fractal.boot.lowers={':'.join(image_lowers)}",) if image_lowers else ()),
            balloon=balloon)
        vm = Machine(spec)
        try:
            vm.boot()
            assert vm.accel is not None
            note(f"accel {vm.accel.accel} ({vm.accel.reason}); shares over {stype} ({why})")
            if netns:
                assert vm.net is not None
                note(f"netns {netns}: " + (", ".join(f"{i.name} {i.mac} mtu {i.mtu} {' '.join(i.addrs)}"
                                                     for i in vm.net.interfaces) or "no IPv4 interface"))
            note(f"QEMU runs as {vm.qemu_user}")
            ctl, out_s, err_s = (vm.ports[p] for p in (PORT_RUN, PORT_OUT, PORT_ERR))
            marker = runproto.new_marker()
            ctl.sendall(runproto.request(marker, argv))
            deadline = t0 + timeout if timeout is not None else float("inf")
            if tty:
                with terminal.Relay(stdin_fd, out_f.fileno() if hasattr(out_f, "fileno") else None) as term:
                    ctl.sendall(runproto.winsize(*term.size()))
                    feed = _Input(stdin_fd, vm.ports[PORT_IN], eof_ends=False) if stdin_fd is not None else None
                    code = _pump(ctl, out_s, err_s, marker, out_f, out_f, vm, deadline, timings, t0,
                                 term=term, feed=feed)
            else:
                feed = _Input(stdin_fd, vm.ports[PORT_IN], eof_ends=True) if stdin_fd is not None else None
                code = _pump(ctl, out_s, err_s, marker, out_f, err_f, vm, deadline, timings, t0, feed=feed)
            hwm = _vm_hwm_kb(vm.pid)  # QEMU's peak RSS, read while it still exists
            ctl.sendall(runproto.ACK)
            if vm.wait(timeout=15) is None:
                log.warning("guest did not power off within 15 s; killing QEMU")
            timings["qemu_exit"] = time.monotonic() - t0
            text = _read(log_path)
            result = RunResult(code, timings, console_log if console_log else None, hwm)
            for up, what in console_milestones(text):
                timings[f"guest:{what}"] = up
            return result
        except MachineError as exc:
            tail = _read(log_path)[-3000:]
            raise VMError(f"{exc}\n--- guest console (tail) ---\n{tail}") from None
        finally:
            for c in vm.ports.values():
                c.close()
            vm.stop()


def _vm_hwm_kb(pid: int | None) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


class _Input:
    """The host's stdin relayed to the guest's fractal.stdin port, never blocking the pump: a
    guest that stops reading must not stop its output from being read (it would wait on us).

    ``eof_ends``: at the end of the input the port's host end is shut for writing; the guest sees
    its port's host side disconnect and the command reads EOF (``vm run -i``).  With a TTY the
    end of the keystrokes ends nothing (the user types ^D)."""

    def __init__(self, src_fd: int, sock: socket.socket, eof_ends: bool) -> None:
        self.src_fd, self.sock, self.eof_ends = src_fd, sock, eof_ends
        self.pending = b""
        self.eof = False
        self.own_fd: int | None = None  # a pipe made here (_piped), closed by close()
        sock.setblocking(False)

    def close(self) -> None:
        if self.own_fd is not None:
            os.close(self.own_fd)
            self.own_fd = None

    def register(self, sel: selectors.BaseSelector) -> None:
        try:
            sel.register(self.src_fd, selectors.EVENT_READ, "stdin")
        except PermissionError:  # epoll refuses regular files (`< file`): a thread pipes it
            self.src_fd = self.own_fd = _piped(self.src_fd)
            sel.register(self.src_fd, selectors.EVENT_READ, "stdin")

    def on_readable(self, sel: selectors.BaseSelector) -> None:
        data = os.read(self.src_fd, 65536)
        sel.unregister(self.src_fd)
        if not data:
            self.eof = True
        self.pending = data
        self._flush(sel, first=True)

    def on_writable(self, sel: selectors.BaseSelector) -> None:
        self._flush(sel, first=False)

    def _flush(self, sel: selectors.BaseSelector, first: bool) -> None:
        try:
            if self.pending:
                self.pending = self.pending[self.sock.send(self.pending):]
        except BlockingIOError:
            pass
        except OSError:  # QEMU went away: the pump reports that; the input is dropped
            self.pending, self.eof = b"", True
            self.eof_ends = False
        if self.pending:
            if first:
                sel.register(self.sock, selectors.EVENT_WRITE, "stdin-out")
            return
        if not first:
            sel.unregister(self.sock)
        if not self.eof:
            self.register(sel)
        elif self.eof_ends:
            self.sock.shutdown(socket.SHUT_WR)


def _piped(fd: int) -> int:
    """The read end of a pipe that a daemon thread fills from ``fd`` (a file epoll cannot watch)."""
    import threading

    r, w = os.pipe()

    def copy() -> None:
        try:
            while data := os.read(fd, 65536):
                os.write(w, data)
        except OSError:
            pass  # the reader went away (the run ended): nothing to deliver to
        finally:
            os.close(w)
    threading.Thread(target=copy, name="vm-run-stdin", daemon=True).start()
    return r


def _pump(ctl: socket.socket, out_s: socket.socket, err_s: socket.socket, marker: bytes,
          out_f: BinaryIO, err_f: BinaryIO, vm: Machine, deadline: float,
          timings: dict[str, float], t0: float,
          term: terminal.Relay | None = None, feed: _Input | None = None) -> int:
    """Forward output until both streams ended and the exit code arrived; returns the exit code.
    ``term``: a TTY's window sizes to the control port; ``feed``: input to the stdin port."""
    sel = selectors.DefaultSelector()
    ends = {out_s: runproto.StreamEnd(marker), err_s: runproto.StreamEnd(marker)}
    sinks = {out_s: out_f, err_s: err_f}
    control = runproto.Control()
    for s in (ctl, out_s, err_s):
        sel.register(s, selectors.EVENT_READ)
    if feed is not None:
        feed.register(sel)
    if term is not None:
        sel.register(term.winch_fd, selectors.EVENT_READ, "winch")
    try:
        while control.exit_code is None or not all(e.done for e in ends.values()):
            now = time.monotonic()
            if now > deadline:
                raise VMError("timeout waiting for the command")
            held = term is not None and ends[out_s].pending()
            events = sel.select(timeout=min(0.02 if held else 0.5, deadline - now))
            if not events and held:
                out_f.write(ends[out_s].release())
                out_f.flush()
            if not events and vm.poll() is not None:
                why = "" if vm.ended is None or vm.ended.startswith("QEMU") else f": {vm.ended}"
                raise VMError(f"QEMU exited ({vm.exit_status}) before the command finished{why}")
            for key, _ in events:
                if key.data == "stdin" and feed is not None:
                    feed.on_readable(sel)
                    continue
                if key.data == "stdin-out" and feed is not None:
                    feed.on_writable(sel)
                    continue
                if key.data == "winch" and term is not None:
                    if term.winched():
                        ctl.sendall(runproto.winsize(*term.size()))
                    continue
                s = key.fileobj
                assert isinstance(s, socket.socket)
                data = s.recv(65536)
                if not data:
                    sel.unregister(s)
                    if s is ctl or not ends[s].done:
                        raise VMError("QEMU closed a port before the command finished")
                    continue
                if s is ctl:
                    if control.feed(data) is not None:
                        timings.setdefault("exit_code", time.monotonic() - t0)
                else:
                    chunk = ends[s].feed(data)
                    if chunk:
                        timings.setdefault("first_output", time.monotonic() - t0)
                        sinks[s].write(chunk)
                        sinks[s].flush()
    finally:
        sel.close()
        if feed is not None:
            feed.close()
    assert control.exit_code is not None
    return control.exit_code
