"""`python3 -m ccpu.agent`: the fractal agent's command line.

    python3 -m ccpu.agent [--fd N] [--listen unix:PATH | --listen tcp:HOST:PORT --tls-dir DIR]
                          --runc-root DIR [--runc PATH]
                          --bundle-root DIR... --layer-root DIR... [--repo DIR] [--drain-timeout S]
                          [--cgroup-parent PATH --memory-reserve-mb N] [--debug] [--log FILE]

`--fd N`: serve the connected stream on fd N (a socketpair end from the shim, or a virtio-serial
port); `--listen unix:PATH`: accept connections on a unix socket (one client at a time; a new
one may connect after the previous one went away).  Both may be given.  `--listen tcp:HOST:PORT`
(remote mode, docs/remote.md): TLS 1.3 with a client certificate from the CA of `--tls-dir`
(`ca.pem`, `agent.pem`, `agent.key`: ccpu/agent/tls.py); there is no plaintext TCP.  A TCP
agent serves one client after another: `shutdown` ends a client's session, not the agent; a
client lost with containers gets them reaped after `--orphan-grace` s (server.py).  With `--fd`
alone the agent exits when that stream closes and no container exists (nobody could reach it
any more).

`--repo DIR` (a remote machine, docs/remote.md): the machine's own layer repo, filled by the
layers the shim streams (feature `layers:pull`, ccpu/agent/layerpull.py); the containers'
bundles and writable layers go below it too, so no host path is needed on the machine.

`--cgroup-parent` (a guest's agent, from the init): the agent runs at oom_score_adj -1000 and
puts every container's cgroup below PATH, whose memory.max keeps `--memory-reserve-mb` of the
guest's memory for the kernel, the agent and runc (ccpu/agent/limits.py).

Standard library only: this runs in a minimal guest.

Ready first: on `--fd` alone (a guest's port, a host-mode child's socketpair) the first `hello` is
read and answered with blocking reads (hello.answer_first) before asyncio, logging or dataclasses
are imported -- under TCG asyncio's import alone was ~1.6 s of the boot -> ready time; the event loop
then takes the greeted connection over.  Otherwise what `hello` needs (asyncio, the wire, the
protocol) is all that loads before the agent answers it.  The container machinery (`CONTAINER_MODULES`) is imported in a thread right
after, and the Supervisor (with the reaper, the subreaper flag and the guest's memory reserve)
is built when the first request needs it -- before it no container, so no child, can exist.
Under TCG the imports are most of a guest's boot -> ready time (docs/vm.md "The agent's
imports"); tests/unit/test_import_graph.py pins what the ready path may import.
"""

from __future__ import annotations

import argparse
import os
import sys
import typing

from . import endpoint, hello

if typing.TYPE_CHECKING:
    import asyncio
    import logging

    from ..linux.reaper import Reaper
    from .container import Supervisor
    from .layerpull import LocalRepo
    from .server import Outbox


def _log() -> logging.Logger:
    """The agent's logger (logging, like asyncio, is imported after the first `hello`)."""
    import logging

    return logging.getLogger("ccpu.agent")

#: imported after `hello` (preload) or by the first request that needs them, never before ready
CONTAINER_MODULES = ("ccpu.agent.container", "ccpu.agent.runc", "ccpu.agent.limits", "ccpu.agent.live",
                     "ccpu.agent.diagnose", "ccpu.linux.reaper")


def which(name: str) -> str | None:
    """``shutil.which`` for one executable name or path: without shutil (and the bz2/lzma/fnmatch
    it loads), which the agent's boot in a guest would pay for under TCG (docs/vm.md)."""
    candidates = [name] if os.sep in name else [os.path.join(d, name) for d in os.get_exec_path()]
    for c in candidates:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


