"""The pool of ready VMs: where it lives, what a shim asks it, and how a VM is handed over.

The pool daemon (:mod:`shim.poold`, ``python3 -m shim.poold``) keeps ``vm.pool`` guests booted
with the agent ready.  A VM sandbox (shim/vm.py) asks it for one before booting its own; with
no pool (not running, ``vm.pool = 0``, no VM of the right shape ready) it boots as before.

One request per connection on ``<FRACTAL_RUN_DIR>/pool/pool.sock`` (root, 0600 in a 0700 dir):
a JSON line from the shim, one JSON reply from the pool, with file descriptors attached
(SCM_RIGHTS) when a VM is handed over:

* ``{"op": "adopt", "key": {...}, "dir": "<the sandbox's run dir>"}``: the pool takes a ready VM
  whose :func:`vm_key` equals ``key``, renames its run dir to ``dir`` (which must be
  ``<run dir>/vms/<namespace>/<group>`` and must not exist) and answers
  ``{"ok": true, "vm": {...}, "fds": [names]}`` with the fds in that order: ``agent`` (the host end
  of the agent's virtio-serial port, hello done), ``console`` (the serial console socket),
  ``qemu`` and one ``virtiofsd`` per share (pidfds), ``volumes`` (the dir under the volume
  share's read-only view: shim/volumes.py makes the binds through it), ``qmp`` (a dup of the
  pool's end of QEMU's QMP socketpair: NICs are added live on it; ``vm.hotplug_slots`` lists the
  root ports still free, ``vm.qmp_negotiated`` whether the greeting was consumed).  From then on the VM is
  the shim's: the pool never touches it or its dir again, and a dead shim's ``delete`` finds its
  processes and mounts in the dir's records like those of a VM it booted.
  ``{"ok": false, "why": "..."}``: nothing handed over; the shim boots its own.
* ``{"op": "refill", "id": "<VM id>"}``: the adopter of that VM runs its first container; the
  refill the pool held back since the handover boots now.  ``{"ok": true, "released": bool}``.
* ``{"op": "status"}``: ``{"ok": true, "size": N, "ready": [{"id", "qemu_pid", "warm", ...}],
  "booting": n, "held": [VM ids whose refill waits]}``.

Kept stdlib-only and light: the shim imports it on every VM sandbox start.
"""

from __future__ import annotations

import array
import json
import os
import socket
from dataclasses import dataclass, field
from typing import Any

POOL_DIR = "pool"
SOCKET = "pool.sock"
#: the largest request or reply (a reply carries a few short fields)
MAX_MESSAGE = 1 << 16
#: fds a reply may carry (agent, console, qemu, virtiofsds, volumes, qmp)
MAX_FDS = 8
#: how long a shim waits for the pool's answer before booting its own VM
ASK_TIMEOUT = 5.0


class PoolError(RuntimeError):
    pass


def pool_dir(run_dir: str) -> str:
    return os.path.join(run_dir, POOL_DIR)


def socket_path(run_dir: str) -> str:
    return os.path.join(pool_dir(run_dir), SOCKET)


def vm_key(settings: Any, share: str) -> dict[str, Any]:
    """What must match between a pooled VM and the sandbox adopting it: every setting the boot
    fixed (a shim.config.VmSettings) and the layer share's type as resolved (``auto`` and
    ``virtiofs`` are the same VM when virtiofsd is there).  Pure."""
    return {"memory_mb": settings.memory_mb, "cpus": settings.cpus, "accel": settings.accel,
            "share": share, "memory_reserve_mb": settings.memory_reserve_mb,
            "qemu_uid_base": settings.qemu_uid_base}


def share_of(settings: Any) -> str:
    """The layer share type a VM of ``settings`` gets (as shim/vm.py decides it at boot)."""
    from ccpu.vm import shares

    return shares.decide(None if settings.share == "auto" else settings.share,
                         os.environ.get("FRACTAL_SHARE") or None, shares.find_virtiofsd())[0]


def target_ok(run_dir: str, target: str) -> bool:
    """Whether ``target`` is a sandbox run dir ``<run_dir>/vms/<ns>/<group>`` (no ``..``, no
    other place): the pool renames a VM's dir only there.  Pure."""
    base = os.path.join(os.path.normpath(run_dir), "vms")
    if os.path.normpath(target) != target or not target.startswith(base + "/"):
        return False
    parts = target[len(base) + 1:].split("/")
    return len(parts) == 2 and all(p and p not in (".", "..") for p in parts)


