"""Snapshot semantics of the repo, on a real directory (no containerd)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ccpu.repo import (
    SNAPSHOT_REF_LABEL, AlreadyExists, FailedPrecondition, InvalidArgument, Kind, NotFound, Repo, RepoLocked,
)

CHAIN1 = "sha256:" + "1" * 64
CHAIN2 = "sha256:" + "2" * 64


@pytest.fixture
def repo(tmp_path: Path):
    r = Repo(tmp_path / "repo", background_removal=False)
    yield r
    r.close()


def unpack(repo: Repo, ns: str, chain: str, parent: str = "", files: dict[str, str] | None = None) -> str:
    """Do what containerd's unpacker does for one layer; returns the committed name."""
    key = f"{ns}/1/extract-{chain[-4:]} {chain}"
    try:
        mounts = repo.prepare(key, parent, {SNAPSHOT_REF_LABEL: chain})
    except AlreadyExists:
        found = list(repo.list([f'labels."{SNAPSHOT_REF_LABEL}"=={chain},parent=="{parent}"']))
        assert len(found) == 1 and found[0].kind is Kind.COMMITTED
        return found[0].name
    upper = upper_of(mounts)
    for name, content in (files or {}).items():
        Path(upper, name).write_text(content)
    name = f"{ns}/2/{chain}"
    repo.commit(name, key)
    return name


def upper_of(mounts) -> str:
    m = mounts[0]
    if m.type == "bind":
        return m.source
    return next(o.split("=", 1)[1] for o in m.options if o.startswith("upperdir="))


def lowers_of(mounts) -> list[str]:
    m = mounts[0]
    if m.type == "bind":
        return [m.source]
    return next(o.split("=", 1)[1] for o in m.options if o.startswith("lowerdir=")).split(":")


def test_prepare_without_parent_is_rw_bind(repo: Repo) -> None:
    mounts = repo.prepare("a")
    assert len(mounts) == 1 and mounts[0].type == "bind"
    assert "rw" in mounts[0].options
    assert os.path.isdir(mounts[0].source)
    assert repo.stat("a").kind is Kind.ACTIVE
    assert repo.mounts("a") == mounts


def test_commit_then_child_gets_overlay_over_layer(repo: Repo) -> None:
    Path(upper_of(repo.prepare("a"))).joinpath("f").write_text("x")
    repo.commit("base", "a")
    with pytest.raises(NotFound):
        repo.stat("a")
    info = repo.stat("base")
    assert info.kind is Kind.COMMITTED and info.parent == ""
    m = repo.prepare("c", "base")
    assert m[0].type == "overlay"
    [lower] = lowers_of(m)
    assert Path(lower, "f").read_text() == "x"
    assert Path(lower).parent == repo.layers_dir
    assert repo.stat("c").parent == "base"


def test_view_shapes(repo: Repo) -> None:
    empty = repo.view("v0")
    assert empty[0].type == "bind" and "ro" in empty[0].options
    repo.prepare("a")
    repo.commit("l1", "a")
    one = repo.view("v1", "l1")
    assert one[0].type == "bind" and "ro" in one[0].options
    repo.prepare("b", "l1")
    repo.commit("l2", "b")
    two = repo.view("v2", "l2")
    assert two[0].type == "overlay"
    assert not any(o.startswith("upperdir=") for o in two[0].options)
    assert len(lowers_of(two)) == 2
    assert repo.stat("v2").kind is Kind.VIEW
    with pytest.raises(FailedPrecondition):
        repo.commit("x", "v2")


def test_lowerdirs_nearest_first(repo: Repo) -> None:
    parent = ""
    for i in range(3):
        up = upper_of(repo.prepare(f"k{i}", parent))
        Path(up, "level").write_text(str(i))
        repo.commit(f"l{i}", f"k{i}")
        parent = f"l{i}"
    lowers = lowers_of(repo.prepare("top", parent))
    assert [Path(p, "level").read_text() for p in lowers] == ["2", "1", "0"]


