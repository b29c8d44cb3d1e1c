"""The ``start`` verb: find or start the shim daemon of a container's group, print its address.

Exactly as containerd's runc shim (runtime/v2/runc/manager, 1.6): the group's socket name is
fixed (:mod:`shim.address`); if a live daemon listens there, this container joins it.  Otherwise
the socket is bound and listening *before* we exit (containerd connects right after reading our
output), and the daemon inherits the listening socket.  Two ``start`` of one group at once are
serialised by an flock on the socket directory, held only for the check-bind-spawn step (no lock
files are left behind when a shim is killed).

Nothing but the address may be written to stdout or stderr: containerd reads both
(CombinedOutput) as the address.  The daemon gets /dev/null as stdio and its own session, so
containerd's read of our output ends when we exit.

How the daemon is started (``FRACTAL_SHIM_SPAWN``):

* ``zygote`` (default): the verb relays its whole invocation to a warm fork-server
  (:mod:`shim.relay`, :mod:`shim.zygote`), whose worker runs :func:`serve_relayed` -- this
  module's ``fork`` path below, with every module already imported -- and prints the address
  it answers.  When nothing usable answered, the verb runs this module itself: it asks the
  fork-server once more the older way (it forks the daemon, with the listening socket passed
  over its unix socket), else falls back to ``fork`` below and starts a zygote for the next
  sandbox.
* ``fork``: ``os.fork()`` once everything is parsed and the socket listens (no threads exist
  in ``start``).  The child closes the lock, takes /dev/null as stdio, calls setsid, moves to
  the bundle and runs :func:`shim.daemon.serve` -- no second interpreter start and no second
  ``site`` import, but every module of the daemon is imported in the child.  The parent prints
  the address and exits at once (``os._exit``: nothing of the child's to flush).
* ``exec``: a fresh ``python -m shim.daemon`` that inherits the listening socket as an fd (no
  fork-server, no fork of ``start``: the opt-out when either is unwanted).

However it was started, a daemon has the comm ``containerd-shim``: tools find daemons by the one
rule in :mod:`shim.procs`, never by a command line.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys

from shim import address as addr

#: The directory holding the ``shim`` package: put on the daemon's PYTHONPATH.
_CODE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def daemon_argv(opts, group: str, bundle: str, sock_path: str, listen_fd: int) -> list[str]:  # noqa: ANN001
    argv = [
        sys.executable, "-m", "shim.daemon",
        "-namespace", opts.namespace,
        "-address", opts.address,
        "-publish-binary", opts.publish_binary,
        "-id", opts.id,
        "-bundle", bundle,
        "-group", group,
        "-socket", sock_path,
        "-listen-fd", str(listen_fd),
    ]
    if opts.debug:
        argv.append("-debug")
    return argv


SPAWN_MODES = ("zygote", "fork", "exec")


def spawn_mode() -> str:
    """``FRACTAL_SHIM_SPAWN`` (zygote when unset or empty); another value is refused with a
    clear error (containerd shows it) rather than silently taking some other way."""
    mode = os.environ.get("FRACTAL_SHIM_SPAWN", "").strip() or "zygote"
    if mode not in SPAWN_MODES:
        raise ValueError(f"FRACTAL_SHIM_SPAWN={mode[:40]!r}: want one of {', '.join(SPAWN_MODES)}")
    return mode


def _zygote_daemon(opts, group: str, bundle: str, sock_path: str, sock: socket.socket) -> bool:  # noqa: ANN001
    """Have the fork-server fork the daemon (shim/zygote.py); False: no daemon was started --
    then the caller forks it itself, and a fresh zygote is started for the next sandbox."""
    from shim import zygoteclient as zygote

    try:
        zygote.spawn_daemon(zygote.socket_path(opts.address),
                            zygote.daemon_request(opts, group=group, bundle=bundle, socket=sock_path),
                            sock)
        return True
    except zygote.Unavailable as exc:
        if exc.restart:
            try:
                zygote.start_zygote(opts.address)
            except OSError:
                pass  # the next start tries again; this one forks as always
        return False


def _exec_daemon(opts, group: str, bundle: str, sock_path: str, sock: socket.socket) -> None:  # noqa: ANN001
    import subprocess

    fd = sock.fileno()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_CODE_ROOT, env.get("PYTHONPATH", "")) if p)
    if not sys.dont_write_bytecode:  # as this process (shim.main.keep_byte_code)
        env.pop("PYTHONDONTWRITEBYTECODE", None)
    with open(os.devnull, "r+b") as devnull:
        subprocess.Popen(
            daemon_argv(opts, group, bundle, sock_path, fd),
            stdin=devnull, stdout=devnull, stderr=devnull,
            pass_fds=(fd,), cwd=bundle, env=env, start_new_session=True, close_fds=True,
        )


def _fork_daemon(opts, group: str, bundle: str, sock_path: str, sock: socket.socket,  # noqa: ANN001
                 lock_fd: int, close: tuple[int, ...] = ()) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return
    # The child: never returns into start's code, never flushes start's buffers.
    code = 1
    try:
        from shim import procs

        # first: from here on this is a daemon to every tool that looks (a relayed start's worker
        # has another comm, and the daemon's imports below can take a while under load)
        procs.set_comm(procs.DAEMON_COMM)
        os.close(lock_fd)  # an flock belongs to the open file: the child must not keep it
        for fd in close:  # the fork-server worker's connection to the relaying verb
            os.close(fd)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):  # containerd waits for EOF on start's stdout/stderr
            os.dup2(null, fd)
        if null > 2:
            os.close(null)
        os.setsid()
        os.chdir(bundle)
        if os.environ.get("FRACTAL_SHIM_SSL", "") != "1":
            sys.modules.setdefault("ssl", None)  # type: ignore[arg-type]  # see daemon.skip_ssl
        from shim import daemon

        dopts = daemon.daemon_options(opts, group=group, bundle=bundle, socket=sock_path,
                                      listen_fd=sock.detach())
        if os.environ.get("FRACTAL_SHIM_PROFILE"):  # measurement only (docs/performance.md)
            code = daemon.serve_profiled(dopts)
        else:
            code = daemon.serve(dopts)
    except BaseException:  # noqa: BLE001 - nothing to report to: stdio is /dev/null
        code = 1
    finally:
        os._exit(code)


def start(opts, mode: str | None = None, close_in_daemon: tuple[int, ...] = ()) -> str:  # noqa: ANN001
    """Return the address of the group's daemon, starting it if needed (``mode``: as
    ``FRACTAL_SHIM_SPAWN`` says unless given; ``close_in_daemon``: fds a forked daemon closes)."""
    if not opts.namespace or not opts.id or not opts.address:
        raise ValueError("start needs -namespace, -address and -id")
    mode = mode or spawn_mode()
    bundle = opts.bundle or os.getcwd()
    group = addr.group_id(addr.read_annotations(bundle), opts.id)
    sock_path = addr.socket_path(opts.address, opts.namespace, group)
    address = "unix://" + sock_path
    os.makedirs(addr.SOCKET_DIR, mode=0o711, exist_ok=True)

    dir_fd = os.open(addr.SOCKET_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(dir_fd, fcntl.LOCK_EX)
        if addr.can_connect(sock_path):
            addr.write_address(bundle, address)
            return address
        try:
            os.unlink(sock_path)  # stale: its daemon is gone
        except FileNotFoundError:
            pass
        sock = addr.listen_unix(sock_path)
        try:
            if mode == "exec":
                _exec_daemon(opts, group, bundle, sock_path, sock)
            elif not (mode == "zygote" and _zygote_daemon(opts, group, bundle, sock_path, sock)):
                _fork_daemon(opts, group, bundle, sock_path, sock, dir_fd, close_in_daemon)
        except BaseException:
            sock.close()
            try:
                os.unlink(sock_path)
            except OSError:
                pass
            raise
        sock.close()
        addr.write_address(bundle, address)
        return address
    finally:
        os.close(dir_fd)


def apply_options(options: bytes) -> None:
    """The runtime options (protobuf Any, possibly empty) containerd wrote on stdin: a runtime
    config file named there (runtimeoptions.v1.Options.config_path) reaches the daemon through
    its environment."""
    if options:
        from shim.config import RUNTIME_CONFIG_ENV, config_path_from_options

        path = config_path_from_options(options)
        if path:
            os.environ[RUNTIME_CONFIG_ENV] = path


def serve_relayed(opts, options: bytes, close_in_daemon: tuple[int, ...]) -> bytes:  # noqa: ANN001
    """In the fork-server's worker (shim/zygote.py), with the relaying verb's environment and
    directory: run ``start`` down the ``fork`` path; the answer line for :mod:`shim.relay`."""
    try:
        if opts.verb != "start":
            raise ValueError(f"relayed verb {opts.verb!r}: only start is")
        apply_options(options)
        address = start(opts, mode="fork", close_in_daemon=close_in_daemon)
    except Exception as exc:  # noqa: BLE001 - containerd shows the text
        return b"err " + " ".join(str(exc).split())[:1000].encode(errors="replace")
    return b"ok " + address.encode()


def run(opts, options: bytes | None = None) -> int:  # noqa: ANN001
    # Read all of stdin (unless shim.relay did) so containerd's writer never blocks.
    if options is None:
        try:
            options = sys.stdin.buffer.read()
        except (OSError, ValueError, AttributeError):
            options = b""
    apply_options(options)
    try:
        address = start(opts)
    except Exception as exc:  # containerd shows this text in its error
        sys.stderr.write(f"containerd-shim-fractal-v1 start: {exc}\n")
        return 1
    sys.stdout.write(address)
    sys.stdout.flush()
    return 0

