"""Guest → host disk: a guest writing its serial console without end.

QEMU used to append the console to ``console.log`` in the sandbox run dir (``-serial file:``),
without limit.  Now QEMU writes it to a socket the shim reads (shim/console.py) and the shim
keeps the newest output in ``console.log`` + ``console.log.1``, at most the configured cap.

* through real containerd: a VM container given the guest's serial port (``ctr --device
  /dev/ttyS0``) floods it; with ``[vm] console_log_kib = 16`` the pair stays within 16 KiB and
  holds the newest output;
* QEMU + the guest kernel + the shim's console reader alone: a kernel booted with all its debug
  output (far more than the cap) leaves at most the cap on disk, ending with its last words.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from hack.containerd_env import FractalEnv
from tests.harness import wait_for

RUNTIME = "io.containerd.fractal.v1"
CAP_KIB = 16


def console_files(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.rglob("console.log*") if p.is_file() and not p.is_symlink())


@pytest.fixture
def image(fenv: FractalEnv, registry, namespace: str) -> str:  # noqa: ANN001
    ref = registry.ref("busybox")
    fenv.pull(ref, namespace=namespace)
    return ref


@pytest.fixture
def small_console(fenv: FractalEnv):  # noqa: ANN201
    """The env's fractal config with a 16 KiB console cap (read by each new sandbox)."""
    path = Path(fenv.fractal_config)
    saved = path.read_text()
    path.write_text(saved + f"\n[vm]\nconsole_log_kib = {CAP_KIB}\n")
    try:
        yield
    finally:
        path.write_text(saved)


def test_console_flood_from_a_vm_container_is_capped(fenv: FractalEnv, namespace: str, image: str,
                                                     small_console) -> None:  # noqa: ANN001
    if not Path("/dev/ttyS0").exists():
        pytest.skip("no /dev/ttyS0 on the host to name the guest's serial device after")
    vms = fenv.fractal_run_dir / "vms" / namespace
    marker = "END-OF-FLOOD"
    # 80 KiB of console output (5x the cap), then a marker: the newest output must be kept
    script = (f"i=0; while [ $i -lt 80 ]; do head -c 1024 /dev/zero | tr '\\0' x > /dev/ttyS0; "
              f"i=$((i+1)); done; echo {marker} > /dev/ttyS0")
    try:
        # detached, and read while the container (so its sandbox and the VM's run dir, where the
        # console log lives) still exists: the run dir goes with the sandbox, and a `run --rm`
        # may return after the sandbox ended
        r = fenv.ctr("run", "-d", "--snapshotter", "fractal", "--fifo-dir", str(fenv.fifo_dir),
                     "--runtime", RUNTIME, "--annotation", "io.fractal.mode=vm",
                     "--annotation", "io.fractal.sandbox=cons", "--device", "/dev/ttyS0",
                     image, "cons", "sh", "-c", script, namespace=namespace, timeout=600)
        assert r.returncode == 0
        wait_for(lambda: "STOPPED" in fenv.ctr("tasks", "ls", namespace=namespace).stdout, 300,
                 what="the flooding task's exit")

        def kept() -> bytes:
            d = vms / "cons"
            return b"".join(p.read_bytes() for p in (d / "console.log.1", d / "console.log") if p.is_file())

        wait_for(lambda: marker.encode() in kept(), 60, what="the marker in the console log")
        files = console_files(vms)
        total = sum(p.stat().st_size for p in files)
        names = {p.name for p in files}
        assert total <= CAP_KIB * 1024, {str(p): p.stat().st_size for p in files}
        assert "console.log.1" in names  # it rotated: more was written than kept
        newest = (files[0].parent / "console.log.1").read_bytes() + (files[0].parent / "console.log").read_bytes()
        assert marker.encode() in newest
    finally:
        fenv.ctr("tasks", "kill", "-s", "SIGKILL", "cons", namespace=namespace, check=False)
        fenv.ctr("tasks", "delete", "cons", namespace=namespace, check=False)
        fenv.ctr("containers", "rm", "cons", namespace=namespace, check=False)


def test_qemu_console_through_the_shim_reader_is_capped(tmp_path: Path) -> None:
    from ccpu.guest import initramfs
    from ccpu.vm import qemu
    from shim.console import ConsoleLog, tail

    try:
        guest = initramfs.build(offline=True)
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"no guest kernel built: {exc}")
    cap = 8 * 1024
    path = str(tmp_path / "console.log")

    async def go() -> ConsoleLog:
        console = ConsoleLog(path, cap)
        fd = console.qemu_fd()
        # no initramfs that mounts a root: the kernel logs everything (loglevel=8, initcall_debug)
        # and panics; -no-reboot makes QEMU exit then
        cfg = qemu.VMConfig(kernel=str(guest.kernel), initramfs=str(guest.initramfs), console_log="",
                            console_fd=fd, memory_mb=256, cpus=1, mode="none", rng=False,
                            cmdline_extra=["rdinit=/nonexistent", "loglevel=8", "initcall_debug"])
        proc = qemu.spawn(qemu.command(cfg, qboot_exists=qemu.qboot_available()), pass_fds=(fd,))
        console.start()
        try:
            while proc.poll() is None:
                await asyncio.sleep(0.2)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        await asyncio.wait_for(console.closed.wait(), 30)
        return console

    console = asyncio.run(asyncio.wait_for(go(), 300))
    sizes = {p: os.path.getsize(p) for p in (path, path + ".1") if os.path.exists(p)}
    assert console.written > 4 * cap, console.written  # the guest wrote far more than the cap
    assert sum(sizes.values()) <= cap, sizes
    assert b"Kernel panic" in tail(path, cap)  # the newest output is what is kept
