"""A small client of containerd's own API, for the `fractal` CLI.

The CLI addresses containers the way `ctr` does (ccpu/client/address.py).  Only what the CLI
needs is here (containers, tasks, labels, and ``call`` for the sibling clients of images and
snapshots); the full API stays in the generated stubs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import grpc

from ..api.gen.containerd.services.containers.v1 import containers_pb2, containers_pb2_grpc
from ..api.gen.containerd.services.tasks.v1 import tasks_pb2, tasks_pb2_grpc
from ..api.gen.containerd.types.task import task_pb2

FRACTAL_RUNTIME = "io.containerd.fractal.v1"


class ContainerdError(Exception):
    """containerd could not be reached or refused a request; the message says which and why."""


class NotFound(ContainerdError):
    """containerd answered NotFound: the object asked for does not exist (in this namespace)."""


@dataclass(frozen=True, slots=True)
class ContainerRecord:
    id: str
    runtime: str
    image: str
    snapshotter: str
    snapshot_key: str
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TaskRecord:
    id: str
    pid: int
    status: str


class ContainerdClient:
    def __init__(self, address: str, namespace: str, *, timeout: float = 10.0) -> None:
        self.address = address
        self.namespace = namespace
        self.timeout = timeout
        self._channel = grpc.insecure_channel(f"unix:{address}")
        self._md = (("containerd-namespace", namespace),)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "ContainerdClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def channel(self) -> grpc.Channel:
        return self._channel

    def call(self, fn, request):  # type: ignore[no-untyped-def]
        """One unary call of a stub method bound to ``channel``, in this client's namespace;
        gRPC failures become ContainerdError (NotFound for NOT_FOUND)."""
        try:
            return fn(request, metadata=self._md, timeout=self.timeout)
        except grpc.RpcError as e:
            code = e.code()  # type: ignore[attr-defined]
            if code == grpc.StatusCode.NOT_FOUND:
                raise NotFound(f"containerd: not found: {e.details()}") from None  # type: ignore[attr-defined]
            if code == grpc.StatusCode.UNAVAILABLE:
                raise ContainerdError(f"cannot reach containerd at {self.address}: {e.details()}") from None  # type: ignore[attr-defined]
            raise ContainerdError(f"containerd: {code.name.lower()}: {e.details()}") from None  # type: ignore[attr-defined]

    @staticmethod
    def _record(c) -> ContainerRecord:  # type: ignore[no-untyped-def]
        annotations: dict[str, str] = {}
        if c.spec.value:
            try:
                annotations = dict(json.loads(c.spec.value).get("annotations") or {})
            except (ValueError, AttributeError):
                annotations = {}
        return ContainerRecord(c.id, c.runtime.name, c.image, c.snapshotter, c.snapshot_key,
                               dict(c.labels), annotations)

    def containers(self, runtime: str | None = None) -> list[ContainerRecord]:
        stub = containers_pb2_grpc.ContainersStub(self._channel)
        resp = self.call(stub.List, containers_pb2.ListContainersRequest())
        return [self._record(c) for c in resp.containers if runtime is None or c.runtime.name == runtime]

    def container(self, container_id: str) -> ContainerRecord:
        """One container (ContainerdError "... not found" if it does not exist): one Get, not a
        List of every container with each spec parsed (``layers add``/``rm`` ask it each time)."""
        stub = containers_pb2_grpc.ContainersStub(self._channel)
        try:
            resp = self.call(stub.Get, containers_pb2.GetContainerRequest(id=container_id))
        except NotFound:
            raise ContainerdError(f"container {container_id!r} not found in namespace {self.namespace!r}") from None
        return self._record(resp.container)

    def update_container_labels(self, container_id: str, labels: dict[str, str]) -> None:
        """Set labels of a container, leaving the others alone (field mask ``labels.<key>``);
        an empty value removes the label (containerd drops empty labels)."""
        from google.protobuf import field_mask_pb2

        stub = containers_pb2_grpc.ContainersStub(self._channel)
        req = containers_pb2.UpdateContainerRequest(
            container=containers_pb2.Container(id=container_id, labels=labels),
            update_mask=field_mask_pb2.FieldMask(paths=[f"labels.{k}" for k in labels]))
        self.call(stub.Update, req)

    def tasks(self) -> dict[str, TaskRecord]:
        stub = tasks_pb2_grpc.TasksStub(self._channel)
        resp = self.call(stub.List, tasks_pb2.ListTasksRequest())
        return {
            t.id: TaskRecord(t.id, t.pid, task_pb2.Status.Name(t.status).lower())
            for t in resp.tasks
        }
