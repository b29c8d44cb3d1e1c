"""A VM sees only the layers of its own containers (issue 10, item 6): attacker = guest root.

Guest root is played by a container with CAP_SYS_ADMIN in the VM: it mounts the layer share's
tag itself (virtiofs: the same superblock as the guest's /repo/layers) and lists it.  Before the
per-sandbox view (shim/layerview.py) the share was the whole ``<repo>/layers``: every layer of
every image in the repo, other tenants' included.

Mounts: the view's mounts are the shim's, made in containerd's mount namespace; the tests only
read mountinfo.  The bookkeeping test that mounts by itself runs in a private mount namespace.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hack.containerd_env import FractalEnv
from tests.integration.test_layers_live_vm import fractal
from tests.integration.test_shim_vm import (_virtiofsd, exec_, remove, start_detached, task_status, vm_dir, vm_pid,
                                           wait_for)

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not Path("/usr/bin/qemu-system-x86_64").exists(), reason="needs QEMU")


def sh(env: FractalEnv, ns: str, cid: str, script: str) -> str:
    return exec_(env, ns, cid, f"x{time.monotonic_ns()}", "sh", "-c", script).stdout


def guest_layers(env: FractalEnv, ns: str, cid: str) -> set[str]:
    """What guest root finds at the layer share: mounted by the CAP_SYS_ADMIN container."""
    # ro like the guest's own mount of the tag: the same superblock is then shared with it
    out = sh(env, ns, cid, "mkdir -p /tmp/share && { grep -q ' /tmp/share ' /proc/mounts || "
                              "mount -t virtiofs -o ro fractallayers /tmp/share; } && ls -a /tmp/share")
    return set(out.split()) - {".", ".."}


def own_layers(env: FractalEnv, ns: str, cid: str) -> set[str]:
    """The repo layer ids in ``cid``'s rootfs, as the snapshotter hands them out (containerd's view)."""
    out = env.ctr("snapshots", "--snapshotter", "fractal", "mounts", "/x", cid, namespace=ns).stdout
    lowers = out.split("lowerdir=")[1].split(",")[0].split()[0].split(":")
    return {Path(p).relative_to(env.snapshotter_root / "layers").parts[0] for p in lowers}


def repo_layers(env: FractalEnv) -> set[str]:
    return set(os.listdir(env.snapshotter_root / "layers"))


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` (the harness runs containerd, hence the shims, in the
    test's own mount namespace)."""
    prefix = str(path)
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4]
            if mp == prefix or mp.startswith(prefix + "/"):
                out.append(mp)
    return out


@pytest.fixture
def other_tenant(fenv: FractalEnv, registry) -> str:  # noqa: ANN001
    """Another namespace with an image pulled: its layers are in the same repo."""
    ns = fenv.new_namespace()
    fenv.pull(registry.ref("edge"), namespace=ns)
    yield ns
    fenv.remove_namespace(ns)


@pytest.mark.skipif(not _virtiofsd(), reason="guest root reads the share by mounting its virtiofs tag")
def test_a_vm_sees_only_its_containers_layers_as_they_come_and_go(fenv: FractalEnv, registry, namespace: str,  # noqa: ANN001
                                                                   other_tenant: str) -> None:
    only_own_layers(fenv, registry, namespace, "view-root")


@pytest.mark.skipif(not _virtiofsd(), reason="guest root reads the share by mounting its virtiofs tag")
def test_a_pooled_vm_sees_only_its_containers_layers(fenv: FractalEnv, registry, namespace: str,  # noqa: ANN001
                                                     other_tenant: str) -> None:
    """The same on a VM the pool booted before the sandbox existed (shim/poold.py): its view was
    empty until adoption, and holds exactly the sandbox's layers after."""
    from tests.integration.test_vm_pool import PoolProc

    p = PoolProc(fenv)
    try:
        (ready,) = p.ready()
        only_own_layers(fenv, registry, namespace, "view-pooled", pooled_pid=ready["qemu_pid"])
    finally:
        p.stop()
    assert mounts_under(fenv.fractal_run_dir / "pool") == []


