"""The one place repo errors become gRPC status codes.

containerd turns these codes back into its errdefs (errdefs/grpc.go), which
is how `ctr` prints "not found", how the unpacker recognises AlreadyExists as
"layer already here", and how GC tolerates FailedPrecondition.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from ccpu.repo import errors as repo_errors
from ccpu.repo.space import is_full_error

log = logging.getLogger(__name__)

class DeadlineExceeded(repo_errors.RepoError):
    """The snapshotter's own bound on an RPC's work ran out (List, snapshotter/service.py)."""


CODES: dict[type[repo_errors.RepoError], grpc.StatusCode] = {
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    repo_errors.NotFound: grpc.StatusCode.NOT_FOUND,
    repo_errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    repo_errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    repo_errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    # containerd passes the message through to ctr (docs/snapshotter.md, "When the disk is full")
    repo_errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    for cls in type(exc).__mro__:
        code = CODES.get(cls)  # type: ignore[arg-type]
        if code is not None:
            return code, str(exc)
    if is_full_error(exc):  # a full disk the repo did not wrap with its context: still not Unknown
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"no space left in the repo: {exc}"
    return grpc.StatusCode.UNKNOWN, f"{type(exc).__name__}: {exc}"


T = TypeVar("T")


def _brief(request: Any) -> str:
    """The request's identifying fields for a log line (never its whole label map)."""
    parts = [f"{f}={getattr(request, f)!r}" for f in ("key", "name", "parent") if getattr(request, f, "")]
    return " ".join(parts)


def unary(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> T:
        t0 = time.perf_counter()
        try:
            result = await fn(self, request, context)
            if log.isEnabledFor(logging.DEBUG):  # --debug: one line per request
                log.debug("%s %s ok in %.2f ms", fn.__name__, _brief(request), (time.perf_counter() - t0) * 1e3)
            return result
        except repo_errors.RepoError as e:
            code, msg = status_of(e)
            level = logging.WARNING if code is grpc.StatusCode.RESOURCE_EXHAUSTED else logging.DEBUG
            log.log(level, "%s %s -> %s: %s", fn.__name__, _brief(request), code.name, msg)
            await context.abort(code, msg)
        except Exception as e:  # unexpected: log with traceback, still answer
            log.exception("%s failed", fn.__name__)
            code, msg = status_of(e)
            await context.abort(code, msg)
        raise AssertionError("unreachable")

    return wrapper


def streaming(fn: Callable[..., AsyncIterator[T]]) -> Callable[..., AsyncIterator[T]]:
    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[T]:
        try:
            async for item in fn(self, request, context):
                yield item
        except repo_errors.RepoError as e:
            await context.abort(*status_of(e))
        except Exception as e:
            log.exception("%s failed", fn.__name__)
            await context.abort(*status_of(e))

    return wrapper
