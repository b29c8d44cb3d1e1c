"""The shim's launcher: the ``containerd-shim-fractal-v1`` that ``fractal install`` writes on
containerd's PATH, a console script that starts Python without ``site``.

Why: containerd executes the shim binary twice per ``ctr run`` (``start``, then ``delete`` after
the shim's exit), and of each such interpreter start ``site`` was most of the cost here: it
reads every ``.pth`` file of site-packages, and some run code (an editable install's finder
imports pathlib/zipfile/tempfile; a CA-bundle hook imports certifi).  ``python3 -S`` skips all
of it (docs/performance.md, issue 13: ~90 -> ~20 ms per start on a quiet machine).

What ``site`` would have contributed is computed once, at install time, by asking the same
interpreter (:func:`site_paths`, with the environment's ``PYTHONPATH`` left out, so a developer's
checkout on ``PYTHONPATH`` is not baked in): its ``sys.path`` after ``site`` (site-packages and
every directory a ``.pth`` file adds) and the directories that hold the ``shim`` and ``ccpu``
packages (an editable install finds them through a meta-path hook rather than a path entry).
The launcher appends those after its own path, so the order is the one ``site`` gives:
``PYTHONPATH`` (still honoured: ``-S`` is not ``-E``) first, then the standard library, then
site-packages, then the project.  Moving or upgrading the Python install needs ``fractal
install`` again, as the console script pip writes would.

Pure rendering (:func:`render`) apart from the one subprocess of :func:`site_paths`.
"""

from __future__ import annotations

import json
import os
import subprocess

#: run by the target interpreter with ``site``: its path, and where fractal's packages live
_PROBE = (
    "import json, os, sys, ccpu, shim\n"
    "roots = [os.path.dirname(os.path.dirname(os.path.abspath(m.__file__))) for m in (shim, ccpu)]\n"
    "print(json.dumps({'path': [p for p in sys.path if p], 'roots': roots}))\n"
)

#: what a shebang line can carry safely: one absolute path without blanks, one flag
_SHEBANG_MAX = 200


class LauncherError(Exception):
    """No launcher can be written for this interpreter (the caller links the console script)."""


def site_paths(python: str, timeout: float = 30.0) -> list[str]:
    """What ``site`` puts on ``python``'s path plus the directories of fractal's packages, in
    order, without duplicates and without ``PYTHONPATH``'s entries."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    try:
        r = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, env=env,
                           cwd="/", timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LauncherError(f"cannot run {python}: {e}") from None
    if r.returncode != 0:
        raise LauncherError(f"{python} cannot import fractal without PYTHONPATH: "
                            f"{(r.stderr.strip().splitlines() or ['?'])[-1]}")
    try:
        data = json.loads(r.stdout)
        paths = [str(p) for p in data["path"]] + [str(p) for p in data["roots"]]
    except (ValueError, KeyError, TypeError) as e:
        raise LauncherError(f"{python} answered {r.stdout[:200]!r}: {e}") from None
    return list(dict.fromkeys(p for p in paths if os.path.isabs(p)))


def render(python: str, paths: list[str], module: str = "shim.main") -> str:
    """The launcher's text: ``python -S`` with ``paths`` appended to ``sys.path``, then
    ``module.main()``."""
    if not os.path.isabs(python) or any(c.isspace() for c in python) or len(python) > _SHEBANG_MAX:
        raise LauncherError(f"{python!r} cannot be named in a shebang line")
    return (f"#!{python} -S\n"
            "# Written by `fractal install` (ccpu/cli/launcher.py): Python without `site` (no .pth\n"
            "# processing), the paths `site` would add computed at install time; rerun\n"
            "# `fractal install` after moving or upgrading this Python.\n"
            "import sys\n"
            f"sys.path += [p for p in {tuple(paths)!r} if p not in sys.path]\n"
            f"from {module} import main\n"
            "sys.exit(main())\n")