def only_own_layers(fenv: FractalEnv, registry, namespace: str, cid: str,  # noqa: ANN001
                    pooled_pid: int | None = None) -> None:
    bb, tools = registry.ref("busybox"), registry.ref("tools")
    fenv.pull(bb, namespace=namespace)
    fenv.pull(tools, namespace=namespace)
    start_detached(fenv, namespace, bb, cid, "sleep", "600", extra=("--cap-add", "CAP_SYS_ADMIN"))
    try:
        if pooled_pid is not None:
            assert vm_pid(fenv, namespace, cid) == pooled_pid  # the pooled VM was adopted
        mine = own_layers(fenv, namespace, cid)
        others = repo_layers(fenv) - mine
        assert others, "the repo must hold layers of other images for this test to mean anything"
        assert guest_layers(fenv, namespace, cid) == mine

        r = fractal(fenv, "layers", "add", "-a", str(fenv.address), "-n", namespace, cid, tools)
        assert r.returncode == 0, r.stderr
        added = {Path(la["dir"]).name for la in json.loads(
            fractal(fenv, "layers", "ls", "--json", "-a", str(fenv.address), "-n", namespace, cid).stdout
        )["layers"] if la.get("live")}
        assert added and not added <= mine
        assert guest_layers(fenv, namespace, cid) == mine | added
        assert sh(fenv, namespace, cid, "cat /opt/tools/hello.txt") == "hello from tools\n"

        r = fractal(fenv, "layers", "rm", "-a", str(fenv.address), "-n", namespace, cid, tools)
        assert r.returncode == 0, r.stderr
        assert guest_layers(fenv, namespace, cid) == mine
    finally:
        remove(fenv, namespace, cid)
    # the last container is gone: the shim exits and takes every mount of the view with it
    wait_for(lambda: not vm_dir(fenv, namespace, cid).exists(), what="VM run dir removed")
    assert mounts_under(fenv.fractal_run_dir / "vms" / namespace) == []


def test_a_dead_shims_view_is_unmounted_by_containerds_delete(fenv: FractalEnv, registry,  # noqa: ANN001
                                                               namespace: str) -> None:
    bb = registry.ref("busybox")
    fenv.pull(bb, namespace=namespace)
    cid = "view-kill"
    start_detached(fenv, namespace, bb, cid, "sleep", "600")
    view = vm_dir(fenv, namespace, cid) / "layers"
    try:
        assert str(view) in mounts_under(view)
        pid = vm_pid(fenv, namespace, cid)
        shim = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])  # QEMU's parent
        os.kill(shim, signal.SIGKILL)
        # containerd notices the dead shim and runs `containerd-shim-fractal-v1 delete`
        wait_for(lambda: task_status(fenv, namespace, cid) == "", what="task cleaned up")
        wait_for(lambda: not mounts_under(vm_dir(fenv, namespace, cid)), what="view unmounted")
        wait_for(lambda: not vm_dir(fenv, namespace, cid).exists(), what="VM run dir removed")
    finally:
        remove(fenv, namespace, cid)


def _status(pid: int) -> dict[str, str]:
    return {k: v.strip() for k, v in (line.split(":", 1) for line in
                                      Path(f"/proc/{pid}/status").read_text().splitlines())}


def test_the_shims_qemu_runs_under_seccomp(fenv: FractalEnv, registry, namespace: str) -> None:  # noqa: ANN001
    bb = registry.ref("busybox")
    fenv.pull(bb, namespace=namespace)
    cid = "qemu-confined"
    start_detached(fenv, namespace, bb, cid, "sleep", "600")
    try:
        status = _status(vm_pid(fenv, namespace, cid))
        assert status["Seccomp"] == "2" and status["NoNewPrivs"] == "1"  # -sandbox on (+ fsguard)
        # root: it serves the read-write 9p volume share itself (volume dirs of any owner); with
        # no 9p share it runs as a uid of its own (test below, docs/vm.md)
        assert set(status["Uid"].split()) == {"0"}
    finally:
        remove(fenv, namespace, cid)