class _Formatter(argparse.HelpFormatter):
    """argparse's formatter with a fixed width: the default asks ``shutil.get_terminal_size``, and
    importing shutil (fnmatch, zlib, bz2, lzma) would be on the guest's boot path (every
    ``add_argument`` makes a formatter)."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=100)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python3 -m ccpu.agent", description="fractal agent",
                                formatter_class=_Formatter)
    p.add_argument("--fd", type=int, help="serve the connected stream on this fd")
    p.add_argument("--listen", help="unix:PATH or tcp:HOST:PORT (with --tls-dir) to accept connections on")
    p.add_argument("--tls-dir", help="tcp: the dir with ca.pem, agent.pem, agent.key (`fractal pki init`)")
    p.add_argument("--tls-ca-pin", help="tcp, an attested machine (instead of --tls-dir): sha256:HEX of the "
                   "only CA whose client certificates are accepted; a TLS key is made at boot and the TPM "
                   "quote binds it (docs/hardware.md)")
    p.add_argument("--tls-ca-file", help="with --tls-ca-pin: where the CA certificate is read (a file or "
                   "a disk holding its PEM; untrusted until its sha256 matches the pin)")
    p.add_argument("--tls-boot-dir", default="/run/fractal/tls",
                   help="with --tls-ca-pin: the RAM directory for the boot key")
    p.add_argument("--runc-root", required=True, help="runc's --root (state dir)")
    p.add_argument("--runc", default="runc", help="runc binary (default: runc on PATH)")
    p.add_argument("--bundle-root", action="append", default=[], help="bundles must be below this (repeatable)")
    p.add_argument("--layer-root", action="append", default=[], help="layer/mount dirs must be below this (repeatable)")
    p.add_argument(
        "--drain-timeout", type=float, default=5.0,
        help="seconds an exited process's output may take to reach EOF (default 5)",
    )  # fmt: skip
    p.add_argument("--cgroup-parent", help="guest: the containers' parent cgroup (below /sys/fs/cgroup)")
    p.add_argument("--memory-reserve-mb", type=int, default=64,
                   help="guest: MiB of memory containers can never take (default 64)")
    p.add_argument("--orphan-grace", type=float, default=30.0,
                   help="tcp: seconds a lost client's containers are kept for it to return (default 30)")
    p.add_argument("--repo", help="remote machine: its own layer repo, filled by streamed layers "
                                  "(feature layers:pull); its bundles/ and containers/ hold the "
                                  "containers' bundles and writable layers")
    p.add_argument("--max-layer-mb", type=int, default=4096,
                   help="--repo: the largest compressed layer accepted, MiB (default 4096)")
    p.add_argument("--layer-cache-mb", type=int, default=2048,
                   help="--repo: MiB of layers no container uses kept for the next sandbox (default 2048)")
    p.add_argument("--ready-fd", type=int, help="write 'ready' to this fd once listening (tcp)")
    p.add_argument("--nics", action="store_true",
                   help="guest: serve the `nic` op (configure NICs the host plugs in after boot)")
    p.add_argument("--debug", action="store_true")
    p.add_argument("--log", help="log file (default: stderr)")
    ns = p.parse_args(argv)
    if ns.fd is None and ns.listen is None:
        p.error("one of --fd or --listen is required")
    if not ns.bundle_root and not ns.repo:
        p.error("--bundle-root (or --repo) is required")
    if not 1 <= ns.max_layer_mb <= 1 << 20:
        p.error("--max-layer-mb: from 1 to 1048576")
    if not 0 <= ns.layer_cache_mb <= 1 << 30:
        p.error("--layer-cache-mb: from 0")
    ns.tls_spki = None
    if ns.listen is not None and ns.listen.startswith("tcp:"):
        if bool(ns.tls_dir) == bool(ns.tls_ca_pin):
            p.error("--listen tcp: needs --tls-dir or --tls-ca-pin (mutual TLS; there is no plaintext TCP)")
        if bool(ns.tls_ca_pin) != bool(ns.tls_ca_file):
            p.error("--tls-ca-pin and --tls-ca-file go together")
        from . import tls  # only here: the agent of a local VM never needs ssl

        try:
            ns.tcp = endpoint.parse_tcp(ns.listen)
            if ns.tls_dir:
                ns.tls = tls.server_context(tls.TlsFiles.in_dir(ns.tls_dir, "agent"))
            else:
                ns.tls, ns.tls_spki = boot_tls(ns.tls_ca_pin, ns.tls_ca_file, ns.tls_boot_dir)
        except (ValueError, OSError) as e:
            p.error(f"--listen {ns.listen}: {e}")
    elif ns.listen is not None and not ns.listen.startswith("unix:"):
        p.error("--listen takes unix:PATH or tcp:HOST:PORT")
    elif ns.tls_dir or ns.tls_ca_pin:
        p.error("--tls-dir / --tls-ca-pin go with --listen tcp:HOST:PORT")
    if not 0 <= ns.orphan_grace <= 86400:
        p.error("--orphan-grace: seconds from 0 to 86400")
    runc = which(ns.runc)  # processes are posix_spawn'ed: no PATH search later
    if runc is None:
        p.error(f"runc binary {ns.runc!r} not found")
    ns.runc = runc
    return ns


def boot_tls(pin: str, ca_file: str, directory: str) -> tuple[typing.Any, bytes]:
    """An attested machine's TLS: the CA read from ``ca_file`` and accepted only if its sha256 is
    ``pin`` (from the measured command line), a key made now in RAM; (server context, the key's
    SPKI sha256 that every quote binds)."""
    from . import tls

    want = tls.parse_pin(pin)
    with open(ca_file, "rb") as f:
        pem = tls.pinned_ca(f.read(tls.MAX_CA_BYTES), want)
    key = tls.make_boot_key(directory)
    ca_path = os.path.join(directory, "ca.pem")
    with open(ca_path, "w") as f:
        f.write(pem)
    _log().info("boot TLS key made (SPKI sha256 %s); client certificates of CA sha256:%s only",
             key.spki_sha256.hex(), want.hex())
    return tls.boot_server_context(key, ca_path), key.spki_sha256


async def _fd_streams(fd: int, rest: bytes = b"") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Streams over an inherited fd: a socket, or a character device / pipe (virtio-serial).
    ``rest``: bytes already read from it (hello.answer_first), read first."""
    import asyncio
    import socket
    import stat

    os.set_inheritable(fd, False)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    if rest:
        reader.feed_data(rest)
    read_proto = asyncio.StreamReaderProtocol(reader)
    if stat.S_ISSOCK(os.fstat(fd).st_mode):
        transport, _ = await loop.create_connection(lambda: read_proto, sock=socket.socket(fileno=fd))
        return reader, asyncio.StreamWriter(transport, read_proto, reader, loop)
    await loop.connect_read_pipe(lambda: read_proto, os.fdopen(fd, "rb", buffering=0))
    wfd = os.dup(fd)
    transport, write_proto = await loop.connect_write_pipe(
        lambda: asyncio.streams.FlowControlMixin(), os.fdopen(wfd, "wb", buffering=0)
    )
    writer = asyncio.StreamWriter(transport, write_proto, reader, loop)
    return reader, writer


