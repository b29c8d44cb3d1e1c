"""Where a shim daemon listens, and which containers share one (no I/O beyond small files).

containerd 1.6 (runtime/v2/shim/util.go ``SocketAddress``) names shim sockets
``unix:///run/containerd/s/<hex sha256(filepath.Join(address, namespace, id))>`` whatever its own
state dir is; ``address`` is containerd's gRPC address (the ``-address`` flag).  The runc shim
uses the group id instead of the container id, so containers of one group share a shim: ours
is the first of the annotations :data:`GROUP_ANNOTATIONS`, else the container id.
"""

from __future__ import annotations

import os
import posixpath
TYPE_CHECKING = False  # not typing's: `start` and `delete` import this module, and typing
if TYPE_CHECKING:     # (with re, contextlib, ...) is ~10 ms of their interpreter start
    import socket

SOCKET_DIR = "/run/containerd/s"

from ccpu.grouping import SANDBOX_ANNOTATIONS as GROUP_ANNOTATIONS
from ccpu.grouping import asks_to_join, sandbox_group
from shim.sha import sha256_hex


def go_join(*parts: str) -> str:
    """Go's filepath.Join on Linux: join non-empty elements with '/', then Clean."""
    joined = "/".join(p for p in parts if p)
    return go_clean(joined) if joined else ""


def go_clean(path: str) -> str:
    """Go's path.Clean (posixpath.normpath keeps a leading '//', Go does not)."""
    if not path:
        return "."
    cleaned = posixpath.normpath(path)
    if cleaned.startswith("//"):
        cleaned = "/" + cleaned.lstrip("/")
    return cleaned


def socket_path(containerd_address: str, namespace: str, group: str) -> str:
    """Filesystem path of the shim socket for (containerd, namespace, group)."""
    digest = sha256_hex(go_join(containerd_address, namespace, group).encode())
    return f"{SOCKET_DIR}/{digest}"


def socket_address(containerd_address: str, namespace: str, group: str) -> str:
    """The ``unix://`` address printed by ``start`` and stored in ``<bundle>/address``."""
    return "unix://" + socket_path(containerd_address, namespace, group)


def strip_scheme(address: str) -> str:
    return address[len("unix://"):] if address.startswith("unix://") else address


def read_annotations(bundle: str) -> dict[str, str]:
    """Annotations of the OCI spec in ``bundle/config.json`` ({} if missing/unreadable)."""
    from ccpu.agent import jsonbound  # json (and re): not for a `delete` that needs no spec

    try:
        with open(os.path.join(bundle, "config.json"), "rb") as f:
            spec = jsonbound.loads(f.read())
    except (OSError, ValueError):
        return {}
    ann = spec.get("annotations") if isinstance(spec, dict) else None
    return {str(k): str(v) for k, v in ann.items()} if isinstance(ann, dict) else {}


def group_id(annotations: dict[str, str], container_id: str) -> str:
    """The group (sandbox) id: first non-empty of :data:`GROUP_ANNOTATIONS`, else the id --
    except that a Kubernetes pod's container names another sandbox only if the operator lets
    pods join one (the config is read only in that rare case: ``start`` stays fast)."""
    may_join = True
    if asks_to_join(container_id, annotations):
        from shim.config import pod_may_join

        may_join = pod_may_join()
    return sandbox_group(container_id, annotations, pod_may_join=may_join)


def run_dir() -> str:
    """fractal's run dir (sandbox records, runc state): $FRACTAL_RUN_DIR or /run/fractal."""
    return os.environ.get("FRACTAL_RUN_DIR") or "/run/fractal"


def runc_root(namespace: str) -> str:
    """runc's --root for containers of one containerd namespace."""
    return os.path.join(run_dir(), "runc", namespace)


def read_recorded_socket(bundle: str) -> str | None:
    """The shim socket ``start`` recorded in ``<bundle>/address`` (:func:`write_address`), or
    None when there is none or it is not one of ours (a path of :data:`SOCKET_DIR` named by a
    sha256): lets ``delete`` find the socket without parsing the spec."""
    try:
        with open(os.path.join(bundle, "address"), "rb") as f:
            text = f.read(256).decode("ascii")
    except (OSError, UnicodeDecodeError):
        return None
    path = strip_scheme(text.strip())
    name = path[len(SOCKET_DIR) + 1:]
    if posixpath.dirname(path) != SOCKET_DIR or len(name) != 64 or \
            name.strip("0123456789abcdef"):
        return None
    return path


def write_address(bundle: str, address: str) -> None:
    """Write ``<bundle>/address`` atomically (temp file + rename), as the runc shim does."""
    path = os.path.join(bundle, "address")
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, address.encode())
    finally:
        os.close(fd)
    os.rename(tmp, path)


def listen_unix(path: str) -> "socket.socket":
    """A unix stream socket bound at ``path`` (0600 from the start: no window in which another
    user could connect) and listening; the shim daemons' and the fork-server's sockets."""
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(socket.SOMAXCONN)
    except BaseException:
        sock.close()
        raise
    return sock


def can_connect(path: str, timeout: float = 1.0) -> bool:
    """True if something accepts connections on the unix socket ``path``.  ``_socket`` (the C
    module) rather than ``socket``: its import (enum, selectors) was most of a ``delete``'s."""
    import _socket  # type: ignore[import-not-found]

    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()
