"""The macOS variant (issue 17 part 4): hvf, 9p only, no seccomp, shares confined to $HOME.

Untested on a mac (there is none here): what is checked is the decision logic and the command
lines it produces, against the same builder Linux uses.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ccpu.vm import accel, hostos, qemu, run, shares
from ccpu.vm.qemu import Nic, Share, VMConfig

MAC = hostos.darwin("/Users/ann")


def cfg(**kw) -> VMConfig:
    base = dict(kernel="/k/vmlinux", initramfs="/k/initramfs.cpio", console_log="/b/console.log",
                host=MAC, accel="hvf")
    base.update(kw)
    return VMConfig(**base)


def opt_after(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_accelerator_on_a_mac() -> None:
    intel = accel.Probe(kvm_rw=False, cpu_virt=False, system="Darwin", machine="x86_64", hv_support=True)
    assert accel.decide(intel).accel == "hvf"
    no_hv = accel.Probe(kvm_rw=False, cpu_virt=False, system="Darwin", machine="x86_64", hv_support=False)
    assert accel.decide(no_hv).accel == "tcg" and "hv_support" in accel.decide(no_hv).reason
    # hvf runs only guests of the host's architecture: an x86-64 guest on Apple Silicon is TCG's
    apple = accel.Probe(kvm_rw=False, cpu_virt=False, system="Darwin", machine="arm64", hv_support=True)
    c = accel.decide(apple)
    assert c.accel == "tcg" and "x86-64" in c.reason
    assert accel.decide(accel.Probe(False, False, override="hvf", system="Darwin")).accel == "hvf"
    with pytest.raises(ValueError, match="not an accelerator of Darwin"):
        accel.decide(accel.Probe(False, False, override="kvm", system="Darwin"))
    with pytest.raises(ValueError, match="not an accelerator of Linux"):
        accel.decide(accel.Probe(True, True, override="hvf", system="Linux"))
    # Linux's decision is unchanged by the new fields
    assert accel.decide(accel.Probe(kvm_rw=True, cpu_virt=True)).accel == "kvm"


def test_mac_command_line() -> None:
    home_share = Share("share0", "/Users/ann/src", "/work", readonly=False, type="9p")
    argv = qemu.command(cfg(shares=[home_share], cpus=4), qboot_exists=True)
    assert opt_after(argv, "-accel") == ["hvf"] and opt_after(argv, "-cpu") == ["host"]
    assert "-sandbox" not in argv  # QEMU has no seccomp filter on macOS
    assert not any("memory-backend-memfd" in a for a in argv)  # no vhost-user there
    assert opt_after(argv, "-bios") == [qemu.qboot_path(MAC)]
    assert qemu.qboot_path(MAC).endswith("/share/qemu/qboot.rom") and qemu.qboot_path(MAC) != qemu.QBOOT
    fsdev = opt_after(argv, "-fsdev")
    assert len(fsdev) == 1 and "path=/Users/ann/src" in fsdev[0] and "security_model=none" in fsdev[0]
    assert "readonly=on" not in fsdev[0]
    # the same builder as Linux: only what differs differs
    linux = qemu.command(cfg(shares=[home_share], cpus=4, host=hostos.LINUX, accel="kvm"), qboot_exists=True)
    assert opt_after(linux, "-accel") == ["kvm"] and "-sandbox" in linux
    same = {"hvf": "ACCEL", "kvm": "ACCEL", qemu.qboot_path(MAC): "QBOOT", qemu.QBOOT: "QBOOT"}
    # Linux's guest RAM is a memfd (docs/vm.md "Host memory per VM"); macOS has none
    i = linux.index("memory-backend-memfd,id=mem,size=512M,share=on")
    linux = [a.replace(",memory-backend=mem", "") for a in linux[:i - 1] + linux[i + 1:]
             if a not in ("-sandbox", qemu.SANDBOX)]
    assert [same.get(a, a) for a in argv] == [same.get(a, a) for a in linux]


@pytest.mark.parametrize("bad, match", [
    (dict(accel="kvm"), "accel kvm does not exist on darwin"),
    (dict(host=hostos.LINUX, accel="hvf"), "accel hvf does not exist on linux"),
    (dict(shares=[Share("s", "/Users/ann/x", "/x", type="virtiofs", socket="/tmp/v.sock")]), "virtiofs"),
    (dict(nics=[Nic(5, "52:54:00:12:34:56")]), "tap NICs"),
])
def test_what_a_mac_cannot_do_is_refused(bad: dict, match: str) -> None:
    with pytest.raises(qemu.ConfigError, match=match):
        qemu.command(cfg(**bad))


def test_tcg_on_a_mac_is_allowed() -> None:
    argv = qemu.command(cfg(accel="tcg"))
    assert opt_after(argv, "-accel")[0].startswith("tcg,") and "-sandbox" not in argv


def test_boot_files_by_dev_fd(tmp_path: Path) -> None:
    """macOS has no /proc: QEMU gets /dev/fd/N (Linux has /dev/fd too, so the paths are read here)."""
    files = {n: tmp_path / n for n in ("vmlinux", "initramfs", "system.erofs")}
    for n, p in files.items():
        p.write_bytes(n.encode())
    c, fds = qemu.open_boot_files(cfg(kernel=str(files["vmlinux"]), initramfs=str(files["initramfs"]),
                                      system_image=str(files["system.erofs"])))
    try:
        assert [c.kernel, c.initramfs, c.system_image] == [f"/dev/fd/{fd}" for fd in fds]
        assert Path(c.kernel).read_bytes() == b"vmlinux" and Path(c.system_image).read_bytes() == b"system.erofs"
    finally:
        for fd in fds:
            os.close(fd)


def test_the_mac_share_policy_is_home_only() -> None:
    hostos.check_share(MAC, "/Users/ann")
    hostos.check_share(MAC, "/Users/ann/src/project")
    for outside in ("/etc", "/Users/annex", "/Users", "/", "/Users/ann/../bob"):
        with pytest.raises(hostos.HostPolicyError, match=r"only directories under /Users/ann"):
            hostos.check_share(MAC, outside)
    hostos.check_share(hostos.LINUX, "/etc")  # no policy on Linux


def test_vm_run_refuses_a_share_outside_home_before_booting(monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    monkeypatch.setattr(hostos, "current", lambda: hostos.darwin(str(tmp_path / "home")))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "link").symlink_to("/etc")  # a link in $HOME does not reach outside it
    for spec in ("/etc", str(tmp_path / "home" / "link")):
        with pytest.raises(hostos.HostPolicyError):
            run.run(None, ["true"], share_dirs=[run.parse_share(spec, 0)])  # type: ignore[arg-type]


def test_shares_on_a_mac_are_9p() -> None:
    assert shares.decide(None, None, "/usr/bin/virtiofsd", True, MAC)[0] == "9p"
    with pytest.raises(ValueError, match="virtiofs is Linux only"):
        shares.decide("virtiofs", None, "/usr/bin/virtiofsd", True, MAC)
    assert shares.decide(None, None, "/usr/bin/virtiofsd", True, hostos.LINUX)[0] == "virtiofs"
