"""The one place where the shim chooses a ttrpc status code.

Everything in the shim -- the Task and Layers services, their state (shim/state.py), the
sandboxes (shim/sandbox.py and its implementations) -- raises :mod:`ccpu.errdefs` errors, the
same kinds the agent answers with (the agent client raises the class its answer names).  The
daemon wraps every handler it serves with :func:`at_edge` (shim/daemon.py), which turns them
into ttrpc statuses here, once, as ``snapshotter/errors.py`` does for the snapshotter's gRPC.

containerd turns the codes back into its own errdefs (``ctr`` prints "not found", CRI retries on
Unavailable, ...), so the mapping is 1:1 by kind.  An exception of no known kind is a bug: it is
logged with its traceback and answered UNKNOWN, as containerd's errdefs does for what it does not
know.  Messages are clipped: an agent's text is untrusted, and containerd logs it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from ccpu import errdefs
from ccpu.ttrpc import Code, RequestContext, TtrpcError

log = logging.getLogger("shim.errors")

#: errdefs kind (code name) -> ttrpc code
CODES: dict[str, Code] = {
    errdefs.InvalidArgument.code: Code.INVALID_ARGUMENT,
    errdefs.NotFound.code: Code.NOT_FOUND,
    errdefs.AlreadyExists.code: Code.ALREADY_EXISTS,
    errdefs.FailedPrecondition.code: Code.FAILED_PRECONDITION,
    errdefs.Unimplemented.code: Code.UNIMPLEMENTED,
    errdefs.Unavailable.code: Code.UNAVAILABLE,
    errdefs.DeadlineExceeded.code: Code.DEADLINE_EXCEEDED,
    errdefs.ResourceExhausted.code: Code.RESOURCE_EXHAUSTED,
    errdefs.Internal.code: Code.INTERNAL,
}

#: longest error message passed on (an agent's is untrusted; containerd logs these)
MAX_MESSAGE = 4096

Handler = Callable[[Any, RequestContext], Awaitable[Any]]
MethodTable = dict[str, tuple[type, Handler]]


def clip(message: str) -> str:
    if len(message) > MAX_MESSAGE:
        return f"{message[:MAX_MESSAGE]}...({len(message)} chars)"
    return message


def to_ttrpc(exc: BaseException) -> TtrpcError:
    """The ttrpc status containerd gets for ``exc``."""
    if isinstance(exc, TtrpcError):  # already a status (ccpu.ttrpc's own)
        return exc
    if isinstance(exc, errdefs.Error):
        message = exc.message
        if isinstance(exc, errdefs.InvalidArgument) and OUTSIDE_ROOTS in message:
            message = f"{clip(message)} ({root_hint()})"
        return TtrpcError(CODES.get(exc.code, Code.UNKNOWN), clip(message))
    return TtrpcError(Code.UNKNOWN, clip(str(exc) or type(exc).__name__))


#: how the agent words a path outside its roots (ccpu/agent/protocol.py resolve_inside)
OUTSIDE_ROOTS = "is outside the agent's roots"


def root_hint() -> str:
    """Where the shim's repo root came from and how to set it: the usual cause of a layer path
    outside the agent's roots is a snapshotter whose --root is not the shim's root."""
    from shim.config import repo_root

    return repo_root().hint()


def at_edge(methods: MethodTable) -> MethodTable:
    """``methods`` (a service's handler table) answering every error as :func:`to_ttrpc` says."""
    return {name: (request_type, _mapped(fn)) for name, (request_type, fn) in methods.items()}


def _mapped(fn: Handler) -> Handler:
    @functools.wraps(fn)
    async def handler(request: Any, ctx: RequestContext) -> Any:
        try:
            return await fn(request, ctx)
        except (errdefs.Error, TtrpcError) as exc:
            raise to_ttrpc(exc) from None
        except Exception as exc:
            log.exception("%s failed", getattr(fn, "__name__", "handler"))
            raise to_ttrpc(exc) from None

    return handler


def config_error(exc: Exception, prefix: str = "") -> errdefs.Error:
    """A sandbox config error for containerd: InvalidArgument when a Kubernetes pod asked for
    what the operator does not allow (shim.config.AnnotationDenied), else FailedPrecondition
    (a bad value or file: the sandbox cannot start as configured).

    Why not PermissionDenied: containerd 1.6's errdefs has no such error and shows it as
    "unknown" (seen through CRI); InvalidArgument reads "invalid argument" on 1.6 and 2.x."""
    from shim.config import AnnotationDenied

    kind = errdefs.InvalidArgument if isinstance(exc, AnnotationDenied) else errdefs.FailedPrecondition
    return kind(f"{prefix}{exc}")
