"""The shim daemon: serves the Task API for one group of containers (started by ``start``).

The warm fork-server forks it (shim/zygote.py, the default), or ``start`` forks it
(``shim.start._fork_daemon`` calls :func:`serve`: the interpreter and the modules ``start``
already imported are reused), or, with ``FRACTAL_SHIM_SPAWN=exec``, executes
``python -m shim.daemon -namespace NS -address ADDR -publish-binary P -id ID -bundle B
-group G -socket PATH -listen-fd N [-debug]``.

* child subreaper with ONE reaper (SIGCHLD -> waitpid(-1)) for every child: runc, the
  containers' processes (the in-process agent's children), or the agent process;
* stderr goes to the first container's ``<bundle>/log`` FIFO, which containerd copies into its
  own log; one logrus-style record per line (:mod:`ccpu.logfmt`, docs/logging.md) with the
  namespace, sandbox (group), pid and -- while a request is handled -- the container id;
* SIGPIPE ignored; SIGTERM/SIGINT shut down (containers are left running; containerd will
  clean up with ``delete``);
* exits after Shutdown when no containers are left (Shutdown is a no-op before that).
"""

from __future__ import annotations

import sys


def skip_ssl() -> None:
    """Make ``import ssl`` fail in the daemon (asyncio then runs without TLS support).

    Why: asyncio imports ssl (and with it OpenSSL) only to offer TLS, which the daemon never
    uses (unix sockets only); that import is ~10 ms of every sandbox start, on the critical path
    of ``ctr run``.  Called only in the daemon's own process, before asyncio is imported.
    ``FRACTAL_SHIM_SSL=1`` keeps ssl importable."""
    import os

    if "ssl" not in sys.modules and os.environ.get("FRACTAL_SHIM_SSL", "") != "1":
        sys.modules["ssl"] = None  # type: ignore[assignment]


if __name__ == "__main__":
    skip_ssl()

import asyncio  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402

from shim.args import UsageError, parse_args  # noqa: E402

DAEMON_FLAGS: dict[str, bool] = {
    "namespace": False, "address": False, "publish-binary": False, "id": False,
    "bundle": False, "group": False, "socket": False, "listen-fd": False, "debug": True,
}

log = logging.getLogger("shim")


