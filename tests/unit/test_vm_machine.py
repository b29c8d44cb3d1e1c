"""ccpu/vm/machine.py: one VM's boot plan (pure) and both runners, with stand-ins for QEMU and
virtiofsd (shell/Python scripts that take the same arguments)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
import time
from pathlib import Path

import pytest

from ccpu.linux.reaper import Reaper
from ccpu.vm import machine, qemu, shares
from ccpu.vm.machine import ConsoleFile, ConsoleSocket, DirShare, Machine, MachineError, MachineSpec, Opened

LAYERS = DirShare("fractallayers", "/run/v/layers", "/repo/layers", True, "virtiofs", layers=True,
                  virtiofsd_args=("--no-announce-submounts",))
VOLUMES = DirShare("fractalvolumes", "/run/v/volumes", "/run/fractal/volumes", False, "9p")


def spec(**kw: object) -> MachineSpec:
    base: dict[str, object] = dict(kernel="/k", initramfs="/i", workdir="/run/v", console=ConsoleSocket(9),
                                   accel="tcg", ports=("fractal.agent",))
    return MachineSpec(**{**base, **kw})  # type: ignore[arg-type]


# -- the plan (pure) ---------------------------------------------------------------------------


def test_plan_passes_fds_not_paths() -> None:
    cfg = machine.plan(spec(shares=(LAYERS, VOLUMES), cmdline_extra=("fractal.reserve=64",)), "tcg",
                       Opened(share_fds={"fractallayers": 5}, port_fds={"fractal.agent": 6}, console_fd=9,
                              net_cmdline=("fractal.net=eth0,x",)))
    argv = qemu.command(cfg)
    joined = " ".join(argv)
    assert "socket,id=port0,fd=6" in joined and "socket,id=vfs0,fd=5" in joined
    assert "socket,id=con0,fd=9,server=off" in joined and "file:" not in joined
    assert ".sock" not in joined  # no virtiofsd socket path: QEMU may not reach the run dir
    assert argv[argv.index("-sandbox") + 1] == qemu.SANDBOX
    assert argv[argv.index("-accel") + 1] == qemu.Tcg().accel_arg()
    assert sorted(qemu.inherited_fds(cfg)) == [5, 6, 9]
    cmdline = argv[argv.index("-append") + 1]
    assert cmdline.endswith("fractal.net=eth0,x fractal.reserve=64")  # the network first, then the caller's
    assert "fractal.share=fractalvolumes:9p:rw:/run/fractal/volumes" in cmdline


def test_qemu_keeps_root_only_while_it_serves_9p() -> None:
    with_9p = machine.plan(spec(shares=(LAYERS, VOLUMES)), "tcg",
                           Opened({"fractallayers": 5}, {"fractal.agent": 6}, 9))
    creds, why = qemu.choose_creds(with_9p, qemu.DEFAULT_UID_BASE, 1234)
    assert creds is None and "fractalvolumes" in why
    only_virtiofs = machine.plan(spec(shares=(LAYERS,)), "tcg", Opened({"fractallayers": 5}, {"fractal.agent": 6}, 9))
    creds, _ = qemu.choose_creds(only_virtiofs, qemu.DEFAULT_UID_BASE, 1234)
    assert creds is not None and creds.uid == creds.gid == qemu.DEFAULT_UID_BASE + 1234


def test_plan_console_file_and_repo() -> None:
    repo = DirShare(qemu.REPO_TAG, "/var/lib/fractal", "/repo", True, "9p", layers=True)
    cfg = machine.plan(spec(console=ConsoleFile("/tmp/c.log"), repo=repo, mode="run", ports=()), "kvm",
                       Opened(console_fd=7))
    argv = qemu.command(cfg)
    assert argv[argv.index("-add-fd") + 1] == f"fd=7,set={qemu.CONSOLE_FDSET}"
    assert "fractal.mode=run fractal.repo=9p" in argv[argv.index("-append") + 1]
    assert "security_model=passthrough" in " ".join(argv) and argv[argv.index("-accel") + 1] == "kvm"


def test_virtiofsd_argv_layers_refuse_trusted_and_announce_no_submounts() -> None:
    argv = machine.virtiofsd_argv("/bin/virtiofsd", LAYERS)
    assert argv[argv.index("--socket-path") + 1] == "vfs-fractallayers.sock"  # relative to the workdir
    assert argv[argv.index("--sandbox") + 1] == "chroot" and "--readonly" in argv
    assert all(flag in argv for flag in shares.LAYER_XATTRS) and argv[-1] == "--no-announce-submounts"


def test_plan_attaches_the_system_image() -> None:
    opened = Opened({}, {"fractal.agent": 6}, 9)
    assert machine.plan(spec(system_image="/g/system.erofs"), "tcg", opened).system_image == "/g/system.erofs"
    assert machine.plan(spec(), "tcg", opened).system_image is None


def test_choose_accel() -> None:
    assert machine.choose_accel("tcg") == machine.accel_.Choice("tcg", "configured")
    with pytest.raises(ValueError, match="hvf"):
        machine.choose_accel("hvf")


# -- the runners, with stand-ins ---------------------------------------------------------------

FAKE_QEMU = """\
#!/bin/sh
# QEMU's stand-in: records its argv, then waits (a TERM is ignored if FAKE_QEMU_TERM=ignore)
[ "$FAKE_QEMU_TERM" = ignore ] && trap '' TERM
printf '%s\\n' "$@" > "$FAKE_DIR/qemu.args"
exec sleep 60
"""

FAKE_VIRTIOFSD = """\
#!/usr/bin/env python3
# virtiofsd's stand-in: serves one connection on --socket-path for FAKE_VFSD_LIFE seconds
import os, socket, sys, time
if os.environ.get("FAKE_VFSD_LIFE") == "fail":
    sys.stderr.write("no such dir, says the stand-in\\n")
    sys.exit(2)
