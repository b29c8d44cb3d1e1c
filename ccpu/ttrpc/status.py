"""Call status: the gRPC status codes ttrpc carries, and the exception that carries them.

Why: ttrpc reuses google.rpc.Status (code, message, details) in every Response, and
containerd maps those numeric gRPC codes to its errdefs (NotFound, AlreadyExists, ...), so
both our server and our client speak in these codes.  One exception type, :class:`TtrpcError`,
crosses the handler boundary on the server and surfaces non-OK answers on the client.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

from google.protobuf import any_pb2
from google.rpc import status_pb2


class Code(enum.IntEnum):
    """The numeric gRPC status codes (google/rpc/code.proto), used unchanged by ttrpc."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


def code_name(code: int) -> str:
    """Readable name of a code, tolerating values outside the known set."""
    try:
        return Code(code).name
    except ValueError:
        return f"CODE({code})"


def make_status(
    code: int, message: str = "", details: Iterable[any_pb2.Any] = ()
) -> status_pb2.Status:
    """Build a google.rpc.Status (what a ttrpc Response carries in field 1)."""
    st = status_pb2.Status(code=int(code), message=message)
    st.details.extend(details)
    return st


class TtrpcError(Exception):
    """A call finished with a non-OK status.

    Raise it from a server handler to answer with that status; the client raises it when the
    peer answered non-OK, and for local failures (connection lost -> UNAVAILABLE, local
    deadline -> DEADLINE_EXCEEDED).
    """

    def __init__(
        self, code: int, message: str = "", details: Iterable[any_pb2.Any] = ()
    ) -> None:
        self.code: int = int(code)
        self.message = message
        self.details: list[any_pb2.Any] = list(details)
        super().__init__(f"ttrpc: {code_name(self.code)}: {message}")

    def to_status(self) -> status_pb2.Status:
        return make_status(self.code, self.message, self.details)

    @classmethod
    def from_status(cls, status: status_pb2.Status) -> TtrpcError:
        return cls(status.code, status.message, status.details)
