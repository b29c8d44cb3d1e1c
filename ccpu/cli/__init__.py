"""`fractal`: the command line.  One module per command group; this one is the edge.

Thin by design: parse, call a library, print.  This module owns what every command shares:
the top-level parser (global ``--debug``, ``-a/--address``, ``-n/--namespace`` also before the
command, as ctr takes them; ``--version``), the exit codes (0 done, 1 a failure the user can act
on, 2 a usage error, 130 interrupted) and the one place where expected failures become a single
``fractal: ...`` line on stderr (a traceback only with ``--debug``).

Start-up is kept cheap: a group's module is imported only when the command line names that
group, so ``fractal --help`` and ``fractal ps`` do not load what ``fractal image`` or
``fractal vm`` need; and no command module imports grpc at its top.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # typing, dataclasses and logging cost `fractal --help` ~30 ms of imports
if TYPE_CHECKING:      # here (issue 13): annotations only, logging once a command runs
    from collections.abc import Sequence
    from typing import Any

from .groups import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, GROUPS, Group, setup_logging, version

__all__ = ["EXIT_FAILURE", "EXIT_INTERRUPTED", "EXIT_USAGE", "GROUPS", "Group", "build_parser",
           "expected_failure", "main", "setup_logging", "version"]

#: failures a command expects and reports as one line, as (module, class): looked up only in
#: modules already imported, since a command that never loaded a module cannot have raised its
#: errors (and the edge must not import grpc or SQLite just to name them)
EXPECTED_ERRORS = (
    ("ccpu.client.containerd", "ContainerdError"),
    ("ccpu.cli.layers", "LayersError"),
    ("ccpu.repo.errors", "RepoError"),
    ("ccpu.cli.install", "InstallError"),
    ("ccpu.cli.images", "ImportError_"),
    ("ccpu.vm.run", "VMError"),
    ("ccpu.pki", "PkiError"),
    ("builtins", "OSError"),
)


def build_parser(argv: Sequence[str] | None = None) -> Any:
    """The argparse parser (ccpu/cli/parser.py); only the group ``argv`` names gets its arguments.
    Looked up here by ``main`` so that tests may replace it."""
    from .parser import build_parser as build

    return build(argv)


def __getattr__(name: str) -> Any:
    """``ccpu.cli.Parser`` and the like, from ccpu/cli/parser.py on first use (see its docstring)."""
    if name == "Parser":
        from . import parser

        return getattr(parser, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def expected_failure(exc: BaseException) -> bool:
    for module, name in EXPECTED_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and isinstance(exc, cls):
            return True
    return False


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from .fastargs import parse_layers

    args = parse_layers(argv)  # `layers add|rm` in their plain forms; None: argparse decides
    if args is None:
        ap = build_parser(argv)
        args = ap.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:  # `fractal` or `fractal GROUP` alone: its help, as ctr does
        getattr(args, "parser", ap).print_help()
        return 0
    if args.debug or not getattr(args, "lazy_logging", False):
        setup_logging(args.debug)
    for flag in ("address", "namespace"):  # a global flag fills in what the command's left unset
        if getattr(args, flag, None) is None and hasattr(args, flag):
            setattr(args, flag, getattr(args, f"global_{flag}"))
    try:
        return int(func(args))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - the one edge where failures become a line
        if args.debug or not expected_failure(e):
            raise
        print(f"fractal: {e}", file=sys.stderr)
        return EXIT_FAILURE
