"""The one mapping of agent error codes to ttrpc status codes (1:1, by name)."""

from __future__ import annotations

from ccpu.ttrpc import Code, TtrpcError

AGENT_CODES: dict[str, Code] = {
    "InvalidArgument": Code.INVALID_ARGUMENT,
    "NotFound": Code.NOT_FOUND,
    "AlreadyExists": Code.ALREADY_EXISTS,
    "FailedPrecondition": Code.FAILED_PRECONDITION,
    "Unimplemented": Code.UNIMPLEMENTED,
    "Unavailable": Code.UNAVAILABLE,
    "DeadlineExceeded": Code.DEADLINE_EXCEEDED,
    "ResourceExhausted": Code.RESOURCE_EXHAUSTED,
    "Internal": Code.INTERNAL,
}


class AgentCallError(Exception):
    """An agent answered a request with an error (``code`` is the protocol's code name)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


#: longest agent error message passed on (the agent is untrusted; containerd logs these)
MAX_MESSAGE = 4096


def to_ttrpc(code: str, message: str) -> TtrpcError:
    """TtrpcError for an agent error (unknown codes -> UNKNOWN, as containerd's errdefs)."""
    if len(message) > MAX_MESSAGE:
        message = f"{message[:MAX_MESSAGE]}...({len(message)} chars)"
    if code == "InvalidArgument" and OUTSIDE_ROOTS in message:
        message = f"{message} ({root_hint()})"
    return TtrpcError(AGENT_CODES.get(code, Code.UNKNOWN), message)


#: how the agent words a path outside its roots (ccpu/agent/protocol.py resolve_inside)
OUTSIDE_ROOTS = "is outside the agent's roots"


def root_hint() -> str:
    """Where the shim's repo root came from and how to set it: the usual cause of a layer path
    outside the agent's roots is a snapshotter whose --root is not the shim's root."""
    from shim.config import repo_root

    return repo_root().hint()


def agent_error_code(exc: BaseException) -> str | None:
    """The agent code name of an exception raised by an agent client, if it carries one."""
    code = getattr(exc, "code", None)
    return code if isinstance(code, str) else None


def not_found(what: str) -> TtrpcError:
    return TtrpcError(Code.NOT_FOUND, f"{what}: not found")


def failed_precondition(msg: str) -> TtrpcError:
    return TtrpcError(Code.FAILED_PRECONDITION, msg)


def already_exists(what: str) -> TtrpcError:
    return TtrpcError(Code.ALREADY_EXISTS, f"{what}: already exists")


def config_error(exc: Exception, prefix: str = "") -> TtrpcError:
    """A sandbox config error for containerd: InvalidArgument when a Kubernetes pod asked for
    what the operator does not allow (shim.config.AnnotationDenied), else FailedPrecondition
    (a bad value or file: the sandbox cannot start as configured).

    Why not PermissionDenied: containerd 1.6's errdefs has no such error and shows it as
    "unknown" (seen through CRI); InvalidArgument reads "invalid argument" on 1.6 and 2.x."""
    from shim.config import AnnotationDenied

    code = Code.INVALID_ARGUMENT if isinstance(exc, AnnotationDenied) else Code.FAILED_PRECONDITION
    return TtrpcError(code, f"{prefix}{exc}")