def preload(nics: bool) -> None:
    """Import the container machinery (run in a thread after `hello`; imports are idempotent)."""
    import importlib

    for name in CONTAINER_MODULES + (("ccpu.agent.nic",) if nics else ()):
        importlib.import_module(name)


def build_supervisor(ns: argparse.Namespace, outbox: Outbox, loop: asyncio.AbstractEventLoop,
                     started: list[Reaper], roots: tuple[list[str], list[str]]) -> Supervisor:
    """The Supervisor, its reaper started (subreaper from now on) and, in a guest, the
    containers' memory reserve set up; ``started`` gets the reaper (stopped at exit)."""
    from ..linux.reaper import Reaper
    from . import limits
    from .container import Supervisor
    from .runc import Runc

    reaper = Reaper()
    reaper.start(loop)
    started.append(reaper)
    os.makedirs(ns.runc_root, mode=0o700, exist_ok=True)
    cgroup_parent = ns.cgroup_parent
    if cgroup_parent:
        try:
            limits.setup_guest(cgroup_parent, ns.memory_reserve_mb * limits.MiB)
        except OSError as e:  # containers still run, without the reserve: say so loudly
            _log().error("cannot set up the containers' memory limit in %s: %s", cgroup_parent, e)
            cgroup_parent = None
    return Supervisor(
        Runc(reaper, ns.runc_root, ns.runc), reaper, outbox, roots[0], roots[1], ns.drain_timeout,
        cgroup_parent=cgroup_parent,
    )


