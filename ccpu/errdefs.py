"""The error kinds of fractal's agent and shim: one vocabulary on both sides of the agent protocol.

Like containerd's ``errdefs`` package: an error says *what kind of failure* it is (not found,
already exists, a precondition not met, ...) and carries a message with its context; each RPC
edge turns the kind into its own status code, once (the agent: the wire's ``code`` name,
ccpu/agent/protocol.py; the shim: a ttrpc code, shim/errors.py).

Why one vocabulary: the agent answers with these names, the agent client raises the class the
name stands for, and the shim raises the very same classes for its own refusals.  An error from
the agent therefore reaches containerd with its kind intact, through no translation table but
the one at the shim's edge; a fake agent in a test raises what the real one does.

Stdlib only: the agent imports it, and it is shipped in the guest (ccpu/guest/initramfs.py).
"""

from __future__ import annotations


class Error(Exception):
    """A failure of a known kind; ``code`` names the kind (the agent protocol's code name).
    Raised as is only for a failure of no more precise kind (its code is ``Internal``)."""

    code = "Internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_wire(self) -> dict[str, str]:
        """The agent protocol's error object (docs/agent-protocol.md)."""
        return {"code": self.code, "message": self.message}


class InvalidArgument(Error):
    """The request itself is wrong (a bad id, path, value, JSON)."""

    code = "InvalidArgument"


class NotFound(Error):
    """What the request names does not exist (a container, a process, a layer)."""

    code = "NotFound"


class AlreadyExists(Error):
    """What the request would create exists already."""

    code = "AlreadyExists"


class FailedPrecondition(Error):
    """The request is fine but the state does not allow it (a running container deleted, a
    container that cannot run in this sandbox, a sandbox that could not be configured)."""

    code = "FailedPrecondition"


class Unimplemented(Error):
    """Not supported here (checkpoint/restore, an unknown operation)."""

    code = "Unimplemented"


class Unavailable(Error):
    """The peer is gone or not reachable (the agent's connection closed, the VM did not boot)."""

    code = "Unavailable"


class DeadlineExceeded(Error):
    """No answer in time (a stuck or overloaded agent)."""

    code = "DeadlineExceeded"


class ResourceExhausted(Error):
    """Out of space (ENOSPC/EDQUOT) or another resource; the message names what is full."""

    code = "ResourceExhausted"


class Internal(Error):
    """A bug, or a peer breaking the protocol (a value out of range)."""

    code = "Internal"


#: every kind by its code name (the agent protocol's ``code``)
ERRORS: dict[str, type[Error]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        Unimplemented,
        Unavailable,
        DeadlineExceeded,
        ResourceExhausted,
        Internal,
    )
}
