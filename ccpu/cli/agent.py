"""`fractal agent serve`: run the fractal agent on a machine for remote mode (docs/remote.md).

A thin front of `python3 -m ccpu.agent --listen tcp:ADDR --tls-dir DIR`, with the machine's
defaults for runc's state and the roots containers may use.  With `--repo DIR` (the default:
/var/lib/fractal-agent) the machine keeps its own layer repo, filled by the layers the shim
streams (feature `layers:pull`), and the containers' bundles and writable layers below it;
`--no-repo` keeps the older placement, where the host's bundle and layer paths must exist on
the machine at the same paths (docs/remote.md).
"""

from __future__ import annotations

import argparse
import os
import sys


def cmd_agent_serve(args: argparse.Namespace) -> int:
    argv = ["--listen", args.listen if args.listen.startswith("tcp:") else f"tcp:{args.listen}",
            "--tls-dir", args.tls_dir, "--runc-root", args.runc_root, "--runc", args.runc]
    if args.repo:
        argv += ["--repo", args.repo]
    for root in args.bundle_root or ([] if args.repo else ["/run/containerd"]):
        argv += ["--bundle-root", root]
    for root in args.layer_root or ([] if args.repo else ["/var/lib/fractal"]):
        argv += ["--layer-root", root]
    if args.debug:
        argv.append("--debug")
    os.execv(sys.executable, [sys.executable, "-m", "ccpu.agent", *argv])
    return 127  # not reached: execv replaced this process or raised


def register(agent: argparse.ArgumentParser) -> None:
    sub = agent.add_subparsers(dest="agent_command", metavar="COMMAND")
    p = sub.add_parser("serve", help="serve the agent protocol on TCP with mutual TLS",
                       description="Run the fractal agent listening on ADDR (HOST:PORT) with TLS 1.3; "
                                   "only clients with a certificate of the CA in --tls-dir are served.")
    p.add_argument("--listen", required=True, metavar="HOST:PORT")
    p.add_argument("--tls-dir", required=True, help="ca.pem, agent.pem, agent.key (`fractal pki init`)")
    p.add_argument("--runc-root", default="/run/fractal-agent/runc", help="runc's state dir")
    p.add_argument("--runc", default="runc", help="runc binary")
    p.add_argument("--bundle-root", action="append", help="bundles must be below this (repeatable; "
                   "default /run/containerd)")
    p.add_argument("--layer-root", action="append", help="layers must be below this (repeatable; "
                   "default /var/lib/fractal)")
    p.add_argument("--repo", default="/var/lib/fractal-agent",
                   help="the machine's own layer repo (layers streamed by the shim; default "
                        "/var/lib/fractal-agent)")
    p.add_argument("--no-repo", dest="repo", action="store_const", const=None,
                   help="no repo of its own: the host's bundle and layer paths must be visible here")
    p.set_defaults(func=cmd_agent_serve)
