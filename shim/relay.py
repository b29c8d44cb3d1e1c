"""``start``'s fast path: the fork-server does ``start``'s work, the verb only relays.

Why: containerd executes ``containerd-shim-fractal-v1 start`` for every new container and waits
for it.  Done in that fresh interpreter, ``start`` imported json (with re, enum, collections),
socket (with selectors), array, fcntl and five modules of ours, read and parsed the spec, and
then asked the fork-server for a daemon anyway (docs/performance.md, issue 13).  The warm
fork-server (:mod:`shim.zygote`) has all of that loaded, so here the verb sends it its whole
invocation -- argv, working directory, environment, the runtime options containerd wrote on
stdin -- and prints what comes back.  This module imports nothing but ``_socket`` (the C
module under ``socket``) and ``_sha256``: ``os`` and ``sys`` are loaded by the interpreter
itself.

The fork-server forks a *worker* that takes the request's environment and directory and runs
the ordinary ``start`` (shim/start.py, ``fork`` mode): the same flock, the same check of a live
daemon, the same bind-then-fork, so the daemon is the worker's child, reparented when the
worker exits -- no child of the fork-server, with its own lifetime, as before.

Whenever nothing usable answers (no fork-server, another code version, an answer not in time,
a broken line) :func:`run` returns None and ``start`` runs in this process as before (which
also starts a new fork-server).  That fallback is always safe: a worker that did bind a socket
did so under the flock, and the fallback's own check-under-flock finds its daemon and joins it.

Wire format (one request per connection): :data:`MAGIC`, then a 4-byte big-endian length and
that many bytes of fields, each a 4-byte big-endian length and its bytes: code version,
working directory, runtime options, argv (NUL-separated), environment (``K=V``,
NUL-separated).  The answer is one line: ``ok ADDRESS``, ``err MESSAGE`` (start failed: shown
by containerd) or ``no REASON`` (nothing was done: fall back).
"""

from __future__ import annotations

import os
import sys

from shim.sha import sha256_hex

#: the first 4 bytes of a relayed request; as a length of the fork-server's other request
#: kind (the daemon spawn) it would be > 1 GiB, which that refuses: the two cannot be confused
MAGIC = b"FRS1"
#: containerd's shim socket dir (shim/address.py SOCKET_DIR; not imported here: see above)
SOCKET_DIR = "/run/containerd/s"
#: how long the verb waits for the fork-server's answer before it does the work itself
ANSWER_SECONDS = 2.0
REQUEST_MAX = 1 << 20
ANSWER_MAX = 4096

_CODE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_VERSION_FILES = ("shim/__init__.py", "shim/daemon.py", "shim/zygote.py", "shim/task.py", "shim/procs.py",
                  "shim/start.py", "shim/relay.py", "ccpu/__init__.py")


def zygote_socket(containerd_address: str, socket_dir: str | None = None) -> str:
    """The fork-server's socket for one containerd (next to the shims' sockets; never one of
    them: those hash address/namespace/group)."""
    return f"{socket_dir or SOCKET_DIR}/{sha256_hex((containerd_address + chr(0) + 'fractal-zygote').encode())}"


def code_version() -> str:
    """What a daemon forked now would run: the interpreter and the identity of the shim's files
    (an upgrade replaces them).  The fork-server refuses requests of another version."""
    parts = [sys.executable, sys.version, _CODE_ROOT]
    for rel in _VERSION_FILES:
        try:
            st = os.stat(os.path.join(_CODE_ROOT, rel))
            parts.append(f"{st.st_ino}:{st.st_mtime_ns}:{st.st_size}")
        except OSError:
            parts.append("-")
    return "|".join(parts)


# ---------------------------------------------------------------------------------------------
# the wire format (both halves)


def _field(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def encode(version: str, cwd: str, options: bytes, argv: list[str], env: dict[str, str]) -> bytes:
    body = b"".join(_field(f) for f in (
        version.encode(errors="surrogateescape"), os.fsencode(cwd), options,
        b"\0".join(os.fsencode(a) for a in argv),
        b"\0".join(os.fsencode(k) + b"=" + os.fsencode(v) for k, v in env.items())))
    return MAGIC + _field(body)


class Request:
    """A decoded request (the fork-server's side)."""

    __slots__ = ("version", "cwd", "options", "argv", "env")

    def __init__(self, version: str, cwd: str, options: bytes, argv: list[str], env: dict[str, str]) -> None:
        self.version, self.cwd, self.options, self.argv, self.env = version, cwd, options, argv, env


def decode(body: bytes) -> Request:
    """The fields after MAGIC and the length; ValueError on anything malformed."""
    fields: list[bytes] = []
    i = 0
    while i < len(body):
        if i + 4 > len(body):
            raise ValueError("truncated field length")
        n = int.from_bytes(body[i:i + 4], "big")
        i += 4
        if i + n > len(body):
            raise ValueError("truncated field")
        fields.append(body[i:i + n])
        i += n
    if len(fields) != 5:
        raise ValueError(f"want 5 fields, got {len(fields)}")
    version, cwd, options, argv, env = fields
    if not cwd.startswith(b"/"):
        raise ValueError("working directory not absolute")
    environ: dict[str, str] = {}
    for item in env.split(b"\0") if env else []:
        k, sep, v = item.partition(b"=")
        if not sep or not k:
            raise ValueError("bad environment entry")
        environ[os.fsdecode(k)] = os.fsdecode(v)
    return Request(version.decode(errors="surrogateescape"), os.fsdecode(cwd), options,
                   [os.fsdecode(a) for a in argv.split(b"\0")] if argv else [], environ)


# ---------------------------------------------------------------------------------------------
# the verb's side


def _read_stdin() -> bytes:
    try:
        return sys.stdin.buffer.read()
    except (OSError, ValueError, AttributeError):
        return b""


def ask(path: str, request: bytes, timeout: float = ANSWER_SECONDS) -> bytes | None:
    """Send ``request`` to the fork-server at ``path``; its answer line (without the newline),
    or None when nothing usable answered."""
    import _socket  # type: ignore[import-not-found]

    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(request)
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(ANSWER_MAX - len(buf))
            if not chunk:
                return None
            buf += chunk
            if len(buf) >= ANSWER_MAX:
                return None
        return buf[:-1]
    except OSError:  # absent, refused, reset, timed out
        return None
    finally:
        s.close()


def run(opts, argv: list[str]) -> int | None:  # noqa: ANN001
    """Relay ``start`` (``argv`` as containerd gave it) to the fork-server; the exit code, or
    None: nothing was done, run ``start`` here.  The runtime options on stdin are read here
    either way and left in :data:`stdin_options` for that fallback."""
    global stdin_options
    stdin_options = _read_stdin()
    if not opts.address:
        return None  # start reports the usage error
    answer = ask(zygote_socket(opts.address),
                 encode(code_version(), os.getcwd(), stdin_options, argv, dict(os.environ)))
    if answer is None:
        return None
    kind, _, text = answer.partition(b" ")
    if kind == b"ok" and text.startswith(b"unix://"):
        sys.stdout.buffer.write(text)
        sys.stdout.flush()
        return 0
    if kind == b"err":
        sys.stderr.buffer.write(b"containerd-shim-fractal-v1 start: " + text + b"\n")
        sys.stderr.flush()
        return 1
    return None


#: what :func:`run` read from stdin (None: it did not run)
stdin_options: bytes | None = None