def test_errors(repo: Repo) -> None:
    repo.prepare("a")
    with pytest.raises(AlreadyExists):
        repo.prepare("a")
    with pytest.raises(NotFound):
        repo.prepare("b", "missing")
    with pytest.raises(InvalidArgument):  # parent must be committed
        repo.prepare("b", "a")
    with pytest.raises(NotFound):
        repo.commit("x", "missing")
    repo.commit("l", "a")
    with pytest.raises(FailedPrecondition):
        repo.commit("y", "l")
    repo.prepare("c", "l")
    with pytest.raises(FailedPrecondition):
        repo.remove("l")
    with pytest.raises(FailedPrecondition):
        repo.mounts("l")
    with pytest.raises(NotFound):
        repo.remove("nope")
    repo.prepare("d")
    with pytest.raises(AlreadyExists):
        repo.commit("l", "d")
    assert repo.stat("d").kind is Kind.ACTIVE  # the failed commit changed nothing


@pytest.mark.parametrize("key", ["", "../etc", "a/../../b", "/abs/../x", "a\x00b", "./x", "x" * 5000])
def test_bad_keys_rejected(repo: Repo, key: str) -> None:
    with pytest.raises(InvalidArgument):
        repo.prepare(key)
    assert list(repo.list()) == []
    assert list(repo.active_dir.iterdir()) == []


def test_bad_labels_rejected(repo: Repo) -> None:
    with pytest.raises(InvalidArgument):
        repo.prepare("a", labels={"k": "v" * 5000})
    with pytest.raises(InvalidArgument):
        repo.prepare("a", labels={"k\x00": "v"})
    with pytest.raises(InvalidArgument):
        repo.prepare("a", labels={SNAPSHOT_REF_LABEL: "../../etc"})
    assert list(repo.list()) == []


def test_second_namespace_reuses_layers(repo: Repo) -> None:
    top1 = unpack(repo, "ns1", CHAIN1, files={"a": "1"})
    top1b = unpack(repo, "ns1", CHAIN2, parent=top1, files={"b": "2"})
    assert len(repo.layers()) == 2
    # second namespace: both layers come from the repo, nothing is unpacked
    top2 = unpack(repo, "ns2", CHAIN1)
    assert top2 == CHAIN1
    top2b = unpack(repo, "ns2", CHAIN2, parent=top2)
    assert repo.stat(top2b).parent == CHAIN1
    assert len(repo.layers()) == 2
    # third namespace finds the very same committed snapshots
    assert unpack(repo, "ns3", CHAIN1) == top2
    assert unpack(repo, "ns3", CHAIN2, parent=top2) == top2b
    # containers on either chain see the same data
    l1 = lowers_of(repo.prepare("c1", top1b))
    l2 = lowers_of(repo.prepare("c2", top2b))
    assert l1 == l2
    # removing ns1's snapshots keeps data ns2 still uses
    repo.remove("c1")
    repo.remove(top1b)
    repo.remove(top1)
    assert len(repo.layers()) == 2
    assert Path(l2[0], "b").read_text() == "2"
    repo.remove("c2")
    repo.remove(top2b)
    repo.remove(top2)
    assert repo.layers() == []
    assert list(repo.layers_dir.iterdir()) == []


def test_concurrent_unpack_of_same_layer_keeps_one_copy(repo: Repo) -> None:
    k1 = f"ns1/1/extract {CHAIN1}"
    k2 = f"ns2/1/extract {CHAIN1}"
    repo.prepare(k1, "", {SNAPSHOT_REF_LABEL: CHAIN1})
    repo.prepare(k2, "", {SNAPSHOT_REF_LABEL: CHAIN1})  # neither committed yet: both unpack
    repo.commit(f"ns1/2/{CHAIN1}", k1)
    repo.commit(f"ns2/2/{CHAIN1}", k2)
    [layer] = repo.layers()
    assert sorted(layer.users) == [f"ns1/2/{CHAIN1}", f"ns2/2/{CHAIN1}"]
    assert list(repo.active_dir.iterdir()) == []


def test_update_labels(repo: Repo) -> None:
    from ccpu.repo import SnapshotInfo

    repo.prepare("a", labels={"x": "1", "y": "2"})
    before = repo.stat("a")
    info = repo.update(SnapshotInfo("a", Kind.ACTIVE, labels={"x": "9", "z": "3"}), ["labels.x", "labels.y"])
    assert info.labels == {"x": "9"}
    assert info.updated_ns >= before.updated_ns and info.created_ns == before.created_ns
    info = repo.update(SnapshotInfo("a", Kind.ACTIVE, labels={"q": "1"}), [])
    assert info.labels == {"q": "1"}
    with pytest.raises(InvalidArgument):
        repo.update(SnapshotInfo("a", Kind.ACTIVE, parent="x"), ["parent"])
    with pytest.raises(NotFound):
        repo.update(SnapshotInfo("zz", Kind.ACTIVE), [])


