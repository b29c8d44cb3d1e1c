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
