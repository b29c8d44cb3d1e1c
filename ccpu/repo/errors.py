"""Errors of the layer repo.

Every failure the repo reports is one of these, each with the context a user
needs (which key, which parent).  They carry no gRPC knowledge: the snapshotter
maps them to status codes in exactly one place (snapshotter/errors.py), and the
CLI maps them to messages and exit codes.
"""

from __future__ import annotations


class RepoError(Exception):
    """Base of every error the repo raises on purpose."""


class NotFound(RepoError):
    """The named snapshot, parent or layer does not exist."""


class AlreadyExists(RepoError):
    """A snapshot with that name exists already.

    Also the signal of containerd's remote-snapshot protocol: Prepare answers
    AlreadyExists when the layer it was asked to unpack is in the repo already.
    """


class FailedPrecondition(RepoError):
    """The request is well formed but the snapshot is in the wrong state."""


class InvalidArgument(RepoError):
    """The request itself is malformed (bad key, label, parent kind...)."""


class ResourceExhausted(RepoError):
    """The repo's filesystem is out of space or inodes (ENOSPC, EDQUOT, SQLite's "disk is full").

    The message says which repo and what ran out; the request changed nothing.  It heals by
    itself once space is freed: nothing stays wedged (docs/snapshotter.md, "When the disk is full").
    """


class RepoLocked(RepoError):
    """Another process serves this repo already."""
