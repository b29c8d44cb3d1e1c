"""The agent's own `runc start`: runc's exec-fifo handshake (ccpu/agent/runc.py start_created).

A real fifo in runc's layout (<root>/<id>/exec.fifo) and a thread playing runc init's part
(open for writing, blocking until a reader came; write one byte).  The real runc is used in
tests/integration/test_agent.py."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest

from ccpu.agent import protocol
from ccpu.agent import runc as runcmod
from ccpu.agent.runc import Runc


class Recorder(Runc):
    """A Runc whose `runc start` only records that it was called (the fallback)."""

    def __init__(self, root: Path) -> None:
        super().__init__(reaper=None, root=str(root), binary="/nonexistent/runc")  # type: ignore[arg-type]
        self.started: list[str] = []

    async def start(self, container: str) -> None:
        self.started.append(container)


def fifo(root: Path, cid: str = "c1") -> Path:
    (root / cid).mkdir(parents=True)
    path = root / cid / "exec.fifo"
    os.mkfifo(path, 0o622)
    return path


def init_thread(path: Path, data: bytes = b"0", delay: float = 0.0) -> threading.Thread:
    """runc init's side: open for writing (blocks until the agent opened the read end)."""

    def go() -> None:
        if delay:
            threading.Event().wait(delay)
        fd = os.open(path, os.O_WRONLY)
        try:
            if data:
                os.write(fd, data)
        finally:
            os.close(fd)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t


async def start(r: Runc, cid: str = "c1", exited: asyncio.Future[int] | None = None) -> str:
    if exited is None:
        exited = asyncio.get_running_loop().create_future()
    return await asyncio.wait_for(r.start_created(cid, exited), 10)


def test_start_reads_the_byte_and_removes_the_fifo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    path = fifo(tmp_path)
    r = Recorder(tmp_path)

    async def main() -> str:
        t = init_thread(path, delay=0.2)  # the init comes after the agent is waiting
        how = await start(r)
        t.join(5)
        assert not t.is_alive()
        return how

    assert asyncio.run(main()) == "fifo"
    assert not path.exists()  # runc now sees "running"
    assert r.started == []


def test_init_already_waiting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The usual order: the init is blocked in its open before start comes."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    path = fifo(tmp_path)
    r = Recorder(tmp_path)

    async def main() -> str:
        t = init_thread(path)
        await asyncio.sleep(0.1)
        how = await start(r)
        t.join(5)
        return how

    assert asyncio.run(main()) == "fifo"
    assert not path.exists()


