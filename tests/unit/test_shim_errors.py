"""shim/errors.py: the one place where an error becomes the ttrpc code containerd sees."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from google.protobuf import empty_pb2

from ccpu import errdefs
from ccpu.ttrpc import Code, RequestContext, TtrpcError
from shim import errors

CTX = RequestContext(service="s", method="m")

EXPECTED = {
    errdefs.InvalidArgument: Code.INVALID_ARGUMENT,
    errdefs.NotFound: Code.NOT_FOUND,
    errdefs.AlreadyExists: Code.ALREADY_EXISTS,
    errdefs.FailedPrecondition: Code.FAILED_PRECONDITION,
    errdefs.Unimplemented: Code.UNIMPLEMENTED,
    errdefs.Unavailable: Code.UNAVAILABLE,
    errdefs.DeadlineExceeded: Code.DEADLINE_EXCEEDED,
    errdefs.ResourceExhausted: Code.RESOURCE_EXHAUSTED,
    errdefs.Internal: Code.INTERNAL,
}


def served(exc: BaseException) -> TtrpcError:
    """What a handler raising ``exc`` answers through the edge."""

    async def handler(req: Any, ctx: RequestContext) -> Any:
        raise exc

    fn = errors.at_edge({"M": (empty_pb2.Empty, handler)})["M"][1]
    with pytest.raises(TtrpcError) as ei:
        asyncio.run(fn(empty_pb2.Empty(), CTX))
    return ei.value


def test_every_kind_has_its_code() -> None:
    assert set(EXPECTED) == set(errdefs.ERRORS.values())  # a new kind needs a code here
    for cls, code in EXPECTED.items():
        err = served(cls("what happened"))
        assert (err.code, err.message) == (code, "what happened"), cls


def test_what_is_of_no_known_kind_is_unknown(caplog) -> None:  # noqa: ANN001
    class Odd(errdefs.Error):
        code = "Odd"

    assert served(Odd("x")).code == Code.UNKNOWN
    err = served(KeyError("c1"))
    assert (err.code, err.message) == (Code.UNKNOWN, "'c1'")
    assert "Traceback" in caplog.text  # a bug: logged with where it happened
    assert served(ValueError()).message == "ValueError"


def test_statuses_pass_and_results_too() -> None:
    assert served(TtrpcError(Code.ABORTED, "as is")).code == Code.ABORTED

    async def ok(req: Any, ctx: RequestContext) -> Any:
        return empty_pb2.Empty()

    table = errors.at_edge({"Ok": (empty_pb2.Empty, ok)})
    assert table["Ok"][0] is empty_pb2.Empty
    assert asyncio.run(table["Ok"][1](empty_pb2.Empty(), CTX)) == empty_pb2.Empty()


def test_long_messages_are_clipped() -> None:
    """An agent's text is untrusted and containerd logs it: at most MAX_MESSAGE characters."""
    text = "x" * (errors.MAX_MESSAGE + 10)
    err = served(errdefs.Internal(text))
    assert err.message == "x" * errors.MAX_MESSAGE + f"...({len(text)} chars)"
    assert served(errdefs.Internal("short")).message == "short"


def test_config_errors() -> None:
    """An annotation the operator does not allow is InvalidArgument (containerd 1.6 has no
    PermissionDenied); any other config error FailedPrecondition."""
    from shim.config import AnnotationDenied, ConfigError

    denied = errors.config_error(AnnotationDenied("io.fractal.mode is not allowed"), "c1: ")
    assert isinstance(denied, errdefs.InvalidArgument) and denied.message == "c1: io.fractal.mode is not allowed"
    bad = errors.config_error(ConfigError("vm.memory: not a size"))
    assert isinstance(bad, errdefs.FailedPrecondition) and served(bad).code == Code.FAILED_PRECONDITION