path = sys.argv[sys.argv.index("--socket-path") + 1]
s = socket.socket(socket.AF_UNIX)
s.bind(path)
s.listen(1)
c, _ = s.accept()
time.sleep(float(os.environ.get("FAKE_VFSD_LIFE", "60")))
"""


@pytest.fixture
def fakes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name, text in (("qemu", FAKE_QEMU), ("virtiofsd", FAKE_VIRTIOFSD)):
        p = tmp_path / name
        p.write_text(text)
        p.chmod(0o700)
    for name in ("vmlinux", "initramfs"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "share").mkdir()
    (tmp_path / "work").mkdir(mode=0o700)
    monkeypatch.setenv("FAKE_DIR", str(tmp_path))
    monkeypatch.setattr(machine, "TERM_WAIT", 0.3)
    return tmp_path


def fake_spec(d: Path, **kw: object) -> MachineSpec:
    base: dict[str, object] = dict(
        kernel=str(d / "vmlinux"), initramfs=str(d / "initramfs"), workdir=str(d / "work"),
        console=ConsoleFile(str(d / "work" / "console.log")), accel="tcg", ports=("a", "b"), uid_base=0,
        shares=(DirShare("layers", str(d / "share"), "/repo/layers", True, "virtiofs", layers=True),),
        virtiofsd=str(d / "virtiofsd"), qemu_binary=str(d / "qemu"))
    return MachineSpec(**{**base, **kw})  # type: ignore[arg-type]


def wait_for(cond, timeout: float = 10.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_sync_boot_and_stop(fakes: Path) -> None:
    with Machine(fake_spec(fakes)) as vm:
        vm.boot()
        names = [n for n, _ in vm.pids()]
        assert names == ["qemu", "virtiofsd"] and all(alive(p) for _, p in vm.pids())
        wait_for(lambda: (fakes / "qemu.args").exists() and "-sandbox" in (fakes / "qemu.args").read_text())
        args = (fakes / "qemu.args").read_text().splitlines()
        assert any(a.startswith("socket,id=vfs0,fd=") for a in args)
        assert args[args.index("-serial") + 1] == f"file:/dev/fdset/{qemu.CONSOLE_FDSET}"
        assert set(vm.ports) == {"a", "b"} and vm.poll() is None
        assert vm.pid is not None and os.readlink(f"/proc/{vm.pid}/cwd") == str(fakes / "work")  # whose it is
        assert (fakes / "work" / "console.log").exists() and (fakes / "work" / machine.QEMU_LOG).exists()
        pids = [p for _, p in vm.pids()]
    assert vm.exit_status == -signal.SIGTERM and not any(alive(p) for p in pids)
    assert vm.ended is None  # asked to stop: not an unexpected end


def test_sync_a_dying_virtiofsd_ends_the_vm(fakes: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_VFSD_LIFE", "0.3")
    with Machine(fake_spec(fakes)) as vm:
        vm.boot()
        wait_for(lambda: vm.poll() is not None)
        assert vm.ended == "virtiofsd exited with 0" and vm.exit_status == -signal.SIGKILL


def test_sync_stop_escalates_to_sigkill(fakes: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_QEMU_TERM", "ignore")
    vm = Machine(fake_spec(fakes, shares=(), virtiofsd=None))
    vm.boot()
    wait_for(lambda: (fakes / "qemu.args").exists())  # TERM is ignored by then (and after exec)
    assert vm.stop() == -signal.SIGKILL


def test_sync_boot_failures_leave_nothing(fakes: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(MachineError, match="is not a directory"):
        Machine(fake_spec(fakes, shares=(DirShare("x", str(fakes / "nope"), "/x"),))).boot()
    monkeypatch.setenv("FAKE_VFSD_LIFE", "fail")
    vm = Machine(fake_spec(fakes))
    with pytest.raises(MachineError, match="exited .*says the stand-in"):
        vm.boot()
    assert vm.qemu is None and vm.ports == {} and not (fakes / "qemu.args").exists()


def test_async_a_dying_virtiofsd_ends_the_vm(fakes: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_VFSD_LIFE", "0.3")
    ends: list[str] = []

    async def main() -> None:
        reaper = Reaper()
        reaper.start(subreaper=False)
        try:
            console, theirs = socket.socketpair()
            vm = machine.AsyncMachine(fake_spec(fakes, console=ConsoleSocket(theirs.fileno())), reaper, ends.append)
            await vm.boot()
            theirs.close()
            assert vm.exited is not None and [n for n, _ in vm.pids()] == ["qemu", "virtiofsd"]
            await asyncio.wait_for(asyncio.shield(vm.exited), 10)
            await vm.stop()
            assert vm.exit_status == 128 + signal.SIGTERM  # the reaper's convention
            console.close()
        finally:
            reaper.stop()

    asyncio.run(main())
    assert ends == ["virtiofsd exited with 0"]


def test_async_stop_and_unexpected_qemu_exit(fakes: Path) -> None:
    ends: list[str] = []

    async def main() -> None:
        reaper = Reaper()
        reaper.start(subreaper=False)
        try:
            vm = machine.AsyncMachine(fake_spec(fakes), reaper, ends.append)
            await vm.boot()
            pids = [p for _, p in vm.pids()]
            await vm.stop(grace=0.1)
            assert vm.exited is not None and vm.exited.done() and not any(alive(p) for p in pids)
            assert ends == []  # asked for
            vm = machine.AsyncMachine(fake_spec(fakes, shares=(), virtiofsd=None), reaper, ends.append)
            await vm.boot()
            assert vm.pid is not None
            os.kill(vm.pid, signal.SIGKILL)
            await asyncio.wait_for(asyncio.shield(vm.exited), 10)
            await asyncio.sleep(0)
            await vm.stop()
        finally:
            reaper.stop()

    asyncio.run(main())
    assert ends == [f"QEMU exited with {128 + signal.SIGKILL}"]


def test_long_workdir_reaches_virtiofsd_through_a_dir_fd(fakes: Path) -> None:
    deep = fakes / "work" / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True, mode=0o700)
    assert len(str(deep / "vfs-layers.sock")) > 107
    with Machine(fake_spec(fakes, workdir=str(deep))) as vm:
        vm.boot()
        assert stat.S_ISSOCK(os.stat(deep / "vfs-layers.sock").st_mode) and vm.poll() is None


def test_tcg_options_come_from_the_spec_or_fractal_tcg() -> None:
    opened = Opened(port_fds={"fractal.agent": 6}, console_fd=9)
    assert machine.plan(spec(), "tcg", opened).tcg == qemu.Tcg()
    mine = qemu.Tcg(threads="multi", tb_size_mb=32)
    assert machine.plan(spec(tcg=mine), "tcg", opened).tcg == mine
    assert machine.tcg_options({}) == qemu.Tcg()
    assert machine.tcg_options({"FRACTAL_TCG": "thread=multi"}).threads == "multi"
    with pytest.raises(qemu.ConfigError, match="FRACTAL_TCG='thread=x'"):
        machine.tcg_options({"FRACTAL_TCG": "thread=x"})


def test_plan_of_an_attested_vm_boots_the_uki_through_ovmf_with_its_tpm() -> None:
    from ccpu.vm import tpm

    opened = Opened({}, {"fractal.agent": 6}, 9, ovmf_vars="/run/vm/OVMF_VARS.fd", tpm_fd=11)
    cfg = machine.plan(spec(uki="/b/fractal.efi", tpm_ca="/cache/attest/ca"), "tcg", opened)
    assert cfg.kernel == "/b/fractal.efi" and cfg.ovmf == (tpm.OVMF_CODE, "/run/vm/OVMF_VARS.fd")
    assert cfg.tpm_fd == 11
    plain = machine.plan(spec(), "tcg", Opened({}, {"fractal.agent": 6}, 9))
    assert plain.ovmf is None and plain.tpm_fd is None and plain.kernel != "/b/fractal.efi"


def test_swtpm_serves_qemu_on_its_control_socket_and_ends_with_it() -> None:
    from pathlib import Path

    from ccpu.vm import tpm

    argv = tpm.swtpm_argv(Path("/run/vm/tpm"), "swtpm.sock")
    assert argv[:3] == ["swtpm", "socket", "--tpm2"] and "--terminate" in argv
    assert "type=unixio,path=swtpm.sock" in argv and "dir=/run/vm/tpm" in argv
