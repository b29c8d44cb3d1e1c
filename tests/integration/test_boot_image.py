"""`fractal boot` (issue 17 part 1): an image pulled with the fractal snapshotter booted as a whole
machine, its own init as PID 1, through real containerd, virtiofsd/9p and QEMU.

The `machine` test image (hack/testimages.py) has busybox init and an inittab whose sysinit
one-shot service prints what the booted root looks like (the file a later layer whited out, the
dir it made opaque, whether the root is writable) and powers off.
"""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from hack.containerd_env import FractalEnv
from tests.integration.test_vm_net import Pod, pod  # noqa: F401 - the netns fixture

MARKER = "fractal-boot-oneshot"
EXPECTED = f"{MARKER}: pid1=init doomed=absent opq=c, written=written root=overlay"
TIMEOUT = 600


def fractal(*args: str, timeout: float = TIMEOUT, **kw: object) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CONTAINERD_ADDRESS", "CONTAINERD_NAMESPACE")}
    return subprocess.run([sys.executable, "-m", "ccpu.cli", "boot", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, stdin=subprocess.DEVNULL, **kw)  # type: ignore[call-overload]


@pytest.fixture(scope="module")
def machine(fenv: FractalEnv, registry) -> Iterator[list[str]]:  # noqa: ANN001
    """``-a ADDR -n NS REF`` of the machine image (and busybox, which has no /sbin/init) pulled
    with the fractal snapshotter."""
    from hack import testimages

    testimages.build("machine")
    if registry.server is not None:
        registry.server.push(testimages.layout_path("machine"), "fractal/machine", "latest")
    ns = fenv.new_namespace()
    try:
        fenv.pull(registry.ref("machine"), namespace=ns)
        fenv.pull(registry.ref("busybox"), namespace=ns)
        yield ["-a", str(fenv.address), "-n", ns, registry.ref("machine")]
    finally:
        problems = fenv.remove_namespace(ns)
    assert not problems, problems


@pytest.fixture(scope="module")
def booted(machine: list[str], tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess[str]:
    data = tmp_path_factory.mktemp("data")
    (data / "hello.txt").write_text("hello from the host\n")
    return fractal(*machine, "--share", f"{data}:/mnt/data")


def test_boot_runs_the_images_init_to_poweroff(booted: subprocess.CompletedProcess[str]) -> None:
    """busybox init is PID 1, runs the one-shot service, which sees the layers stacked as
    containerd stacks them (whiteout and opaque dir honoured) on a writable overlay, then
    powers off: `fractal boot` exits 0."""
    assert booted.returncode == 0, booted.stderr + booted.stdout
    assert EXPECTED in booted.stdout, booted.stdout
    assert f"{MARKER}: share=hello from the host" in booted.stdout, booted.stdout


def test_image_without_boot_gets_fractals_kernel_with_a_note(booted: subprocess.CompletedProcess[str]) -> None:
    assert booted.returncode == 0, booted.stderr
    assert "note: the image has no /boot/vmlinuz-*: booting fractal's kernel" in booted.stderr, booted.stderr
    assert "may be missing" in booted.stderr


def test_boot_over_9p(machine: list[str]) -> None:
    """The 9p fallback carries the layers (and the opaque markers, user.* xattrs) as virtiofs does."""
    r = fractal(*machine, "--share-type", "9p")
    assert r.returncode == 0, r.stderr + r.stdout
    assert EXPECTED in r.stdout, r.stdout


def test_tgz_round_trip(machine: list[str], tmp_path: Path) -> None:
    """--export tgz writes the merged root (whiteout and opaque dir applied); booting that tarball
    prints the same marker; it is unpacked into the cache under its sha256."""
    out = tmp_path / "machine.tgz"
    r = fractal(*machine, "--export", "tgz", str(out))
    assert r.returncode == 0, r.stderr
    with tarfile.open(out) as t:
        names = {n.removeprefix("./") for n in t.getnames()}
    assert {"sbin/init", "etc/inittab", "etc/opq/c", "bin/busybox"} <= names, sorted(names)[:50]
    assert not {"etc/doomed", "etc/opq/a", "etc/opq/b"} & names
    assert not any(".wh." in n for n in names)
    r = fractal(str(out))
    assert r.returncode == 0, r.stderr + r.stdout
    assert EXPECTED in r.stdout, r.stdout
    from ccpu.boot import tgz

    cache = Path(os.environ.get("FRACTAL_CACHE", "/var/cache/fractal")) / "boot" / "tgz"
    assert (cache / tgz.sha256_file(str(out)) / "root" / "etc" / "inittab").is_file()


@pytest.mark.parametrize("args, message", [
    (["--mem", "lots"], "--mem 'lots'"),
    (["--mem", "1"], "--mem '1'"),
    (["--cpus", "0"], "--cpus 0"),
    (["--init", "sbin/init"], "absolute"),
    (["--init", "/nope"], "no init /nope in"),
])
def test_bad_input_is_a_usage_error(machine: list[str], args: list[str], message: str) -> None:
    r = fractal(*machine, *args)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_image_not_in_repo_and_image_without_init(machine: list[str], registry) -> None:  # noqa: ANN001
    r = fractal(*machine[:4], "fractal/not-pulled:latest")
    assert r.returncode == 2 and "not found" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = fractal(*machine[:4], registry.ref("busybox"))  # busybox has /bin/init but no /sbin/init
    assert r.returncode == 2 and "no init /sbin/init in" in r.stderr, r.stderr


def test_vm_run_image_runs_the_command_in_the_images_root(machine: list[str], tmp_path: Path) -> None:
    """`fractal vm run --image` (issue 17 part 2): the command runs in the image's root, stacked
    from the repo's layers as `fractal boot` stacks it (whiteout and opaque dir honoured, a
    writable tmpfs on top), with the working directory at /work; `--image` with `--repo` is a
    usage error."""
    *flags, ref = machine
    env = {k: v for k, v in os.environ.items() if k not in ("CONTAINERD_ADDRESS", "CONTAINERD_NAMESPACE")}
    (tmp_path / "in.txt").write_text("from the host\n")
    script = ("[ -e /etc/doomed ] && echo doomed=present || echo doomed=absent; ls /etc/opq | tr '\\n' ,; echo; "
              "cat /etc/inittab; echo x > /new && cat /new; cat in.txt; pwd; echo out > out.txt")
    r = subprocess.run([sys.executable, "-m", "ccpu.cli", "vm", "run", *flags, "--image", ref, "--", "sh", "-c", script],
                       cwd=tmp_path, capture_output=True, text=True, env=env, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split("\n") == ["doomed=absent", "c,", "::sysinit:/etc/init.d/oneshot", "x", "from the host",
                                     "/work", ""], r.stdout
    assert (tmp_path / "out.txt").read_text() == "out\n"
    bad = subprocess.run([sys.executable, "-m", "ccpu.cli", "vm", "run", *flags, "--image", ref, "--repo", str(tmp_path),
                          "--", "true"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "--image and --repo" in bad.stderr, bad.stderr


def test_boot_with_a_nic_in_a_netns(machine: list[str], pod: Pod) -> None:
    """`fractal boot --netns` (issue 17 part 1): the netns's interface becomes the machine's NIC,
    configured by the boot stage before the image's init runs (its address, its default route);
    the image's one-shot service reaches the veth's host end through it."""
    r = fractal(*machine, "--netns", pod.path)
    assert r.returncode == 0, r.stderr + r.stdout
    assert f"{MARKER}: net eth0 {pod.pod_ip}/24" in r.stdout, r.stdout
    assert f"{MARKER}: ping {pod.host_ip} ok" in r.stdout, r.stdout
    bad = fractal(*machine, "--netns", "/var/run/netns/fractal-no-such-netns")
    assert bad.returncode == 2 and "no such network namespace" in bad.stderr, bad.stderr


def _children(pid: int) -> dict[int, str]:
    out = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                stat = (p / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    out[int(p.name)] = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, ValueError, IndexError):
                continue
    return out


def test_sigterm_stops_the_machine_and_leaves_nothing(machine: list[str]) -> None:
    """A machine that never powers off (a shell as init, reading a console nobody types on):
    SIGTERM stops QEMU and virtiofsd, removes the temp dir, and `fractal boot` exits 143."""
    env = {k: v for k, v in os.environ.items() if k not in ("CONTAINERD_ADDRESS", "CONTAINERD_NAMESPACE")}
    proc = subprocess.Popen([sys.executable, "-m", "ccpu.cli", "boot", *machine, "--init", "/bin/sh"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        assert proc.stdout is not None
        seen = b""
        deadline = time.monotonic() + TIMEOUT
        while b"boot: exec /bin/sh" not in seen:
            assert time.monotonic() < deadline and proc.poll() is None, seen
            if select.select([proc.stdout], [], [], 1)[0]:
                seen += os.read(proc.stdout.fileno(), 65536)
        kids = _children(proc.pid)
        qemu = [p for p, cmd in kids.items() if f"fractal-boot-{proc.pid}" in cmd]
        assert qemu, kids
        workdir = os.readlink(f"/proc/{qemu[0]}/cwd")
        assert Path(workdir).is_dir()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
        assert "stopped by SIGTERM" in proc.stderr.read().decode()  # type: ignore[union-attr]
        for pid in kids:
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text(), kids[pid]
        assert not Path(workdir).exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_console_is_interactive(machine: list[str]) -> None:
    """--console: the terminal is the machine's serial console, driven through a pty as a person
    would: a shell as init reads what is typed, and its poweroff ends `fractal boot` with 0."""
    env = {k: v for k, v in os.environ.items() if k not in ("CONTAINERD_ADDRESS", "CONTAINERD_NAMESPACE")}
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "ccpu.cli", "boot", *machine, "--init", "/bin/sh", "--console"],
                            stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True)
    os.close(slave)
    seen = b""
    try:
        deadline = time.monotonic() + TIMEOUT
        typed = False
        while proc.poll() is None or select.select([master], [], [], 0)[0]:
            assert time.monotonic() < deadline, seen
            if select.select([master], [], [], 1)[0]:
                try:
                    seen += os.read(master, 65536)
                except OSError:
                    break
            if not typed and b"boot: exec /bin/sh" in seen:
                time.sleep(1)  # (not an assertion) let the shell start reading its console
                os.write(master, b"echo typed-$((6*7)); poweroff -f\r")
                typed = True
        assert proc.wait(timeout=60) == 0, seen
        assert b"typed-42" in seen, seen
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_debian_boots_with_its_own_kernel_to_multi_user(fenv: FractalEnv, registry) -> None:  # noqa: ANN001
    """A debootstrap image with linux-image-amd64 and systemd-sysv boots with ITS kernel (its
    modules in fractal's boot stage) and systemd reaches multi-user.target, where a unit of the
    image reports on the console and powers the machine off."""
    import re

    from hack import testimages

    testimages.build("machine-debian")
    if registry.server is not None:
        registry.server.push(testimages.layout_path("machine-debian"), "fractal/machine-debian", "latest")
    ns = fenv.new_namespace()
    try:
        fenv.pull(registry.ref("machine-debian"), namespace=ns, timeout=900)
        r = fractal("-a", str(fenv.address), "-n", ns, registry.ref("machine-debian"), "--kernel", "image",
                    timeout=1500)
    finally:
        problems = fenv.remove_namespace(ns)
    assert not problems, problems
    m = re.search(r"booting the image's kernel /boot/vmlinuz-(\S+) ", r.stderr)
    assert m, r.stderr
    assert r.returncode == 0, r.stderr + r.stdout[-5000:]
    marker = f"{testimages.MACHINE_DEBIAN_MARKER}: kernel={m.group(1)} multi-user=active pid1=systemd"
    assert marker in r.stdout, r.stdout[-5000:]
