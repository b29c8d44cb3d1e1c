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

import os
import sys

from . import endpoint, hello

TYPE_CHECKING = False  # typing (re, contextlib, warnings) only for checkers: not on the boot path
if TYPE_CHECKING:
    import argparse
    import asyncio
    import logging
    from typing import Any

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


#: the flags: (flag, type, default, help); type ``bool`` is a switch, ``list`` a repeatable str.
#: One table for both parsers (:func:`parse_args`), so they cannot disagree on a default.
OPTIONS: tuple[tuple[str, type, object, str], ...] = (
    ("--fd", int, None, "serve the connected stream on this fd"),
    ("--listen", str, None, "unix:PATH or tcp:HOST:PORT (with --tls-dir) to accept connections on"),
    ("--tls-dir", str, None, "tcp: the dir with ca.pem, agent.pem, agent.key (`fractal pki init`)"),
    ("--tls-ca-pin", str, None, "tcp, an attested machine (instead of --tls-dir): sha256:HEX of the "
     "only CA whose client certificates are accepted; a TLS key is made at boot and the TPM "
     "quote binds it (docs/hardware.md)"),
    ("--tls-ca-file", str, None, "with --tls-ca-pin: where the CA certificate is read (a file or "
     "a disk holding its PEM; untrusted until its sha256 matches the pin)"),
    ("--tls-boot-dir", str, "/run/fractal/tls", "with --tls-ca-pin: the RAM directory for the boot key"),
    ("--runc-root", str, None, "runc's --root (state dir; required)"),
    ("--runc", str, "runc", "runc binary (default: runc on PATH)"),
    ("--bundle-root", list, None, "bundles must be below this (repeatable)"),
    ("--layer-root", list, None, "layer/mount dirs must be below this (repeatable)"),
    ("--drain-timeout", float, 5.0, "seconds an exited process's output may take to reach EOF (default 5)"),
    ("--cgroup-parent", str, None, "guest: the containers' parent cgroup (below /sys/fs/cgroup)"),
    ("--memory-reserve-mb", int, 64, "guest: MiB of memory containers can never take (default 64)"),
    ("--orphan-grace", float, 30.0, "tcp: seconds a lost client's containers are kept for it to return (default 30)"),
    ("--repo", str, None, "remote machine: its own layer repo, filled by streamed layers (feature "
     "layers:pull); its bundles/ and containers/ hold the containers' bundles and writable layers"),
    ("--max-layer-mb", int, 4096, "--repo: the largest compressed layer accepted, MiB (default 4096)"),
    ("--layer-cache-mb", int, 2048, "--repo: MiB of layers no container uses kept for the next sandbox (default 2048)"),
    ("--ready-fd", int, None, "write 'ready' to this fd once listening (tcp)"),
    ("--nics", bool, False, "guest: serve the `nic` op (configure NICs the host plugs in after boot)"),
    ("--init-done", str, None, "guest: requests other than hello wait until this file exists (the "
     "init's boot steps that run beside the agent: shares, NICs, the remaining modules)"),
    ("--debug", bool, False, ""),
    ("--log", str, None, "log file (default: stderr)"),
)

#: the flags a guest's init passes over a port (ccpu/guest/init.sh): parsed without argparse
FAST_FLAGS = frozenset({"--fd", "--runc-root", "--runc", "--bundle-root", "--layer-root", "--cgroup-parent",
                        "--memory-reserve-mb", "--nics", "--init-done", "--debug", "--log"})


def _dest(flag: str) -> str:
    return flag[2:].replace("-", "_")


def parse_args(argv: list[str] | None = None) -> Any:
    """The agent's arguments (an argparse.Namespace, or the same values as a SimpleNamespace).

    Why two parsers: argparse (with gettext, locale, its formatter) was ~0.1-0.15 s of the guest
    agent's boot under TCG before its first `hello` (docs/vm.md "The agent's imports").  The
    init's own command line (`FAST_FLAGS`, every value in its own word) is parsed by hand;
    anything else -- another flag, a value argparse would read differently, a missing required
    flag, an error to report -- goes to argparse, which gives the same values or the same
    error as it always has (tests/unit/test_agent_args.py checks both agree)."""
    args = sys.argv[1:] if argv is None else list(argv)
    ns = _parse_fast(args)
    return ns if ns is not None else _parse_argparse(args)


