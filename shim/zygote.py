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

Protocol on the zygote's unix socket, one request per connection: ``start`` sends a 4-byte
big-endian length and a JSON object (the daemon's options, the bundle, the socket path, the
environment containerd gave ``start``, the version) with the daemon's listening socket as
``SCM_RIGHTS``; the new daemon answers ``pid N\\n`` (the zygote answers ``no REASON\\n``);
``start`` answers ``go``.

``start`` imports only this module's client half (standard library, no daemon module).
"""

from __future__ import annotations

import array
import json
import os
import socket
import struct
import sys

from shim import address as addr

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
_VERSION_FILES = ("shim/__init__.py", "shim/daemon.py", "shim/zygote.py", "shim/task.py", "shim/procs.py",
                  "ccpu/__init__.py")


class Unavailable(Exception):
    """No daemon was started; ``restart``: no usable zygote is there (start a new one)."""

    def __init__(self, why: str, restart: bool) -> None:
        super().__init__(why)
        self.restart = restart


def socket_path(containerd_address: str) -> str:
    """The zygote's socket for one containerd (next to the shims' sockets; never one of them:
    those hash address/namespace/group)."""
    return f"{addr.SOCKET_DIR}/{addr._sha256_hex((containerd_address + chr(0) + 'fractal-zygote').encode())}"


def code_version() -> str:
    """What a daemon forked now would run: the interpreter and the identity of the shim's files
    (an upgrade replaces them)."""
    parts = [sys.executable, sys.version, _CODE_ROOT]
    for rel in _VERSION_FILES:
        try:
            st = os.stat(os.path.join(_CODE_ROOT, rel))
            parts.append(f"{st.st_ino}:{st.st_mtime_ns}:{st.st_size}")
        except OSError:
            parts.append("-")
    return "|".join(parts)


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


def recv_request(conn: socket.socket) -> tuple[dict, list[int]]:
    """One request and the fds that came with it (the caller closes them)."""
    fds = array.array("i")
    head, ancdata, _, _ = conn.recvmsg(4, socket.CMSG_SPACE(4 * fds.itemsize))
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - (len(data) % fds.itemsize)])
    try:
        head += _recv_exact(conn, 4 - len(head))
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
        code = _serve_profiled(dopts) if os.environ.get(PROFILE_ENV) else daemon.serve(dopts)
    except BaseException:  # noqa: BLE001 - stdio is /dev/null; start falls back on no answer
        code = 1
    finally:
        os._exit(code)


def _serve_profiled(dopts) -> int:  # noqa: ANN001
    """``daemon.serve`` under cProfile, the stats written to ``$FRACTAL_SHIM_PROFILE/PID.prof``
    at exit: how what a forked daemon still does per sandbox is measured (docs/performance.md)."""
    import cProfile

    from shim import daemon

    prof = cProfile.Profile()
    prof.enable()
    try:
        return daemon.serve(dopts)
    finally:
        prof.disable()
        prof.dump_stats(os.path.join(os.environ[PROFILE_ENV], f"{os.getpid()}.prof"))


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
    """Import what a daemon imports (shim.daemon's Daemon.run), so forked daemons start warm."""
    from shim import daemon

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
                    if req.get("version") != version or changed_file(loaded):
                        conn.sendall(b"no version\n")
                        return 0  # the code changed: start starts a zygote of the new code
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
