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

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class Group:
    """A command group: its name, its one-line help and the module that fills in its parser
    (``register(parser)``).  A plain class, not a dataclass: see the imports."""

    __slots__ = ("name", "module", "help")

    def __init__(self, name: str, module: str, help: str) -> None:  # noqa: A002
        self.name, self.module, self.help = name, module, help

    def __repr__(self) -> str:
        return f"Group({self.name!r}, {self.module!r}, {self.help!r})"


GROUPS = (
    Group("install", "ccpu.cli.install", "wire fractal into containerd (config, systemd unit, shim)"),
    Group("uninstall", "ccpu.cli.uninstall", "undo what `fractal install` did (the user's files restored byte for byte)"),
    Group("doctor", "ccpu.cli.doctor", "check containerd, the snapshotter, the shim, QEMU ... and say what to fix"),
    Group("ps", "ccpu.cli.ps", "fractal sandboxes, their mode, containers and pids"),
    Group("repo", "ccpu.cli.repo", "inspect the layer repo"),
    Group("layers", "ccpu.cli.layers", "add or remove layers of a running container (live layers)"),
    Group("image", "ccpu.cli.images", "import images into containerd, unpacked for fractal"),
    Group("guest", "ccpu.cli.guest", "the VM guest image (kernel + initramfs)"),
    Group("vm", "ccpu.cli.vm", "run things in the fractal VM"),
    Group("boot", "ccpu.cli.boot", "boot an image (or a docker-export tgz) as a whole machine, its own init as PID 1"),
    Group("pki", "ccpu.cli.pki", "certificates for remote mode's mutual TLS (a CA, the host's, agents')"),
    Group("agent", "ccpu.cli.agent", "run the fractal agent on a machine (remote mode, mutual TLS)"),
    Group("metrics", "ccpu.cli.metrics", "Prometheus metrics of the snapshotter and every shim"),
    Group("collect", "ccpu.cli.collect", "write a bug-report bundle (versions, configs, doctor, logs; secrets redacted)"),
)

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


def version() -> str:
    """The installed distribution's version; in a source tree without one, its pyproject's."""
    from importlib import metadata

    try:
        return metadata.version("fractal")
    except metadata.PackageNotFoundError:
        pass
    import tomllib
    from pathlib import Path

    try:
        with open(Path(__file__).resolve().parents[2] / "pyproject.toml", "rb") as f:
            return str(tomllib.load(f)["project"]["version"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "unknown"


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


def setup_logging(debug: bool) -> None:
    """Log records to stderr (debug ones with ``--debug``).  Done before every command except
    those that set ``lazy_logging`` (``fractal layers add``: logging is ~5 ms of its imports and
    its fast path logs nothing), which call this where they start to need it."""
    import logging

    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING)


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