def _setup_logging(bundle: str, namespace: str, group: str, debug: bool) -> None:
    """stderr -> the ``<bundle>/log`` FIFO containerd copies into its own log, one
    :mod:`ccpu.logfmt` record per line (logrus text, like containerd's and its runc shim's):
    ``namespace``/``sandbox`` on every record, ``container``/``exec`` while a request about
    one is handled.  ``-debug`` (containerd passes it when it runs at debug level) -> DEBUG."""
    from ccpu import logfmt

    try:
        fd = os.open(os.path.join(bundle, "log"), os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        os.set_blocking(fd, True)
        os.dup2(fd, 2)
        os.close(fd)
    except OSError:
        pass  # no log FIFO (tests, or containerd gone): stderr stays /dev/null
    logging.raiseExceptions = False  # a broken log pipe must never break the shim
    logfmt.setup(open(2, "w", buffering=1, closefd=False, errors="replace"), debug=debug,
                 defaults={"namespace": namespace, "sandbox": group},
                 trailing={"runtime": logfmt.RUNTIME, "pid": os.getpid()})


def layer_roots(repo_root: str, bundle: str) -> list[str]:
    """Dirs the agent may mount layers from: the fractal repo, and containerd's root (where
    its own snapshotters, e.g. overlayfs, keep theirs).  containerd's root is found through the
    bundle's ``work`` link (<root>/io.containerd.runtime.v2.task/<ns>/<id>)."""
    roots = [repo_root]
    try:
        work = os.path.realpath(os.path.join(bundle, "work"))
        if os.path.basename(os.path.dirname(os.path.dirname(work))) == \
                "io.containerd.runtime.v2.task":
            roots.append(os.path.dirname(os.path.dirname(os.path.dirname(work))))
    except OSError:
        pass
    return roots


class Daemon:
    def __init__(self, opts) -> None:  # noqa: ANN001
        self.opts = opts
        self.namespace = opts.namespace
        self.group = opts.group or opts.id
        self.stop_event = asyncio.Event()
        self.exit_requested = False
        self.socket_id: tuple[int, int] | None = None  # (dev, ino) of our socket file, once serving
        self._record_dirty = False  # the sandbox record is to be rewritten (write_record)
        self._record_closed = False
        self._record_writer: asyncio.Task[None] | None = None

    async def run(self) -> int:
        from ccpu.linux.reaper import Reaper
        from ccpu.ttrpc import Server
        from shim import address as addr
        import functools

        from shim.events import Publisher
        from shim import config as shim_config
        from shim.errors import at_edge, config_error
        from shim.sandbox import FailedSandbox, Sandbox
        from shim.sandboxkind import for_config
        from shim.task import SERVICE, TaskService

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._signalled, sig)
        self.reaper = Reaper()
        self.reaper.start(loop, subreaper=True)

        ttrpc_address = os.environ.get("TTRPC_ADDRESS") or (self.opts.address + ".ttrpc")
        self.publisher = Publisher(ttrpc_address)
        repo_root = shim_config.repo_root().path  # $FRACTAL_ROOT, else root in the config file
        bundle_root = os.path.dirname(os.path.realpath(self.opts.bundle))
        admit = None
        self.sandbox: Sandbox
        try:  # the first container decides the sandbox's mode (docs/config.md)
            cfg = shim_config.load(addr.read_annotations(self.opts.bundle))
            admit = functools.partial(shim_config.check_annotations, cfg)  # every later container
            log.info("sandbox config: %s", cfg.describe())
            self.sandbox = for_config(
                cfg, reaper=self.reaper, namespace=self.namespace, group=self.group,
                repo_root=repo_root, run_dir=addr.run_dir(), runc_root=addr.runc_root(self.namespace),
                bundle_root=bundle_root, layer_roots=layer_roots(repo_root, self.opts.bundle),
                first_bundle=self.opts.bundle, containerd_address=self.opts.address)
        except shim_config.ConfigError as exc:
            log.error("sandbox config: %s", exc)
            self.sandbox = FailedSandbox(config_error(exc, "fractal config: "))
        self.service = TaskService(
            self.sandbox, self.publisher.publish, self.namespace, repo_root=repo_root,
            request_exit=self.request_exit, on_change=self.write_record, admit=admit)
        self.sandbox.on_event = self.service.on_agent_event
        self.sandbox.on_lost = self.service.on_agent_lost

        from ccpu.logfmt import with_request_fields  # records carry the request's container id

        # every handler answers errors through shim/errors.py: the one errdefs -> ttrpc mapping
        self.server = Server()
        from shim import promexport  # Prometheus metrics over this ttrpc socket (docs/metrics.md)
        promexport.install(self)
        self.server.register(SERVICE, with_request_fields(at_edge(self.service.methods())))
        from shim.layers import SERVICE as LAYERS_SERVICE, LayersService  # live layers (fractal CLI)

        self.server.register(LAYERS_SERVICE, with_request_fields(at_edge(
            LayersService(self.service, self.sandbox, repo_root,
                          (self.opts.address, self.namespace)).methods())))
        try:
            st = os.stat(self.opts.socket)
            self.socket_id = (st.st_dev, st.st_ino)
        except OSError:
            self.socket_id = None
        listen_fd = int(self.opts.listen_fd)
        os.set_inheritable(listen_fd, False)  # never into runc or a container
        await self.server.serve_fd(listen_fd)
        log.info("serving %s for group %s (first container %s, agent %s)", self.opts.socket,
                 self.group, self.opts.id, self.sandbox.agent_mode)
        starting = loop.create_task(self._start_sandbox())
        await self.stop_event.wait()
        await self.shutdown(starting)
        return 0

    async def _start_sandbox(self) -> None:
        try:
            await self.sandbox.start()
            self.write_record()
        except Exception:  # noqa: BLE001 - Create will report it
            log.exception("sandbox start failed")

    def _record(self):  # noqa: ANN202
        from ccpu import sandboxes

        return sandboxes.SandboxRecord(
            group=self.group, namespace=self.namespace, mode=self.sandbox.mode,
            shim_pid=os.getpid(), agent_pid=self.sandbox.pid,
            vm=self.sandbox.describe().get("vm"),
            containers=sorted(self.service.tasks.containers),
            address="unix://" + self.opts.socket)

    def write_record(self) -> None:
        """Have the sandbox record (for ``fractal ps``) rewritten, off the RPC's path.

        Why not here and now: Create and Delete call this before they answer, and the record's
        write-and-rename over the old one cost 2-5 ms of each answer where the run dir is on
        a disk (ext4 flushes a file renamed over another: measured, docs/performance.md).  So
        a writer task takes a snapshot of the state on the loop and writes it in a thread;
        requests made meanwhile are coalesced (the latest state wins), :meth:`shutdown` waits
        for the writer before it removes the record."""
        self._record_dirty = True
        if self._record_writer is not None and not self._record_writer.done():
            return
        try:
            self._record_writer = asyncio.get_running_loop().create_task(self._write_records())
        except RuntimeError:  # no loop running (never in the daemon): write it now
            self._write_record_now()

    async def _write_records(self) -> None:
        from ccpu import sandboxes

        while self._record_dirty and not self._record_closed:
            self._record_dirty = False
            try:
                await asyncio.to_thread(sandboxes.write, self._record())
            except Exception as exc:  # noqa: BLE001 - informational only
                log.debug("sandbox record: %s", exc)

    def _write_record_now(self) -> None:
        try:
            from ccpu import sandboxes

            sandboxes.write(self._record())
        except Exception as exc:  # noqa: BLE001 - informational only
            log.debug("sandbox record: %s", exc)

    async def _close_records(self) -> None:
        """No record writes from now on, and none in flight (then the record can go)."""
        self._record_closed = True
        if self._record_writer is not None:
            await asyncio.wait({self._record_writer})

    def _remove_socket(self) -> None:
        """Remove our socket file, unless a successor's socket replaced it meanwhile."""
        try:
            st = os.stat(self.opts.socket)
            if self.socket_id == (st.st_dev, st.st_ino):
                os.unlink(self.opts.socket)
        except OSError:
            pass

    def request_exit(self) -> None:
        """Shutdown with no containers left (or the sandbox is gone): leave.  The socket file
        goes at once, before Shutdown's answer: containerd runs ``delete`` as soon as it has
        closed our connection, and a ``delete`` that still finds the file connects to tell
        whether we live (a socket import and a round trip on every ``ctr run --rm``); and a
        ``start`` of this group from now on gets a new daemon instead of joining one that is
        leaving."""
        self.exit_requested = True
        self._remove_socket()
        self.stop_event.set()

    def _signalled(self, sig: int) -> None:
        log.info("got %s, shutting down", signal.Signals(sig).name)
        self.stop_event.set()

    async def shutdown(self, starting: asyncio.Task[None]) -> None:
        # containerd's Shutdown after its last task's Delete (and the sandbox up): nothing of the
        # sandbox is needed any more, so it is discarded at once, beside the pause below --
        # containerd's `delete` verb, which `ctr run --rm` waits for, starts as our connection
        # closes and then finds the sandbox gone (Sandbox.discard; shim/vm.py)
        discarding = None
        if self.exit_requested and starting.done() and len(self.service.tasks) == 0:
            discarding = asyncio.ensure_future(self.sandbox.discard())
        # Let the Shutdown answer go out before the listener closes.
        await asyncio.sleep(0.05)
        await self.service.drain_exits()
        if not starting.done():
            starting.cancel()
        try:
            await (discarding if discarding is not None else self.sandbox.stop())
        except Exception:  # noqa: BLE001
            log.exception("sandbox stop failed")
        await self.publisher.close()
        await self.server.shutdown(grace=1.0)
        self._remove_socket()
        await self._close_records()
        try:
            from ccpu import sandboxes

            sandboxes.remove(self.namespace, self.group, owner=os.getpid())  # not a successor's
        except Exception:  # noqa: BLE001
            pass
        self.reaper.stop()
        log.info("shim exiting")


