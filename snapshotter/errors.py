"""The one place repo errors become gRPC status codes.

containerd turns these codes back into its errdefs (errdefs/grpc.go), which
is how `ctr` prints "not found", how the unpacker recognises AlreadyExists as
"layer already here", and how GC tolerates FailedPrecondition.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from ccpu.repo import errors as repo_errors

log = logging.getLogger(__name__)

CODES: dict[type[repo_errors.RepoError], grpc.StatusCode] = {
    repo_errors.NotFound: grpc.StatusCode.NOT_FOUND,
    repo_errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    repo_errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    repo_errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
}


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    for cls in type(exc).__mro__:
        code = CODES.get(cls)  # type: ignore[arg-type]
        if code is not None:
            return code, str(exc)
    return grpc.StatusCode.UNKNOWN, f"{type(exc).__name__}: {exc}"


T = TypeVar("T")


def unary(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> T:
        try:
            return await fn(self, request, context)
        except repo_errors.RepoError as e:
            code, msg = status_of(e)
            log.debug("%s: %s %s", fn.__name__, code.name, msg)
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
