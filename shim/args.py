"""The shim's command line, parsed as Go's ``flag`` package does (containerd's shims are Go).

``-flag value``, ``--flag value``, ``-flag=value``; boolean flags take no value (``-debug``, or
``-debug=true``).  Flags stop at the first non-flag argument (the verb) or at ``--``.

Its own module because both the entry point (:mod:`shim.main`) and the daemon
(:mod:`shim.daemon`, started by :mod:`shim.start`) parse a command line: with the parser in
``shim.main``, main -> start -> daemon -> main was an import cycle.  No imports at all: the
``start`` and ``delete`` verbs are on containerd's critical path.
"""

from __future__ import annotations

#: Flags containerd passes (1.6 and 2.x) -> True if boolean.
FLAGS: dict[str, bool] = {
    "namespace": False,
    "address": False,
    "publish-binary": False,
    "id": False,
    "bundle": False,
    "socket": False,
    "debug": True,
    "v": True,
    "info": True,
}

_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_FALSE = {"0", "f", "F", "FALSE", "false", "False"}


class UsageError(Exception):
    """Bad command line (Go's flag package would print usage and exit 2)."""


class Options:
    """Parsed command line: flag values plus the positional arguments (the verb)."""

    def __init__(self) -> None:
        self.namespace = ""
        self.address = ""
        self.publish_binary = ""
        self.id = ""
        self.bundle = ""
        self.socket = ""
        self.debug = False
        self.v = False
        self.info = False
        self.args: list[str] = []

    @property
    def verb(self) -> str:
        return self.args[0] if self.args else ""

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"Options({self.__dict__!r})"


def parse_args(argv: list[str], flags: dict[str, bool] | None = None) -> Options:
    """Parse Go-flag style arguments (``argv`` without the program name)."""
    flags = FLAGS if flags is None else flags
    opts = Options()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if len(arg) < 2 or arg[0] != "-":
            break
        name = arg[2:] if arg.startswith("--") else arg[1:]
        if not name or name[0] in "-=":
            raise UsageError(f"bad flag syntax: {arg}")
        value: str | None = None
        if "=" in name:
            name, value = name.split("=", 1)
        if name not in flags:
            raise UsageError(f"flag provided but not defined: -{name}")
        attr = name.replace("-", "_")
        if flags[name]:
            if value is None:
                setattr(opts, attr, True)
            elif value in _TRUE:
                setattr(opts, attr, True)
            elif value in _FALSE:
                setattr(opts, attr, False)
            else:
                raise UsageError(f"invalid boolean value {value!r} for -{name}")
        else:
            if value is None:
                i += 1
                if i >= len(argv):
                    raise UsageError(f"flag needs an argument: -{name}")
                value = argv[i]
            setattr(opts, attr, value)
        i += 1
    opts.args = argv[i:]
    return opts
