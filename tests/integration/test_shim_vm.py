"""VM mode through containerd: containers of a sandbox run inside one QEMU guest (shim/vm.py).

Under TCG (no usable KVM here) a guest boots to its agent in ~4-6 s, so the tests share VMs
where that hides nothing: one sandbox with three containers carries exec, kill, pause/resume,
tty, images, the share and `fractal ps`.  The harness's containerd runs the shim with a config
saying `mode = "host"`; every container here asks for a VM with `io.fractal.mode=vm`.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hack.containerd_env import FractalEnv
from shim import address as addr
from tests.harness import wait_for

RUNTIME = "io.containerd.fractal.v1"
VM = ("--annotation", "io.fractal.mode=vm")
REPO = Path(__file__).resolve().parents[2]


def _virtiofsd() -> bool:
    from ccpu.vm import shares

    return shares.find_virtiofsd() is not None


def _proc_cmd(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        st = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return st[st.rindex(")") + 2:].split()[0] != "Z"


def qemus(env: FractalEnv | None = None) -> list[int]:
    """qemu-system-x86_64 processes (of ``env``'s run dir if given)."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        cmd = _proc_cmd(int(pid))
        if cmd and cmd[0].endswith(b"qemu-system-x86_64") and _alive(int(pid)):
            if env is None or any(str(env.run_dir).encode() in c for c in cmd):
                out.append(int(pid))
    return sorted(out)


def vm_dir(env: FractalEnv, ns: str, group: str) -> Path:
    return env.fractal_run_dir / "vms" / ns / group


def vm_pid(env: FractalEnv, ns: str, group: str) -> int:
    text = (vm_dir(env, ns, group) / "pids").read_text()
    for line in text.splitlines():
        name, pid, _start = line.split()
        if name == "qemu":
            return int(pid)
    raise AssertionError(f"no qemu pid recorded: {text!r}")


def bundle(env: FractalEnv, ns: str, cid: str) -> Path:
    return env.run_dir / "st" / "io.containerd.runtime.v2.task" / ns / cid


def task_status(env: FractalEnv, ns: str, cid: str) -> str:
    r = env.ctr("tasks", "ls", namespace=ns)
    for line in r.stdout.splitlines()[1:]:
        parts = line.split()
        if parts and parts[0] == cid:
            return parts[-1]
    return ""


def start_detached(env: FractalEnv, ns: str, image: str, cid: str, *cmd: str,
                   extra: tuple[str, ...] = ()) -> None:
    env.ctr("run", "-d", "--snapshotter", "fractal", "--fifo-dir", str(env.fifo_dir),
            "--runtime", RUNTIME, *VM, *extra, image, cid, *cmd, namespace=ns, timeout=180)
    wait_for(lambda: task_status(env, ns, cid) == "RUNNING", what=f"{cid} running")


def remove(env: FractalEnv, ns: str, cid: str) -> None:
    env.ctr("tasks", "kill", "-s", "SIGKILL", cid, namespace=ns, check=False)
    wait_for(lambda: task_status(env, ns, cid) in ("STOPPED", ""), what=f"{cid} stopped")
    env.ctr("tasks", "delete", cid, namespace=ns, check=False)
    env.ctr("containers", "rm", cid, namespace=ns, check=False)


def exec_(env: FractalEnv, ns: str, cid: str, eid: str, *cmd: str, check: bool = True,
          input: str | None = None) -> subprocess.CompletedProcess[str]:  # noqa: A002
    return env.ctr("tasks", "exec", "--exec-id", eid, cid, *cmd, namespace=ns, check=check,
                   input=input, timeout=120)


@pytest.fixture(scope="module", autouse=True)
def _guest_built() -> None:
    """Build the guest once up front (the shim would, but inside a container's Create)."""
    if not Path("/usr/bin/qemu-system-x86_64").exists():
        pytest.skip("qemu-system-x86_64 is not installed")
    from ccpu.guest import initramfs

    initramfs.build(offline=True)


@pytest.fixture(scope="module", autouse=True)
def _no_qemu_left(fenv: FractalEnv):  # noqa: ANN202
    yield
    wait_for(lambda: not qemus(fenv), timeout=20, what="no QEMU left by this file's tests")


@pytest.fixture
def images(fenv: FractalEnv, registry, namespace: str) -> dict[str, str]:  # noqa: ANN001
    refs = {}
    for name in ("busybox", "edge", "tools"):
        refs[name] = registry.ref(name)
        fenv.pull(refs[name], namespace=namespace)
    return refs


# ---------------------------------------------------------------------------------------------


def test_run_guest_kernel_output_and_exit_code(fenv: FractalEnv, namespace: str,
                                               images: dict[str, str]) -> None:
    """`ctr run --rm` in a VM of its own: the guest kernel answers, output and exit code come
    back, and the VM is gone afterwards."""
    r = fenv.run(images["busybox"], "vm-uname", "sh", "-c", "uname -r; echo err >&2; exit 3",
                 namespace=namespace, runtime=RUNTIME, extra=VM, check=False, timeout=180)
    assert r.returncode == 3, (r.stdout, r.stderr)
    guest_kernel = r.stdout.strip()
    assert guest_kernel.startswith("6.1."), r.stdout
    assert guest_kernel != platform.release()
    assert "err\n" in r.stderr
    wait_for(lambda: not vm_dir(fenv, namespace, "vm-uname").exists(), what="VM run dir removed")
    assert not qemus(fenv)
    # the shim ended its VM itself at containerd's Shutdown (no agent shutdown, no 2 s grace), before
    # containerd's `delete` verb -- which `ctr run --rm` waits for -- could find it and SIGKILL it from
    # its records under the stopping shim (which then logged its virtiofsd's death as an error)
    records = [ln for ln in (Path(fenv.log_dir) / "containerd.log").read_text().splitlines()
               if "sandbox=vm-uname " in ln]
    assert any("no container left: the VM is discarded at once" in ln for ln in records), records[-10:]
    assert not any("exited while its VM runs" in ln for ln in records), records[-10:]


def test_runtime_config_file_selects_vm(fenv: FractalEnv, namespace: str, images: dict[str, str],
                                        tmp_path: Path) -> None:
    """`ctr run --runtime-config-path FILE` (runtimeoptions.v1.Options on start's stdin): the
    file's `mode = "vm"` and `[vm] memory` apply without any annotation; events in order."""
    cfg = tmp_path / "fractal-vm.toml"
    cfg.write_text('mode = "vm"\n[vm]\nmemory = "384M"\ncpus = 1\n')
    ev = subprocess.Popen(fenv.containerd.ctr_argv("events", namespace=None),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.3)
        r = fenv.run(images["busybox"], "vm-cfg", "sh", "-c",
                     "uname -r; grep MemTotal /proc/meminfo; grep -c ^processor /proc/cpuinfo",
                     namespace=namespace, runtime=RUNTIME,
                     extra=["--runtime-config-path", str(cfg)], timeout=180)
        time.sleep(0.5)
    finally:
        ev.terminate()
        out, _ = ev.communicate(timeout=10)
    lines = r.stdout.split("\n")
    assert lines[0].startswith("6.1."), r.stdout
    mem_kb = int(lines[1].split()[1])
    assert 250_000 < mem_kb < 384 * 1024, r.stdout
    assert lines[2] == "1", r.stdout
    topics = [w for line in out.splitlines() if f" {namespace} /tasks/" in line and '"vm-cfg"' in line
              for w in line.split() if w.startswith("/tasks/")]
    assert topics == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"], out


def _root_overlay(mounts: str) -> dict[str, str]:
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[1] == "/" and parts[2] == "overlay":
            return dict(o.partition("=")[::2] for o in parts[3].split(","))
    raise AssertionError(f"no overlay root in {mounts}")


def fractal_ps(env: FractalEnv, ns: str) -> list[dict]:
    e = {**os.environ, "FRACTAL_RUN_DIR": str(env.fractal_run_dir)}
    r = subprocess.run([sys.executable, "-m", "ccpu.cli", "ps", "-a", str(env.address), "-n", ns,
                        "--json"], capture_output=True, text=True, env=e, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


SHARES = ["9p", pytest.param("virtiofs", marks=pytest.mark.skipif(
    not _virtiofsd(), reason="no virtiofsd (hack/setup.sh builds one)"))]


@pytest.mark.parametrize("share", SHARES)
def test_one_vm_many_containers(fenv: FractalEnv, namespace: str, images: dict[str, str],
                                share: str) -> None:
    """Three images in one sandbox = ONE QEMU; each container sees its own image from the share
    with its upper on guest tmpfs; exec (output, exit code, stdin, tty), pause/resume, ps,
    kill -> 137, a conflicting mode is refused, `fractal ps` shows the VM; the VM stops with
    the last container."""
    sb = f"vmsb-{share}"
    ann = ("--annotation", f"io.fractal.sandbox={sb}", "--annotation", f"io.fractal.share={share}")
    a, b, c = f"{sb}-busybox", f"{sb}-edge", f"{sb}-tools"
    before = set(qemus(fenv))
    start_detached(fenv, namespace, images["busybox"], a, "sleep", "600", extra=ann)
    start_detached(fenv, namespace, images["edge"], b, "sleep", "600", extra=ann)
    start_detached(fenv, namespace, images["tools"], c, "sleep", "600", extra=ann)
    killed = None
    try:
        new = set(qemus(fenv)) - before
        assert len(new) == 1, new
        (pid,) = new
        assert vm_pid(fenv, namespace, sb) == pid
        assert len({(bundle(fenv, namespace, x) / "address").read_text() for x in (a, b, c)}) == 1
        assert (bundle(fenv, namespace, a) / "console.log").resolve() == \
            vm_dir(fenv, namespace, sb) / "console.log"

        # each its own image (the edge image's whiteouts and replaced files work over the share)
        probe = ("for p in /edge /opt/tools /bin/busybox; do test -e $p && echo $p; done; "
                 "cat /edge/modified 2>/dev/null; test -e /edge/deleted || echo no-deleted")
        assert exec_(fenv, namespace, a, "i1", "sh", "-c", probe).stdout == \
            "/bin/busybox\nno-deleted\n"
        assert exec_(fenv, namespace, b, "i2", "sh", "-c", probe).stdout == \
            "/edge\n/bin/busybox\nv2\nno-deleted\n"
        assert exec_(fenv, namespace, c, "i3", "sh", "-c", probe).stdout == \
            "/opt/tools\n/bin/busybox\nno-deleted\n"

        # the guest stacks lowers from the share, the upper lives in the guest; the guest's tmpfs
        # keeps no user.* xattrs, so the share's layers are a read-only overlay of their own
        # (it reads the layers' user.overlay.opaque markers) below the container's: its only lower
        opts = _root_overlay(exec_(fenv, namespace, b, "m1", "cat", "/proc/mounts").stdout)
        assert opts["lowerdir"] == f"/run/fractal/bundles/{b}/rootfs.lower", opts
        assert opts["upperdir"] == f"/run/fractal/containers/{b}/upper", opts
        e = {**os.environ, "FRACTAL_RUN_DIR": str(fenv.fractal_run_dir), "FRACTAL_ROOT": str(fenv.snapshotter_root)}
        r = subprocess.run([sys.executable, "-m", "ccpu.cli", "layers", "ls", "-a", str(fenv.address), "-n",
                            namespace, "--json", b], capture_output=True, text=True, env=e, timeout=60)
        assert r.returncode == 0, r.stderr
        lowers = [la["dir"] for la in json.loads(r.stdout)["layers"]]
        assert len(lowers) == 4, lowers
        for lo in lowers:
            assert Path(lo).parent == fenv.snapshotter_root / "layers" and Path(lo).is_dir(), lo
        exec_(fenv, namespace, b, "w1", "sh", "-c", "echo written > /in-upper")
        assert exec_(fenv, namespace, b, "w2", "cat", "/in-upper").stdout == "written\n"
        assert exec_(fenv, namespace, a, "w3", "sh", "-c",
                     "test -e /in-upper || echo isolated").stdout == "isolated\n"

        # exec: exit code, stdin, tty
        assert exec_(fenv, namespace, a, "x5", "sh", "-c", "echo out; exit 5",
                     check=False).returncode == 5
        assert exec_(fenv, namespace, a, "xin", "cat", input="via exec stdin\n").stdout == \
            "via exec stdin\n"
        argv = fenv.containerd.ctr_argv("tasks", "exec", "-t", "--exec-id", "tty1", a, "sh", "-c",
                                        "tty; stty size; exit 4", namespace=namespace)
        cmd = " ".join(f"'{x}'" for x in argv)
        r = subprocess.run(["script", "-qec", f"stty cols 91 rows 17; {cmd}", "/dev/null"],
                           capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
        out = r.stdout.decode(errors="replace")
        assert "/dev/pts/" in out and "17 91" in out and r.returncode == 4, out

        # pause / resume / ps
        fenv.ctr("tasks", "pause", c, namespace=namespace)
        assert task_status(fenv, namespace, c) == "PAUSED"
        fenv.ctr("tasks", "resume", c, namespace=namespace)
        assert task_status(fenv, namespace, c) == "RUNNING"
        assert len(fenv.ctr("tasks", "ps", c, namespace=namespace).stdout.splitlines()) >= 2

        # `fractal ps`: the VM of the sandbox
        (entry,) = [e for e in fractal_ps(fenv, namespace) if e["sandbox"] == sb]
        assert entry["mode"] == "vm"
        vm = entry["vm"]
        assert vm["pid"] == pid and vm["share"] == share and vm["memory"] == "512M"
        assert vm["accel"] in ("tcg", "kvm")
        assert sorted(x["id"] for x in entry["containers"]) == sorted([a, b, c])

        if share == "9p":
            # a container asking for host mode cannot join a VM sandbox
            r = fenv.ctr("run", "-d", "--snapshotter", "fractal", "--fifo-dir", str(fenv.fifo_dir),
                         "--runtime", RUNTIME, *ann, "--annotation", "io.fractal.mode=host",
                         images["busybox"], f"{sb}-host", "true", namespace=namespace, check=False)
            assert r.returncode != 0 and "already runs in vm mode" in r.stderr, r.stderr
            fenv.ctr("containers", "rm", f"{sb}-host", namespace=namespace, check=False)

        # a foreground `ctr run` in the sandbox, SIGKILLed: 137
        killed = f"{sb}-killed"
        fg = subprocess.Popen(fenv.containerd.ctr_argv(
            "run", "--rm", "--snapshotter", "fractal", "--fifo-dir", str(fenv.fifo_dir),
            "--runtime", RUNTIME, *VM, *ann, images["busybox"], killed, "sleep", "600",
            namespace=namespace), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: task_status(fenv, namespace, killed) == "RUNNING", what="fg running")
        fenv.ctr("tasks", "kill", "-s", "SIGKILL", killed, namespace=namespace)
        assert fg.wait(timeout=60) == 137, fg.communicate()
        assert set(qemus(fenv)) - before == {pid}

        # deleting containers keeps the VM until the last one goes
        remove(fenv, namespace, a)
        remove(fenv, namespace, b)
        assert _alive(pid)
        assert exec_(fenv, namespace, c, "last", "echo", "still").stdout == "still\n"
    finally:
        for x in (a, b, c) + ((killed,) if killed else ()):
            remove(fenv, namespace, x)
    wait_for(lambda: not _alive(pid), what="QEMU stopped with the last container")
    wait_for(lambda: not vm_dir(fenv, namespace, sb).exists(), what="VM run dir removed")


def test_same_id_again_in_a_running_vm(fenv: FractalEnv, namespace: str, images: dict[str, str]) -> None:
    """In a running VM the agent starts a container without `runc start` (the exec fifo) and
    answers its delete before `runc delete` ends: the output arrives, and a `ctr run --rm` of
    the same id right after the last one works (its create waits for that runc delete)."""
    sb = "vmagain"
    ann = ("--annotation", f"io.fractal.sandbox={sb}")
    start_detached(fenv, namespace, images["busybox"], f"{sb}-keep", "sleep", "600", extra=ann)
    pid = vm_pid(fenv, namespace, sb)
    try:
        for i in range(3):
            r = fenv.ctr("run", "--rm", "--snapshotter", "fractal", "--fifo-dir", str(fenv.fifo_dir),
                         "--runtime", RUNTIME, *VM, *ann, images["busybox"], f"{sb}-again", "sh", "-c",
                         f"echo round {i}; exit {i}", namespace=namespace, check=False, timeout=120)
            assert (r.returncode, r.stdout) == (i, f"round {i}\n"), r.stderr
        assert vm_pid(fenv, namespace, sb) == pid  # all in the one VM
        assert exec_(fenv, namespace, f"{sb}-keep", "k", "echo", "still").stdout == "still\n"
    finally:
        remove(fenv, namespace, f"{sb}-again")
        remove(fenv, namespace, f"{sb}-keep")
    wait_for(lambda: not _alive(pid), what="QEMU stopped with the last container")


def test_overlayfs_snapshotter_refused(fenv: FractalEnv, namespace: str, registry) -> None:  # noqa: ANN001
    ref = registry.ref("busybox")
    fenv.pull(ref, namespace=namespace, snapshotter="overlayfs")
    r = fenv.run(ref, "vm-ovl", "true", namespace=namespace, runtime=RUNTIME,
                 snapshotter="overlayfs", extra=VM, check=False)
    assert r.returncode != 0
    assert "VM mode needs the fractal snapshotter" in r.stderr, r.stderr
    fenv.ctr("containers", "rm", "vm-ovl", namespace=namespace, check=False)


def test_qemu_killed_reports_exit_and_cleans_up(fenv: FractalEnv, namespace: str,
                                                images: dict[str, str]) -> None:
    """kill -9 of QEMU: every container of the sandbox is reported exited (255, the agent is
    lost), `ctr task delete` works, the shim exits and leaves nothing behind."""
    sb = "vm-qkill"
    ann = ("--annotation", f"io.fractal.sandbox={sb}")
    start_detached(fenv, namespace, images["busybox"], sb, "sleep", "600", extra=ann)
    fg_id = f"{sb}-fg"
    fg = subprocess.Popen(fenv.containerd.ctr_argv(
        "run", "--rm", "--snapshotter", "fractal", "--fifo-dir", str(fenv.fifo_dir),
        "--runtime", RUNTIME, *VM, *ann, images["busybox"], fg_id, "sleep", "600",
        namespace=namespace), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pid = vm_pid(fenv, namespace, sb)
    try:
        wait_for(lambda: task_status(fenv, namespace, fg_id) == "RUNNING", what="fg running")
        os.kill(pid, signal.SIGKILL)
        assert fg.wait(timeout=60) == 255, fg.communicate()
        wait_for(lambda: task_status(fenv, namespace, sb) == "STOPPED", what="task exit reported")
        fenv.ctr("tasks", "delete", sb, namespace=namespace)
        assert task_status(fenv, namespace, sb) == ""
    finally:
        if fg.poll() is None:
            fg.kill()
            fg.wait()
        remove(fenv, namespace, sb)
        fenv.ctr("containers", "rm", fg_id, namespace=namespace, check=False)
    wait_for(lambda: not vm_dir(fenv, namespace, sb).exists(), what="VM run dir removed")
    assert not _alive(pid)


@pytest.mark.parametrize("trigger, words", [("o", "the guest shut down"),
                                             ("c", "the guest reset itself (a reboot, or a kernel panic")],
                         ids=["poweroff", "panic"])
def test_guest_poweroff_or_panic_ends_the_sandbox(fenv: FractalEnv, namespace: str, images: dict[str, str],
                                                  trigger: str, words: str) -> None:
    """The guest powers itself off (sysrq o) or panics (sysrq c; panic=-1 resets, -no-reboot ends
    QEMU): QEMU's QMP event is the sandbox's end, reported as such (the shim names the guest's
    end, not QEMU's exit), every container is reported exited, and nothing is left: QEMU, the run
    dir, the task."""
    sb = f"vm-gend-{trigger}"
    ann = ("--annotation", f"io.fractal.sandbox={sb}")
    start_detached(fenv, namespace, images["busybox"], sb, "sleep", "600", extra=ann)
    pid = vm_pid(fenv, namespace, sb)
    log_from = fenv.containerd.log_path.stat().st_size
    fg_id = f"{sb}-fg"
    try:
        # a privileged container of the sandbox can reach the guest's /proc/sysrq-trigger
        r = fenv.ctr("run", "--rm", "--privileged", "--snapshotter", "fractal", "--fifo-dir", str(fenv.fifo_dir),
                     "--runtime", RUNTIME, *VM, *ann, images["busybox"], fg_id,
                     "sh", "-c", f"echo {trigger} > /proc/sysrq-trigger; sleep 600",
                     namespace=namespace, check=False, timeout=180)
        assert r.returncode == 255, (r.returncode, r.stdout, r.stderr)
        wait_for(lambda: task_status(fenv, namespace, sb) == "STOPPED", what="task exit reported")
        with fenv.containerd.log_path.open("rb") as f:
            f.seek(log_from)
            log = f.read().decode(errors="replace")
        assert f"ended unexpectedly (QEMU pid {pid}): {words}" in log, log[-3000:]
        fenv.ctr("tasks", "delete", sb, namespace=namespace)
        assert task_status(fenv, namespace, sb) == ""
    finally:
        remove(fenv, namespace, sb)
        fenv.ctr("containers", "rm", fg_id, namespace=namespace, check=False)
    wait_for(lambda: not vm_dir(fenv, namespace, sb).exists(), what="VM run dir removed")
    assert not _alive(pid)


def test_shim_killed_takes_the_vm(fenv: FractalEnv, namespace: str, images: dict[str, str]) -> None:
    cid = "vm-skill"
    start_detached(fenv, namespace, images["busybox"], cid, "sleep", "600")
    pid = vm_pid(fenv, namespace, cid)
    shim = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])  # QEMU's parent
    sock = Path(addr.strip_scheme((bundle(fenv, namespace, cid) / "address").read_text()))
    os.kill(shim, signal.SIGKILL)
    try:
        wait_for(lambda: not _alive(pid), what="QEMU died with the shim")
        wait_for(lambda: task_status(fenv, namespace, cid) == "", what="task cleaned up")
        wait_for(lambda: not vm_dir(fenv, namespace, cid).exists(), what="VM run dir removed")
        wait_for(lambda: not sock.exists(), what="stale shim socket removed")
    finally:
        fenv.ctr("tasks", "delete", "-f", cid, namespace=namespace, check=False)
        fenv.ctr("containers", "rm", cid, namespace=namespace, check=False)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def _boot_file_rss_kb(pid: int) -> int:
    """kB of the boot files' pages QEMU holds alone (Private_*): MADV_PAGEOUT leaves the pages
    another process maps too (another VM booted from the same shared kernel file meanwhile),
    which are shared, not this VM's copy."""
    total, mine = 0, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0] if line.strip() else ""
            if "-" in head and ":" not in head:
                path = line.split(None, 5)[5].strip() if len(line.split(None, 5)) > 5 else ""
                mine = "/vmlinux" in path or "/initramfs" in path
            elif mine and line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1])
    return total


