"""A warm fork-server for shim daemons (the default; ``FRACTAL_SHIM_SPAWN=fork``/``exec`` opt out).

Why: a new sandbox's daemon spends most of its start importing (asyncio, protobuf and the
generated modules, the Task service, the agent: ~90 ms here, docs/performance.md), on the path
of every ``ctr run`` and CRI pod.  The zygote is one process per containerd address that has
imported all of that once and, asked by ``start``, forks a ready daemon for the new sandbox.

What must hold, and how:

* **The daemon is still a process of its own, with its own lifetime.**  The zygote forks twice:
  the middle child exits at once (the zygote reaps only it), so the daemon is reparented like
  today's forked daemon, is no child of the zygote and dies with nothing but itself.  It stays
  the one reaper of its containers (it makes itself a child subreaper, as ever).  A ``kill -9``
  of the zygote touches no sandbox (tests/integration/test_shim_zygote.py).
* **Nothing depends on the zygote.**  ``start`` asks it with short timeouts; whenever no daemon
  was started (no zygote, a refused or reset connection, another code version, no answer)
  :class:`Unavailable` sends ``start`` down today's fork path, and ``start`` then starts a fresh
  zygote for the next sandbox (unless one merely answered slowly).  A daemon is started at
  most once: the forked daemon writes its pid and waits for ``start``'s ``go``; without it (``start``
  gave up) it exits before it touches the listening socket.
* **No stale code.**  Every request carries :func:`code_version` (the interpreter and the
  shim's files' identities); a zygote of another version refuses and exits.  It also exits
  after :data:`IDLE_SECONDS` without a request: nothing stays on a host that runs no container
  for long.
* **Only root (the zygote's uid) may ask** (``SO_PEERCRED``); the socket is 0600 in
  containerd's shim socket dir.

Protocol on the zygote's unix socket, one request per connection, of two kinds.  **Relayed
start** (the default, :mod:`shim.relay`): the verb sends its whole invocation; the zygote forks
a *worker* that takes the invocation's environment and directory and runs ``start``'s ``fork``
path (:func:`shim.start.serve_relayed`): the daemon is the worker's child, reparented when the
worker exits at once -- so again no child of the zygote -- and the worker answers the address
(the zygote reaps only the worker).  **Daemon spawn** (``start``'s second try when the relay got
no answer): ``start`` sends a 4-byte big-endian length and a JSON object (the daemon's options, the bundle, the socket path, the
environment containerd gave ``start``, the version) with the daemon's listening socket as
``SCM_RIGHTS``; the new daemon answers ``pid N\\n`` (the zygote answers ``no REASON\\n``);
``start`` answers ``go``.

``start`` imports only the client half, :mod:`shim.zygoteclient` (standard library, no daemon
module); the default ``start`` only :mod:`shim.relay`.
"""

from __future__ import annotations

import array
import json
import os
import socket
import struct
import sys

from shim import relay
from shim.zygoteclient import (ANSWER_SECONDS, GO_SECONDS, IDLE_SECONDS, PROFILE_ENV, REQUEST_MAX,  # noqa: F401
                               Unavailable, code_version, daemon_request, socket_path, spawn_daemon,
                               start_zygote)

_CODE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: the comm of a worker running a relayed start (neither a daemon nor a zygote: shim/procs.py)
WORKER_COMM = "fractal-start"


# ---------------------------------------------------------------------------------------------
# server (``python -m shim.zygote``)


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise EOFError("request cut short")
        buf += chunk
    return buf


