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


class BadTarget(ValueError):
    """A ``layers rm`` target that names no layer, or more than one (``ambiguous``)."""

    def __init__(self, message: str, ambiguous: bool = False) -> None:
        super().__init__(message)
        self.ambiguous = ambiguous


_HEX = frozenset("0123456789abcdef")


def _hex(text: str, least: int) -> bool:
    return least <= len(text) <= 64 and not set(text) - _HEX


def resolve_targets(targets: list[str], layers: list[dict[str, object]]) -> tuple[list[str], list[str]]:
    """What ``fractal layers rm`` removes: (layer dirs, image names) for ``targets`` on a stack
    whose ``layers`` are named (dicts with dir, live, chain_id, image).  A target is a unique
    prefix of a layer's chain ID (>= 4 hex digits, ``sha256:`` optional; any layer of the
    stack) or the image of layers added live.  Both ends use this one rule: the shim's
    RemoveTargets, and the CLI against an older shim."""
    dirs: list[str] = []
    images: list[str] = []
    for t in targets:
        hexpart = t.removeprefix("sha256:")
        matches = []
        if _hex(hexpart, 4):
            matches = [la for la in layers if short(str(la.get("chain_id") or ""), 64).startswith(hexpart)]
        if len(matches) > 1:
            raise BadTarget(f"{t} matches {len(matches)} layers; give more of the digest", ambiguous=True)
        if matches:
            d = str(matches[0]["dir"])
            if d not in dirs:
                dirs.append(d)
            continue
        if any(la.get("live") and la.get("image") == t for la in layers):
            if t not in images:
                images.append(t)
            continue
        if t.startswith("sha256:") or _hex(t, 12):
            raise BadTarget(f"no layer {t} in its stack")
        raise BadTarget(f"no layers of image {t} were added to it (name a layer digest from "
                        "`fractal layers ls` to remove one of its image's layers)")
    return dirs, images


def needs_chain_ids(targets: list[str]) -> bool:
    """Whether any target could be a chain ID prefix (then every layer must be named first)."""
    return any(_hex(t.removeprefix("sha256:"), 4) for t in targets)