@pytest.mark.skipif(not _virtiofsd(), reason="QEMU keeps root while it serves 9p shares")
def test_qemu_without_9p_shares_runs_as_its_own_unprivileged_user(tmp_path: Path) -> None:
    """``fractal vm run`` with virtiofs shares: QEMU touches no host file, so it runs as uid/gid
    base + the starter's pid, without capabilities, under seccomp; the command still works."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "in").write_text("from the host\n")
    env = {**os.environ, "FRACTAL_SHARE": "virtiofs"}
    proc = subprocess.Popen([sys.executable, "-m", "ccpu.cli", "vm", "run", "--share", str(work), "--",
                             "sh", "-c", "cat /work/in; echo back > /work/out; sleep 30"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        def qemu_child() -> int | None:
            for p in os.listdir("/proc"):
                if p.isdigit() and _status_or_none(int(p), "PPid") == str(proc.pid) \
                        and Path(f"/proc/{p}/comm").read_text().startswith("qemu"):
                    return int(p)
            return None

        status = _status(wait_for(qemu_child, timeout=60, what="QEMU started"))
        uids, gids = set(status["Uid"].split()), set(status["Gid"].split())
        assert uids == gids and len(uids) == 1 and int(uids.pop()) >= 65536
        assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0
        assert status["Seccomp"] == "2" and status["NoNewPrivs"] == "1"
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        assert out == "from the host\n" and (work / "out").read_text() == "back\n"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _status_or_none(pid: int, key: str) -> str | None:
    try:
        return _status(pid).get(key)
    except OSError:
        return None


def test_view_bookkeeping_binds_exactly_what_containers_use(tmp_path: Path) -> None:
    """shim/layerview.py against real mounts, in a private mount namespace: refcounts across
    owners, read-only binds, no symlink followed out of the repo, the record undone by id."""
    script = textwrap.dedent(f"""
        import json, os, sys
        sys.path.insert(0, {str(REPO)!r})
        from shim import layerview as lv
        t = {str(tmp_path)!r}
        repo = os.path.join(t, "repo", "layers"); run = os.path.join(t, "run")
        for n in ("1", "2", "3"):
            os.makedirs(os.path.join(repo, n)); open(os.path.join(repo, n, "f"), "w").write(n)
        os.symlink("/", os.path.join(repo, "4"))
        os.makedirs(run, mode=0o700)
        v = lv.LayerView(run, repo); v.create()
        L = lambda *ns: [os.path.join(repo, n) for n in ns]
        v.set("a", L("1", "2")); v.set("b", L("2"))
        assert sorted(os.listdir(v.path)) == ["1", "2"], os.listdir(v.path)
        assert open(os.path.join(v.path, "1", "f")).read() == "1"
        try:
            open(os.path.join(v.path, "1", "g"), "w"); sys.exit("writable")
        except OSError as e:
            assert e.errno == 30, e
        v.drop("a")
        assert sorted(os.listdir(v.path)) == ["2"]  # still b's
        try:
            v.add("b", L("4")); sys.exit("followed a symlink")
        except lv.LayerViewError:
            pass
        assert sorted(os.listdir(v.path)) == ["2"]  # all or nothing
        v.add("b", L("3"))
        rec = json.load(open(os.path.join(run, "layers.mounts")))
        assert sorted(rec["binds"]) == ["2", "3"]
        # the shim dies here: undo from the record alone
        mine = [l.split()[4] for l in open("/proc/self/mountinfo") if run in l.split()[4]]
        assert len(mine) == 3, mine
        assert lv.undo_recorded(run) == []
        assert [l for l in open("/proc/self/mountinfo") if run in l.split()[4]] == []
        assert os.listdir(run) == [], os.listdir(run)
        print("ok")
    """)
    r = subprocess.run(["unshare", "-m", "--propagation", "slave", sys.executable, "-c", script],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr + r.stdout