def test_no_writer_yet_is_not_end_of_file(tmp_path: Path) -> None:
    """What the handshake relies on (fs/pipe.c): a fifo read end opened before any writer is
    neither readable nor hung up -- a bare read would say end of file."""
    path = fifo(tmp_path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        assert runcmod._fifo_now(fd) is None
        assert os.read(fd, 1) == b""  # why poll is asked first
    finally:
        os.close(fd)


def test_writer_left_without_a_byte(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """0 bytes: runc's "cannot start an already running container"."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    path = fifo(tmp_path)
    r = Recorder(tmp_path)

    async def main() -> None:
        init_thread(path, data=b"")
        await start(r)

    with pytest.raises(protocol.FailedPrecondition, match="already running"):
        asyncio.run(main())
    assert path.exists()  # not started: left as it was


def test_init_dead_before_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    path = fifo(tmp_path)
    r = Recorder(tmp_path)

    async def main() -> None:
        exited = asyncio.get_running_loop().create_future()
        exited.set_result(137)
        await start(r, exited=exited)

    with pytest.raises(protocol.FailedPrecondition, match="already dead"):
        asyncio.run(main())
    assert path.exists()


def test_init_dies_while_waiting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No writer ever comes: the init's exit ends the wait (no hang)."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    fifo(tmp_path)
    r = Recorder(tmp_path)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        exited = loop.create_future()
        loop.call_later(0.2, exited.set_result, 137)
        await start(r, exited=exited)

    with pytest.raises(protocol.FailedPrecondition, match="already dead"):
        asyncio.run(main())


def test_byte_written_then_init_ended(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As runc: the process started, ran and ended before start looked -- started."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    path = fifo(tmp_path)
    r = Recorder(tmp_path)

    async def main() -> str:
        loop = asyncio.get_running_loop()
        # the read end must exist for the writer's open to return: open one, let the
        # "init" write, then run start with the init already exited
        keep = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            t = init_thread(path)
            t.join(5)
            exited = loop.create_future()
            exited.set_result(0)
            return await start(r, exited=exited)
        finally:
            os.close(keep)

    assert asyncio.run(main()) == "fifo"
    assert not path.exists()


@pytest.mark.parametrize("layout", ["no state dir", "no fifo", "regular file", "symlinked dir", "symlinked fifo"])
def test_fallback_to_runc_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str) -> None:
    """Not runc's fifo where we expect it: `runc start` (whose error is then the right one)."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    root = tmp_path / "root"
    root.mkdir()
    elsewhere = tmp_path / "elsewhere"
    if layout == "no fifo":
        (root / "c1").mkdir()
    elif layout == "regular file":
        (root / "c1").mkdir()
        (root / "c1" / "exec.fifo").write_bytes(b"0")
    elif layout == "symlinked dir":
        fifo(elsewhere)
        (root / "c1").symlink_to(elsewhere / "c1")
    elif layout == "symlinked fifo":
        target = fifo(elsewhere)
        (root / "c1").mkdir()
        (root / "c1" / "exec.fifo").symlink_to(target)
    r = Recorder(root)
    assert asyncio.run(start(r)) == "runc"
    assert r.started == ["c1"]
    if layout.startswith("symlinked"):
        assert (elsewhere / "c1" / "exec.fifo").exists()  # never touched


def test_notify_socket_keeps_runc_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With NOTIFY_SOCKET runc start also waits for the container's READY=1: runc does it."""
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/x.sock")
    path = fifo(tmp_path)
    r = Recorder(tmp_path)
    assert asyncio.run(start(r)) == "runc"
    assert r.started == ["c1"] and path.exists()


@pytest.mark.parametrize("bad", ["", "..", ".", "a/b", "../c1"])
def test_id_confined(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    r = Recorder(tmp_path / "root")
    with pytest.raises(protocol.InvalidArgument):
        asyncio.run(start(r, bad))


# -- runc delete in the background (ccpu/agent/container.py) ------------------------------------


class FlakyDelete(Runc):
    """`runc delete` that fails `fails` times, then works; records each call."""

    def __init__(self, fails: int, delay: float = 0.0) -> None:
        super().__init__(reaper=None, root="/nonexistent", binary="/nonexistent/runc")  # type: ignore[arg-type]
        self.fails = fails
        self.delay = delay
        self.calls: list[str] = []

    async def delete(self, container: str, force: bool = False) -> None:
        self.calls.append(container)
        await asyncio.sleep(self.delay)
        if self.fails:
            self.fails -= 1
            raise runcmod.RuncError("runc delete: device or resource busy")


def supervisor(r: Runc):  # noqa: ANN201
    from ccpu.agent.container import Supervisor

    return Supervisor(r, None, None, [], [])  # type: ignore[arg-type]


def test_create_waits_for_the_background_delete() -> None:
    async def main() -> None:
        r = FlakyDelete(0, delay=0.2)
        sup = supervisor(r)
        sup._delete_in_background("c1")
        await sup._deleted_by_runc("c1")  # what create does first
        assert r.calls == ["c1"] and "c1" not in sup._deleting

    asyncio.run(main())


def test_a_failed_background_delete_is_tried_again_by_create() -> None:
    async def main() -> None:
        r = FlakyDelete(1)
        sup = supervisor(r)
        sup._delete_in_background("c1")
        await asyncio.sleep(0.05)
        assert "c1" in sup._deleting  # kept: the next create of c1 must know
        await sup._deleted_by_runc("c1")
        assert r.calls == ["c1", "c1"] and "c1" not in sup._deleting

    asyncio.run(main())


def test_create_fails_if_runc_still_cannot_delete() -> None:
    async def main() -> None:
        sup = supervisor(FlakyDelete(2))
        sup._delete_in_background("c1")
        await sup._deleted_by_runc("c1")

    with pytest.raises(runcmod.RuncError, match="busy"):
        asyncio.run(main())


def test_settle_is_bounded() -> None:
    """shutdown's wait ends at its bound: a runc delete that hangs does not hold it."""

    async def main() -> None:
        sup = supervisor(FlakyDelete(0, delay=30))
        sup._delete_in_background("c1")
        await sup.settle(timeout=0.2)
        assert not sup._deleting["c1"].done()  # returned without it
        sup._deleting["c1"].cancel()

    asyncio.run(main())