def test_idle_sandbox_holds_no_boot_file_copies_and_no_more_guest_ram_than_the_guest_uses(
        fenv: FractalEnv, namespace: str, images: dict[str, str]) -> None:
    """docs/vm.md "Host memory per VM": once the agent answered, QEMU's ROM copies of the kernel and
    initramfs are paged out (they were ~40 MB of its RSS for the VM's life), and the guest's RAM
    resident on the host is no more than what the guest has not free (its reserved memory --
    kernel image, struct pages -- plus MemTotal - MemFree) and a margin for free pages not yet
    reported: the guest RAM is 4 KiB shared memory, not 2 MiB huge pages.  The guest reports free
    pages of every size (page_reporting_order 0, which a 6.1 kernel resets to 9 when the balloon
    registers unless the init writes it again: ccpu/guest/init.sh set_page_reporting_order)."""
    from hack import vm_rss

    sb = "vm-rss"
    start_detached(fenv, namespace, images["busybox"], sb, "sleep", "600")
    pid = vm_pid(fenv, namespace, sb)
    try:
        order = exec_(fenv, namespace, sb, "order", "cat", "/sys/module/page_reporting/parameters/page_reporting_order")
        assert order.stdout.strip() == "0", order.stdout
        assert _boot_file_rss_kb(pid) < 4 << 10, vm_rss.render(vm_rss.breakdown(pid))

        n = iter(range(1000))

        def guest_ram_within() -> bool:
            out = exec_(fenv, namespace, sb, f"meminfo{next(n)}", "cat", "/proc/meminfo").stdout
            info = vm_rss.meminfo(out)
            not_free_kb = 512 * 1024 - info["MemFree"]
            ram = vm_rss.breakdown(pid).parts["guest_ram"]
            return ram.mappings == 1 and ram.anon_huge_kb == 0 and ram.rss_kb <= not_free_kb + (24 << 10)
        wait_for(guest_ram_within, timeout=120, what="QEMU's guest RAM resident <= the guest's not-free + 24 MiB")
    finally:
        remove(fenv, namespace, sb)


