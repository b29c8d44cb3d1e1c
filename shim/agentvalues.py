"""What the shim accepts from the agent: integers in range, ids of bounded size, typed events.

Why a module of its own: in VM mode the agent is the guest, and guest root can speak the agent
protocol, so every number and string it sends is untrusted input.  Unchecked, a value that does
not fit containerd's protobuf fields (``exit_status: 2**40``) would be stored and make every
later State/Wait of that process fail; a huge id would be copied into every log record.  Here
each value is checked once, where it enters, and refused with a :class:`BadAgentValue` that
names the field; callers turn that into a dropped event (counted) or a failed RPC.  Pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ccpu.agent.protocol import ID_RE

#: Linux's PID_MAX_LIMIT (4M on 64-bit): no pid in any guest is larger
PID_MAX = 1 << 22
#: a wait status as the agent reports it: an exit code, or 128+signal
EXIT_STATUS_MAX = 255
#: the last nanosecond protobuf's Timestamp can hold (9999-12-31T23:59:59.999999999Z)
TIMESTAMP_MAX_NS = 253402300799_999_999_999
#: uint64 fields (sizes, counters)
UINT64_MAX = (1 << 64) - 1


class BadAgentValue(ValueError):
    """The agent sent a value out of its range (or of the wrong type)."""


def _int(value: Any, field: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadAgentValue(f"agent sent {field} of type {type(value).__name__}, want an integer")
    if not lo <= value <= hi:
        shown = str(value) if value.bit_length() < 128 else f"a {value.bit_length()}-bit integer"
        raise BadAgentValue(f"agent sent {field} {shown}, out of range {lo}..{hi}")
    return value


def pid(value: Any, field: str = "pid") -> int:
    """A process id (0: none/unknown)."""
    return _int(value, field, 0, PID_MAX)


def exit_status(value: Any, field: str = "exit_status") -> int:
    return _int(value, field, 0, EXIT_STATUS_MAX)


def timestamp_ns(value: Any, field: str = "exited_at") -> int:
    """Nanoseconds since the epoch (0: not set)."""
    return _int(value, field, 0, TIMESTAMP_MAX_NS)


def uint64(value: Any, field: str) -> int:
    return _int(value, field, 0, UINT64_MAX)


def ident(value: Any, field: str, *, empty: bool = False) -> str:
    """A container or exec id: what the agent protocol allows (bounded, printable)."""
    if empty and value in ("", None):
        return ""
    if not isinstance(value, str) or not ID_RE.fullmatch(value):
        raise BadAgentValue(f"agent sent an invalid {field} ({clip(value)})")
    return value


def clip(value: Any, limit: int = 80) -> str:
    """`value` for an error message or log record: at most about `limit` characters."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} chars)"


@dataclass(frozen=True)
class ExitEvent:
    container: str
    exec_id: str
    pid: int
    exit_status: int
    exited_at: int  # ns; 0 = the agent did not say

    @classmethod
    def parse(cls, event: Mapping[str, Any]) -> ExitEvent:
        return cls(container=ident(event.get("container"), "container id"),
                   exec_id=ident(event.get("exec", ""), "exec id", empty=True),
                   pid=pid(event.get("pid", 0)),
                   exit_status=exit_status(event.get("exit_status")),
                   exited_at=timestamp_ns(event.get("exited_at", 0) or 0))


def result_pid(result: Mapping[str, Any], op: str) -> int:
    """The ``pid`` of a create/start result."""
    return pid(result.get("pid", 0), f"{op} pid")


def result_exit(result: Mapping[str, Any]) -> tuple[int, int]:
    """``exit_status``/``exited_at`` of a delete result (absent: 0)."""
    return (exit_status(result.get("exit_status", 0) or 0, "delete exit_status"),
            timestamp_ns(result.get("exited_at", 0) or 0, "delete exited_at"))
