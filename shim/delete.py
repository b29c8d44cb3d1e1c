"""The ``delete`` verb: clean up one container whose shim is dead or unreachable.

containerd runs it with a 5 s deadline when Connect/Delete through the shim failed (e.g. the
shim was SIGKILLed).  Nothing is asked of the dead shim; best effort, fast:

1. ``runc --root <runc root>/<ns> delete --force <id>`` (SIGKILLs the container's processes
   and removes runc's state; the agent, gone with its shim, cannot do it);
2. unmount ``<bundle>/rootfs`` (lazily, everything stacked there);
3. if no live shim listens on the group's socket any more, remove the stale socket file, and
   kill a VM sandbox's QEMU/virtiofsd left in ``$FRACTAL_RUN_DIR/vms/<ns>/<group>`` (they die
   with the shim through PDEATHSIG; this is the second line) and remove that dir;
4. print a raw protobuf DeleteResponse{pid, exit_status=137, exited_at=now} on stdout.

Only the standard library is imported, and only what the case at hand needs: containerd also
runs ``delete`` after every normal shim exit (its clean-up of a closed shim connection), and
``ctr run --rm`` waits for it.  Then runc has no state for the container and nothing is
mounted, so neither runc nor ctypes is needed.  The response is three protobuf fields, encoded
here.
"""

from __future__ import annotations

import os
import sys
import time

MNT_DETACH = 2
EXIT_STATUS = 137  # what runc's shim reports: killed


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def delete_response(pid: int, exit_status: int, exited_at_ns: int) -> bytes:
    """DeleteResponse{pid=1 uint32, exit_status=2 uint32, exited_at=3 Timestamp{1 int64, 2 int32}}."""
    ts = b""
    secs, nanos = divmod(exited_at_ns, 1_000_000_000)
    if secs:
        ts += b"\x08" + _varint(secs)
    if nanos:
        ts += b"\x10" + _varint(nanos)
    out = b""
    if pid:
        out += b"\x08" + _varint(pid)
    if exit_status:
        out += b"\x10" + _varint(exit_status)
    out += b"\x1a" + _varint(len(ts)) + ts
    return out


def _runc_pid(runc_root: str, cid: str) -> int:
    try:
        with open(os.path.join(runc_root, cid, "state.json"), "rb") as f:
            data = f.read(1 << 20)
    except OSError:
        return 0  # the usual case (a clean exit): json is not even imported
    import json

    try:
        return int(json.loads(data).get("init_process_pid", 0))
    except (ValueError, TypeError, AttributeError):
        return 0


def _mounted(path: str) -> bool:
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 4 and parts[4] == path:
                    return True
    except OSError:
        pass
    return False


def _unmount_all(path: str) -> None:
    if not _mounted(path):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for _ in range(32):
        if not _mounted(path):
            return
        if libc.umount2(path.encode(), MNT_DETACH) != 0:
            return


def _has_entries(path: str) -> bool:
    try:
        with os.scandir(path) as it:
            return next(it, None) is not None
    except OSError:
        return False


def _clean_sandbox(namespace: str, cid: str, bundle: str, containerd_address: str) -> None:
    """A dead shim's stale socket, sandbox record and VM leftovers.

    The sandbox's group comes from the spec's annotations (json, and with it re: ~10 ms of
    this process), so it is read only when needed: the socket is the one ``start`` recorded in
    ``<bundle>/address`` when that is there, and a VM can have been left only if the namespace
    has a VM dir at all.  After a clean exit in host mode nothing is parsed."""
    from shim import address as addr

    found: list[str] = []

    def group() -> str:
        if not found:
            found.append(addr.group_id(addr.read_annotations(bundle), cid))
        return found[0]

    sock = addr.read_recorded_socket(bundle) or addr.socket_path(containerd_address, namespace, group())
    if os.path.exists(sock) and not addr.can_connect(sock, timeout=0.5):
        try:
            os.unlink(sock)
        except OSError:
            pass
        try:  # the dead shim's record for `fractal ps`
            os.unlink(os.path.join(addr.run_dir(), "sandboxes", namespace, f"{group()}.json"))
        except OSError:
            pass
    vms = os.path.join(addr.run_dir(), "vms", namespace)
    if not _has_entries(vms):
        return
    vm_dir = os.path.join(vms, group())
    if os.path.isdir(vm_dir) and not addr.can_connect(sock, timeout=0.5):
        from shim.leftovers import cleanup_dead  # a VM sandbox's leftovers: QEMU, virtiofsd

        cleanup_dead(vm_dir)


def cleanup(namespace: str, cid: str, bundle: str, containerd_address: str) -> int:
    """Do the clean-up; returns the container's last known pid (0 if unknown)."""
    from shim import address as addr

    root = addr.runc_root(namespace)
    pid = _runc_pid(root, cid)
    if os.path.exists(os.path.join(root, cid)):  # runc still knows the container
        import subprocess

        try:
            subprocess.run(["runc", "--root", root, "delete", "--force", cid],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=3)
        except (OSError, subprocess.TimeoutExpired):
            pass
    if bundle:
        _unmount_all(os.path.join(os.path.realpath(bundle), "rootfs"))
        if containerd_address:
            _clean_sandbox(namespace, cid, bundle, containerd_address)
    return pid


def run(opts) -> int:  # noqa: ANN001
    bundle = opts.bundle or os.getcwd()
    pid = 0
    try:
        pid = cleanup(opts.namespace, opts.id, bundle, opts.address)
    except Exception as exc:  # noqa: BLE001 - best effort: still answer containerd
        sys.stderr.write(f"containerd-shim-fractal-v1 delete: {exc}\n")
    sys.stdout.buffer.write(delete_response(pid, EXIT_STATUS, time.time_ns()))
    sys.stdout.flush()
    return 0
