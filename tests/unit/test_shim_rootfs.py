"""CreateTaskRequest.rootfs -> agent rootfs argument."""

from __future__ import annotations

from dataclasses import dataclass, field

from shim.rootfs import parse


def translate(mounts, repo_root):  # noqa: ANN001, ANN201 - the agent's rootfs argument
    return parse(mounts, repo_root).to_wire()

REPO = "/var/lib/fractal"


@dataclass
class M:
    type: str
    source: str
    options: list[str] = field(default_factory=list)


def overlay(*lowers: str, upper: str = "/var/lib/fractal/active/9/fs",
            work: str = "/var/lib/fractal/active/9/work", extra: tuple[str, ...] = ("index=off",)) -> M:
    opts = [*extra, f"workdir={work}", f"upperdir={upper}", "lowerdir=" + ":".join(lowers)]
    return M("overlay", "overlay", opts)


def test_no_mounts() -> None:
    assert translate([], REPO) == {"kind": "none"}


def test_repo_layers() -> None:
    m = overlay("/var/lib/fractal/layers/3", "/var/lib/fractal/layers/1")
    assert translate([m], REPO) == {
        "kind": "layers", "lowers": ["/var/lib/fractal/layers/3", "/var/lib/fractal/layers/1"],
        "upper": "/var/lib/fractal/active/9/fs", "work": "/var/lib/fractal/active/9/work"}


def test_repo_root_with_trailing_slash() -> None:
    assert translate([overlay("/var/lib/fractal/layers/3")], REPO + "/")["kind"] == "layers"


def test_lower_outside_repo_layers_is_passed_through() -> None:
    for bad in ("/var/lib/containerd/snap/1/fs", "/var/lib/fractal/layers", "layers/3",
                "/var/lib/fractal/layers/../active/1", "/var/lib/fractalx/layers/1"):
        m = overlay("/var/lib/fractal/layers/3", bad)
        out = translate([m], REPO)
        assert out["kind"] == "mounts", bad
        assert out["mounts"] == [{"type": "overlay", "source": "overlay", "options": m.options}]


def test_read_only_overlay_or_several_mounts_pass_through() -> None:
    ro = M("overlay", "overlay", ["lowerdir=/var/lib/fractal/layers/2:/var/lib/fractal/layers/1"])
    assert translate([ro], REPO)["kind"] == "mounts"
    two = [overlay("/var/lib/fractal/layers/1"), M("bind", "/x", ["rbind"])]
    assert translate(two, REPO)["kind"] == "mounts"
    assert translate([overlay("/var/lib/fractal/layers/1")], None)["kind"] == "mounts"


def test_bind_mount_of_overlayfs_snapshotter() -> None:
    m = M("bind", "/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs/snapshots/5/fs",
          ["rw", "rbind"])
    assert translate([m], REPO) == {"kind": "mounts", "mounts": [
        {"type": "bind", "source": m.source, "options": ["rw", "rbind"]}]}