def preload() -> None:
    """Import every module :meth:`Daemon.run` imports, and the sandbox kinds: the fork-server
    (shim/zygote.py) calls it once, so the daemons it forks find them loaded."""
    import functools  # noqa: F401

    from ccpu import logfmt, sandboxes  # noqa: F401
    from ccpu.linux import reaper  # noqa: F401
    from ccpu import ttrpc  # noqa: F401
    from shim import (address, config, errors, events, hostsandbox, layers, promexport,  # noqa: F401
                      sandbox, sandboxkind, task)
    try:
        from shim import vm  # noqa: F401  # VM sandboxes
    except Exception:  # noqa: BLE001 - a VM sandbox imports it again and reports
        pass
    # What each daemon imported lazily on its first request (cProfile of a zygote-forked daemon,
    # docs/performance.md): the host-mode agent (~20 modules), the config file's TOML parser
    # and the metrics service's message types.  Imported once here, shared by every fork.
    import base64  # noqa: F401
    import encodings.ascii  # noqa: F401
    import tomllib  # noqa: F401

    from ccpu.agent import diagnose, embed  # noqa: F401
    try:
        from google.protobuf import empty_pb2, wrappers_pb2  # noqa: F401
    except ImportError:  # promexport reports it
        pass
    # `fractal layers add` has the shim do its containerd lookups (shim/layers.py AddImages):
    # grpc and the containerd stubs were ~200 ms of the first call in every new daemon.  Only
    # imported here (no channel, no thread: the zygote stays single-threaded for its forks),
    # and without grpc's fork handlers (see grpc_without_fork_handlers).
    layers.grpc_without_fork_handlers()
    try:
        from ccpu.client import livelayers  # noqa: F401
    except ImportError:  # grpc missing: AddImages reports it when asked
        pass


