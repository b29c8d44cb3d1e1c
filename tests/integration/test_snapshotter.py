"""The fractal snapshotter through a real containerd: pull, run, dedup, GC, errors, crashes."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest

from ccpu.api.gen.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from ccpu.api.gen.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from ccpu.repo import Repo
from ccpu.repo.fsutil import disk_usage
from ccpu.stack import compact_lowerdirs
from hack import testimages
from hack.containerd_env import CommandError, FractalEnv
from tests.harness import private_snapshotter

SN = "fractal"


def layers_size(env: FractalEnv) -> int:
    return disk_usage(env.snapshotter_root / "layers").size


def wait_for(cond, timeout: float = 15.0, what: str = "condition") -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def bundle_rootfs(env: FractalEnv, ns: str, cid: str) -> Path:
    return env.run_dir / "st" / "io.containerd.runtime.v2.task" / ns / cid / "rootfs"


def mount_options(path: Path) -> str:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == str(path):
            return line.split(" - ", 1)[1]
    raise AssertionError(f"{path} is not a mount point")


def repo_consistent(env: FractalEnv) -> list[str]:
    """Directories on disk match the metadata exactly (what a crash must never break)."""
    repo = Repo.open_readonly(env.snapshotter_root)
    try:
        problems = []
        layer_ids = {str(la.id) for la in repo.layers()}
        on_disk = {p.name for p in repo.layers_dir.iterdir()}
        if layer_ids != on_disk:
            problems.append(f"layers: metadata {sorted(layer_ids)} != disk {sorted(on_disk)}")
        rows = repo.meta.snapshots()
        active = {str(r.id) for r in rows if r.kind.name != "COMMITTED"}
        active_disk = {p.name for p in repo.active_dir.iterdir()}
        if active != active_disk:
            problems.append(f"active: metadata {sorted(active)} != disk {sorted(active_disk)}")
        for r in rows:
            if r.layer_id is not None and not (repo.layers_dir / str(r.layer_id)).is_dir():
                problems.append(f"{r.name} names missing layer {r.layer_id}")
        return problems
    finally:
        repo.close()


@pytest.fixture
def snap_client(fenv: FractalEnv):
    with grpc.insecure_channel(f"unix:{fenv.snapshotter_address}") as ch:
        yield pb_grpc.SnapshotsStub(ch)


def test_edge_image_contents_in_running_container(fenv: FractalEnv, registry, namespace: str) -> None:
    ref = registry.ref("edge")
    fenv.pull(ref, namespace=namespace)
    fenv.run(ref, "edge1", "sleep", "300", rm=False, namespace=namespace, extra=["-d"])
    try:
        rootfs = bundle_rootfs(fenv, namespace, "edge1")
        # the rootfs containerd mounted is an overlay straight over the repo's layer dirs
        opts = mount_options(rootfs)
        assert opts.startswith("overlay overlay"), opts
        lowers = opts.split("lowerdir=", 1)[1].split(",", 1)[0].split(":")
        assert len(lowers) == 4  # busybox + 3 edge layers
        assert all(Path(p).parent == fenv.snapshotter_root / "layers" for p in lowers), lowers
        failures = testimages.check_rootfs(rootfs, testimages.EDGE_EXPECTATIONS)
        assert failures == []
        # and the container itself sees the same through busybox
        out = fenv.ctr("tasks", "exec", "--exec-id", "e1", "edge1", "sh", "-c",
                       "stat -c '%n %u %g %a %s %h' /edge/setuid /edge/owned /edge/empty /edge/hard1;"
                       " readlink /edge/abs-link; readlink /edge/rel-link; ls /edge/opaque;"
                       " sha256sum /edge/big; cat /edge/EXPECTED; test -e /edge/deleted || echo deleted-gone",
                       namespace=namespace).stdout.splitlines()
        assert out[0] == "/edge/setuid 0 0 4755 16 1"
        assert out[1].startswith("/edge/owned 1234 1234 644 ")
        assert out[2] == "/edge/empty 0 0 644 0 1"
        assert out[3].endswith(" 2")
        assert out[4:6] == ["/edge/empty", "../edge/empty"]
        assert out[6] == "c"
        expected = json.loads(out[8])
        assert out[7].split()[0] == expected["big"]["sha256"] == testimages.EDGE_BIG_SHA256
        assert out[9] == "deleted-gone"
        # writes go to the container's own upper, never into the shared layers
        fenv.ctr("tasks", "exec", "--exec-id", "e2", "edge1", "sh", "-c", "echo w > /edge/modified; rm /edge/empty",
                 namespace=namespace)
        with_empty = [p for p in lowers if (Path(p) / "edge" / "empty").exists()]
        assert len(with_empty) == 1, "the shared layer lost /edge/empty"
        top_modified = next(Path(p) / "edge" / "modified" for p in lowers if (Path(p) / "edge" / "modified").exists())
        assert top_modified.read_text() == "v2\n"
        assert (rootfs / "edge" / "modified").read_text() == "w\n"
        assert not (rootfs / "edge" / "empty").exists()
    finally:
        fenv.ctr("tasks", "kill", "-s", "SIGKILL", "edge1", namespace=namespace, check=False)
        wait_for(lambda: "STOPPED" in fenv.ctr("tasks", "ls", namespace=namespace).stdout
                 or "edge1" not in fenv.ctr("tasks", "ls", namespace=namespace).stdout, what="task exit")
        fenv.ctr("tasks", "delete", "edge1", namespace=namespace, check=False)
        fenv.ctr("containers", "delete", "edge1", namespace=namespace, check=False)
    assert not rootfs.is_mount()


def test_run_busybox_exit_code_and_output(fenv: FractalEnv, registry, namespace: str) -> None:
    ref = registry.ref("busybox")
    fenv.pull(ref, namespace=namespace)
    r = fenv.run(ref, "bb1", "sh", "-c", "echo hello from fractal; exit 3", namespace=namespace, check=False)
    assert r.stdout.strip() == "hello from fractal"
    assert r.returncode == 3


def test_second_namespace_adds_no_layer_data(fenv: FractalEnv, registry) -> None:
    ref = registry.ref("edge")
    ns1, ns2 = fenv.new_namespace(), fenv.new_namespace()
    try:
        fenv.pull(ref, namespace=ns1)
        after_first = layers_size(fenv)
        n_layers = len(os.listdir(fenv.snapshotter_root / "layers"))
        fenv.pull(ref, namespace=ns2)
        wait_for(lambda: not any((fenv.snapshotter_root / "trash").iterdir()), what="trash emptied")
        grown = layers_size(fenv) - after_first
        assert grown < 64 * 1024, f"second namespace added {grown} bytes of layer data"
        assert len(os.listdir(fenv.snapshotter_root / "layers")) == n_layers
        # both namespaces still run containers on it
        r = fenv.run(ref, "dd2", "cat", "/edge/opaque/c", namespace=ns2)
        assert r.stdout == "c\n"
    finally:
        assert fenv.remove_namespace(ns1) == []
        assert fenv.remove_namespace(ns2) == []


def test_gc_after_image_removal_shrinks_repo(fenv: FractalEnv, registry, namespace: str) -> None:
    base = layers_size(fenv)
    fenv.pull(registry.ref("edge"), namespace=namespace)
    assert layers_size(fenv) - base > 64 << 20
    fenv.ctr("images", "rm", "--sync", registry.ref("edge"), namespace=namespace)
    wait_for(lambda: layers_size(fenv) - base < 64 * 1024, what="repo to shrink after GC")
    assert repo_consistent(fenv) == []


def test_ctr_snapshot_commands(fenv: FractalEnv, namespace: str) -> None:
    c = lambda *a, **kw: fenv.ctr("snapshots", "--snapshotter", SN, *a, namespace=namespace, **kw)  # noqa: E731
    c("prepare", "--target", "/nonexistent-never-mounted", "a")
    # no parent: one rw bind mount of the upper, "mount -t bind SRC /mnt -o rbind,rw"
    upper = Path(c("mounts", "/mnt", "a").stdout.split()[3])
    (upper / "data").write_bytes(b"x" * 65536)

    def usage(key: str) -> tuple[str, int]:
        """(size as ctr prints it, inodes) of ``ctr snapshots usage KEY``."""
        *size, inodes = c("usage", key).stdout.splitlines()[-1].split()[1:]
        return " ".join(size), int(inodes)

    active_usage = usage("a")  # measured now (an active upper, walked in a worker thread)
    assert active_usage[1] == 2, active_usage  # the upper dir and the file
    c("commit", "base", "a")
    assert usage("base") == active_usage  # recorded at Commit, answered from the layer's row
    c("prepare", "child", "base")
    c("label", "child", "team=x")
    ls = c("ls").stdout
    assert "base" in ls and "Committed" in ls and "child" in ls and "Active" in ls
    info = json.loads(c("info", "child").stdout)
    assert info["Parent"] == "base" and info["Labels"]["team"] == "x"
    mounts = c("mounts", "/mnt", "child").stdout
    assert "overlay" in mounts and "upperdir=" in mounts
    # errors come back as the codes containerd understands
    r = c("rm", "base", check=False)
    assert r.returncode != 0 and "failed precondition" in r.stderr.lower() or "child" in r.stderr.lower()
    r = c("prepare", "x", "no-such-parent", check=False)
    assert r.returncode != 0 and "not found" in r.stderr
    r = c("commit", "base", "child", check=False)
    assert r.returncode != 0 and "already exists" in r.stderr
    r = c("view", "v", "child", check=False)  # parent not committed
    # 1.6 passes this to the backend (our InvalidArgument); 2.x's metadata refuses it itself
    assert r.returncode != 0 and ("invalid argument" in r.stderr or "not a committed snapshot" in r.stderr)
    c("rm", "child")
    c("rm", "base")
    assert "base" not in c("ls").stdout


def test_bad_requests_get_codes_and_leave_nothing(snap_client, fenv: FractalEnv) -> None:
    before = repo_consistent(fenv)
    # Active dirs are named by never-reused ids: a bad request must add none. (Comparing counts
    # failed when containerd's GC removed an earlier test's snapshot meanwhile, on 2.x.)
    active_before = set(os.listdir(fenv.snapshotter_root / "active"))
    cases = [
        (pb.PrepareSnapshotRequest(key="../escape"), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.PrepareSnapshotRequest(key="/abs/../etc"), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.PrepareSnapshotRequest(key="nul\x00key"), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.PrepareSnapshotRequest(key="k", labels={"big": "x" * 5000}), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.PrepareSnapshotRequest(key="k", labels={"containerd.io/snapshot.ref": "../../x"}),
         grpc.StatusCode.INVALID_ARGUMENT),
        (pb.PrepareSnapshotRequest(key="k", parent="missing"), grpc.StatusCode.NOT_FOUND),
    ]
    for req, code in cases:
        with pytest.raises(grpc.RpcError) as e:
            snap_client.Prepare(req)
        assert e.value.code() == code, (req, e.value)
    with pytest.raises(grpc.RpcError) as e:
        snap_client.Remove(pb.RemoveSnapshotRequest(key="missing"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:
        list(snap_client.List(pb.ListSnapshotsRequest(filters=["=="])))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(os.listdir(fenv.snapshotter_root / "active")) - active_before == set()
    assert repo_consistent(fenv) == before == []


@pytest.fixture
def own_snap_client(tmp_path: Path):
    """A Snapshots client of a snapshotter of its own, which no containerd knows (see
    tests/harness.py private_snapshotter: containerd's GC would remove what we make over gRPC)."""
    with private_snapshotter(tmp_path, "--metrics-address", "none") as snap:
        yield snap.client


def test_update_and_list_filters_over_grpc(own_snap_client) -> None:
    snap_client = own_snap_client
    snap_client.Prepare(pb.PrepareSnapshotRequest(key="grpc-a", labels={"x": "1"}))
    try:
        from google.protobuf.field_mask_pb2 import FieldMask

        info = snap_client.Update(pb.UpdateSnapshotRequest(
            info=pb.Info(name="grpc-a", labels={"y": "2"}), update_mask=FieldMask(paths=["labels.y"]))).info
        assert dict(info.labels) == {"x": "1", "y": "2"}
        with pytest.raises(grpc.RpcError) as e:
            snap_client.Update(pb.UpdateSnapshotRequest(info=pb.Info(name="grpc-a", parent="p"),
                                                        update_mask=FieldMask(paths=["parent"])))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        got = [i.name for r in snap_client.List(pb.ListSnapshotsRequest(filters=['labels.y==2,name==grpc-a']))
               for i in r.info]
        assert got == ["grpc-a"]
        assert snap_client.Stat(pb.StatSnapshotRequest(key="grpc-a")).info.kind == pb.ACTIVE
    finally:
        snap_client.Remove(pb.RemoveSnapshotRequest(key="grpc-a"))


def test_128_layer_stack_mounts(fenv: FractalEnv, snap_client, namespace: str, tmp_path: Path) -> None:
    """containerd's testsuite stacks 128 layers in one mount; so must we (page-size option limit)."""
    c = lambda *a: fenv.ctr("snapshots", "--snapshotter", SN, *a, namespace=namespace)  # noqa: E731
    parent = ""
    for i in range(128):
        c("prepare", f"k{i}", *([parent] if parent else []))
        c("commit", f"l{i}", f"k{i}")
        parent = f"l{i}"
    c("prepare", "top", parent)
    # the backend name of "top" is namespaced by containerd: find it over our gRPC
    [name] = [i.name for r in snap_client.List(pb.ListSnapshotsRequest(filters=["kind==active"]))
              for i in r.info if i.name.endswith("/top")]
    [m] = snap_client.Mounts(pb.MountsRequest(key=name)).mounts
    lowers = [o for o in m.options if o.startswith("lowerdir=")][0].split(":")
    assert len(lowers) == 128
    plan = compact_lowerdirs(list(m.options))
    target = tmp_path / "mnt"
    target.mkdir()
    subprocess.run(["mount", "-t", m.type, m.source, "-o", ",".join(plan.options), str(target)],
                   cwd=plan.chdir, check=True)
    try:
        (target / "hello").write_text("on top of 128 layers")
    finally:
        subprocess.run(["umount", str(target)], check=True)
    c("rm", "top")
    for i in reversed(range(128)):
        c("rm", f"l{i}")


def test_snapshotter_restart_keeps_everything(fenv: FractalEnv, registry, namespace: str) -> None:
    ref = registry.ref("busybox")
    fenv.pull(ref, namespace=namespace)
    fenv.restart_snapshotter()
    assert fenv.run(ref, "r1", "echo", "still here", namespace=namespace).stdout == "still here\n"
    fenv.restart_snapshotter(kill=True)
    assert fenv.run(ref, "r2", "echo", "after kill", namespace=namespace).stdout == "after kill\n"
    assert repo_consistent(fenv) == []


@pytest.mark.parametrize("delay", [0.15, 0.4, 0.8])
def test_kill9_mid_pull_then_retry(fenv: FractalEnv, registry, namespace: str, delay: float) -> None:
    """Kill the snapshotter at some point of a pull; after restart the repo is consistent and the retry works."""
    ref = registry.ref("edge")
    result: dict[str, object] = {}

    def pull() -> None:
        try:
            result["r"] = fenv.pull(ref, namespace=namespace)
        except CommandError as e:
            result["err"] = e

    t = threading.Thread(target=pull)
    t.start()
    time.sleep(delay)
    assert fenv.snapshotter is not None
    fenv.snapshotter.kill9()
    t.join(120)
    fenv.snapshotter.start()
    fenv.wait_snapshotter_reachable()
    assert repo_consistent(fenv) == []
    fenv.pull(ref, namespace=namespace)  # containerd retries the unpack
    out = fenv.run(ref, "k9", "sh", "-c", "sha256sum /edge/big; cat /edge/opaque/c", namespace=namespace).stdout
    assert out.split()[0] == testimages.EDGE_BIG_SHA256
    assert out.splitlines()[1] == "c"
    assert repo_consistent(fenv) == []
