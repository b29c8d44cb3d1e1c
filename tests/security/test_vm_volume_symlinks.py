"""Guest root must not steer the shim's mounts through symlinks in the volume share (issue 10, 1).

The volume dir of a VM sandbox is shared read-write with the guest over 9p.  A guest that
replaces a container's volume dir with a symlink to a host dir must not make the shim detach
mounts there when that container is deleted, nor create files or bind mounts there when a
container is created.  The whole scenario (containerd, snapshotter, shim, QEMU) runs in a
private mount namespace with sacrificial mounts as the bait (tests/security/
volume_symlink_scenario.py), so a regression cannot detach the machine's mounts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.security import privns


@pytest.fixture(scope="module", autouse=True)
def _guest_built() -> None:
    if not Path("/usr/bin/qemu-system-x86_64").exists():
        pytest.skip("qemu-system-x86_64 is not installed")
    from ccpu.guest import initramfs

    initramfs.build(offline=True)


def test_guest_symlink_in_volume_dir_cannot_steer_host_mounts(registry, tmp_path: Path) -> None:  # noqa: ANN001
    out = privns.run("tests.security.volume_symlink_scenario", "--registry", registry.address,
                     "--work", str(tmp_path))
    context = json.dumps(out, indent=1)
    assert out["private_mount_ns"]
    assert out["victim_start"][0] == 0 and out["attacker_start"][0] == 0, context
    # deleting the victim did not detach the mount its symlink pointed to
    assert out["bait_ids_after"] == out["bait_ids_before"] != [], context
    assert out["bait_marker"] == "still here\n", context
    # creating `late` made nothing (no dir, no mount) where the planted symlink pointed
    assert out["bait2_entries"] == [] and out["mounts_below_bait2"] == [], context
    # the guest cannot disturb the volumes of later containers either: `late` ran normally
    assert out["late_start"][0] == 0, context
    assert out["mounts_left_in_run_dir"] == [], context
    assert out["victim_data"] == ["keep"] and out["late_data"] == ["keep"], context
