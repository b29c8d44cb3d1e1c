"""The guest-root symlink attack on a VM sandbox's volume dir, end to end (run by
tests/security/test_vm_volume_symlinks.py, never by pytest directly).

Runs a private containerd + snapshotter + shim + QEMU and must itself run inside a private mount
namespace (``unshare -m --propagation slave``): if the fix regresses, the shim detaches or
creates mounts where the guest points it, and that must only ever hit the sacrificial mounts
made here, never the machine's.

The attack (guest root = a privileged container sharing the guest init's pid namespace, so it
reaches the volume share at ``/proc/1/root/run/fractal/volumes``):

1. it moves another container's volume dir (``victim``) aside and puts a symlink to the host
   dir ``bait/`` in its place; ``bait/mnt`` is a tmpfs with a marker file.  Deleting ``victim``
   must not detach ``bait/mnt``;
2. it plants a symlink ``late -> bait2/`` for a container not created yet.  Creating ``late``
   with a volume must not create anything in ``bait2/`` nor mount anything there.

Prints one JSON object with what the host saw; the test judges it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from ccpu.linux import mountinfo
from ccpu.linux.mount import MNT_DETACH, mount as sys_mount, umount as sys_umount
from hack.containerd_env import FractalEnv
from tests.integration.test_shim_vm import RUNTIME, remove, task_status, wait_for
from tests.security.privns import in_private_mount_ns

def _mount_ids_at(path: Path) -> list[int]:
    return [m.mount_id for m in mountinfo.read() if m.mountpoint == str(path)]


def _mounts_below(path: Path) -> list[str]:
    prefix = str(path).rstrip("/") + "/"
    return [m.mountpoint for m in mountinfo.read() if m.mountpoint.startswith(prefix)]


def _start(env: FractalEnv, ns: str, image: str, cid: str, *extra: str) -> subprocess.CompletedProcess[str]:
    r = env.ctr("run", "-d", "--snapshotter", "fractal", "--fifo-dir", str(env.fifo_dir),
                "--runtime", RUNTIME, "--annotation", "io.fractal.mode=vm",
                "--annotation", "io.fractal.sandbox=atk", *extra, image, cid, "sleep", "600",
                namespace=ns, timeout=240, check=False)
    if r.returncode == 0:
        wait_for(lambda: task_status(env, ns, cid) == "RUNNING", what=f"{cid} running")
    return r


def scenario(registry: str, work: Path) -> dict:
    out: dict = {"private_mount_ns": in_private_mount_ns()}
    if not out["private_mount_ns"]:
        raise SystemExit("refusing to run outside a private mount namespace")
    bait, bait2 = work / "bait", work / "bait2"
    for d in (bait / "mnt", bait2, work / "victim-data", work / "late-data"):
        d.mkdir(parents=True)
    sys_mount("tmpfs", str(bait / "mnt"), "tmpfs", 0, "size=1m")
    (bait / "mnt" / "marker").write_text("still here\n")
    (work / "victim-data" / "keep").write_text("victim data\n")
    (work / "late-data" / "keep").write_text("late data\n")
    out["bait_ids_before"] = _mount_ids_at(bait / "mnt")
    image = f"{registry}/fractal/busybox:latest"
    try:
        with FractalEnv() as env:
            ns = env.new_namespace()
            env.pull(image, namespace=ns)
            vol = "type=bind,src={},dst=/data,options=rbind:rw"
            r = _start(env, ns, image, "victim", "--mount", vol.format(work / "victim-data"))
            out["victim_start"] = [r.returncode, r.stderr[-2000:]]
            r = _start(env, ns, image, "attacker", "--privileged", "--with-ns", "pid:/proc/1/ns/pid")
            out["attacker_start"] = [r.returncode, r.stderr[-2000:]]
            script = (f"V=/proc/1/root/run/fractal/volumes; ls -la $V; "
                      f"mv $V/victim $V/victim.moved; ln -s {bait} $V/victim; "
                      f"ln -s {bait2} $V/late; ls -la $V")
            r = env.ctr("tasks", "exec", "--exec-id", "atk1", "attacker", "sh", "-c", script,
                        namespace=ns, check=False, timeout=120)
            out["attack"] = [r.returncode, r.stdout[-2000:], r.stderr[-2000:]]
            r = _start(env, ns, image, "late", "--mount", vol.format(work / "late-data"))
            out["late_start"] = [r.returncode, r.stderr[-2000:]]
            for cid in ("late", "victim", "attacker"):
                remove(env, ns, cid)
            vms = env.fractal_run_dir / "vms"
            wait_for(lambda: not (vms / ns / "atk").exists(), what="VM run dir removed")
            out["mounts_left_in_run_dir"] = _mounts_below(env.fractal_run_dir)
            env.remove_namespace(ns)
    finally:
        out["bait_ids_after"] = _mount_ids_at(bait / "mnt")
        marker = bait / "mnt" / "marker"
        out["bait_marker"] = marker.read_text() if marker.exists() else None
        out["bait2_entries"] = sorted(os.listdir(bait2))
        out["mounts_below_bait2"] = _mounts_below(bait2)
        out["victim_data"] = sorted(os.listdir(work / "victim-data"))
        out["late_data"] = sorted(os.listdir(work / "late-data"))
        for _ in out["bait_ids_after"]:
            sys_umount(str(bait / "mnt"), MNT_DETACH)
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--registry", required=True)
    p.add_argument("--work", required=True, type=Path)
    args = p.parse_args(argv)
    print(json.dumps(scenario(args.registry, args.work)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
