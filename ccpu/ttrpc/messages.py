"""ttrpc's own envelope messages: Request, Response, KeyValue, StringList (package ``ttrpc``).

Why built from a descriptor here: these types live in containerd/ttrpc's request.proto, not in
containerd's API protos we generate stubs for.  Describing them with descriptor_pb2 keeps the
field numbers visible in one place and avoids a second code generator.  Field numbers and types
follow request.proto (request.pb.go):

    Request  { string service = 1; string method = 2; bytes payload = 3;
               int64 timeout_nano = 4; repeated KeyValue metadata = 5; }
    Response { google.rpc.Status status = 1; bytes payload = 2; }
    StringList { repeated string list = 1; }   (ttrpc >= 1.2; unused by unary calls)
    KeyValue { string key = 1; string value = 2; }

ttrpc's Go code types Response.status with its own copy of status.proto; on the wire that is
the same message as google.rpc.Status, which we use.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.rpc import status_pb2

_FILE_NAME = "github.com/containerd/ttrpc/request.proto"
_F = descriptor_pb2.FieldDescriptorProto


def _field(
    msg: descriptor_pb2.DescriptorProto,
    name: str,
    number: int,
    ftype: int,
    *,
    repeated: bool = False,
    type_name: str = "",
) -> None:
    f = msg.field.add(name=name, number=number, type=ftype)
    f.label = _F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL
    if type_name:
        f.type_name = type_name


def _file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    fd = descriptor_pb2.FileDescriptorProto(name=_FILE_NAME, package="ttrpc", syntax="proto3")
    fd.dependency.append(status_pb2.DESCRIPTOR.name)  # "google/rpc/status.proto"

    req = fd.message_type.add(name="Request")
    _field(req, "service", 1, _F.TYPE_STRING)
    _field(req, "method", 2, _F.TYPE_STRING)
    _field(req, "payload", 3, _F.TYPE_BYTES)
    _field(req, "timeout_nano", 4, _F.TYPE_INT64)
    _field(req, "metadata", 5, _F.TYPE_MESSAGE, repeated=True, type_name=".ttrpc.KeyValue")

    resp = fd.message_type.add(name="Response")
    _field(resp, "status", 1, _F.TYPE_MESSAGE, type_name=".google.rpc.Status")
    _field(resp, "payload", 2, _F.TYPE_BYTES)

    sl = fd.message_type.add(name="StringList")
    _field(sl, "list", 1, _F.TYPE_STRING, repeated=True)

    kv = fd.message_type.add(name="KeyValue")
    _field(kv, "key", 1, _F.TYPE_STRING)
    _field(kv, "value", 2, _F.TYPE_STRING)
    return fd


def _load() -> Any:
    pool = descriptor_pool.Default()
    try:
        return pool.FindFileByName(_FILE_NAME)  # already added (module re-import)
    except KeyError:
        return pool.Add(_file_descriptor())


_FILE = _load()

# The classes are built at runtime, so type checkers see them as Any.
Request: Any = message_factory.GetMessageClass(_FILE.message_types_by_name["Request"])
Response: Any = message_factory.GetMessageClass(_FILE.message_types_by_name["Response"])
StringList: Any = message_factory.GetMessageClass(_FILE.message_types_by_name["StringList"])
KeyValue: Any = message_factory.GetMessageClass(_FILE.message_types_by_name["KeyValue"])

__all__ = ["Request", "Response", "StringList", "KeyValue"]