def test_usage(repo: Repo) -> None:
    up = upper_of(repo.prepare("a"))
    Path(up, "f").write_bytes(b"x" * 100_000)
    active = repo.usage("a")
    assert active.size >= 100_000 and active.inodes == 2
    repo.commit("l", "a")
    assert repo.usage("l") == active


def test_list_filters(repo: Repo) -> None:
    repo.prepare("a", labels={"team": "x"})
    repo.commit("l", "a")
    repo.prepare("b", "l", labels={"team": "y"})
    names = lambda *f: sorted(i.name for i in repo.list(list(f)))  # noqa: E731
    assert names() == ["b", "l"]
    assert names("parent==l") == ["b"]
    assert names("kind==committed") == ["l"]
    assert names("labels.team==y", "name==l") == ["b", "l"]
    with pytest.raises(InvalidArgument):
        names("==")


def test_second_process_cannot_open_repo(repo: Repo) -> None:
    with pytest.raises(RepoLocked):
        Repo(repo.root)


def test_recover_removes_orphans_and_undoes_interrupted_commit(tmp_path: Path) -> None:
    root = tmp_path / "r"
    r = Repo(root, background_removal=False)
    up = upper_of(r.prepare("a"))
    Path(up, "keep").write_text("k")
    r.prepare("b")
    r.commit("l", "b")
    sid = int(Path(up).parent.name)
    r.close()
    # states a kill -9 can leave: a half-made Prepare, a layer nobody names,
    # and a commit whose rename happened but whose transaction did not
    (root / "active" / ".new-deadbeef" / "fs").mkdir(parents=True)
    (root / "layers" / "999").mkdir()
    os.rename(Path(up), root / "layers" / str(sid))
    r = Repo(root, background_removal=False)
    try:
        assert Path(up, "keep").read_text() == "k"
        assert not (root / "layers" / "999").exists()
        assert not (root / "active" / ".new-deadbeef").exists()
        assert r.stat("a").kind is Kind.ACTIVE
        r.commit("l2", "a")
        assert {i.name for i in r.list()} == {"l", "l2"}
    finally:
        r.close()


def test_pins_keep_layers_alive(repo: Repo) -> None:
    name = unpack(repo, "ns", CHAIN1, files={"f": "x"})
    repo.pin(CHAIN1, "container-1")
    repo.remove(name)
    [layer] = repo.layers()
    assert layer.users == ("pin:container-1",)
    repo.unpin(CHAIN1, "container-1")
    assert repo.layers() == []
    with pytest.raises(NotFound):
        repo.pin(CHAIN2, "c")


def test_unlabelled_unpack_is_deduplicated_at_commit(repo: Repo) -> None:
    """ctr 1.6 sends no snapshot.ref label; the chain ID in key and name still identify the layer."""
    for ns in ("ns1", "ns2"):
        key = f"{ns}/5/extract-123-abc {CHAIN1}"
        Path(upper_of(repo.prepare(key))).joinpath("f").write_text(ns)
        repo.commit(f"{ns}/6/{CHAIN1}", key)
    [layer] = repo.layers()
    assert layer.chain_id == CHAIN1
    assert Path(layer.path, "f").read_text() == "ns1"  # the first copy is kept, the second dropped
    assert len(list(repo.trash_dir.iterdir())) == 0


def test_removal_never_deletes_through_a_mount(repo: Repo, tmp_path: Path) -> None:
    """A snapshot dir with something still mounted inside keeps that mount's data."""
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    up = Path(upper_of(repo.prepare("a")))
    inner = up / "mnt"
    inner.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(inner)], check=True)
    try:
        (inner / "precious").write_text("keep")
        repo.remove("a")  # metadata goes; the directory must not be emptied through the mount
        assert list(repo.list()) == []
        leftovers = [p for p in repo.trash_dir.rglob("precious")]
        assert [p.read_text() for p in leftovers] == ["keep"]
    finally:
        subprocess.run(["umount", "-l", str(next(repo.trash_dir.rglob("mnt"), inner))], check=False)
    repo.recover()
    assert list(repo.trash_dir.iterdir()) == []
