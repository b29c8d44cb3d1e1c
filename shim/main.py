"""containerd-shim-fractal-v1: entry point.

containerd runs the binary in three ways (runtime v2, reference A):

* ``-namespace NS -address ADDR -publish-binary P -id ID [-debug] start``: start (or find) the
  shim daemon of the container's group and print its ttrpc address;
* ``... -id ID -bundle B delete``: clean up after a dead shim and print a DeleteResponse;
* ``-info`` (containerd 2.x; a flag, not a verb): print the shim's RuntimeInfo
  (:mod:`shim.info`);
* (internal) the daemon itself is ``python -m shim.daemon ...``.

Arguments follow Go's ``flag`` package (:mod:`shim.args`).

Only ``os``, ``sys`` and :mod:`shim.args` are imported here: containerd gives ``delete`` 5 s
and every ``ctr run`` waits for ``start`` and (through its clean-up of the closed shim connection) for
``delete``, so start-up time matters.  Both verbs end with ``os._exit`` once their output is
flushed (:func:`exit_now`): interpreter finalisation would only add time.

The binary writes byte code even under ``PYTHONDONTWRITEBYTECODE`` (:func:`keep_byte_code`).
"""

from __future__ import annotations

import os
import sys

from shim.args import UsageError, parse_args


def exit_now(code: int) -> None:
    """Flush stdout/stderr and leave without interpreter finalisation."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def keep_byte_code() -> None:
    """Let this process write the ``__pycache__`` files of the modules it compiles, whatever
    ``PYTHONDONTWRITEBYTECODE`` says.

    Why: containerd passes its environment on to the shim, and a containerd started from a
    developer's shell (or a service that sets the variable) carries ``PYTHONDONTWRITEBYTECODE=1``.
    With an editable install (no byte code shipped) every ``start`` then compiled the daemon's
    ~150 modules -- protobuf stubs, the agent, the Task service -- from source again: +~55 ms of
    every sandbox start here, and ~30 % of ``ctr run --rm`` (docs/performance.md, issue 13).  A
    packaged install has its byte code already and is unaffected; where the tree is read-only
    Python skips the write silently.  Only the console script does this (not ``main(argv)``
    from tests)."""
    sys.dont_write_bytecode = False


def main(argv: list[str] | None = None, *, fast_exit: bool | None = None) -> int:
    """Run one verb; as the console script (``argv`` None) start/delete end with exit_now."""
    if fast_exit is None:
        fast_exit = argv is None
    if argv is None:
        keep_byte_code()
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
        code, options = None, None
        if os.environ.get("FRACTAL_SHIM_SPAWN", "").strip() in ("", "zygote"):
            from shim import relay  # the fork-server does start's work (no json, socket, ...)

            code = relay.run(opts, argv)
            options = relay.stdin_options
        if code is None:  # no fork-server answered: do it here
            from shim import start

            code = start.run(opts, options)
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
