"""`fractal-snapshotter`: serve the layer repo to containerd as a proxy snapshotter.

containerd connects to it through
    [proxy_plugins.fractal]
      type = "snapshot"
      address = "/run/fractal/snapshotter.sock"
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from pathlib import Path

import grpc

from ccpu.defaults import DEFAULT_ROOT, DEFAULT_SNAPSHOTTER_ADDRESS as DEFAULT_ADDRESS
from ccpu.repo import Repo, RepoError

from .service import add_to_server

log = logging.getLogger("fractal.snapshotter")


def _claim_socket(path: Path) -> None:
    """Remove a stale socket, but never steal one a live server answers on."""
    path.parent.mkdir(mode=0o711, parents=True, exist_ok=True)
    if not os.path.lexists(path):
        return
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
    except OSError:
        path.unlink(missing_ok=True)
        return
    finally:
        s.close()
    raise RepoError(f"{path} is already served by another process")


def default_metrics_address(address: Path) -> str:
    """The metrics socket beside the gRPC one: ``/run/fractal/snapshotter.sock`` ->
    ``unix:/run/fractal/snapshotter-metrics.sock`` (docs/metrics.md: why a unix socket)."""
    return f"unix:{address.with_name(address.stem + '-metrics.sock')}"


async def serve(root: Path, address: Path, *, ready: asyncio.Event | None = None,
                metrics_address: str | None = None) -> None:
    from ccpu import promhttp

    from .metrics import Metrics, RpcTimer

    metrics_at = promhttp.parse_address(default_metrics_address(address) if metrics_address is None
                                        else metrics_address)
    repo = Repo(root)
    metrics_server = None
    try:
        _claim_socket(address)
        metrics = Metrics(repo)
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 16 << 20)],
                                 interceptors=[RpcTimer(metrics.observe)])
        add_to_server(repo, server)
        server.add_insecure_port(f"unix:{address}")
        await server.start()
        os.chmod(address, 0o600)
        log.info("serving repo %s on %s", root, address)
        if metrics_at is not None:
            metrics_server = await promhttp.serve(metrics_at, metrics.render)
            log.info("metrics on %s", metrics_at)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if ready is not None:
            ready.set()
        await stop.wait()
        log.info("shutting down")
        await server.stop(grace=2)
    finally:
        if metrics_server is not None:
            metrics_server.close()
            if metrics_at is not None and metrics_at.unix is not None:
                metrics_at.unix.unlink(missing_ok=True)
        address.unlink(missing_ok=True)
        repo.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fractal-snapshotter", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=None,
                    help=f"repo directory (default: $FRACTAL_ROOT, else root in $FRACTAL_CONFIG or "
                         f"/etc/fractal/config.toml, else {DEFAULT_ROOT}; the shim reads the same)")
    ap.add_argument("--address", default=os.environ.get("FRACTAL_SNAPSHOTTER_ADDRESS", DEFAULT_ADDRESS),
                    help="unix socket to listen on (default %(default)s)")
    ap.add_argument("--metrics-address", default=os.environ.get("FRACTAL_SNAPSHOTTER_METRICS_ADDRESS"),
                    metavar="ADDR",
                    help="Prometheus metrics: unix:/PATH, HOST:PORT (e.g. 127.0.0.1:9595) or none "
                         "(default: unix:<--address without .sock>-metrics.sock; docs/metrics.md)")
    ap.add_argument("--debug", action="store_true", help="log every request (debug level)")
    ap.add_argument("--log-format", choices=("text", "json"), default="text",
                    help="stderr records: logrus-style key=value text (default) or JSON lines "
                         "(docs/logging.md)")
    args = ap.parse_args(argv)
    if args.root is None:  # the shim finds its root the same way (shim/config.py repo_root)
        from shim.config import ConfigError, repo_root

        try:
            args.root = repo_root(strict=True).path
        except ConfigError as exc:
            print(f"fractal-snapshotter: fractal config: {exc}", file=sys.stderr)
            return 1
    from ccpu import logfmt

    # stderr: journald takes it under systemd.  With --debug our own loggers only go to debug
    # level: grpc's debug output is noise to a user.
    logfmt.setup(sys.stderr, debug=args.debug, fmt=args.log_format,
                 debug_loggers=("fractal", "snapshotter", "ccpu"), trailing={"pid": os.getpid()})
    from ccpu.promhttp import AddressError, parse_address

    try:
        parse_address(args.metrics_address)
    except AddressError as e:
        print(f"fractal-snapshotter: {e}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(Path(args.root), Path(args.address), metrics_address=args.metrics_address))
    except (RepoError, OSError) as e:
        print(f"fractal-snapshotter: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