def recv_request(conn: socket.socket) -> tuple[dict | relay.Request, list[int]]:
    """One request -- a daemon spawn's JSON object, or a :class:`shim.relay.Request` -- and the
    fds that came with it (the caller closes them)."""
    fds = array.array("i")
    head, ancdata, _, _ = conn.recvmsg(4, socket.CMSG_SPACE(4 * fds.itemsize))
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - (len(data) % fds.itemsize)])
    try:
        head += _recv_exact(conn, 4 - len(head))
        if head == relay.MAGIC:
            if fds:
                raise ValueError("a relayed start carries no fd")
            (n,) = struct.unpack("!I", _recv_exact(conn, 4))
            if n > relay.REQUEST_MAX:
                raise ValueError(f"request of {n} bytes")
            return relay.decode(_recv_exact(conn, n)), []
        (n,) = struct.unpack("!I", head)
        if n > REQUEST_MAX:
            raise ValueError(f"request of {n} bytes")
        req = json.loads(_recv_exact(conn, n))
        if not isinstance(req, dict) or len(fds) != 1:
            raise ValueError("want a JSON object and one fd")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return req, list(fds)


def _become_daemon(conn: socket.socket, listener: socket.socket, req: dict, listen_fd: int) -> None:
    """In the grandchild: take the request's identity, wait for go, serve.  Never returns."""
    code = 1
    try:
        listener.close()
        from shim import procs

        procs.set_comm(procs.DAEMON_COMM)  # shim.daemon.serve sets it again
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        if null > 2:
            os.close(null)
        os.environ.clear()
        os.environ.update({str(k): str(v) for k, v in req["env"].items()})
        os.chdir(req["bundle"])
        conn.settimeout(GO_SECONDS)
        conn.sendall(f"pid {os.getpid()}\n".encode())
        if _recv_exact(conn, 2) != b"go":
            os._exit(0)
        conn.close()
        from shim import daemon
        from shim.args import Options

        o = Options()
        for name in ("namespace", "address", "publish_binary", "id"):
            setattr(o, name, str(req[name]))
        o.debug = bool(req.get("debug"))
        dopts = daemon.daemon_options(o, group=str(req["group"]), bundle=str(req["bundle"]),
                                      socket=str(req["socket"]), listen_fd=listen_fd)
        code = daemon.serve_profiled(dopts) if os.environ.get(PROFILE_ENV) else daemon.serve(dopts)
    except BaseException:  # noqa: BLE001 - stdio is /dev/null; start falls back on no answer
        code = 1
    finally:
        os._exit(code)


def fork_daemon(conn: socket.socket, listener: socket.socket, req: dict, listen_fd: int) -> None:
    """Fork twice; the grandchild becomes the daemon (reparented: no child of ours)."""
    pid = os.fork()
    if pid == 0:
        try:
            if os.fork() == 0:
                _become_daemon(conn, listener, req, listen_fd)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def _start_worker(conn: socket.socket, listener: socket.socket, req: relay.Request) -> None:
    """In the worker: become the relaying verb (its environment, directory, argv) and run
    ``start``'s fork path; answer its result.  Never returns."""
    code = 1
    try:
        listener.close()
        from shim import procs, start
        from shim.args import UsageError, parse_args

        procs.set_comm(WORKER_COMM)
        os.environ.clear()
        os.environ.update(req.env)
        os.chdir(req.cwd)
        try:
            opts = parse_args(req.argv)
        except UsageError as exc:
            answer = f"err {exc}".encode()
        else:
            answer = start.serve_relayed(opts, req.options, (conn.fileno(),))
        conn.sendall(answer + b"\n")
        code = 0
    except BaseException:  # noqa: BLE001 - stdio is /dev/null; the verb falls back on no answer
        code = 1
    finally:
        os._exit(code)


def start_worker(conn: socket.socket, listener: socket.socket, req: relay.Request) -> None:
    """Fork the worker of a relayed start and reap it.  Bounded: the worker does what a
    ``start`` process does (a flock held by other starts only for their check-bind-fork step,
    connects with timeouts, one fork); the zygote handles its requests one by one."""
    pid = os.fork()
    if pid == 0:
        _start_worker(conn, listener, req)
    os.waitpid(pid, 0)


