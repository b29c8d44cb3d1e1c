"""JSON from a peer with its nesting bounded.  Stdlib only: the agent uses it in the guest.

Why: ``json.loads`` recurses once per nesting level, so ``[[[[...`` a few thousand deep raised
``RecursionError`` -- which no caller caught (they expect ``ValueError`` for bad JSON), so one
control frame from a guest, or an Exec spec, ended the reader instead of one request.  And a
document just under the interpreter's limit would still make every later ``json.dumps`` or
``repr`` of it fail.  Here both are a :class:`TooDeep` (a ``ValueError``) at :data:`MAX_DEPTH`,
far above any real message (an OCI spec nests about 6 deep).  ``NaN``/``Infinity``, which
Python's json accepts but JSON does not (RFC 8259), are refused too: an ``Infinity`` where a
number is expected overflows ``int()`` far from where it was read.
"""

from __future__ import annotations

import json

TYPE_CHECKING = False  # typing only for checkers: the shim's start/delete import this module
if TYPE_CHECKING:
    from typing import Any

MAX_DEPTH = 64


class TooDeep(ValueError):
    """The document nests deeper than allowed."""


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads(data: str | bytes | bytearray, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads`` that raises :class:`TooDeep` (a ``ValueError``) past ``max_depth``, and a
    ``ValueError`` for NaN/Infinity."""
    try:
        value = json.loads(data, parse_constant=_no_constant)
    except RecursionError:
        raise TooDeep(f"JSON nested deeper than {max_depth} levels") from None
    # A document cannot nest deeper than it has brackets: counting them is C-speed, so the
    # walk below runs only for documents that could be too deep.
    opens = data.count("[" if isinstance(data, str) else b"[") + \
        data.count("{" if isinstance(data, str) else b"{")
    if opens > max_depth and depth(value) > max_depth:
        raise TooDeep(f"JSON nested deeper than {max_depth} levels")
    return value


def depth(value: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0), without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        level += 1
        deepest = max(deepest, level)
        stack.extend((child, level) for child in children)
    return deepest
