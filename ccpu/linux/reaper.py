"""One reaper per process, and the spawn helpers that go with it (the agent's and the shim's).

Why one reaper: the agent (and the shim daemon, for runc, hooks and its agent process) is a
child subreaper, so container processes (orphaned by runc) become its children and only it can
collect their exit status.  That requires `waitpid(-1)`, which steals
the exits asyncio's child watchers and `subprocess.wait` are waiting for (ECHILD).  So every child
-- runc invocations, mount helpers, container and exec processes -- is reaped here and its exit
dispatched to whoever registered its pid.

Exits of pids nobody has registered yet are kept only while a `collect()` window is open: a
container process can exit before runc has even written its pid file, and the window (opened
before runc is started, closed after the pid was registered) catches that without keeping stale
exits around for pids the kernel may reuse later.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from .libc import check, libc

log = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER = 36


def exit_status(wait_status: int) -> int:
    """Exit code as containerd reports it: the code, or 128+signal for a signal death."""
    code = os.waitstatus_to_exitcode(wait_status)
    return 128 - code if code < 0 else code


def set_child_subreaper() -> None:
    check(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(PR_SET_CHILD_SUBREAPER)")


class Reaper:
    """Collects every child's exit with waitpid(-1, WNOHANG) on SIGCHLD and dispatches it."""

    def __init__(self) -> None:
        self._waiters: dict[int, asyncio.Future[int]] = {}
        self._unclaimed: dict[int, int] = {}
        self._windows = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop | None = None, subreaper: bool = True) -> None:
        self._loop = loop or asyncio.get_running_loop()
        if subreaper:
            set_child_subreaper()
        self._loop.add_signal_handler(signal.SIGCHLD, self.reap)
        self.reap()  # children that ended before the handler was installed

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.remove_signal_handler(signal.SIGCHLD)

    def wait(self, pid: int) -> asyncio.Future[int]:
        """A future for `pid`'s exit status.  Call it in the same loop step as the spawn (or
        inside a `collect()` window), so the exit cannot be reaped unseen."""
        assert self._loop is not None, "reaper not started"
        fut = self._waiters.get(pid)
        if fut is None:
            fut = self._loop.create_future()
            if pid in self._unclaimed:
                fut.set_result(self._unclaimed.pop(pid))
            else:
                self._waiters[pid] = fut
        return fut

    def forget(self, pid: int) -> None:
        """Stop waiting for `pid` (its exit will be dropped)."""
        fut = self._waiters.pop(pid, None)
        if fut is not None and not fut.done():
            fut.cancel()

    @contextlib.contextmanager
    def collect(self) -> Iterator[None]:
        """Keep exits of unregistered pids while open (see the module docstring)."""
        self._windows += 1
        try:
            yield
        finally:
            self._windows -= 1
            if self._windows == 0:
                self._unclaimed.clear()

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            except InterruptedError:
                continue
            if pid == 0:
                return
            code = exit_status(status)
            fut = self._waiters.pop(pid, None)
            if fut is not None:
                if not fut.done():
                    fut.set_result(code)
            elif self._windows:
                self._unclaimed[pid] = code
            else:
                log.debug("reaped unclaimed pid %d (status %d)", pid, code)


# ---------------------------------------------------------------------------------------------
# spawning


@dataclass(frozen=True, slots=True)
class Result:
    status: int
    stdout: bytes
    stderr: bytes


DEVNULL = -3
PIPE = -1


class Spawned:
    """A child started by `spawn`: its pid, its exit future and the captured output."""

    def __init__(self, pid: int, exit_fut: asyncio.Future[int], out_fd: int | None, err_fd: int | None) -> None:
        self.pid = pid
        self.exited = exit_fut
        self._out = asyncio.ensure_future(read_all(out_fd)) if out_fd is not None else None
        self._err = asyncio.ensure_future(read_all(err_fd)) if err_fd is not None else None

    async def result(self) -> Result:
        status = await self.exited
        out = await self._out if self._out is not None else b""
        err = await self._err if self._err is not None else b""
        return Result(status, out, err)


