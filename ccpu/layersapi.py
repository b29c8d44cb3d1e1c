"""The ``fractal.layers.v1.Layers`` protocol: the names and values both of its ends agree on.

The shim serves the service (shim/layers.py) and the CLI calls it (ccpu/cli/layers.py); each
used to spell the service name and parse ``position`` on its own, so a change on one side could
silently disagree with the other.  Stdlib only: the shim, the CLI and a guest may import it.
"""

from __future__ import annotations

SERVICE = "fractal.layers.v1.Layers"

#: where added layers go when a request names no position: just below the writable layer
DEFAULT_POSITION = "top"
POSITIONS = ("top", "bottom")


class BadPosition(ValueError):
    """A position that is neither top, bottom nor an index into the stack (0 = top)."""


def parse_position(value: object) -> str | int:
    """``top``, ``bottom`` or a non-negative index (an int, or its decimal digits); None or ""
    mean the default.  Raises BadPosition, which each end maps to its own error."""
    if value is None or value == "":
        return DEFAULT_POSITION
    if isinstance(value, bool):  # a JSON true is an int to Python, not an index to the user
        raise BadPosition(f"position must be top, bottom or an index, not {value!r}")
    if value in POSITIONS:
        return str(value)
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    raise BadPosition(f"position must be top, bottom or an index, not {value!r}")


GC_LABEL_PREFIX = "containerd.io/gc.ref.snapshot."
LIVE_LABEL_MARK = "/live-"


def short(chain_id: str, n: int = 12) -> str:
    return chain_id.split(":", 1)[-1][:n]


def gc_label(snapshotter: str, top_chain_id: str) -> str:
    """The container label that keeps an added image's snapshots (and so its repo layers):
    set by whoever resolves the image (the CLI, or the shim's AddImages)."""
    return f"{GC_LABEL_PREFIX}{snapshotter}{LIVE_LABEL_MARK}{short(top_chain_id, 12)}"
