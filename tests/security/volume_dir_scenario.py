"""shim/volumes.py against a hostile guest and a dead shim, without a VM (run by
tests/security/test_volume_dir_mounts.py inside a private mount namespace: it mounts and
unmounts).  The guest's writes are made directly on the shared dir, as QEMU's 9p server would
make them for it.  Prints one JSON object with what happened; the test judges it."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ccpu.linux import mountinfo
from ccpu.linux.mount import MNT_DETACH, MS_BIND, mount as sys_mount, umount as sys_umount
from shim.guestspec import Volume
from shim.mountrecord import RECORD, MountRecordError, remove_run_dir
from shim.volumes import VolumeDir
from tests.security.privns import in_private_mount_ns


def _ids() -> set[int]:
    return {m.mount_id for m in mountinfo.read()}


def _below(path: Path) -> list[str]:
    prefix = str(path) + "/"
    return [m.mountpoint for m in mountinfo.read() if m.mountpoint.startswith(prefix)]


def _try(fn) -> int:  # noqa: ANN001
    try:
        fn()
        return 0
    except OSError as exc:
        return exc.errno or -1


def _sandbox_with_a_volume(run: Path, cid: str, data: Path, mnt_id: int | None = None) -> None:
    """A shim's volume dir with one volume of ``cid``, then the shim gone (its fds dropped),
    its record saying ``mnt_id`` for that volume (when given: a damaged or crashed record)."""
    run.mkdir()
    vols = VolumeDir(str(run))
    vols.create()
    vols.attach(cid, [Volume(str(data), f"{cid}/0", True, False, True)])
    if mnt_id is not None:
        rec = json.loads((run / RECORD).read_text())
        for m in rec["mounts"]:
            if m["path"] == f"volumes/{cid}/0":
                m["id"] = mnt_id or None
        (run / RECORD).write_text(json.dumps(rec))
    vols.close()


def scenario(work: Path) -> dict:
    out: dict = {"private_mount_ns": in_private_mount_ns()}
    if not out["private_mount_ns"]:
        raise SystemExit("refusing to run outside a private mount namespace")
    data, bait = work / "data", work / "bait"
    data.mkdir()
    (data / "keep").write_text("host data\n")
    bait.mkdir()
    sys_mount("tmpfs", str(bait), "tmpfs", 0, "size=1m")
    bait_id = max(m.mount_id for m in mountinfo.read() if m.mountpoint == str(bait))
    run = work / "run"
    run.mkdir()

    # 1. the guest cannot change the tree of the share
    vols = VolumeDir(str(run))
    vols.create()
    vols.attach("c1", [Volume(str(data), "c1/0", True, False, True)])
    root = Path(vols.root)
    out["guest_writes"] = {
        "symlink for a later container": _try(lambda: os.symlink(str(bait), root / "c2")),
        "rename a volume dir": _try(lambda: os.rename(root / "c1", root / "moved")),
        "replace a volume dir": _try(lambda: os.rmdir(root / "c1")),
        "new file": _try(lambda: (root / "junk").write_text("x")),
        "write in the volume": _try(lambda: (root / "c1" / "0" / "guest").write_text("ok\n")),
    }
    out["host_sees_guest_write"] = (data / "guest").read_text() if (data / "guest").exists() else None

    # 2. a dead shim: its record alone lets a fresh process undo exactly its mounts
    record = json.loads((run / RECORD).read_text())
    out["recorded"] = [m["path"] for m in record["mounts"]]
    recorded_ids = {m["id"] for m in record["mounts"]}
    out["recorded_ids_mounted"] = recorded_ids <= _ids()
    vols.close()  # the fds only (the shim process is "gone")
    remove_run_dir(str(run))
    out["after_dead_shim"] = {"run_dir_exists": run.exists(), "mounts_below": _below(run),
                              "recorded_ids_left": sorted(recorded_ids & _ids()),
                              "data": sorted(os.listdir(data))}

    # 3. the shim died between recording a mount and learning its id: the intent is enough
    _sandbox_with_a_volume(run, "c3", data, mnt_id=0)  # 0: recorded without an id
    remove_run_dir(str(run))
    out["after_intent_only"] = {"run_dir_exists": run.exists(), "mounts_below": _below(run),
                                "data": sorted(os.listdir(data))}

    # 4. a record naming another mount's id is not obeyed: only the recorded mount at its place goes
    _sandbox_with_a_volume(run, "c4", data, mnt_id=bait_id)
    try:
        remove_run_dir(str(run))
        out["mismatch_error"] = None
    except MountRecordError as exc:
        out["mismatch_error"] = str(exc)
    out["after_mismatch"] = {"bait_mounted": bait_id in _ids(), "data": sorted(os.listdir(data)),
                             "run_dir_exists": run.exists()}
    for point in reversed(_below(run)):  # the scenario's own clean-up
        sys_umount(point, MNT_DETACH)

    # 5. a mount nobody recorded: not unmounted, not entered, not removed (the data stays)
    run5 = work / "run5"
    (run5 / "other" / "mnt").mkdir(parents=True)
    sys_mount(str(data), str(run5 / "other" / "mnt"), None, MS_BIND, None)
    try:
        remove_run_dir(str(run5))
        out["unrecorded_error"] = None
    except MountRecordError as exc:
        out["unrecorded_error"] = str(exc)
    out["after_unrecorded"] = {"still_mounted": _below(run5), "data": sorted(os.listdir(data))}
    for point in reversed(_below(run5)):
        sys_umount(point, MNT_DETACH)
    sys_umount(str(bait), MNT_DETACH)
    return out


def main() -> int:
    print(json.dumps(scenario(Path(sys.argv[1]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