def spawn(
    reaper: Reaper,
    argv: Sequence[str],
    *,
    stdin: int = DEVNULL,
    stdout: int = PIPE,
    stderr: int = PIPE,
    cwd: str | None = None,
    env: dict[str, str] | None = None,
) -> Spawned:
    """posix_spawn `argv` with stdio wired to fds / PIPE (captured) / DEVNULL; reaped by `reaper`.

    File descriptors given are dup'ed into 0/1/2 of the child only; all other fds of the agent
    are close-on-exec (Python's default), so nothing else leaks into runc or containers.  There
    is no `cwd`: chdir is process-wide in a concurrent agent; use `fork_call` where a cwd matters.
    """
    if cwd is not None:
        raise ValueError("spawn does not support cwd (chdir is process-wide); use fork_call")
    opened: list[int] = []  # fds to close in the parent after spawning
    keep: list[int | None] = [None, None, None]  # parent ends of pipes for stdout/stderr
    actions: list[tuple[int, ...]] = []
    try:
        for target, spec in ((0, stdin), (1, stdout), (2, stderr)):
            if spec == DEVNULL:
                fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
                opened.append(fd)
            elif spec == PIPE:
                r, w = os.pipe()
                if target == 0:
                    raise ValueError("stdin=PIPE is not supported; pass a pipe's read end")
                opened.append(w)
                keep[target] = r
                fd = w
            else:
                fd = spec
            _ensure_not_stdio(fd)
            actions.append((os.POSIX_SPAWN_DUP2, fd, target))
        pid = os.posix_spawn(argv[0], list(argv), env if env is not None else dict(os.environ), file_actions=actions)
        fut = reaper.wait(pid)  # same loop step as the spawn: the exit cannot be missed
    except BaseException:
        for kept in keep:
            if kept is not None:
                os.close(kept)
        raise
    finally:
        for fd in opened:
            os.close(fd)
    return Spawned(pid, fut, keep[1], keep[2])


def _ensure_not_stdio(fd: int) -> None:
    # posix_spawn's dup2 onto the same number would keep FD_CLOEXEC set; the agent makes sure
    # its own 0/1/2 are open (see ccpu.linux.stdio.ensure_stdio_open) so pipe and devnull fds are never 0..2.
    if fd in (0, 1, 2):
        raise ValueError(f"refusing to hand fd {fd} to a child: make sure stdio is open")


async def run(reaper: Reaper, argv: Sequence[str], *, stdin: int = DEVNULL) -> Result:
    """Run `argv` to completion, capturing stdout and stderr."""
    return await spawn(reaper, argv, stdin=stdin).result()


def fork_call(reaper: Reaper, fn: Callable[[], int]) -> asyncio.Future[int]:
    """Run `fn` in a forked child and get its return value (0..255) as the exit status.

    Why: mounting relative lowerdirs needs a chdir, which would move the whole agent's cwd
    under its concurrent requests; a short-lived child has a cwd of its own.  `fn` must only
    make syscalls (no asyncio, no logging) and report errors through its return value.
    """
    pid = os.fork()
    if pid == 0:
        code = 255
        try:
            code = fn()
        finally:
            os._exit(code)
    return reaper.wait(pid)


def wake(fut: asyncio.Future[None]) -> None:
    """Reader/writer callback: resolve `fut` once (the callback may fire again before removal)."""
    if not fut.done():
        fut.set_result(None)


async def read_all(fd: int) -> bytes:
    """Read a (blocking or not) pipe to EOF without blocking the loop, then close it."""
    os.set_blocking(fd, False)
    chunks: list[bytes] = []
    try:
        while True:
            data = await read_some(fd)
            if not data:
                return b"".join(chunks)
            chunks.append(data)
    finally:
        os.close(fd)


async def read_some(fd: int, size: int = 65536) -> bytes:
    """One read from a non-blocking fd; b"" on EOF (and on EIO, which is how a pty master
    reports that the terminal's last user went away)."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            return os.read(fd, size)
        except BlockingIOError:
            pass
        except OSError as e:
            if e.errno == errno.EIO:
                return b""
            raise
        fut: asyncio.Future[None] = loop.create_future()
        loop.add_reader(fd, wake, fut)
        try:
            await fut
        finally:
            loop.remove_reader(fd)


async def write_all(fd: int, data: bytes) -> None:
    """Write all of `data` to a non-blocking fd without blocking the loop."""
    loop = asyncio.get_running_loop()
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
            view = view[n:]
            continue
        except BlockingIOError:
            pass
        fut: asyncio.Future[None] = loop.create_future()
        loop.add_writer(fd, wake, fut)
        try:
            await fut
        finally:
            loop.remove_writer(fd)