def code_snapshot(modules: dict | None = None) -> dict[str, tuple[int, int, int]]:
    """(inode, mtime, size) of the file of every loaded module of ours (shim, ccpu).

    Why, besides :func:`code_version` (which ``start`` computes from a few files, to stay
    cheap): a daemon forked now runs the code the zygote imported, so an edit of any other
    module (ccpu/agent, say) must also retire the zygote; it checks this snapshot at each
    request (~130 stats)."""
    out: dict[str, tuple[int, int, int]] = {}
    root = _CODE_ROOT + os.sep
    for mod in list((sys.modules if modules is None else modules).values()):
        path = getattr(mod, "__file__", None)
        if not isinstance(path, str) or not path.startswith(root):
            continue
        try:
            st = os.stat(path)
        except OSError:
            continue
        out[path] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return out


def changed_file(snapshot: dict[str, tuple[int, int, int]]) -> str | None:
    """The first file of ``snapshot`` that is gone or differs now (None: the code is as loaded)."""
    for path, ident in snapshot.items():
        try:
            st = os.stat(path)
        except OSError:
            return path
        if (st.st_ino, st.st_mtime_ns, st.st_size) != ident:
            return path
    return None


def preload() -> None:
    """Import what a daemon imports (shim.daemon's Daemon.run), so forked daemons start warm,
    and what a relayed start's worker runs (shim.start: json, fcntl, the spec's annotations)."""
    from shim import args, daemon, start  # noqa: F401
    from ccpu.agent import jsonbound  # noqa: F401

    daemon.preload()


def serve(listener: socket.socket, path: str, idle: float = IDLE_SECONDS) -> int:
    from shim import procs

    procs.set_comm(procs.ZYGOTE_COMM)
    version = code_version()
    preload()
    loaded = code_snapshot()
    me = os.getuid()
    try:
        st = os.stat(path)
        ident: tuple[int, int] | None = (st.st_dev, st.st_ino)
    except OSError:
        ident = None
    listener.settimeout(idle)
    try:
        while True:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                return 0  # idle: nobody started a sandbox for a while
            with conn:
                conn.settimeout(ANSWER_SECONDS)
                try:
                    if _peer_uid(conn) != me:
                        continue
                    req, fds = recv_request(conn)
                except (OSError, EOFError, ValueError):
                    continue
                try:
                    relayed = isinstance(req, relay.Request)
                    asked = req.version if relayed else req.get("version")
                    if asked != version or changed_file(loaded):
                        conn.sendall(b"no version\n")
                        return 0  # the code changed: start starts a zygote of the new code
                    if relayed:
                        start_worker(conn, listener, req)
                    else:
                        fork_daemon(conn, listener, req, fds[0])
                except OSError:
                    pass
                finally:
                    for fd in fds:
                        os.close(fd)  # never keep a daemon's listening socket open here
    finally:
        try:  # our socket, unless a successor's replaced it
            st = os.stat(path)
            if ident == (st.st_dev, st.st_ino):
                os.unlink(path)
        except OSError:
            pass
        listener.close()


ZYGOTE_FLAGS: dict[str, bool] = {"address": False, "socket": False, "listen-fd": False}


def main(argv: list[str] | None = None) -> int:
    from shim.args import UsageError, parse_args

    try:
        opts = parse_args(sys.argv[1:] if argv is None else argv, ZYGOTE_FLAGS)
    except UsageError as exc:
        sys.stderr.write(f"fractal shim zygote: {exc}\n")
        return 2
    if os.environ.get("FRACTAL_SHIM_SSL", "") != "1":  # as shim.daemon.skip_ssl, before asyncio
        sys.modules.setdefault("ssl", None)  # type: ignore[arg-type]
    fd = int(opts.listen_fd)  # type: ignore[attr-defined]
    os.set_inheritable(fd, False)
    listener = socket.socket(fileno=fd)
    return serve(listener, opts.socket)


if __name__ == "__main__":
    sys.exit(main())
