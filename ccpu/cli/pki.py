"""`fractal pki init|agent`: the certificates of remote mode's mutual TLS (ccpu/pki.py).

`init DIR --agent-name ADDR...` makes a CA, the host's (shim's) client certificate and one
agent certificate; `agent DIR --agent-name ADDR... --out DIR2` issues another agent's from the
same CA.  An operator with a CA of their own skips this and writes the same file names
(docs/remote.md).
"""

from __future__ import annotations

import argparse
import os


def cmd_pki_init(args: argparse.Namespace) -> int:
    from .. import pki

    written = pki.init(args.dir, args.agent_name, days=args.days, force=args.force)  # PkiError: one line
    for path in written:
        print(path)
    print("copy ca.pem, agent.pem and agent.key to the machine (its --tls-dir); keep ca.key off it",
          flush=True)
    return 0


def cmd_pki_agent(args: argparse.Namespace) -> int:
    from .. import pki

    ca = pki.load_ca(args.dir)
    issued = pki.issue(ca, "agent", args.agent_name, days=args.days)
    written = pki.write_pair(args.out, "agent", issued, force=args.force)
    ca_copy = os.path.join(args.out, "ca.pem")
    if not os.path.exists(ca_copy):
        with open(ca_copy, "wb") as f:
            f.write(ca.cert_pem)
        written.append(ca_copy)
    for path in written:
        print(path)
    return 0


def register(pki_parser: argparse.ArgumentParser) -> None:
    sub = pki_parser.add_subparsers(dest="pki_command", metavar="COMMAND")
    p = sub.add_parser("init", help="a new CA, the host's certificate and an agent's, in DIR",
                       description="Make a private CA (ca.pem, ca.key), the shim's client certificate "
                                   "(host.pem, host.key) and an agent's server certificate (agent.pem, "
                                   "agent.key) for the addresses the shim dials.")
    p.add_argument("dir", help="where to write them (made 0700)")
    p.add_argument("--agent-name", action="append", required=True, metavar="ADDR",
                   help="an IP address or DNS name the shim dials the agent at (repeatable)")
    p.add_argument("--days", type=int, default=825, help="leaf lifetime in days (default %(default)s)")
    p.add_argument("--force", action="store_true", help="replace existing files")
    p.set_defaults(func=cmd_pki_init)
    a = sub.add_parser("agent", help="another agent's certificate from the CA in DIR",
                       description="Issue agent.pem/agent.key for another machine from the CA in DIR, "
                                   "into OUT (with a copy of ca.pem).")
    a.add_argument("dir", help="the directory of `fractal pki init` (ca.pem, ca.key)")
    a.add_argument("--agent-name", action="append", required=True, metavar="ADDR",
                   help="an IP address or DNS name the shim dials the agent at (repeatable)")
    a.add_argument("--out", required=True, help="the machine's TLS dir to write")
    a.add_argument("--days", type=int, default=825, help="leaf lifetime in days (default %(default)s)")
    a.add_argument("--force", action="store_true", help="replace existing files")
    a.set_defaults(func=cmd_pki_agent)
