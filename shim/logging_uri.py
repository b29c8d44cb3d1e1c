"""containerd's log URIs for a process's stdout/stderr: `binary://` and `file://`.

Besides FIFO paths, containerd clients may give a URI (containerd's cio.LogURI,
runc shim's pkg/process/io.go): nerdctl passes `binary:///path/nerdctl?_NERDCTL_INTERNAL_LOGGING=DIR`
for `run -d` so that its own program stores the logs `nerdctl logs` reads.

- `binary:///PATH?K=V`: PATH is started with argv `[PATH, K, V, ...]` and an
  environment of only CONTAINER_ID and CONTAINER_NAMESPACE (as containerd does),
  with the process's stdout on fd 3, stderr on fd 4, and a pipe on fd 5 that
  it closes when ready; we wait for that before the process starts.
- `file:///PATH`: both streams appended to that file.

The logger is a child of the shim daemon and reaped by its one reaper; it
exits on its own when both pipes reach EOF.
"""

from __future__ import annotations

import fcntl
import os
import select
import time
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlparse

READY_TIMEOUT = 10.0


class LogURIError(Exception):
    pass


def is_uri(value: str) -> bool:
    return value.startswith(("binary://", "file://"))


@dataclass
class LogTarget:
    """Write ends for the streams (-1 when that stream has no target) and the logger's pid."""

    stdout_fd: int
    stderr_fd: int
    pid: int | None = None


def _high_dup(fd: int) -> int:
    """A close-on-exec copy above 2..5, so dup2 onto 3/4/5 always clears close-on-exec."""
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)


def open_log_uri(uri: str, container_id: str, namespace: str, want_stderr: bool) -> LogTarget:
    u = urlparse(uri)
    if u.scheme == "file":
        path = u.path
        if not path:
            raise LogURIError(f"log URI {uri!r} names no file")
        os.makedirs(os.path.dirname(path) or "/", exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        return LogTarget(fd, os.dup(fd) if want_stderr else -1)
    if u.scheme != "binary":
        raise LogURIError(f"unsupported log URI scheme in {uri!r}")
    if not u.path or not os.access(u.path, os.X_OK):
        raise LogURIError(f"log binary {u.path!r} of {uri!r} is not an executable file")
    args = [x for kv in parse_qsl(u.query, keep_blank_values=True) for x in kv]
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    ready_r, ready_w = os.pipe()
    child_ends = [_high_dup(out_r), _high_dup(err_r), _high_dup(ready_w)]
    for fd in (out_r, err_r, ready_w):
        os.close(fd)
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        actions = [(os.POSIX_SPAWN_DUP2, devnull, n) for n in (0, 1, 2)]
        actions += [(os.POSIX_SPAWN_DUP2, fd, 3 + i) for i, fd in enumerate(child_ends)]
        env = {"CONTAINER_ID": container_id, "CONTAINER_NAMESPACE": namespace}
        pid = os.posix_spawn(u.path, [u.path, *args], env, file_actions=actions, setsid=True)
    except BaseException:
        for fd in (out_w, err_w, ready_r):
            os.close(fd)
        raise
    finally:
        os.close(devnull)
        for fd in child_ends:
            os.close(fd)
    try:  # the logger closes fd 5 when it is ready (or dies)
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([ready_r], [], [], left)[0]:
                raise LogURIError(f"log binary {u.path} did not get ready within {READY_TIMEOUT:.0f} s")
            if not os.read(ready_r, 64):
                break
    except BaseException:
        os.close(out_w)
        os.close(err_w)
        raise
    finally:
        os.close(ready_r)
    if not want_stderr:
        os.close(err_w)
        err_w = -1
    return LogTarget(out_w, err_w, pid)