def _parse_fast(args: list[str]) -> Any:
    """The values for `args` if every flag is in FAST_FLAGS with a plain value, all required
    flags are there and runc is found; None for argparse to decide otherwise."""
    import types

    kinds = {flag: kind for flag, kind, _, _ in OPTIONS}
    values: dict[str, object] = {_dest(f): ([] if k is list else d) for f, k, d, _ in OPTIONS}
    i = 0
    while i < len(args):
        flag = args[i]
        if flag not in FAST_FLAGS:
            return None
        kind = kinds[flag]
        if kind is bool:
            values[_dest(flag)] = True
            i += 1
            continue
        if i + 1 >= len(args) or args[i + 1].startswith("-"):
            return None
        value = args[i + 1]
        if kind is int:
            if not (value.isascii() and value.isdigit()):
                return None
            values[_dest(flag)] = int(value)
        elif kind is list:
            values[_dest(flag)].append(value)  # type: ignore[union-attr]
        else:
            values[_dest(flag)] = value
        i += 2
    if values["fd"] is None or values["runc_root"] is None or not values["bundle_root"]:
        return None
    runc = which(str(values["runc"]))
    if runc is None:
        return None
    values["runc"] = runc
    values["tls_spki"] = None
    return types.SimpleNamespace(**values)


def _parse_argparse(args: list[str]) -> argparse.Namespace:
    import argparse

    class _Formatter(argparse.HelpFormatter):
        """A fixed width: the default asks ``shutil.get_terminal_size`` (shutil, fnmatch, zlib,
        bz2, lzma)."""

        def __init__(self, prog: str) -> None:
            super().__init__(prog, width=100)

    p = argparse.ArgumentParser(prog="python3 -m ccpu.agent", description="fractal agent",
                                formatter_class=_Formatter)
    for flag, kind, default, help_ in OPTIONS:
        if kind is bool:
            p.add_argument(flag, action="store_true", help=help_ or None)
        elif kind is list:
            p.add_argument(flag, action="append", default=[], help=help_)
        else:
            p.add_argument(flag, type=kind, default=default, help=help_, required=flag == "--runc-root")
    ns = p.parse_args(args)
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


def boot_tls(pin: str, ca_file: str, directory: str) -> tuple[Any, bytes]:
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


def build_supervisor(ns: Any, outbox: Outbox, loop: asyncio.AbstractEventLoop,
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


def local_repo(ns: Any) -> tuple[LocalRepo | None, tuple[list[str], list[str]]]:
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


async def amain(ns: Any, first: hello.Greeted | hello.Unanswered | None = None) -> int:
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
                    nics=ns.nics, repo=repo, tls_spki=ns.tls_spki, init_done=ns.init_done)
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


def milestone(what: str) -> None:
    """A guest boot timeline line on stderr (the console), as the init's: ``fractal-agent: UPTIME
    WHAT`` -- only when the init asked for the timeline (fractal.timeline=1: FRACTAL_TIMELINE=1)."""
    if os.environ.get("FRACTAL_TIMELINE") == "1":
        try:
            with open("/proc/uptime", "rb") as f:
                up = f.read().split()[0].decode()
            os.write(2, f"fractal-agent: {up} {what}\n".encode())
        except OSError:
            pass


def main(argv: list[str] | None = None) -> int:
    milestone("imported")
    from ..linux.stdio import ensure_stdio_open

    ns = parse_args(argv)
    ensure_stdio_open()
    first = None
    if ns.fd is not None and ns.listen is None and ns.repo is None:
        # ready first: the shim waits for this answer only (module docstring)
        first = hello.answer_first(ns.fd, hello.features(ns.nics, False, ns.nics and hello.attest_available()))
        milestone("hello answered")
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
