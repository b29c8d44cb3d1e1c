"""The pool of ready VMs through containerd (shim/poold.py, shim/pool.py, issue 12 item 2).

The pool daemon runs with the harness's environment (its run dir, config and repo), so a VM
sandbox of the harness's containerd adopts its VMs.  Adoption is asserted by identity: the
QEMU pid the pool reported ready is the pid `fractal ps` shows for the sandbox, and the
sandbox's record names the pooled VM.  Each test starts and stops its own pool, so the other
VM tests (no pool running) keep booting their own VMs: the fallback path.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hack.containerd_env import FractalEnv
from ccpu.linux import proc
from ccpu.vm.shares import find_virtiofsd
from shim import leftovers, pool
from shim.poold import POOL_BOOT_NICE
from tests.harness import wait_for
from tests.integration.test_shim_vm import _proc_cmd, fractal_ps, qemus, start_detached, task_status

RUNTIME = "io.containerd.fractal.v1"


@pytest.fixture
def images(fenv: FractalEnv, registry, namespace: str) -> dict[str, str]:  # noqa: ANN001
    refs = {}
    for name in ("busybox", "tools"):
        refs[name] = registry.ref(name)
        fenv.pull(refs[name], namespace=namespace)
    return refs


def env_of(fenv: FractalEnv) -> dict[str, str]:
    return {**os.environ, "FRACTAL_RUN_DIR": str(fenv.fractal_run_dir),
            "FRACTAL_CONFIG": str(fenv.fractal_config), "FRACTAL_ROOT": str(fenv.snapshotter_root)}


class PoolProc:
    """``python3 -m shim.poold`` for ``fenv``, its log in the env's log dir."""

    def __init__(self, fenv: FractalEnv, size: int = 1, extra: tuple[str, ...] = ()) -> None:
        self.fenv = fenv
        self.run_dir = str(fenv.fractal_run_dir)
        self.log = Path(fenv.log_dir) / f"pool-{time.monotonic_ns()}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "shim.poold", "--size", str(size), *extra],
                                         env=env_of(fenv), stdout=out, stderr=subprocess.STDOUT)

    def status(self) -> dict:
        try:
            return pool.status(self.run_dir)
        except OSError:
            return {}

    def ready(self, n: int = 1, timeout: float = 900) -> list[dict]:
        def check() -> list[dict] | None:
            assert self.proc.poll() is None, f"the pool exited: {self.log.read_text()[-3000:]}"
            r = self.status().get("ready") or []
            return r if len(r) >= n else None

        return wait_for(check, timeout=timeout, what=f"{n} pooled VM(s) ready", interval=0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def mounts_below(path: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(path.rstrip("/") + "/")]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def virtiofsds(run_dir: str) -> list[tuple[int, int]]:
    """(pid, start time) of the virtiofsd(s) of the VM whose run dir is ``run_dir``, from the
    record the VM keeps for a dead shim's cleanup (shim/leftovers.py): exactly this VM's, never
    another env's or session's.  Each is checked to be a live virtiofsd now; with virtiofsd
    installed the VM has one (its layer share), so the later "gone" checks cannot pass vacuously."""
    found = [(pid, start) for name, pid, start in leftovers.read_pids(run_dir) if name == "virtiofsd"]
    for pid, start in found:
        assert proc.start_time(pid) == start and _proc_cmd(pid)[0].endswith(b"virtiofsd"), (pid, _proc_cmd(pid))
    if find_virtiofsd() is not None:
        assert found, f"no virtiofsd recorded in {run_dir}: {leftovers.read_pids(run_dir)}"
    return found


def none_left(recorded: list[tuple[int, int]]) -> bool:
    """No process of ``recorded`` (pid, start time) is alive (a zombie has no start time here, a
    reused pid another one)."""
    return all(proc.start_time(pid) != start for pid, start in recorded)


def remove(fenv: FractalEnv, ns: str, cid: str) -> None:
    fenv.ctr("tasks", "kill", "-s", "SIGKILL", cid, namespace=ns, check=False)
    deadline = time.monotonic() + 60
    while fenv.ctr("tasks", "delete", cid, namespace=ns, check=False).returncode != 0:
        if time.monotonic() > deadline:
            break
        time.sleep(0.3)
    fenv.ctr("containers", "delete", cid, namespace=ns, check=False)


def sandbox_vm(fenv: FractalEnv, ns: str, cid: str) -> dict:
    (entry,) = [e for e in fractal_ps(fenv, ns) if cid in [c["id"] for c in e["containers"]]]
    return entry["vm"]


def test_a_sandbox_adopts_a_pooled_vm_with_live_layers(fenv: FractalEnv, namespace: str,
                                                       images: dict[str, str], tmp_path: Path) -> None:
    """A new VM sandbox runs on the VM the pool had ready (same QEMU) and warmed (its agent ran
    runc once), its layers and a live `fractal layers add` reach that guest, the pool refills with
    a fresh VM once the sandbox's first container runs (the shim says so: the pool's own hold is
    an hour here), a live `fractal layers rm` takes the added layers away again, and the adopted
    VM ends with its sandbox even when the shim is SIGKILLed (containerd's cleanup), the pool's
    own with the pool's SIGTERM: no orphan QEMU, virtiofsd or mount."""
    p = PoolProc(fenv, extra=("--refill-hold", "3600"))
    cid = "pooled"
    try:
        # while it boots, the pooled VM's QEMU runs at the pool's low priority (shim/poold.py)
        pooled = pool.pool_dir(p.run_dir).encode()
        (booting,) = wait_for(lambda: [q for q in qemus(fenv) if any(pooled in c for c in _proc_cmd(q))] or None,
                              timeout=300, what="the pool's QEMU", interval=0.05)
        assert proc.thread_nices(booting)[booting] == POOL_BOOT_NICE, p.status()
        (ready,) = p.ready()
        qemu = ready["qemu_pid"]
        pool_dir = ready["run_dir"]
        vfsd = virtiofsds(pool_dir)  # this VM's, by the record it moves with to its adopter
        # offered only once warmed: the guest's agent built its machinery and ran runc
        assert (ready.get("warm") or {}).get("runc", "").startswith("runc version"), ready
        assert ready["warm"]["read_bytes"] > 1 << 20, ready
        # ... and ran a throw-away container's whole life cycle, which left nothing behind
        warmed = ready["warm"]["container"]
        assert warmed["ok"] is True and warmed["status"] == 0 and warmed["left"] == [], ready
        assert warmed["container"].startswith("fractal-warm-"), ready
        # booted at the pool's low priority, every thread back to 0 once ready (a sandbox's VM)
        assert set(proc.thread_nices(qemu).values()) == {0}, proc.thread_nices(qemu)
        vol = tmp_path / "vol"
        vol.mkdir()
        (vol / "hello").write_text("from the host\n")
        start_detached(fenv, namespace, images["busybox"], cid, "sleep", "600",
                       extra=("--mount", f"type=bind,src={vol},dst=/data,options=rbind:ro"))
        vm = sandbox_vm(fenv, namespace, cid)
        assert vm["pid"] == qemu, (vm, ready)  # the pooled QEMU, not a new one
        assert vm["pooled"] and vm["pooled"]["id"] == ready["id"], vm
        assert vm["pooled"]["warm"] == ready["warm"], vm
        assert not os.path.exists(pool_dir)  # moved to the sandbox's run dir
        assert vm["layers_visible"], vm  # its image's layers, bound after boot
        ex = lambda eid, *cmd, **kw: fenv.ctr("tasks", "exec", "--exec-id", eid, cid, *cmd,  # noqa: E731
                                              namespace=namespace, **kw)
        assert ex("u", "uname", "-r").stdout.strip() != os.uname().release  # in the guest
        assert ex("v", "cat", "/data/hello").stdout == "from the host\n"  # a volume bound after boot
        r = subprocess.run([sys.executable, "-m", "ccpu.cli", "layers", "add", "-a", str(fenv.address),
                            "-n", namespace, cid, images["tools"]], capture_output=True, text=True,
                           env=env_of(fenv), timeout=180)
        assert r.returncode == 0, r.stderr
        assert ex("c", "cat", "/opt/tools/hello.txt").stdout == "hello from tools\n"
        # ... and a live `layers rm` of that image takes them away again, in the same guest
        r = subprocess.run([sys.executable, "-m", "ccpu.cli", "layers", "rm", "-a", str(fenv.address),
                            "-n", namespace, cid, images["tools"]], capture_output=True, text=True,
                           env=env_of(fenv), timeout=180)
        assert r.returncode == 0, r.stderr
        gone = ex("g", "cat", "/opt/tools/hello.txt", check=False)
        assert gone.returncode != 0 and "hello from tools" not in gone.stdout, gone
        assert ex("s", "cat", "/data/hello").stdout == "from the host\n"  # the rest of its root unchanged
        assert sandbox_vm(fenv, namespace, cid)["pid"] == qemu
        # refilled with a fresh VM, never the used one: released by the shim's word (an hour's hold)
        (again,) = p.ready(timeout=600)
        assert p.status()["held"] == []
        assert f"refill for {ready['id']} released: its adopter's first container runs" in p.log.read_text()
        assert again["qemu_pid"] != qemu and again["id"] != ready["id"]
        vfsd_again = virtiofsds(again["run_dir"])
        assert not set(vfsd_again) & set(vfsd)
        # the shim dies: containerd's cleanup (`delete` verb) ends the VM it adopted
        shim_pid = [e for e in fractal_ps(fenv, namespace) if e["vm"] and e["vm"]["pid"] == qemu][0]["shim_pid"]
        os.kill(shim_pid, signal.SIGKILL)
        wait_for(lambda: task_status(fenv, namespace, cid) in ("STOPPED", ""), timeout=60, what="task stopped")
        remove(fenv, namespace, cid)
        wait_for(lambda: not alive(qemu), timeout=60, what=f"adopted QEMU {qemu} gone")
        wait_for(lambda: none_left(vfsd), timeout=60, what=f"the adopted VM's virtiofsd {vfsd} gone")
        sdir = str(fenv.fractal_run_dir / "vms" / namespace)
        assert mounts_below(sdir) == []
    finally:
        remove(fenv, namespace, cid)
        p.stop()
    # pool stop: its un-adopted VM is stopped (QEMU and virtiofsd), its mounts and dir removed
    assert not alive(again["qemu_pid"])
    wait_for(lambda: none_left(vfsd_again), timeout=60, what=f"the pooled VM's virtiofsd {vfsd_again} gone")
    wait_for(lambda: mounts_below(pool.pool_dir(str(fenv.fractal_run_dir))) == [], timeout=60,
             what="no mount left in the pool dir")
    pdir = pool.pool_dir(str(fenv.fractal_run_dir))
    assert set(os.listdir(pdir)) <= {"pool.lock", "views"}  # no VM dir, no socket
    wait_for(lambda: not os.path.exists(os.path.join(pdir, "views")) or not os.listdir(os.path.join(pdir, "views")),
             timeout=60, what="no view left")


def test_pool_killed_leaves_no_orphan_and_sandboxes_run_on(fenv: FractalEnv, namespace: str,
                                                           images: dict[str, str], tmp_path: Path) -> None:
    """SIGKILL of the pool: the sandbox that adopted a VM keeps running, the un-adopted VM ends
    by itself (its agent link closed; QEMU and virtiofsd), a shim asking the dead pool is told to
    boot its own VM, and the next pool removes what the dead one left (mounts, dirs) and serves
    new sandboxes -- except a sandbox whose runtime config says ``vm.pool = 0``: it boots its own
    VM and the pool keeps its ready one."""
    run_dir = str(fenv.fractal_run_dir)
    p = PoolProc(fenv)
    p2 = None
    a, b, own = "adopter", "after-pool", "no-pool"
    try:
        (ready,) = p.ready()
        vfsd_ready = virtiofsds(ready["run_dir"])
        start_detached(fenv, namespace, images["busybox"], a, "sleep", "600")
        assert sandbox_vm(fenv, namespace, a)["pid"] == ready["qemu_pid"]
        (waiting,) = p.ready()
        vfsd_waiting = virtiofsds(waiting["run_dir"])
        p.proc.kill()
        p.proc.wait()
        # the un-adopted VM ends by itself: no orphan QEMU, no orphan virtiofsd
        wait_for(lambda: not alive(waiting["qemu_pid"]), timeout=120, what="un-adopted QEMU gone")
        wait_for(lambda: none_left(vfsd_waiting), timeout=60, what=f"un-adopted virtiofsd {vfsd_waiting} gone")
        # the adopted one runs on
        assert alive(ready["qemu_pid"])
        assert fenv.ctr("tasks", "exec", "--exec-id", "e", a, "echo", "still", namespace=namespace).stdout == "still\n"
        # no pool (its socket is left, nobody listens): a shim is told to boot its own VM
        from shim.config import VmSettings

        h, why = pool.adopt(run_dir, VmSettings(), os.path.join(run_dir, "vms", namespace, "nobody"))
        assert h is None and "refused" in why, why
        assert not os.path.exists(os.path.join(run_dir, "vms", namespace, "nobody"))
        # the dead pool left its VM's dir (and mounts): the next pool removes them at start
        assert mounts_below(waiting["run_dir"]) != []
        p2 = PoolProc(fenv)
        (ready2,) = p2.ready()
        assert not os.path.exists(waiting["run_dir"])
        assert mounts_below(waiting["run_dir"]) == []
        assert [m for m in mounts_below(pool.pool_dir(run_dir)) if waiting["id"] in m] == []
        # a sandbox whose config turns the pool off (vm.pool = 0) boots its own VM, the pool's stays ready
        cfg = tmp_path / "no-pool.toml"
        cfg.write_text("[vm]\npool = 0\n")
        start_detached(fenv, namespace, images["busybox"], own, "sleep", "600",
                       extra=("--runtime-config-path", str(cfg)))
        vm_own = sandbox_vm(fenv, namespace, own)
        assert vm_own["pid"] not in (ready["qemu_pid"], waiting["qemu_pid"], ready2["qemu_pid"]), (vm_own, ready2)
        assert vm_own["pooled"] is None, vm_own
        assert [(v["id"], v["qemu_pid"]) for v in p2.status()["ready"]] == [(ready2["id"], ready2["qemu_pid"])]
        assert alive(ready2["qemu_pid"]) and os.path.isdir(ready2["run_dir"])
        # and the pool serves new sandboxes
        start_detached(fenv, namespace, images["busybox"], b, "sleep", "600")
        assert sandbox_vm(fenv, namespace, b)["pid"] == ready2["qemu_pid"]
    finally:
        remove(fenv, namespace, a)
        remove(fenv, namespace, b)
        remove(fenv, namespace, own)
        if p2 is not None:
            p2.stop()
        if p.proc.poll() is None:
            p.stop()
    # the sandboxes' shims stop their VMs (and unmount the adopted views) after containerd's delete
    wait_for(lambda: not alive(ready["qemu_pid"]), timeout=60, what="adopted QEMU gone with its sandbox")
    wait_for(lambda: none_left(vfsd_ready), timeout=60, what=f"adopted virtiofsd {vfsd_ready} gone with its sandbox")
    wait_for(lambda: mounts_below(pool.pool_dir(run_dir)) == [], timeout=60, what="no mount left in the pool dir")
