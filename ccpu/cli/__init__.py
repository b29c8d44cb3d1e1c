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

import argparse
import importlib
import os
import sys

TYPE_CHECKING = False  # typing, dataclasses and logging cost `fractal --help` ~30 ms of imports
if TYPE_CHECKING:      # here (issue 13): annotations only, logging once a command runs
    from collections.abc import Sequence
    from typing import NoReturn

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


def _columns() -> int:
    """The help's width as argparse computes it (``shutil.get_terminal_size``: ``$COLUMNS``, else
    the terminal's, else 80; minus 2), without importing shutil: argparse imports it for every
    parser it formats, argument checks included, and with its bz2/lzma/zlib that was ~5 ms of
    ``fractal layers add``'s imports (issue 13)."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return (columns or 80) - 2


class _Formatter(argparse.HelpFormatter):
    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        super().__init__(prog, indent_increment, max_help_position, _columns() if width is None else width)


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit 2) instead of the usage block, and a help
    formatter that does not import shutil (:func:`_columns`)."""

    def __init__(self, *args: object, **kw: object) -> None:
        kw.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kw)  # type: ignore[arg-type]

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see '{self.prog} --help')\n")


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


class _Version(argparse.Action):
    """``--version``: computed only when asked (importlib.metadata is not free)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kw: object) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print fractal's version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> NoReturn:
        print(f"fractal {version()}")
        parser.exit(0)


def _global_flags(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    # ctr's global flags, accepted before the command too; a flag after the command wins
    ap.add_argument("-a", "--address", dest="global_address", default=None, metavar="ADDRESS",
                    help="containerd address (env CONTAINERD_ADDRESS, default /run/containerd/containerd.sock)")
    ap.add_argument("-n", "--namespace", dest="global_namespace", default=None, metavar="NAMESPACE",
                    help="containerd namespace (env CONTAINERD_NAMESPACE, default 'default')")


class _Probe(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ValueError(message)


def _selected(argv: Sequence[str]) -> str | None:
    """The group the command line names (global options and their values skipped), or None.
    A probe: no help, no version, no errors of its own (the real parse reports them)."""
    probe = _Probe(add_help=False, formatter_class=_Formatter)
    _global_flags(probe)
    probe.add_argument("command", nargs="?")
    probe.add_argument("rest", nargs=argparse.REMAINDER)
    try:
        ns, _ = probe.parse_known_args(list(argv))
    except ValueError:
        return None
    return ns.command


def build_parser(argv: Sequence[str] | None = None) -> Parser:
    """The whole parser.  Only the group ``argv`` names gets its arguments (imports its module);
    without ``argv`` every group does (for docs and tests)."""
    ap = Parser(prog="fractal", description="fractal: many containers, one VM, one copy of every layer")
    ap.add_argument("-v", "--version", action=_Version)
    _global_flags(ap)
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    want = None if argv is None else _selected(argv)
    if argv is not None:  # only the named group's parser is made now (see _LazyParsers)
        lazy = _LazyParsers(sub)
        sub._name_parser_map = sub.choices = lazy  # type: ignore[assignment]
    for g in GROUPS:
        if argv is None or g.name == want:
            p = sub.add_parser(g.name, help=g.help, description=g.help)
            p.set_defaults(parser=p)
            importlib.import_module(g.module).register(p)
        else:
            lazy.later(g)
    return ap


class _LazyParsers(dict):
    """The subparsers' name -> parser map, a parser made on first use only.

    Why: each argparse parser costs ~2 ms here (gettext looks its messages up on disk for every
    one, and its formatter compiles regexps), and ``fractal --help`` made 13 that nothing but
    the one-line help of the group list needs: ~25 ms of an ~80 ms goal (issue 13).  The help
    list comes from the pseudo-actions registered here; an unnamed group's parser (a usage
    error naming it, a command line the probe could not read) is made as before when asked."""

    def __init__(self, sub: argparse._SubParsersAction) -> None:
        super().__init__()
        self._sub = sub

    def later(self, g: Group) -> None:
        dict.__setitem__(self, g.name, None)
        self._sub._choices_actions.append(self._sub._ChoicesPseudoAction(g.name, (), g.help))

    def __getitem__(self, name: str) -> argparse.ArgumentParser:
        parser = dict.__getitem__(self, name)
        if parser is None:
            g = next(g for g in GROUPS if g.name == name)
            parser = self._sub._parser_class(prog=f"{self._sub._prog_prefix} {name}", description=g.help)
            parser.set_defaults(parser=parser)
            dict.__setitem__(self, name, parser)
        return parser

    def get(self, name, default=None):  # noqa: ANN001, ANN201
        return self[name] if name in self else default


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