def local_repo(ns: argparse.Namespace) -> tuple[LocalRepo | None, tuple[list[str], list[str]]]:
    """A machine's own layer repo (``--repo``: remote mode, layers streamed by the shim) and the
    (bundle roots, layer roots) the Supervisor may use: the flags' plus the repo's dirs."""
    bundle_roots, layer_roots = list(ns.bundle_root), list(ns.layer_root)
    if not ns.repo:
        return None, (bundle_roots, layer_roots)
    from .layerpull import LocalRepo

    repo = LocalRepo(ns.repo, max_blob=ns.max_layer_mb << 20, cache_max=ns.layer_cache_mb << 20)
    for sub in ("bundles", "containers"):
        os.makedirs(os.path.join(repo.root, sub), mode=0o700, exist_ok=True)
    bundle_roots.append(os.path.join(repo.root, "bundles"))
    layer_roots += [repo.layers, os.path.join(repo.root, "containers")]
    return repo, (bundle_roots, layer_roots)


async def amain(ns: argparse.Namespace, first: hello.Greeted | hello.Unanswered | None = None) -> int:
    """Serve until stopped.  ``first``: what became of the first frame on ``--fd`` (read before
    asyncio was imported: :func:`main`)."""
    import asyncio
    import contextlib
    import signal

    from .server import LazySupervisor, Outbox, Server

    loop = asyncio.get_running_loop()
    outbox = Outbox()
    reapers: list[Reaper] = []
    repo, roots = local_repo(ns)
    lazy = LazySupervisor(build=lambda: build_supervisor(ns, outbox, loop, reapers, roots),
                          preload=lambda: preload(ns.nics))
    server = Server(lazy, outbox, orphan_grace=ns.orphan_grace if getattr(ns, "tcp", None) else None,
                    nics=ns.nics, repo=repo, tls_spki=ns.tls_spki)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    listener: asyncio.AbstractServer | None = None
    path = None
    tcp = getattr(ns, "tcp", None)
    if tcp is not None:
        from . import tls

        async def serve_tls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            identity = tls.peer_identity(writer.get_extra_info("ssl_object"))
            _log().info("client %s connected (identity %s)", writer.get_extra_info("peername"), identity)
            await server.serve(reader, writer, identity)

        listener = await asyncio.start_server(serve_tls, tcp[0], tcp[1], ssl=ns.tls,
                                              ssl_handshake_timeout=tls.HANDSHAKE_TIMEOUT,
                                              reuse_address=True)
        _log().info("listening on %s (TLS 1.3, client certificates of %s)", ns.listen, ns.tls_dir or ns.tls_ca_pin)
        if ns.ready_fd is not None:  # a supervisor waits for the listening socket
            os.write(ns.ready_fd, b"ready\n")
            os.close(ns.ready_fd)
    elif ns.listen:
        path = ns.listen[len("unix:") :]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        old = os.umask(0o177)
        try:
            listener = await asyncio.start_unix_server(server.serve, path=path)
        finally:
            os.umask(old)
        _log().info("listening on %s", path)

    async def serve_fd() -> None:
        greeted = first if isinstance(first, hello.Greeted) else None
        rest = first.rest if isinstance(first, hello.Greeted) else first.raw if first is not None else b""
        reader, writer = await _fd_streams(ns.fd, rest)
        await server.serve(reader, writer, greeted=greeted)
        if listener is None:
            if not server.container_count():
                stop.set()
            else:
                _log().warning("connection on fd %d closed with %d containers left", ns.fd, server.container_count())

    fd_task = asyncio.ensure_future(serve_fd()) if ns.fd is not None else None
    while True:
        waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(server.stopped.wait())]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()
        if tcp is None or stop.is_set():
            break
        server.stopped.clear()  # a TCP agent outlives its clients' sessions
        _log().info("client session ended by shutdown; waiting for the next client")
    if listener is not None:
        listener.close()
        if path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    if fd_task is not None:
        fd_task.cancel()
        with contextlib.suppress(BaseException):
            await fd_task
    for reaper in reapers:
        reaper.stop()
    _log().info("agent exiting (%d containers left)", server.container_count())
    return 0


def main(argv: list[str] | None = None) -> int:
    from ..linux.stdio import ensure_stdio_open

    ns = parse_args(argv)
    ensure_stdio_open()
    first = None
    if ns.fd is not None and ns.listen is None and ns.repo is None:
        # ready first: the shim waits for this answer only (module docstring)
        first = hello.answer_first(ns.fd, hello.features(ns.nics, False, ns.nics and hello.attest_available()))
    import asyncio
    import logging

    handler: logging.Handler = logging.FileHandler(ns.log) if ns.log else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if ns.debug else logging.INFO)
    return asyncio.run(amain(ns, first))


if __name__ == "__main__":
    sys.exit(main())
