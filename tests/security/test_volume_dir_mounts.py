"""shim/volumes.py, without a VM: the guest cannot reshape the volume share, and the shim
(alive or dead, through its record) unmounts exactly what it mounted (issue 10, 1).

Runs in a private mount namespace (tests/security/volume_dir_scenario.py) with a sacrificial
tmpfs as the bait.  The end-to-end attack through QEMU is tests/security/test_vm_volume_symlinks.py.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

from tests.security import privns


def test_volume_share_resists_the_guest_and_cleanup_follows_the_record(tmp_path: Path) -> None:
    out = privns.run("tests.security.volume_dir_scenario", str(tmp_path), timeout=120)
    context = json.dumps(out, indent=1)
    writes = out["guest_writes"]
    # the tree of the share is read-only to the guest; the volume itself is not
    assert writes.pop("write in the volume") == 0, context
    assert set(writes.values()) == {errno.EROFS}, context
    assert out["host_sees_guest_write"] == "ok\n", context
    assert out["recorded"] == ["volumes", "volumes/c1/0"] and out["recorded_ids_mounted"], context
    for case in ("after_dead_shim", "after_intent_only"):
        assert out[case]["run_dir_exists"] is False and out[case]["mounts_below"] == [], context
    assert out["after_dead_shim"]["recorded_ids_left"] == [], context
    # a record that names another mount's id: that mount is left alone, the dir is kept, data too
    assert out["mismatch_error"] and "is not there any more" in out["mismatch_error"], context
    assert out["after_mismatch"]["bait_mounted"] and out["after_mismatch"]["run_dir_exists"], context
    # a mount nobody recorded below the run dir: left mounted, not entered, the dir kept
    assert out["unrecorded_error"] and "mounted below it" in out["unrecorded_error"], context
    assert out["after_unrecorded"]["still_mounted"] == [str(tmp_path / "run5" / "other" / "mnt")], context
    for case in ("after_dead_shim", "after_intent_only", "after_mismatch", "after_unrecorded"):
        assert out[case]["data"] == ["guest", "keep"], context
