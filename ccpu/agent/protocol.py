"""Message shapes, error codes and input validation of the agent protocol.

Why here and not spread over the handlers: every request crosses a trust boundary (the shim may
be talking over a network transport), so ids and paths are checked in one place, the same way
for every operation, before anything touches runc or mount(2).
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterable, Mapping, Sequence
TYPE_CHECKING = False  # typing only for checkers: the agent's ready path loads this module
if TYPE_CHECKING:  # LayerStack: imported by resolve_stack, the agent's ready path does not need it
    from typing import Any

    from ..stack import LayerStack

# The error kinds are ccpu/errdefs.py's (the shim raises the same ones); re-exported here under
# the names the agent has always used.  ``AgentError`` is their base class.
from ccpu.errdefs import (  # noqa: F401
    ERRORS,
    AlreadyExists,
    DeadlineExceeded,
    Error as AgentError,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    Unimplemented,
)

PROTOCOL_VERSION = 1

ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


#: errnos that mean "a filesystem is full" (blocks or inodes; EDQUOT: a quota)
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def error_from_wire(error: Any) -> AgentError:
    """The exception for an error object received from the peer (unknown codes -> Internal)."""
    if not isinstance(error, Mapping):
        return Internal(f"malformed error: {error!r}")
    cls = ERRORS.get(str(error.get("code")), Internal)
    return cls(str(error.get("message", "")))


# ---------------------------------------------------------------------------------------------
# message constructors


def request(id_: int, op: str, args: Mapping[str, Any]) -> dict[str, Any]:
    return {"id": id_, "op": op, "args": dict(args)}


def response_ok(id_: int, result: Mapping[str, Any]) -> dict[str, Any]:
    return {"id": id_, "ok": True, "result": dict(result)}


def response_error(id_: int, error: AgentError) -> dict[str, Any]:
    return {"id": id_, "ok": False, "error": error.to_wire()}


def event(name: str, **fields: Any) -> dict[str, Any]:
    return {"event": name, **fields}


# ---------------------------------------------------------------------------------------------
# argument access: one place that turns bad JSON types into InvalidArgument



def _arg(args: Mapping[str, Any], name: str, types: type | tuple[type, ...], default: Any) -> Any:
    value = args.get(name, default)
    if value is _REQUIRED:
        raise InvalidArgument(f"missing argument {name!r}")
    # bool is an int in Python; never accept it where an int is meant, nor the reverse
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise InvalidArgument(f"argument {name!r} must be {_names(types)}, not a boolean")
    if value is not None and not isinstance(value, types):
        raise InvalidArgument(f"argument {name!r} must be {_names(types)}")
    return value


def _names(types: type | tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))


_REQUIRED: Any = object()


def arg_str(args: Mapping[str, Any], name: str, default: Any = _REQUIRED) -> str:
    return _arg(args, name, str, default)  # type: ignore[no-any-return]


def arg_int(args: Mapping[str, Any], name: str, default: Any = _REQUIRED) -> int:
    return _arg(args, name, int, default)  # type: ignore[no-any-return]


def arg_bool(args: Mapping[str, Any], name: str, default: Any = _REQUIRED) -> bool:
    return _arg(args, name, bool, default)  # type: ignore[no-any-return]


def arg_dict(args: Mapping[str, Any], name: str, default: Any = _REQUIRED) -> dict[str, Any]:
    return _arg(args, name, dict, default)  # type: ignore[no-any-return]


def arg_list(args: Mapping[str, Any], name: str, default: Any = _REQUIRED) -> list[Any]:
    return _arg(args, name, list, default)  # type: ignore[no-any-return]


def arg_channel(args: Mapping[str, Any], name: str) -> int:
    """A stdio channel number: 0 (not connected) or a positive uint32."""
    ch = arg_int(args, name, 0) or 0
    if not 0 <= ch <= 0xFFFFFFFF:
        raise InvalidArgument(f"channel {name!r} out of range: {ch}")
    return ch


# ---------------------------------------------------------------------------------------------
# ids and paths


def validate_id(value: Any, what: str = "id") -> str:
    """Container and exec ids end up in file names and runc's state dir: allow only safe ones."""
    if not isinstance(value, str) or not ID_RE.fullmatch(value):
        raise InvalidArgument(f"invalid {what} {value!r}: must match {ID_RE.pattern}")
    return value


def resolve_inside(path: Any, roots: Sequence[str], what: str = "path") -> str:
    """`path` with symlinks resolved, refused unless it lies strictly below one of `roots`.

    Why realpath on both sides: a root given through a symlink (e.g. /var/run -> /run) must still
    match, and a path that reaches outside through a symlink or `..` must not.  Only absolute
    paths are accepted: the agent's cwd means nothing to the client.
    """
    if not isinstance(path, str) or not path:
        raise InvalidArgument(f"{what} must be a non-empty string")
    if "\0" in path:
        raise InvalidArgument(f"{what} contains a NUL byte")
    if not os.path.isabs(path):
        raise InvalidArgument(f"{what} {path!r} is not absolute")
    real = os.path.realpath(path)
    for root in roots:
        real_root = os.path.realpath(root)
        if real != real_root and os.path.commonpath([real, real_root]) == real_root:
            return real
    raise InvalidArgument(f"{what} {path!r} is outside the agent's roots")


def resolve_all(paths: Iterable[Any], roots: Sequence[str], what: str) -> list[str]:
    return [resolve_inside(p, roots, what) for p in paths]


def resolve_stack(value: Any, roots: Sequence[str]) -> LayerStack:
    """The ONE check of a layer stack the agent is handed (a ``rootfs`` of kind ``layers``):
    well formed, every path absolute and resolved inside ``roots``.  create mounts, and restack
    later changes, only the stack this returns (ccpu/agent/live.py keeps it)."""
    from ..stack import LayerStack, StackError

    try:
        given = value if isinstance(value, LayerStack) else LayerStack.from_wire(value)
    except StackError as e:
        raise InvalidArgument(str(e)) from None
    return given.map(lambda path, role: resolve_inside(path, roots, f"{role} dir"))
