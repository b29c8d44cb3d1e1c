"""The layer repo: every image layer unpacked once, shared by all namespaces and guests."""

from .errors import (
    AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, RepoError, RepoLocked, ResourceExhausted,
)
from .model import Kind, LayerInfo, Mount, SnapshotInfo, Usage
from .store import SNAPSHOT_REF_LABEL, Repo

__all__ = [
    "AlreadyExists", "FailedPrecondition", "InvalidArgument", "NotFound", "RepoError", "RepoLocked", "ResourceExhausted",
    "Kind", "LayerInfo", "Mount", "SnapshotInfo", "Usage", "Repo", "SNAPSHOT_REF_LABEL",
]
