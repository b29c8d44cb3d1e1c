"""The repo on a full filesystem, through real containerd (issue 18 item 1).

The snapshotter's root is a small tmpfs of its own: a pull that does not fit fails with an
error that says the disk is full, the snapshotter keeps serving (same process, no restart),
removing images gives the space back, and the next pull works.  The same for inodes
(tmpfs ``nr_inodes``), and for a disk filled by someone else while the repo needs room.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ccpu.repo.space import RESERVE_NAME
from hack import testimages
from hack.containerd_env import FractalEnv
from tests.integration.test_snapshotter import repo_consistent, wait_for

MiB = 1 << 20


@pytest.fixture(scope="module")
def small_env() -> Iterator[FractalEnv]:
    """A FractalEnv whose repo is a tmpfs (remounted per test to the size under test)."""
    env = FractalEnv()
    env.snapshotter_root.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m,mode=0700", "fractal-repo-full",
                    str(env.snapshotter_root)], check=True)
    try:
        env.start()
        yield env
    finally:
        env.close()  # unmounts everything under its dirs, the tmpfs included


def remount(env: FractalEnv, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(env.snapshotter_root)], check=True)


def statvfs(env: FractalEnv) -> os.statvfs_result:
    return os.statvfs(env.snapshotter_root)


def pull(env: FractalEnv, ref: str, ns: str) -> subprocess.CompletedProcess[str]:
    return env.ctr("images", "pull", "--plain-http", "--snapshotter", "fractal", ref, namespace=ns,
                   check=False, timeout=300)


def remove_all(env: FractalEnv, ns: str) -> None:
    """What an operator does to free space: remove the images (containerd's GC removes the snapshots)."""
    images = env.ctr("images", "ls", "-q", namespace=ns).stdout.split()
    if images:
        env.ctr("images", "rm", "--sync", *images, namespace=ns)


def repo_emptied(env: FractalEnv) -> bool:
    root = env.snapshotter_root
    return not any(any((root / d).iterdir()) for d in ("layers", "active", "trash"))


@pytest.fixture
def empty_repo(small_env: FractalEnv, namespace_small: str) -> Iterator[FractalEnv]:
    yield small_env


@pytest.fixture
def namespace_small(small_env: FractalEnv) -> Iterator[str]:
    ns = small_env.new_namespace()
    yield ns
    problems = small_env.remove_namespace(ns)
    assert not problems, problems
    wait_for(lambda: repo_emptied(small_env), what="repo emptied after the test")
    remount(small_env, "size=256m,nr_inodes=100000")


def check_heals(env: FractalEnv, ns: str, pid: int, failed: subprocess.CompletedProcess[str], busybox: str) -> None:
    """After a failed pull: the snapshotter lives on, removal gives everything back, a pull works."""
    assert env.snapshotter is not None and env.snapshotter.pid == pid and env.snapshotter.running()
    assert "Traceback" not in failed.stderr and "OperationalError" not in failed.stderr, failed.stderr
    remove_all(env, ns)
    wait_for(lambda: repo_emptied(env), what="space given back")
    assert repo_consistent(env) == []
    r = pull(env, busybox, ns)
    assert r.returncode == 0, r.stderr
    out = env.run(busybox, "after-full", "echo", "works again", namespace=ns).stdout
    assert out == "works again\n"
    assert (env.snapshotter_root / RESERVE_NAME / "blocks").is_file()  # the reserve is back in place
    assert env.snapshotter.pid == pid  # no restart anywhere


@pytest.fixture
def refs(registry) -> dict[str, str]:  # noqa: ANN001
    """busybox, edge and the `many` image (pushed here: the session registry has the default ones)."""
    if registry.server is not None and "many" not in registry.pushed:
        registry.pushed["many"] = registry.server.push(testimages.build("many"), "fractal/many", "latest")
    return {name: registry.ref(name) for name in ("busybox", "edge", "many")}


def test_pull_bigger_than_the_disk_fails_clearly_and_heals(empty_repo: FractalEnv, namespace_small: str, refs: dict[str, str]) -> None:
    env, ns = empty_repo, namespace_small
    remount(env, "size=48m")  # edge's big layer is 65 MiB
    pid = env.snapshotter.pid
    r = pull(env, refs["edge"], ns)
    assert r.returncode != 0
    assert "no space left on device" in r.stderr.lower() or "is full" in r.stderr, r.stderr
    check_heals(env, ns, pid, r, refs["busybox"])


def test_pull_with_more_files_than_inodes_fails_clearly_and_heals(empty_repo: FractalEnv, namespace_small: str,
                                                                   refs: dict[str, str]) -> None:
    env, ns = empty_repo, namespace_small
    remount(env, f"nr_inodes={testimages.MANY_FILES // 2}")  # busybox fits (~420), the many layer not
    pid = env.snapshotter.pid
    r = pull(env, refs["many"], ns)
    assert r.returncode != 0
    assert "no space left on device" in r.stderr.lower() or "is full" in r.stderr, r.stderr
    check_heals(env, ns, pid, r, refs["busybox"])


@pytest.mark.parametrize("what", ["space", "inodes"])
def test_repo_full_says_what_is_full(empty_repo: FractalEnv, namespace_small: str, refs: dict[str, str],
                                    what: str) -> None:
    """Someone else filled the disk: the snapshotter's own answer is ResourceExhausted, in words."""
    env, ns = empty_repo, namespace_small
    pid = env.snapshotter.pid
    filler = env.snapshotter_root / "filler"
    if what == "space":
        remount(env, "size=16m")
        with open(filler, "wb") as fh:  # every free block
            try:
                while True:
                    fh.write(b"\0" * MiB)
                    fh.flush()
            except OSError:
                pass
        expect = "out of disk space"
    else:
        remount(env, "nr_inodes=1000")  # room for busybox (~420) once the filler is gone
        filler.mkdir()
        try:
            for i in range(1000):  # every free inode
                (filler / str(i)).touch()
        except OSError:
            pass
        expect = "out of inodes"
    try:
        r = env.ctr("snapshots", "--snapshotter", "fractal", "prepare", "full-probe", namespace=ns, check=False)
        assert r.returncode != 0
        assert f"repo {env.snapshotter_root} is full: {expect}" in r.stderr, r.stderr
        r = pull(env, refs["busybox"], ns)
        assert r.returncode != 0 and f"is full: {expect}" in r.stderr, r.stderr
    finally:
        subprocess.run(["rm", "-rf", str(filler)], check=True)
    check_heals(env, ns, pid, r, refs["busybox"])


def fill(env: FractalEnv, what: str) -> Path:
    """Take every free block (what="space") or inode ("inodes") of the repo's tmpfs; returns the filler."""
    filler = env.snapshotter_root / "filler"
    if what == "space":
        with open(filler, "wb") as fh:
            try:
                while True:
                    fh.write(b"\0" * MiB)
                    fh.flush()
            except OSError:
                pass
    else:
        filler.mkdir()
        try:
            while True:
                (filler / str(len(os.listdir(filler)))).touch()
        except OSError:
            pass
    return filler


def prepare_once_reachable(env: FractalEnv, ns: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """A Prepare answered by the snapshotter itself: after a restart containerd's proxy client
    redials with backoff and fails calls fast meanwhile ("connection closed: unavailable")."""
    deadline = time.monotonic() + timeout
    while True:
        r = env.ctr("snapshots", "--snapshotter", "fractal", "prepare", "full-probe", namespace=ns, check=False)
        if "unavailable" not in r.stderr or time.monotonic() > deadline:
            return r
        time.sleep(0.2)


@pytest.mark.parametrize("what", ["space", "inodes"])
@pytest.mark.parametrize("kill", [False, True])
def test_snapshotter_restarts_on_a_full_disk(empty_repo: FractalEnv, namespace_small: str, refs: dict[str, str],
                                             what: str, kill: bool) -> None:
    """A restart (or a crash) while the repo is full: it comes back, answers, and heals."""
    env, ns = empty_repo, namespace_small
    remount(env, "size=16m" if what == "space" else "nr_inodes=1000")
    assert pull(env, refs["busybox"], ns).returncode == 0
    filler = fill(env, what)
    try:
        # (not env.restart_snapshotter: its readiness probe Prepares, which needs room)
        if kill:
            env.snapshotter.kill9()
        else:
            env.snapshotter.stop()
        env.snapshotter.start()
        assert env.snapshotter.running()
        r = prepare_once_reachable(env, ns)
        assert r.returncode != 0 and "is full" in r.stderr, r.stderr
        assert env.run(refs["busybox"], "on-full", "true", namespace=ns, check=False).returncode != 0
        assert repo_consistent(env) == []
    finally:
        subprocess.run(["rm", "-rf", str(filler)], check=True)
    check_heals(env, ns, env.snapshotter.pid, r, refs["busybox"])
