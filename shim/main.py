"""containerd-shim-fractal-v1: entry point.

containerd runs the binary in three ways (runtime v2, reference A):

* ``-namespace NS -address ADDR -publish-binary P -id ID [-debug] start``: start (or find) the
  shim daemon of the container's group and print its ttrpc address;
* ``... -id ID -bundle B delete``: clean up after a dead shim and print a DeleteResponse;
* ``-info`` (containerd 2.x; a flag, not a verb): print the shim's RuntimeInfo
  (:mod:`shim.info`);
* (internal) the daemon itself is ``python -m shim.daemon ...``.

Arguments follow Go's ``flag`` package: ``-flag value``, ``--flag value``, ``-flag=value``;
boolean flags take no value (``-debug``, or ``-debug=true``).  Flags stop at the first
non-flag argument (the verb) or at ``--``.

Only ``os`` and ``sys`` are imported here: containerd gives ``delete`` 5 s and every
``ctr run`` waits for ``start`` and (through its clean-up of the closed shim connection) for
``delete``, so start-up time matters.  Both verbs end with ``os._exit`` once their output is
flushed (:func:`exit_now`): interpreter finalisation would only add time.
"""

from __future__ import annotations

import os
import sys

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


def exit_now(code: int) -> None:
    """Flush stdout/stderr and leave without interpreter finalisation."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def main(argv: list[str] | None = None, *, fast_exit: bool | None = None) -> int:
    """Run one verb; as the console script (``argv`` None) start/delete end with exit_now."""
    if fast_exit is None:
        fast_exit = argv is None
    argv = sys.argv[1:] if argv is None else argv
    try:
        opts = parse_args(argv)
    except UsageError as exc:
        sys.stderr.write(f"containerd-shim-fractal-v1: {exc}\n")
        return 2
    if opts.v:
        sys.stdout.write("containerd-shim-fractal-v1 (fractal) 0.1.0\n")
        return 0
    if opts.info:  # before any verb, as containerd's shim package does
        from shim import info

        code = info.run(opts)
        if fast_exit:
            exit_now(code)
        return code
    verb = opts.verb
    if verb == "start":
        from shim import start

        code = start.run(opts)
        if fast_exit:
            exit_now(code)
        return code
    if verb == "delete":
        from shim import delete

        code = delete.run(opts)
        if fast_exit:
            exit_now(code)
        return code
    sys.stderr.write(f"containerd-shim-fractal-v1: unknown verb {verb!r} (want start or delete)\n")
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
