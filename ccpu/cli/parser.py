"""`fractal`'s argparse parser: the top level, the global flags and the groups' parsers, each
group's made only when the command line names it.

A module of its own so that importing ``ccpu.cli`` does not import argparse: ``fractal layers
add/rm`` parse their command line without it (ccpu/cli/fastargs.py; issue 13), and every other
command line comes here.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .groups import EXIT_USAGE, GROUPS, Group, version

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import NoReturn


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
