"""shim/guestpaths.py: a VM sandbox's host paths -> its guest's (pure)."""

from __future__ import annotations

import pytest

from ccpu.stack import LayerStack, Mount
from shim.rootfs import NoRootfs, PassThroughMounts

from shim import guestpaths as gp
from shim.guestspec import NotInVm

LAYERS = "/var/lib/fractal/layers"


def test_under_is_strictly_below_after_normalisation() -> None:
    assert gp.under(f"{LAYERS}/abc", LAYERS) and gp.under(f"{LAYERS}/abc/", LAYERS + "/")
    assert gp.under("/x", "/")
    for outside in (LAYERS, f"{LAYERS}/", f"{LAYERS}-x/abc", f"{LAYERS}/../snapshots/1", "/var/lib"):
        assert not gp.under(outside, LAYERS), outside


def test_guest_layer_path() -> None:
    assert gp.guest_layer_path(f"{LAYERS}/abc", LAYERS) == "/repo/layers/abc"
    assert gp.guest_layer_path(f"{LAYERS}/abc/", LAYERS) == "/repo/layers/abc"
    assert gp.guest_layer_path(f"{LAYERS}/abc/fs", LAYERS) == "/repo/layers/abc/fs"
    for bad in (LAYERS, f"{LAYERS}-x/abc", "/var/lib/fractal/snapshots/1/fs", "layers/abc",
                f"{LAYERS}/../snapshots/1"):
        with pytest.raises(NotInVm):
            gp.guest_layer_path(bad, LAYERS)


def test_guest_rootfs_layers() -> None:
    rootfs = LayerStack((f"{LAYERS}/b", f"{LAYERS}/a"),
                        "/var/lib/fractal/snapshots/7/fs", "/var/lib/fractal/snapshots/7/work")
    assert gp.guest_rootfs(rootfs, "c1", LAYERS).to_wire() == {
        "kind": "layers", "lowers": ["/repo/layers/b", "/repo/layers/a"],
        "upper": "/run/fractal/containers/c1/upper", "work": "/run/fractal/containers/c1/work"}
    assert gp.guest_scratch_dir("c1") == "/run/fractal/containers/c1"
    assert gp.guest_bundle("c1") == "/run/fractal/bundles/c1"


@pytest.mark.parametrize("rootfs", [
    PassThroughMounts((Mount("overlay", "overlay", ("lowerdir=/var/lib/containerd/x/1/fs",)),)),
    NoRootfs(),
])
def test_guest_rootfs_refuses_what_the_guest_cannot_see(rootfs: object) -> None:
    with pytest.raises(NotInVm, match="fractal snapshotter"):
        gp.guest_rootfs(rootfs, "c1", LAYERS)


def test_host_layer_path_inverts_guest_layer_path() -> None:
    from shim.guestpaths import guest_layer_path, host_layer_path

    host = "/var/lib/fractal/layers/17/fs"
    guest = guest_layer_path(host, "/var/lib/fractal/layers")
    assert host_layer_path(guest, "/var/lib/fractal/layers") == host
    assert host_layer_path("/run/fractal/containers/c/upper", "/var/lib/fractal/layers") == \
        "/run/fractal/containers/c/upper"
    assert host_layer_path("/repo/layers/../etc", "/var/lib/fractal/layers") == "/repo/layers/../etc"
