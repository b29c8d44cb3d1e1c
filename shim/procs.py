"""Which processes are fractal shim daemons (and fork-servers): the ONE rule every tool uses.

Why one rule: a daemon is started three ways (shim/start.py ``FRACTAL_SHIM_SPAWN``) and each
leaves another command line -- forked by ``start`` it keeps ``containerd-shim-fractal-v1 ...
start``, forked by the zygote it has the zygote's ``python -m shim.zygote -address ADDR ...``,
executed it is ``python -m shim.daemon ...``.  Tools that grepped command lines (the test
harness's clean-up, the tests' shim finders, the benchmarks) each knew one or two of those forms.

The rule (:func:`classify`):

* a **daemon** has ``/proc/PID/comm`` == :data:`DAEMON_COMM` (``containerd-shim``, what
  ``ps``/``pgrep`` show for containerd's own shims too; :func:`shim.daemon.serve` sets it in
  every spawn mode) and a command line that is ours (our binary or one of our modules) naming
  containerd's ``-address``;
* the **zygote** has comm :data:`ZYGOTE_COMM` and the ``shim.zygote`` module on its command line;
* a daemon's own forked child that has not exec'd yet (it inherits comm and command line) is not
  a daemon: its parent is;
* a daemon's ttrpc socket is the listening unix socket it holds under containerd's shim socket
  dir (``/proc/net/unix`` + ``/proc/PID/fd``), whatever the spawn mode.

Standard library only, no project module beyond :mod:`shim.address`: the test harness, the
benchmarks and ``start`` (through the zygote) import it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from shim import address as addr

#: what ``/proc/PID/comm`` shows for a daemon (as for containerd's runc shim: the first 15 bytes)
DAEMON_COMM = "containerd-shim"
#: the fork-server's comm (shim/zygote.py)
ZYGOTE_COMM = "fractal-zygote"
#: command-line words that make a process ours (argv[0]/argv[1] basename, or ``-m`` module)
SHIM_BINARY = "containerd-shim-fractal-v1"
DAEMON_MODULE = "shim.daemon"
ZYGOTE_MODULE = "shim.zygote"

DAEMON = "daemon"
ZYGOTE = "zygote"


@dataclass(frozen=True)
class ShimProcess:
    pid: int
    kind: str  # DAEMON or ZYGOTE
    containerd: str  # containerd's address (the -address flag)
    socket: str = ""  # a daemon's ttrpc socket path ("" if not found, e.g. mid start)


def set_comm(name: str) -> None:
    """Name this thread (the caller's main thread) in ``/proc/PID/comm`` (best effort: /proc may
    be missing in odd places, and the name only helps tools find us)."""
    try:
        with open("/proc/thread-self/comm", "w") as f:
            f.write(name[:15])
    except OSError:
        pass


def _flag(argv: list[str], name: str) -> str:
    for i, a in enumerate(argv[:-1]):
        if a in (f"-{name}", f"--{name}"):
            return argv[i + 1]
        if a.startswith((f"-{name}=", f"--{name}=")):
            return a.split("=", 1)[1]
    return ""


def classify(comm: str, argv: list[str]) -> tuple[str, str] | None:
    """(kind, containerd address) of a process with this comm and command line, or None when it
    is not one of ours (pure: the rule itself, unit-tested)."""
    if len(argv) > 1 and argv[-1] == "":
        argv = argv[:-1]
    containerd = _flag(argv, "address")
    if not containerd:
        return None
    ours_words = {os.path.basename(a) for a in argv[:2]} | {
        argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "-m"}
    if comm == ZYGOTE_COMM and ZYGOTE_MODULE in ours_words:
        return ZYGOTE, containerd
    if comm == DAEMON_COMM and ours_words & {SHIM_BINARY, DAEMON_MODULE, ZYGOTE_MODULE}:
        return DAEMON, containerd
    return None


def parse_net_unix(text: str, directory: str | None = None) -> dict[int, str]:
    """inode -> path of the listening unix sockets bound under ``directory`` (``/proc/net/unix``:
    ``Num RefCount Protocol Flags Type St Inode Path``; flag 0x10000 = listening)."""
    out: dict[int, str] = {}
    prefix = (directory or addr.SOCKET_DIR).rstrip("/") + "/"
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) < 8 or not parts[7].startswith(prefix):
            continue
        try:
            listening = int(parts[3], 16) & 0x10000
            inode = int(parts[6])
        except ValueError:
            continue
        if listening:
            out[inode] = parts[7]
    return out


def _read(path: str, limit: int = 1 << 16) -> bytes:
    with open(path, "rb") as f:
        return f.read(limit)


def _socket_of(pid: int, listening: dict[int, str]) -> str:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return ""
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            try:
                path = listening.get(int(target[8:-1]))
            except ValueError:
                continue
            if path:
                return path
    return ""


def _ppid(pid: int) -> int:
    try:
        raw = _read(f"/proc/{pid}/stat", 4096).decode(errors="replace")
        return int(raw[raw.rindex(")") + 2:].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def find(containerd: str | None = None, *, kinds: tuple[str, ...] = (DAEMON,),
         sockets: bool = True) -> list[ShimProcess]:
    """Our shim processes of the given kinds (of the containerd at ``containerd``, or of any),
    by pid.  ``sockets``: also find each daemon's ttrpc socket."""
    found: dict[int, tuple[str, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            comm = _read(f"/proc/{pid}/comm", 64).decode(errors="replace").strip()
            if comm not in (DAEMON_COMM, ZYGOTE_COMM):
                continue
            argv = _read(f"/proc/{pid}/cmdline").decode(errors="replace").split("\0")
        except OSError:
            continue
        hit = classify(comm, argv)
        if hit and hit[0] in kinds and (containerd is None or hit[1] == str(containerd)):
            found[pid] = hit
    # a daemon's child between fork and exec looks like its parent: keep the parent only
    daemons = {p for p, (k, _) in found.items() if k == DAEMON}
    for pid in list(daemons):
        if _ppid(pid) in daemons:
            del found[pid]
    listening: dict[int, str] = {}
    if sockets and any(k == DAEMON for k, _ in found.values()):
        try:
            listening = parse_net_unix(_read("/proc/net/unix", 1 << 24).decode(errors="replace"))
        except OSError:
            listening = {}
    out = []
    for pid in sorted(found):
        kind, cd = found[pid]
        sock = _socket_of(pid, listening) if kind == DAEMON and listening else ""
        out.append(ShimProcess(pid=pid, kind=kind, containerd=cd, socket=sock))
    return out


def daemon_pids(containerd: str | None = None) -> list[int]:
    """Pids of our shim daemons (of one containerd, or of any): the rule above."""
    return [p.pid for p in find(containerd, sockets=False)]


def zygote_pids(containerd: str | None = None) -> list[int]:
    """Pids of our fork-servers (of one containerd, or of any)."""
    return [p.pid for p in find(containerd, kinds=(ZYGOTE,), sockets=False)]