@dataclass
class Handover:
    """A VM handed to this process: its description and its fds (ours to close)."""

    vm: dict[str, Any]
    fds: dict[str, int] = field(default_factory=dict)
    helpers: list[tuple[str, int]] = field(default_factory=list)  # (name, pidfd), virtiofsds

    def close(self) -> None:
        for fd in list(self.fds.values()) + [fd for _n, fd in self.helpers]:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds.clear()
        self.helpers.clear()


def send(sock: socket.socket, msg: dict[str, Any], fds: list[int] = ()) -> None:  # type: ignore[assignment]
    data = json.dumps(msg).encode() + b"\n"
    if len(data) > MAX_MESSAGE:
        raise PoolError("message too long")
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sock.sendmsg([data], anc)


def receive(sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """One message and the fds that came with it (every fd received is returned, or closed on
    error: none leaks)."""
    fds: list[int] = []
    buf = b""
    try:
        while not buf.endswith(b"\n"):
            data, anc, flags, _ = sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(MAX_FDS * 4))
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    a = array.array("i")
                    a.frombytes(payload[:len(payload) - len(payload) % 4])
                    fds.extend(a)
            if flags & socket.MSG_CTRUNC:
                raise PoolError("too many fds in a pool message")
            if not data:
                raise PoolError("connection closed before a whole message")
            buf += data
            if len(buf) > MAX_MESSAGE:
                raise PoolError("message too long")
        msg = json.loads(buf)
        if not isinstance(msg, dict):
            raise PoolError("message is not an object")
        return msg, fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def _ask(run_dir: str, request: dict[str, Any], timeout: float) -> tuple[dict[str, Any], list[int]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        sock.connect(socket_path(run_dir))
        send(sock, request)
        return receive(sock)
    finally:
        sock.close()


def status(run_dir: str, timeout: float = ASK_TIMEOUT) -> dict[str, Any]:
    msg, fds = _ask(run_dir, {"op": "status"}, timeout)
    for fd in fds:
        os.close(fd)
    return msg


def refill(run_dir: str, vm_id: str, timeout: float = 2.0) -> bool:
    """Tell the pool that the VM ``vm_id`` it handed over runs its sandbox's first container: the
    refill it held back (shim/poold.py REFILL_HOLD) may boot now.  Best effort: whether a held
    refill was released (False: no pool answered, or it held nothing for that VM -- the hold
    then ends by itself)."""
    try:
        msg, fds = _ask(run_dir, {"op": "refill", "id": vm_id}, timeout)
    except (OSError, ValueError, PoolError):
        return False
    for fd in fds:
        os.close(fd)
    return bool(msg.get("ok") and msg.get("released"))


def adopt(run_dir: str, settings: Any, target: str, timeout: float = ASK_TIMEOUT) -> tuple[Handover | None, str]:
    """A ready VM renamed to ``target`` and handed over, or (None, why not).  Never raises for
    an absent or unwilling pool: the caller boots its own VM then."""
    try:
        msg, fds = _ask(run_dir, {"op": "adopt", "key": vm_key(settings, share_of(settings)), "dir": target},
                        timeout)
    except FileNotFoundError:
        return None, "no pool running (no socket)"
    except (OSError, ValueError, PoolError) as exc:  # ValueError: also a share type not available
        return None, f"pool: {exc}"
    names = msg.get("fds")
    if not msg.get("ok") or not isinstance(names, list) or len(names) != len(fds):
        for fd in fds:
            os.close(fd)
        return None, str(msg.get("why") or "pool answered without a VM")
    h = Handover(vm=msg.get("vm") if isinstance(msg.get("vm"), dict) else {})
    for name, fd in zip(names, fds):
        if name == "virtiofsd":
            h.helpers.append((name, fd))
        elif name in ("agent", "console", "qemu", "volumes", "qmp") and name not in h.fds:
            h.fds[name] = fd
        else:
            os.close(fd)
    if set(h.fds) - {"qmp"} != {"agent", "console", "qemu", "volumes"}:
        h.close()
        return None, "pool handed over an incomplete VM"
    return h, "adopted"
