"""Agent ``stats`` result -> the StatsResponse Any containerd expects."""

from __future__ import annotations

from typing import Any

from google.protobuf import any_pb2

from ccpu.ttrpc import Code, TtrpcError


def to_any(stats: dict[str, Any]) -> any_pb2.Any:
    raise TtrpcError(Code.UNIMPLEMENTED, "task metrics are not supported yet")
