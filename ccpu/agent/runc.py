"""Thin async wrapper over the runc command line.

Why the CLI and not libcontainer: the guest has runc and Python, nothing else; the runc shim
does the same through go-runc.  Every invocation goes through the agent's reaper (see
reaper.py).  Failures raise `RuncError` carrying runc's own message; a few well-known messages
are mapped to protocol codes the way containerd's runc shim maps them.

`create` and `exec` hand runc the container's stdio as runc's own stdio, so runc's stderr is not
ours to capture there: those calls use `--log FILE --log-format json` and read the error from
the log, as containerd does.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import select
import signal
import stat
from collections.abc import Sequence
from typing import Any

from ..linux.reaper import DEVNULL, PIPE, Reaper, Spawned, run, spawn
from . import protocol

log = logging.getLogger(__name__)


class RuncError(protocol.Internal):
    """runc failed; `message` holds what runc said."""


def classify(op: str, message: str) -> protocol.AgentError:
    """Protocol error for a runc failure.  As in containerd's shim (checkKillError), a kill of a
    process that is gone is NotFound "process already finished"."""
    low = message.lower()
    if "no space left on device" in low or "disk quota exceeded" in low:
        return protocol.ResourceExhausted(message)
    if "does not exist" in low or "container not found" in low:
        return protocol.NotFound(message)
    if "already exists" in low:
        return protocol.AlreadyExists(message)
    gone = ("container not running", "process already finished", "no such process")
    if op == "kill" and any(g in low for g in gone):
        return protocol.NotFound(f"process already finished: {message}")
    if any(s in low for s in ("not running", "not paused", "is paused", "cannot ", "not stopped")):
        return protocol.FailedPrecondition(message)
    return RuncError(message)


def _log_error(log_file: str) -> str:
    """The last error runc wrote to its JSON log (what went wrong in create/exec)."""
    message = ""
    try:
        with open(log_file, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if isinstance(entry, dict) and entry.get("level") in ("error", "fatal"):
                    message = str(entry.get("msg", ""))
    except OSError:
        pass
    return message


class Runc:
    def __init__(self, reaper: Reaper, root: str, binary: str = "runc") -> None:
        self.reaper = reaper
        self.root = root
        self.binary = binary

    def _argv(self, *args: str, log: str | None = None) -> list[str]:
        argv = [self.binary, "--root", self.root]
        if log is not None:
            argv += ["--log", log, "--log-format", "json"]
        return argv + list(args)

    async def _call(self, *args: str) -> bytes:
        res = await run(self.reaper, self._argv(*args))
        if res.status != 0:
            msg = res.stderr.decode(errors="replace").strip() or f"exit status {res.status}"
            raise classify(args[0], f"runc {args[0]}: {msg}")
        return res.stdout

    def spawn_create(
        self,
        container: str,
        bundle: str,
        pid_file: str,
        log_file: str,
        stdio: Sequence[int],
        console_socket: str | None = None,
    ) -> Spawned:
        """Start `runc create`; the caller awaits `.result()` and then `check(...)`."""
        args = ["create", "--bundle", bundle, "--pid-file", pid_file]
        if console_socket:
            args += ["--console-socket", console_socket]
        return self._spawn_detached(args + [container], log_file, stdio)

    def spawn_exec(
        self,
        container: str,
        process_file: str,
        pid_file: str,
        log_file: str,
        stdio: Sequence[int],
        console_socket: str | None = None,
    ) -> Spawned:
        args = ["exec", "--detach", "--pid-file", pid_file, "--process", process_file]
        if console_socket:
            args += ["--console-socket", console_socket]
        return self._spawn_detached(args + [container], log_file, stdio)

    def _spawn_detached(self, args: list[str], log_file: str, stdio: Sequence[int]) -> Spawned:
        try:
            os.unlink(log_file)  # only this call's errors
        except FileNotFoundError:
            pass
        return spawn(self.reaper, self._argv(*args, log=log_file), stdin=stdio[0], stdout=stdio[1], stderr=stdio[2])

    @staticmethod
    def check(what: str, status: int, log_file: str) -> None:
        if status != 0:
            raise classify(what, f"runc {what}: {_log_error(log_file) or f'exit status {status}'}")

    async def start(self, container: str) -> None:
        await self._call("start", container)

    async def start_created(self, container: str, init_exited: asyncio.Future[int]) -> str:
        """Start a created container's init: runc's exec-fifo handshake done here (`fifo`), or
        `runc start` (`runc`) where that handshake is not what we know; returns which.

        Why: `runc start` is one Go process start only to do this handshake (~10-20 ms on a
        host, ~0.3 s under TCG).  What it does, in every runc from 1.1.5 to 1.5.1
        (start.go, libcontainer/container_linux.go `exec`/`handleFifoResult`): the init,
        blocked opening `<root>/<id>/exec.fifo` for writing, writes one byte once a reader
        opened it and then execs the user's process; the reader reads that byte and removes
        the fifo -- runc tells created from running by the fifo's existence.  Poststart hooks
        run at create in all those versions, so nothing else is skipped.  `runc start` is
        kept when the fifo is not there (another layout, or not `created` in runc's eyes: its
        error is the right one) and with NOTIFY_SOCKET set (runc start then waits for the
        container's READY=1)."""
        if "NOTIFY_SOCKET" in os.environ:
            await self.start(container)
            return "runc"
        opened = _open_exec_fifo(self.root, container)
        if opened is None:
            await self.start(container)
            return "runc"
        dir_fd, fifo = opened
        try:
            await _await_fifo_byte(fifo, init_exited)
            try:  # started whatever happens here: the init has its byte and execs
                os.unlink(EXEC_FIFO, dir_fd=dir_fd)
            except OSError as e:
                log.warning("start %s: the exec fifo stays (runc will say created): %s", container, e)
        finally:
            os.close(fifo)
            os.close(dir_fd)
        return "fifo"

    async def kill(self, container: str, sig: int, all_: bool = False) -> None:
        args = ["kill"] + (["--all"] if all_ else []) + [container, str(sig)]
        await self._call(*args)

    async def pause(self, container: str) -> None:
        await self._call("pause", container)

    async def resume(self, container: str) -> None:
        await self._call("resume", container)

    async def delete(self, container: str, force: bool = False) -> None:
        await self._call("delete", *(["--force"] if force else []), container)

    async def state(self, container: str) -> dict[str, Any]:
        return _json_object(await self._call("state", container), "state")

    async def ps(self, container: str) -> list[int]:
        out = await self._call("ps", "--format", "json", container)
        pids = json.loads(out or b"[]") or []
        if not isinstance(pids, list):
            raise RuncError(f"runc ps: unexpected output {out[:200]!r}")
        return [int(p) for p in pids]

    async def update(self, container: str, resources: dict[str, Any]) -> None:
        """`runc update --resources -` with the OCI LinuxResources object on stdin."""
        data = json.dumps(resources).encode()
        r, w = os.pipe()
        try:
            if len(data) > 60000:  # more than a pipe holds before runc reads
                raise protocol.InvalidArgument("resources object too large")
            os.write(w, data)
            os.close(w)
            w = -1
            res = await run(self.reaper, self._argv("update", "--resources", "-", container), stdin=r)
        finally:
            os.close(r)
            if w >= 0:
                os.close(w)
        if res.status != 0:
            msg = res.stderr.decode(errors="replace").strip() or f"exit status {res.status}"
            raise classify("update", f"runc update: {msg}")

    async def warm(self) -> dict[str, Any]:
        """A throw-away warm-up of the create path (the pool's, before it offers a guest): the
        binary read whole (the guest's page cache then holds every page ``runc create`` and
        ``runc init`` fault in, instead of reading them from the system disk on the sandbox's
        first create) and ``runc --version`` run once (the Go runtime's start, which every runc
        invocation runs, is translated by TCG once per QEMU and kept).  It reads no container
        state, writes nothing and needs no argument: no sandbox's data is touched."""
        import asyncio

        read = await asyncio.get_running_loop().run_in_executor(None, _read_all, self.binary)
        res = await run(self.reaper, [self.binary, "--version"])
        if res.status != 0:
            raise RuncError(f"runc --version: exit status {res.status}")
        return {"runc": res.stdout.decode(errors="replace").partition("\n")[0][:200], "read_bytes": read}

    async def stats(self, container: str) -> dict[str, Any]:
        ev = _json_object(await self._call("events", "--stats", container), "events --stats")
        data = ev.get("data", {})
        return data if isinstance(data, dict) else {}


EXEC_FIFO = "exec.fifo"  # runc's execFifoFilename, in the container's state dir <root>/<id>


def _open_exec_fifo(root: str, container: str) -> tuple[int, int] | None:
    """(state dir fd, fifo read end) of a created container, or None if there is no fifo.

    The read end is opened non-blocking, so this never waits for the init; nothing is
    followed (the state dir is ours, the id validated; a symlink or a non-fifo is not runc's
    fifo)."""
    if not container or "/" in container or container in (".", ".."):
        raise protocol.InvalidArgument(f"invalid container id {container!r}")
    try:
        dir_fd = os.open(os.path.join(root, container), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return None
        raise
    try:
        fifo = os.open(EXEC_FIFO, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as e:
        os.close(dir_fd)
        if e.errno in (errno.ENOENT, errno.ELOOP, errno.ENXIO):
            return None
        raise
    if not stat.S_ISFIFO(os.fstat(fifo).st_mode):
        os.close(fifo)
        os.close(dir_fd)
        return None
    return dir_fd, fifo


def _fifo_now(fd: int) -> bytes | None:
    """What the fifo holds now: bytes, b"" (a writer came and went without writing), or None
    (nothing yet).  Asked with poll first: a read alone cannot tell "no writer yet" (the init
    not yet in its open) from "the writer left", both are end of file to read(2)."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    if not p.poll(0):
        return None
    try:
        return os.read(fd, 64)
    except BlockingIOError:
        return None


async def _await_fifo_byte(fifo: int, init_exited: asyncio.Future[int]) -> None:
    """Wait until the init wrote its byte, or the init died: never longer.

    Linux reports no hang-up to a fifo reader that opened before any writer came (fs/pipe.c,
    pipe_poll: EPOLLHUP only once a writer was seen), so readiness means the byte, or a
    writer that left without one.  runc polls the init every 100 ms; here the init's exit
    (the agent reaps it) ends the wait.  After that exit one last look, as runc does: the
    byte may be there (the process started, ran and ended)."""
    loop = asyncio.get_running_loop()
    while True:
        data = _fifo_now(fifo)
        if data is not None or init_exited.done():
            break
        ready = loop.create_future()
        loop.add_reader(fifo, lambda: ready.done() or ready.set_result(None))
        try:
            await asyncio.wait([ready, init_exited], return_when=asyncio.FIRST_COMPLETED)
        finally:
            loop.remove_reader(fifo)
    if not data:
        if init_exited.done():
            raise protocol.FailedPrecondition("runc start: container process is already dead")
        raise protocol.FailedPrecondition("runc start: cannot start an already running container")


#: a warm-up reads at most this much of the runc binary (runc is ~10-15 MB)
WARM_READ_MAX = 64 << 20


def _read_all(path: str) -> int:
    """Read ``path`` (up to WARM_READ_MAX) and drop the bytes: its pages land in the page cache."""
    n = 0
    with open(path, "rb", buffering=0) as f:
        while n < WARM_READ_MAX:
            chunk = f.read(1 << 20)
            if not chunk:
                break
            n += len(chunk)
    return n


def _json_object(out: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(out)
    except ValueError:
        raise RuncError(f"runc {what}: output is not JSON: {out[:200]!r}") from None
    if not isinstance(value, dict):
        raise RuncError(f"runc {what}: output is not a JSON object")
    return value


SIGKILL = int(signal.SIGKILL)
__all__ = ["Runc", "RuncError", "DEVNULL", "PIPE", "SIGKILL"]
