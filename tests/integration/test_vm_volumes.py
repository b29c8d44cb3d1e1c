"""Volumes of VM containers (shim/volumes.py): host directories given with ``ctr run --mount``
are bind-mounted into the sandbox's volume dir and reach the guest over its 9p share.

Shared, not copied: the container sees host files and the host sees the container's writes; a
read-only volume is read-only in the guest whatever the guest does; deleting the container
unmounts the binds and never touches the host data; a killed shim leaves no bind mounts once
containerd's ``delete`` ran.  One VM for the first test (two containers), one for the kill test.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from hack.containerd_env import FractalEnv
from tests.integration.test_shim_vm import (  # noqa: F401  (module fixtures used by name)
    _alive, _guest_built, _no_qemu_left, exec_, images, remove, start_detached, task_status, vm_dir,
    vm_pid, wait_for)


def _mounts_below(path: Path) -> list[str]:
    real = str(path.resolve()) if path.exists() else str(path)
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(real)]


def test_volumes_shared_both_ways_and_ro(fenv: FractalEnv, namespace: str, images: dict[str, str],
                                         tmp_path: Path) -> None:
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    rw.mkdir()
    ro.mkdir()
    (rw / "from-host").write_text("host says hi\n")
    (ro / "config").write_text("key=value\n")
    big = tmp_path / "big.bin"  # beyond the copy limit: shared as a file volume
    big.write_bytes(b"x" * (1024 * 1024))
    sb = f"vol-{namespace}"
    ann = ("--annotation", f"io.fractal.sandbox={sb}")
    start_detached(fenv, namespace, images["busybox"], "vol1", "sleep", "600", extra=(
        *ann, "--mount", f"type=bind,src={rw},dst=/data,options=rbind:rw",
        "--mount", f"type=bind,src={ro},dst=/etc/app,options=rbind:ro",
        "--mount", f"type=bind,src={big},dst=/big.bin,options=bind:ro"))
    try:
        vdir = vm_dir(fenv, namespace, sb) / "volumes"
        assert exec_(fenv, namespace, "vol1", "e1", "cat", "/data/from-host").stdout == "host says hi\n"
        assert exec_(fenv, namespace, "vol1", "e2", "cat", "/etc/app/config").stdout == "key=value\n"
        assert exec_(fenv, namespace, "vol1", "e3", "wc", "-c", "/big.bin").stdout.split()[0] == str(1024 * 1024)
        # the guest writes, the host reads
        exec_(fenv, namespace, "vol1", "e4", "sh", "-c", "echo guest wrote > /data/from-guest")
        assert (rw / "from-guest").read_text() == "guest wrote\n"
        # a file the host adds later is there at once (9p asks the host on every lookup)
        (rw / "later").write_text("added after start\n")
        assert exec_(fenv, namespace, "vol1", "e5", "cat", "/data/later").stdout == "added after start\n"
        # read-only in the container, and read-only at the host side of the share
        r = exec_(fenv, namespace, "vol1", "e6", "sh", "-c", "echo no > /etc/app/config", check=False)
        assert r.returncode != 0 and "Read-only" in r.stderr, (r.returncode, r.stderr)
        assert (ro / "config").read_text() == "key=value\n"
        assert any(m.endswith("/vol1/1") for m in _mounts_below(vdir)), _mounts_below(vdir)
        # a second container of the same VM gets its own binds of the same host dir
        start_detached(fenv, namespace, images["busybox"], "vol2", "sleep", "600", extra=(
            *ann, "--mount", f"type=bind,src={rw},dst=/shared,options=rbind:rw"))
        assert exec_(fenv, namespace, "vol2", "e7", "cat", "/shared/from-guest").stdout == "guest wrote\n"
        remove(fenv, namespace, "vol2")
        # its binds are gone, vol1's stay
        wait_for(lambda: not any("/vol2/" in m for m in _mounts_below(vdir)), what="vol2 binds unmounted")
        assert exec_(fenv, namespace, "vol1", "e8", "cat", "/data/from-host").stdout == "host says hi\n"
    finally:
        remove(fenv, namespace, "vol2")
        remove(fenv, namespace, "vol1")
    wait_for(lambda: not vm_dir(fenv, namespace, sb).exists(), what="VM run dir removed")
    # the host data is untouched by the cleanup
    assert sorted(p.name for p in rw.iterdir()) == ["from-guest", "from-host", "later"]
    assert (ro / "config").read_text() == "key=value\n" and big.stat().st_size == 1024 * 1024
    assert not _mounts_below(vdir)


def test_killed_shim_leaves_no_volume_mounts(fenv: FractalEnv, namespace: str, images: dict[str, str],
                                             tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "keep").write_text("precious\n")
    cid = "vol-kill"
    start_detached(fenv, namespace, images["busybox"], cid, "sleep", "600",
                   extra=("--mount", f"type=bind,src={data},dst=/data,options=rbind:rw"))
    vdir = vm_dir(fenv, namespace, cid)
    assert _mounts_below(vdir / "volumes"), "the volume is not bound below the VM dir"
    pid = vm_pid(fenv, namespace, cid)
    shim = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])  # QEMU's parent
    os.kill(shim, signal.SIGKILL)
    try:
        wait_for(lambda: not _alive(pid), what="QEMU died with the shim")
        wait_for(lambda: task_status(fenv, namespace, cid) == "", what="task cleaned up")
        wait_for(lambda: not vdir.exists(), what="VM run dir removed by the delete verb")
    finally:
        fenv.ctr("tasks", "delete", "-f", cid, namespace=namespace, check=False)
        fenv.ctr("containers", "rm", cid, namespace=namespace, check=False)
    assert not _mounts_below(vdir)
    assert (data / "keep").read_text() == "precious\n"


def test_virtiofsd_killed_ends_the_vm_instead_of_hanging(fenv: FractalEnv, namespace: str,
                                                         images: dict[str, str]) -> None:
    """Without virtiofsd the guest's layer share never answers again: the shim must end the VM
    and report the containers exited (255, as for a lost agent) -- never leave them hanging."""
    import subprocess

    cid = "vfs-kill"
    start_detached(fenv, namespace, images["busybox"], cid, "sleep", "600",
                   extra=("--annotation", "io.fractal.share=virtiofs"))
    qemu = vm_pid(fenv, namespace, cid)
    vfsd = [int(p) for p in subprocess.run(["pgrep", "-P", str(int(Path(f"/proc/{qemu}/stat").read_text()
                                                                      .rsplit(")", 1)[1].split()[1])),
                                            "-x", "virtiofsd"], capture_output=True, text=True).stdout.split()]
    assert len(vfsd) == 1, f"expected the VM's virtiofsd, found {vfsd}"
    try:
        os.kill(vfsd[0], signal.SIGKILL)
        wait_for(lambda: not _alive(qemu), what="QEMU stopped after virtiofsd died")
        wait_for(lambda: task_status(fenv, namespace, cid) == "STOPPED", what="exit reported")
        r = fenv.ctr("tasks", "ls", namespace=namespace)
        assert "STOPPED" in r.stdout, r.stdout
    finally:
        remove(fenv, namespace, cid)
    wait_for(lambda: not vm_dir(fenv, namespace, cid).exists(), what="VM run dir removed")
