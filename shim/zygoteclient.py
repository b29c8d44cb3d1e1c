"""The fork-server's client half: what ``start`` (and its fallback) needs of shim/zygote.py.

Split from the server so that ``start`` imports no server code and the server may import
``start`` (a relayed start's worker runs it: shim/relay.py) without an import cycle.  Standard
library and :mod:`shim.address`, :mod:`shim.relay` only.
"""

from __future__ import annotations

import array
import json
import os
import socket
import struct
import sys

from shim import address as addr
from shim import relay

#: a zygote without requests for this long exits
IDLE_SECONDS = 600.0
#: how long ``start`` waits for the zygote's answer (it then falls back to forking itself)
ANSWER_SECONDS = 2.0
#: how long a new daemon waits for ``start``'s go before it exits unused
GO_SECONDS = 10.0
REQUEST_MAX = 1 << 20
#: a directory: each forked daemon writes its cProfile stats there (measurement only)
PROFILE_ENV = "FRACTAL_SHIM_PROFILE"

_CODE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Unavailable(Exception):
    """No daemon was started; ``restart``: no usable zygote is there (start a new one)."""

    def __init__(self, why: str, restart: bool) -> None:
        super().__init__(why)
        self.restart = restart


def socket_path(containerd_address: str) -> str:
    """The zygote's socket for one containerd (:func:`shim.relay.zygote_socket` in the shim
    socket dir)."""
    return relay.zygote_socket(containerd_address, addr.SOCKET_DIR)


code_version = relay.code_version


# ---------------------------------------------------------------------------------------------
# client (``start``)


def daemon_request(opts, *, group: str, bundle: str, socket: str) -> dict:  # noqa: ANN001
    return {"version": code_version(), "namespace": opts.namespace, "address": opts.address,
            "publish_binary": opts.publish_binary, "id": opts.id, "debug": bool(opts.debug),
            "group": group, "bundle": bundle, "socket": socket, "env": dict(os.environ)}


def _read_line(conn: socket.socket, limit: int = 256) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = conn.recv(limit - len(buf))
        if not chunk:
            raise EOFError("connection closed")
        buf += chunk
        if len(buf) >= limit:
            raise ValueError("answer too long")
    return buf[:-1]


def spawn_daemon(path: str, request: dict, listen_sock: socket.socket,
                 timeout: float = ANSWER_SECONDS) -> int:
    """Have the zygote at ``path`` fork the daemon for ``request`` on ``listen_sock``; its pid.
    Raises :class:`Unavailable` when no daemon was started (then fall back)."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(timeout)
    try:
        try:
            conn.connect(path)
        except OSError as exc:
            raise Unavailable(f"no zygote at {path}: {exc}", restart=True) from None
        data = json.dumps(request).encode()
        try:
            conn.sendmsg([struct.pack("!I", len(data)) + data],
                         [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [listen_sock.fileno()]))])
            answer = _read_line(conn)
        except (OSError, EOFError, ValueError) as exc:  # reset by a zygote that just left, or slow
            raise Unavailable(f"zygote did not answer: {exc}",
                              restart=not isinstance(exc, TimeoutError)) from None
        if not answer.startswith(b"pid "):
            raise Unavailable(f"zygote refused: {answer[:100]!r}", restart=True)
        try:
            pid = int(answer[4:])
            conn.sendall(b"go")  # from here on the daemon serves
        except (OSError, ValueError) as exc:  # no go reached it: it exits unused
            raise Unavailable(f"daemon not confirmed: {exc}", restart=False) from None
        return pid
    finally:
        conn.close()


def start_zygote(containerd_address: str) -> None:
    """Start a zygote for ``containerd_address`` in the background (``start`` holds the socket
    dir's flock: no two zygotes race for the socket).  Its socket is bound and listening before
    this returns; the zygote imports the daemon's modules after that, and requests wait for it."""
    path = socket_path(containerd_address)
    try:
        os.unlink(path)  # stale (a zygote killed -9) or of another version (it is leaving)
    except FileNotFoundError:
        pass
    sock = addr.listen_unix(path)
    try:
        fd = sock.fileno()
        os.set_inheritable(fd, True)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_CODE_ROOT, env.get("PYTHONPATH", "")) if p)
        if not sys.dont_write_bytecode:  # as start (shim.main.keep_byte_code): compile once
            env.pop("PYTHONDONTWRITEBYTECODE", None)
        argv = [sys.executable, "-m", "shim.zygote", "-address", containerd_address, "-socket", path,
                "-listen-fd", str(fd)]
        os.posix_spawn(sys.executable, argv, env, setsid=True, file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDWR, 0),  # never containerd's pipes
            (os.POSIX_SPAWN_DUP2, 0, 1), (os.POSIX_SPAWN_DUP2, 0, 2)])
    finally:
        sock.close()