def daemon_options(opts, *, group: str, bundle: str, socket: str, listen_fd: int):  # noqa: ANN001, ANN201
    """The daemon's options from ``start``'s (what ``daemon_argv`` passes on the command line)."""
    from shim.args import Options

    d = Options()
    for name in ("namespace", "address", "publish_binary", "id", "debug"):
        setattr(d, name, getattr(opts, name))
    d.bundle = bundle
    d.group = group  # type: ignore[attr-defined]
    d.socket = socket
    d.listen_fd = str(listen_fd)  # type: ignore[attr-defined]
    return d


def serve(opts) -> int:  # noqa: ANN001
    """Run the daemon for parsed ``opts`` (every way of starting it ends here)."""
    from shim import procs

    procs.set_comm(procs.DAEMON_COMM)  # the one rule tools find daemons by (shim/procs.py)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    _setup_logging(opts.bundle, opts.namespace, opts.group or opts.id, opts.debug)
    try:
        return asyncio.run(Daemon(opts).run())
    except Exception:
        log.exception("shim daemon failed")
        return 1


def serve_profiled(dopts) -> int:  # noqa: ANN001
    """``daemon.serve`` under cProfile, the stats written to ``$FRACTAL_SHIM_PROFILE/PID.prof``
    at exit: how what a forked daemon still does per sandbox is measured (docs/performance.md)."""
    import cProfile

    from shim.zygoteclient import PROFILE_ENV

    prof = cProfile.Profile()
    prof.enable()
    try:
        return serve(dopts)
    finally:
        prof.disable()
        prof.dump_stats(os.path.join(os.environ[PROFILE_ENV], f"{os.getpid()}.prof"))


def main(argv: list[str] | None = None) -> int:
    try:
        opts = parse_args(sys.argv[1:] if argv is None else argv, DAEMON_FLAGS)
    except UsageError as exc:
        sys.stderr.write(f"fractal shim daemon: {exc}\n")
        return 2
    return serve(opts)


if __name__ == "__main__":
    sys.exit(main())
