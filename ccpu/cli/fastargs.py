"""``fractal layers add|rm`` parsed without argparse, for their plain command lines only.

Why: issue 13 wants the whole ``fractal layers add`` process within 100 ms, and argparse was
~15 ms of it here: its own import with gettext and locale, and four parsers built for one command
line (fractal's, the probe that finds the group, the group's and the verb's; gettext looks up its
catalogue for each).  ``re`` and ``enum`` are not part of the saving: ``json`` imports ``re``.

The rule that keeps one grammar: argparse stays the definition.  This parser accepts only a
command line it can read exactly as argparse would -- the options spelt out in full, each value
in its own argument or after ``--long=``, the positionals in one run -- and returns None for
anything else (help, version, an abbreviation, ``--``, a value that starts with ``-``, a bad
``--position``, a missing argument), which argparse then parses, errors and all.
tests/unit/test_cli_fastargs.py holds the two to the same result over a corpus of command lines.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any

#: options before the group (ccpu/cli/parser.py ``_global_flags``): option -> attribute
GLOBAL_VALUES = {"-a": "global_address", "--address": "global_address",
                 "-n": "global_namespace", "--namespace": "global_namespace"}
GLOBAL_FLAGS = {"--debug": "debug"}

#: each verb's options (ccpu/cli/layers.py ``register``) and the name of its list positional
VERBS: dict[str, tuple[dict[str, str], dict[str, str], str]] = {
    "add": ({"-a": "address", "--address": "address", "-n": "namespace", "--namespace": "namespace",
             "--position": "position"},
            {"--plain-http": "plain_http", "--no-pull": "no_pull", "--json": "json"}, "images"),
    "rm": ({"-a": "address", "--address": "address", "-n": "namespace", "--namespace": "namespace"},
           {"--json": "json"}, "targets"),
}


class Args:
    """What argparse's Namespace would hold (``parser``, which no command uses, is None)."""

    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)

    def __repr__(self) -> str:
        return f"Args({self.__dict__!r})"


def _options(argv: Sequence[str], i: int, values: dict[str, str], flags: dict[str, str],
             out: dict[str, Any]) -> int | None:
    """Read the option at ``argv[i]`` into ``out``; the index after it, or None if argparse
    must decide (not one of ours spelt out, or a value that is missing or looks like an option)."""
    arg = argv[i]
    name, eq, value = arg.partition("=") if arg.startswith("--") else (arg, "", "")
    if name in flags and not eq:
        out[flags[name]] = True
        return i + 1
    if name not in values:
        return None
    if not eq:
        if i + 1 >= len(argv):
            return None
        value = argv[i + 1]
        i += 1
    if value.startswith("-"):
        return None
    out[values[name]] = value
    return i + 1


def parse_layers(argv: Sequence[str], load: Callable[[], Any] | None = None) -> Args | None:
    """``argv`` as argparse would parse it, if it is a plain ``layers add|rm`` command line;
    else None.  ``load`` gives ccpu.cli.layers (the commands), imported only on a match."""
    out: dict[str, Any] = {"debug": False, "global_address": None, "global_namespace": None}
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        nxt = _options(argv, i, GLOBAL_VALUES, GLOBAL_FLAGS, out)
        if nxt is None:
            return None
        i = nxt
    if argv[i:i + 1] != ["layers"] or i + 1 >= len(argv) or argv[i + 1] not in VERBS:
        return None
    verb = argv[i + 1]
    values, flags, many = VERBS[verb]
    out.update({"address": None, "namespace": None, **{a: False for a in flags.values()}})
    if verb == "add":
        out["position"] = "top"
    positionals: list[str] = []
    ended = False  # an option after the positionals: another positional would be argparse's call
    i += 2
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("-"):
            nxt = _options(argv, i, values, flags, out)
            if nxt is None:
                return None
            ended = ended or bool(positionals)
            i = nxt
            continue
        if ended:
            return None
        positionals.append(arg)
        i += 1
    if len(positionals) < 2:
        return None
    if verb == "add":
        from ..layersapi import BadPosition, parse_position

        try:
            out["position"] = parse_position(out["position"])
        except BadPosition:
            return None
    if load is None:
        from . import layers as module
    else:
        module = load()
    out.update(command="layers", parser=None, layers_command=verb, container=positionals[0],
               lazy_logging=True, func=module.cmd_add if verb == "add" else module.cmd_rm)
    out[many] = positionals[1:]
    return Args(**out)
