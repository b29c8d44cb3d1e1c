"""`fractal boot`'s machine: a :class:`~ccpu.boot.plan.BootPlan` booted through the one VM
builder (ccpu/vm/machine.py), its serial console relayed to the terminal, until it powers off.

Thin I/O over the pure plan: the layers' parent dir becomes the read-only repo share (virtiofs,
9p fallback, as for sandboxes; the layer xattrs and opaque markers cross it as in vm mode), the
guest init runs in mode ``boot`` (ccpu/guest/init.sh) with the plan's arguments, and the console
is a socketpair: QEMU's end is the guest's serial port, ours is copied to stdout (and, with
``--console``, the terminal's keystrokes to the guest, the terminal in raw mode via
ccpu/vm/terminal.py).

The end: the guest powers off (QEMU exits 0: exit status 0), its kernel panics (the console says
so: exit status 1), or the user stops it (^C without ``--console``, ``^]`` with it, SIGTERM): QEMU
is stopped and waited for, virtiofsd ended, the temp dir removed -- nothing is left behind.
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

from ..vm import qemu, shares as shares_, terminal
from ..vm.machine import QEMU_LOG, ConsoleSocket, DirShare, Machine, MachineError, MachineSpec, log_tail
from .plan import BootPlan

ESCAPE = b"\x1d"  # ^]: leaves an interactive console (as telnet's escape does)
PANIC = b"Kernel panic - not syncing"
TAIL = 8192  # console bytes kept to tell a panic from a power-off


class Stopped(Exception):
    """The user stopped the machine (SIGINT, SIGTERM, ^])."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name if signum else '^]'}")
        self.signum = signum


@dataclass
class Outcome:
    exit_status: int  # what `fractal boot` returns
    why: str
    qemu_status: int | None
    console_tail: bytes


def spec_for(plan: BootPlan, *, kernel: str, initramfs: str, system_image: str | None, workdir: str,
             console_fd: int, share_type: str, name: str, debug: bool = False,
             netns: str | None = None) -> MachineSpec:
    """The VM of ``plan``.  Pure."""
    repo = DirShare(qemu.REPO_TAG, plan.layers.root, "/repo", True, share_type, layers=True)
    extra = tuple(DirShare(f"share{i}", s.host, s.guest, s.readonly, share_type) for i, s in enumerate(plan.shares))
    return MachineSpec(kernel=kernel, initramfs=initramfs, system_image=system_image, workdir=workdir,
                       console=ConsoleSocket(console_fd), mode="boot", memory_mb=plan.memory_mb, cpus=plan.cpus,
                       repo=repo, shares=extra, cmdline_extra=plan.cmdline(), debug=debug, name=name,
                       netns=netns)


def boot(plan: BootPlan, *, initramfs: str, system_image: str | None, interactive: bool,
         out_fd: int | None = None, in_fd: int | None = None, share_type: str | None = None,
         note: Callable[[str], None] = lambda s: None, debug: bool = False, netns: str | None = None) -> Outcome:
    """Boot ``plan`` and relay its console until it ends; see the module docstring.  ``netns``: the
    network namespace whose interfaces become the machine's NICs (ccpu/vm/net.py, as `vm run
    --netns`); the boot stage configures them before the image's init starts."""
    out_fd = sys.stdout.fileno() if out_fd is None else out_fd
    in_fd = sys.stdin.fileno() if in_fd is None and interactive else in_fd
    stype, why = shares_.choose(share_type)
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}

    def stop(signum: int, frame: FrameType | None) -> None:
        raise Stopped(signum)

    for s in old:
        signal.signal(s, stop)
    tail = b""
    try:
        with tempfile.TemporaryDirectory(prefix="fractal-boot-") as tmp:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            spec = spec_for(plan, kernel=plan.kernel.path, initramfs=initramfs, system_image=system_image,
                            workdir=tmp, console_fd=theirs.fileno(), share_type=stype,
                            name=f"fractal-boot-{os.getpid()}", debug=debug, netns=netns)
            vm = Machine(spec)
            try:
                try:
                    vm.boot()
                finally:
                    theirs.close()
                assert vm.accel is not None
                note(f"accel {vm.accel.accel} ({vm.accel.reason}); layers over {stype} ({why}); "
                     f"QEMU runs as {vm.qemu_user}")
                with terminal.Relay(in_fd if interactive else None, out_fd) as term:
                    tail = _relay(ours, out_fd, term if interactive else None)
                status = vm.wait(timeout=30)
                if status is None:
                    vm.stop()
                    return Outcome(1, "the console closed but QEMU did not exit", vm.exit_status, tail)
                if PANIC in tail:
                    return Outcome(1, "the guest kernel panicked (its init exited or could not run)", status, tail)
                if status != 0:
                    return Outcome(1, f"QEMU exited with {status}: {log_tail(os.path.join(tmp, QEMU_LOG), 1500)}", status, tail)
                return Outcome(0, "the machine powered off", status, tail)
            except Stopped as exc:
                vm.stop()
                return Outcome(128 + (exc.signum or signal.SIGINT), str(exc), vm.exit_status, tail)
            except MachineError as exc:
                vm.stop()
                return Outcome(1, f"the machine could not run: {exc}", vm.exit_status, tail)
            finally:
                ours.close()
                vm.stop()
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _relay(con: socket.socket, out_fd: int, term: terminal.Relay | None) -> bytes:
    """Console -> ``out_fd`` until QEMU closes it; keystrokes -> console with ``term``.
    Returns the console's last bytes."""
    tail = b""
    sel = selectors.DefaultSelector()
    sel.register(con, selectors.EVENT_READ, "con")
    if term is not None and term.in_fd is not None:
        sel.register(term.in_fd, selectors.EVENT_READ, "in")
    try:
        while True:
            for key, _ in sel.select():
                if key.data == "con":
                    data = con.recv(65536)
                    if not data:
                        return tail
                    tail = (tail + data)[-TAIL:]
                    _write_all(out_fd, data)
                else:
                    assert term is not None and term.in_fd is not None
                    keys = os.read(term.in_fd, 4096)
                    if not keys:
                        sel.unregister(term.in_fd)
                        continue
                    if ESCAPE in keys:
                        raise Stopped(0)
                    con.sendall(keys)
    finally:
        sel.close()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
