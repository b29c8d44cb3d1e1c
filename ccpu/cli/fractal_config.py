"""``root = ...`` in fractal's own config file, the one every fractal process reads.

Why install writes it: the snapshotter takes ``root`` from ``/etc/fractal/config.toml`` as the
default of ``--root`` and every shim takes its repo root from the same key (docs/config.md, "The
repo root"), so one line makes them agree by construction; the unit install writes therefore
passes no ``--root``.

Why tomlkit: this file is the operator's (modes, VM sizes, allowed annotations, with their
comments); tomlkit changes the one key and leaves every other byte as it was, which tomllib
(read-only) and a hand-written rewriter could not promise.  Imported only here, only when a
file is actually edited.
"""

from __future__ import annotations

import tomllib

#: shim/config.py's DEFAULT_FILE (a unit test keeps them equal; not imported so that the CLI
#: does not load the shim's config module)
DEFAULT_FRACTAL_CONFIG = "/etc/fractal/config.toml"

HEADER = "# fractal's configuration (docs/config.md); read by fractal-snapshotter and every shim\n"


class FractalConfigError(Exception):
    """The existing file cannot be edited (not TOML, or root is not a plain key)."""


def with_root(text: str | None, root: str) -> str:
    """``text`` (None: no file yet) with top-level ``root = "<root>"``; ``text`` itself if it
    says so already."""
    import tomlkit

    if text is not None:
        try:
            current = tomllib.loads(text).get("root")
        except tomllib.TOMLDecodeError as e:
            raise FractalConfigError(f"not valid TOML ({e}); fix it first") from None
        if current == root:
            return text
        if current is not None and not isinstance(current, str):
            raise FractalConfigError(f"root is {current!r}, not a path; fix it first")
    doc = tomlkit.parse(text if text is not None else HEADER)
    doc["root"] = root
    new = tomlkit.dumps(doc)
    if tomllib.loads(new).get("root") != root:  # never write what the readers would not see
        raise FractalConfigError("could not set root; add root = \"...\" by hand")
    return new
