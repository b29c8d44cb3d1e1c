"""The daemon gives up its socket file the moment it decides to leave (shim/daemon.py
``request_exit``): before Shutdown's answer, so containerd's ``delete`` (run as soon as it closes
the connection) finds no socket to probe and a new ``start`` of the group gets a new daemon
instead of joining one that is leaving.  A successor's socket at the same path is left alone."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from shim.args import Options
from shim.daemon import Daemon


def daemon_for(path: Path) -> Daemon:
    o = Options()
    o.namespace, o.id, o.socket = "ns", "c1", str(path)
    o.group = "c1"  # type: ignore[attr-defined]
    return Daemon(o)


def bound(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(1)
    return s


def test_request_exit_removes_the_socket_file_at_once(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with bound(path):
        d = daemon_for(path)
        st = os.stat(path)
        d.socket_id = (st.st_dev, st.st_ino)
        d.request_exit()
        assert d.exit_requested and d.stop_event.is_set()
        assert not path.exists()


def test_request_exit_leaves_a_successors_socket(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with bound(path):  # (kept open: its inode cannot be reused for the successor's)
        d = daemon_for(path)
        st = os.stat(path)
        d.socket_id = (st.st_dev, st.st_ino)
        path.unlink()
        with bound(path):  # a new daemon of the group bound the same path meanwhile
            d.request_exit()
            assert path.exists()


def test_request_exit_before_serving_is_harmless(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with bound(path):
        d = daemon_for(path)  # socket_id not known yet: nothing is removed
        d.request_exit()
        assert d.stop_event.is_set() and path.exists()


# ---------------------------------------------------------------------------------------------
# the sandbox record (`fractal ps`): written off the RPC's path, never after the daemon left


def test_record_writes_leave_the_loop_coalesce_and_stop_at_shutdown(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    import asyncio
    import threading
    from types import SimpleNamespace

    from ccpu import sandboxes

    gate = threading.Event()
    written: list[list[str]] = []

    def slow_write(record, base=None):  # noqa: ANN001, ANN202 - a disk that takes its time
        gate.wait(10)
        written.append(list(record.containers))

    monkeypatch.setattr(sandboxes, "write", slow_write)
    d = daemon_for(tmp_path / "s")
    containers: dict[str, object] = {"a": 1}
    d.sandbox = SimpleNamespace(mode="host", pid=1, describe=lambda: {})
    d.service = SimpleNamespace(tasks=SimpleNamespace(containers=containers))

    async def scenario() -> None:
        d.write_record()  # returns at once: the answer is not held up by the disk
        await asyncio.sleep(0.05)
        assert written == []  # the first write is still in the "disk"
        containers["b"] = 2
        d.write_record()
        containers["c"] = 3
        d.write_record()  # two requests while one write is in flight: one more write
        gate.set()
        await asyncio.wait_for(asyncio.shield(d._record_writer), 10)
        assert written == [["a"], ["a", "b", "c"]]
        await d._close_records()
        d.write_record()  # leaving: the record is removed next, nothing may recreate it
        await asyncio.sleep(0.05)
        assert written == [["a"], ["a", "b", "c"]]

    asyncio.run(scenario())