def test_tcg_default_vcpus_and_freed_guest_memory_returns_to_the_host(
        fenv: FractalEnv, namespace: str, images: dict[str, str]) -> None:
    """A sandbox that asks for no vCPU count gets the accelerator's default (1 under TCG: docs/vm.md
    "TCG's settings"); memory a container touched and freed goes back to the host (virtio-balloon
    free page reporting): QEMU's RSS falls again after the file that took it is deleted."""
    from ccpu.vm import qemu

    sb = "vm-balloon"
    start_detached(fenv, namespace, images["busybox"], sb, "sleep", "600")
    pid = vm_pid(fenv, namespace, sb)
    try:
        cpus = exec_(fenv, namespace, sb, "nproc", "sh", "-c", "grep -c ^processor /proc/cpuinfo").stdout
        accel = "kvm" if "-accel kvm" in " ".join(a.decode() for a in _proc_cmd(pid)) else "tcg"
        assert int(cpus) == qemu.default_cpus(accel), cpus
        exec_(fenv, namespace, sb, "touch", "sh", "-c",
              "mkdir -p /tmp && dd if=/dev/zero of=/tmp/big bs=1M count=96 && sync")
        touched = _rss_mb(pid)
        exec_(fenv, namespace, sb, "free", "rm", "/tmp/big")
        # the guest reports freed 2 MiB blocks after ~2 s; allow for a loaded machine
        wait_for(lambda: _rss_mb(pid) < touched - 48, timeout=120,
                 what=f"QEMU RSS below {touched - 48:.0f} MB after the guest freed 96 MB (was {touched:.0f} MB)")
    finally:
        remove(fenv, namespace, sb)
