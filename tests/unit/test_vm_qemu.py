"""The QEMU command line is a pure function of VMConfig."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from ccpu.vm import qemu
from ccpu.vm.qemu import Port, Share, VMConfig


def cfg(**kw) -> VMConfig:
    base = dict(kernel="/k/vmlinux", initramfs="/k/initramfs.cpio", console_log="/b/console.log")
    base.update(kw)
    return VMConfig(**base)


def opt_after(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_minimal_q35_tcg() -> None:
    argv = qemu.command(cfg(), qboot_exists=True)
    assert argv[0] == "qemu-system-x86_64"
    for flag in ("-nodefaults", "-no-user-config", "-no-reboot"):
        assert flag in argv
    assert opt_after(argv, "-machine")[0].startswith("q35")
    # one host thread for every vCPU, and a bounded translation cache (docs/vm.md "Accelerator")
    assert opt_after(argv, "-accel") == [f"tcg,thread=single,tb-size={qemu.Tcg().tb_size_mb}"]
    assert opt_after(argv, "-bios") == [qemu.QBOOT]
    assert opt_after(argv, "-m") == ["512M"] and opt_after(argv, "-smp") == ["2"]
    assert opt_after(argv, "-serial") == ["file:/b/console.log"]
    assert "-netdev" not in argv and "-drive" not in argv
    append = opt_after(argv, "-append")[0]
    assert "console=ttyS0" in append and "panic=-1" in append and "fractal.mode=agent" in append
    assert "no_timer_check" in append.split()  # no boot-time timer probe that a loaded host can fail
    assert "fractal.repo=none" in append


def test_no_qboot_means_default_firmware_and_kvm_uses_host_cpu() -> None:
    argv = qemu.command(cfg(accel="kvm"), qboot_exists=False)
    assert "-bios" not in argv
    assert opt_after(argv, "-accel") == ["kvm"] and opt_after(argv, "-cpu") == ["host"]


def test_ports_are_named_virtserialports_on_listening_sockets() -> None:
    argv = qemu.command(cfg(ports=[Port("fractal.agent", "/s/agent.sock")]))
    assert "virtio-serial-pci,id=vser0,max_ports=2" in argv
    assert "socket,id=port0,path=/s/agent.sock,server=on,wait=off" in argv
    assert "virtserialport,bus=vser0.0,chardev=port0,name=fractal.agent" in argv


def test_repo_share_is_read_only_9p_and_user_shares_can_be_rw() -> None:
    c = cfg(repo=Share("fractalrepo", "/var/lib/fractal", "/repo", True, "9p"),
            shares=[Share("share0", "/home/u/p", "/work", False, "9p")])
    argv = qemu.command(c)
    fsdevs = opt_after(argv, "-fsdev")
    assert fsdevs[0] == "local,id=fs0,path=/var/lib/fractal,security_model=none,multidevs=remap,readonly=on"
    assert "readonly" not in fsdevs[1]
    assert "virtio-9p-pci,fsdev=fs0,mount_tag=fractalrepo" in argv
    append = opt_after(argv, "-append")[0]
    assert "fractal.repo=9p" in append and "fractal.share=share0:9p:rw:/work" in append


def test_virtiofs_needs_shared_memfd_memory() -> None:
    c = cfg(repo=Share("fractalrepo", "/r", "/repo", True, "virtiofs", "/s/vfs.sock"))
    argv = qemu.command(c)
    assert "memory-backend-memfd,id=mem,size=512M,share=on" in argv
    assert "memory-backend=mem" in opt_after(argv, "-machine")[0]
    assert "vhost-user-fs-pci,chardev=vfs0,tag=fractalrepo,queue-size=1024" in argv
    assert "socket,id=vfs0,path=/s/vfs.sock" in argv


def test_guest_ram_is_a_shared_memfd_on_linux_even_without_virtiofs() -> None:
    """Anonymous guest RAM would fault in 2 MiB huge pages (QEMU madvises it): docs/vm.md."""
    for c in (cfg(), cfg(machine="microvm"), cfg(shares=[Share("share0", "/h", "/work", False, "9p")])):
        argv = qemu.command(c)
        assert "memory-backend-memfd,id=mem,size=512M,share=on" in argv
        assert "memory-backend=mem" in opt_after(argv, "-machine")[0]


def test_microvm_uses_mmio_devices() -> None:
    c = cfg(machine="microvm", ports=[Port("p", "/s/p")], shares=[Share("share0", "/h", "/work", False, "9p")])
    argv = qemu.command(c, qboot_exists=True)
    assert opt_after(argv, "-machine")[0].startswith("microvm")
    assert "-bios" not in argv
    assert any(a.startswith("virtio-serial-device") for a in argv)
    assert "virtio-9p-device,fsdev=fs0,mount_tag=share0" in argv


@pytest.mark.parametrize("bad", [
    dict(machine="pc-i440fx"), dict(accel="hvf"),
    dict(shares=[Share("t", "/h", "/a b", False)]), dict(shares=[Share("t:x", "/h", "/w", False)]),
    dict(shares=[Share("t", "/h", "relative", False)]), dict(shares=[Share("fractalrepo", "/h", "/w", False)]),
    dict(shares=[Share("t", "/h", "/w", False, "virtiofs")]),  # no socket
    dict(shares=[Share("t", "/h", "/w"), Share("t", "/h2", "/w2")]),
    dict(repo=Share("other", "/r", "/repo")),
])
def test_bad_configs(bad: dict) -> None:
    with pytest.raises(qemu.ConfigError):
        qemu.command(cfg(**bad))


def test_spawned_children_die_with_their_parent(tmp_path) -> None:
    """A helper started through qemu.spawn is SIGKILLed when the process that spawned it dies."""
    pidfile = tmp_path / "pid"
    code = (
        "import sys, time; sys.path.insert(0, %r)\n"
        "from ccpu.vm import qemu\n"
        "p = qemu.spawn(['sleep', '60'])\n"
        "open(%r, 'w').write(str(p.pid))\n"
        "time.sleep(60)\n"
    ) % (os.getcwd(), str(pidfile))
    parent = subprocess.Popen([sys.executable, "-c", code])
    for _ in range(200):
        if pidfile.exists() and pidfile.read_text():
            break
        time.sleep(0.02)
    child = int(pidfile.read_text())
    parent.kill()
    parent.wait()
    for _ in range(200):
        try:
            with open(f"/proc/{child}/stat") as f:
                if f.read().split(") ")[1].startswith("Z"):
                    break
        except FileNotFoundError:
            break
        time.sleep(0.02)
    else:
        os.kill(child, 9)
        pytest.fail("child outlived its parent")


def test_layer_share_9p_passes_acls_read_only() -> None:
    """passthrough (ACLs and user.* xattrs) only for the read-only layers; a writable one is refused."""
    c = cfg(shares=[Share("fractallayers", "/r/layers", "/repo/layers", True, "9p", layers=True),
                    Share("vols", "/v", "/vols", False, "9p")])
    fsdevs = opt_after(qemu.command(c), "-fsdev")
    assert "security_model=passthrough" in fsdevs[0] and fsdevs[0].endswith(",readonly=on")
    assert "security_model=none" in fsdevs[1]
    with pytest.raises(qemu.ConfigError, match="read-only"):
        qemu.command(cfg(shares=[Share("fractallayers", "/r/layers", "/repo/layers", False, "9p", layers=True)]))


# -- confinement: -sandbox, channels as fds, who QEMU runs as ---------------------------------


def test_qemu_runs_under_its_seccomp_filter_unless_told_not_to() -> None:
    assert opt_after(qemu.command(cfg()), "-sandbox") == [
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
    assert "-sandbox" not in qemu.command(cfg(sandbox=False))


def test_connected_fds_replace_every_path_qemu_would_open() -> None:
    c = cfg(ports=[Port("fractal.agent", fd=7)], console_log_fd=9,
            shares=[Share("fractallayers", "/v", "/repo/layers", True, "virtiofs", fd=8)])
    argv = qemu.command(c)
    assert "socket,id=port0,fd=7" in argv
    assert opt_after(argv, "-add-fd") == [f"fd=9,set={qemu.CONSOLE_FDSET}"]
    assert opt_after(argv, "-serial") == [f"file:/dev/fdset/{qemu.CONSOLE_FDSET}"]
    assert "socket,id=vfs0,fd=8" in argv
    assert not any("/b/console.log" in a or ".sock" in a for a in argv)
    assert sorted(qemu.inherited_fds(c)) == [7, 8, 9]


def test_the_name_says_whose_vm_it_is() -> None:
    assert opt_after(qemu.command(cfg(name="/run/vms/ns,1/g")), "-name") == ["guest=/run/vms/ns,,1/g"]
    assert "-name" not in qemu.command(cfg())


def test_a_port_needs_exactly_one_of_socket_and_fd() -> None:
    for port in (Port("p"), Port("p", "/s/p", 3)):
        with pytest.raises(qemu.ConfigError):
            qemu.command(cfg(ports=[port]))


def test_qemu_keeps_root_only_while_it_serves_a_9p_share() -> None:
    vfs = Share("fractallayers", "/v", "/repo/layers", True, "virtiofs", fd=8)
    nine = Share("fractalvols", "/r/volumes", "/run/v", False, "9p")
    assert qemu.needs_root(cfg(shares=[vfs])) is None
    assert "fractalvols" in (qemu.needs_root(cfg(shares=[vfs, nine])) or "")
    creds, why = qemu.choose_creds(cfg(shares=[vfs]), qemu.DEFAULT_UID_BASE, 1234)
    assert creds == qemu.Creds(qemu.DEFAULT_UID_BASE + 1234, qemu.DEFAULT_UID_BASE + 1234, ())
    assert qemu.choose_creds(cfg(shares=[vfs, nine]), qemu.DEFAULT_UID_BASE, 1234)[0] is None
    assert qemu.choose_creds(cfg(shares=[vfs]), 0, 1234) == (None, "root (qemu_uid_base = 0)")


def test_each_vm_gets_its_own_uid_and_kvm_adds_the_device_group() -> None:
    a, b = qemu.unprivileged(100_000, 10), qemu.unprivileged(100_000, 11)
    assert a.uid != b.uid and a.uid == a.gid == 100_010 and a.groups == ()
    assert qemu.unprivileged(100_000, 10, "kvm", 108).groups == (108,)
    for base, pid in ((0, 1), (100_000, 0), (100_000, qemu.PID_MAX_LIMIT), (0xFFFFFFFF, 1)):
        with pytest.raises(ValueError):
            qemu.unprivileged(base, pid)


def test_spawn_drops_to_the_given_credentials_before_exec(tmp_path) -> None:
    out = tmp_path / "ids"
    with open(out, "w") as f:
        p = qemu.spawn(["sh", "-c", "id -u; id -g; id -G; grep -E '^CapEff' /proc/self/status"], stdout=f,
                       creds=qemu.Creds(2_000_000_123, 2_000_000_124, (2_000_000_125,)))
        assert p.wait(timeout=10) == 0
    uid, gid, groups, capeff = out.read_text().splitlines()
    assert (uid, gid) == ("2000000123", "2000000124")
    assert sorted(groups.split()) == ["2000000124", "2000000125"]
    assert capeff.split()[1] == "0000000000000000"


def test_boot_files_reach_qemu_through_fds(tmp_path) -> None:
    (tmp_path / "k").write_text("kernel")
    (tmp_path / "i").write_text("initramfs")
    c, fds = qemu.open_boot_files(cfg(kernel=str(tmp_path / "k"), initramfs=str(tmp_path / "i")))
    try:
        assert c.kernel == f"/proc/self/fd/{fds[0]}" and c.initramfs == f"/proc/self/fd/{fds[1]}"
        assert os.read(fds[0], 100) == b"kernel"
    finally:
        for fd in fds:
            os.close(fd)


def test_system_image_is_a_read_only_disk_found_by_serial() -> None:
    argv = qemu.command(cfg(system_image="/proc/self/fd/7"), qboot_exists=True)
    drive = opt_after(argv, "-drive")
    assert len(drive) == 1 and drive[0].startswith("file=/proc/self/fd/7,")
    assert "readonly=on" in drive[0].split(",") and "format=raw" in drive[0].split(",")
    assert "virtio-blk-pci,drive=sys,serial=fractal-sys" in opt_after(argv, "-device")
    micro = qemu.command(cfg(system_image="/img", machine="microvm"))
    assert "virtio-blk-device,drive=sys,serial=fractal-sys" in opt_after(micro, "-device")
    assert "-drive" not in qemu.command(cfg())


def test_system_image_reaches_qemu_through_an_fd(tmp_path) -> None:
    for name in ("k", "i", "s"):
        (tmp_path / name).write_text(name)
    c, fds = qemu.open_boot_files(cfg(kernel=str(tmp_path / "k"), initramfs=str(tmp_path / "i"),
                                      system_image=str(tmp_path / "s")))
    try:
        assert len(fds) == 3 and c.system_image == f"/proc/self/fd/{fds[2]}"
        assert os.read(fds[2], 100) == b"s"
    finally:
        for fd in fds:
            os.close(fd)


def test_free_page_reporting_balloon_by_default_and_on_the_machines_bus() -> None:
    assert "virtio-balloon-pci,id=balloon0,free-page-reporting=on" in qemu.command(cfg())
    assert "virtio-balloon-device,id=balloon0,free-page-reporting=on" in qemu.command(cfg(machine="microvm"))
    assert not any("balloon" in a for a in qemu.command(cfg(balloon=False)))


def test_the_guest_reports_every_free_page_when_the_balloon_is_on() -> None:
    """docs/vm.md "Host memory per VM": the kernel's default reporting order (9) leaves free memory
    in blocks under 2 MiB resident on the host; order 0 reports every free page."""
    args = qemu.kernel_cmdline(cfg()).split()
    assert "page_reporting.page_reporting_order=0" in args
    assert not any(a.startswith("page_reporting.") for a in qemu.kernel_cmdline(cfg(balloon=False)).split())


def test_tcg_options_parse_and_reach_the_command_line() -> None:
    t = qemu.parse_tcg("thread=multi, tb-size=128,cpu=qemu64")
    assert t == qemu.Tcg(threads="multi", tb_size_mb=128, cpu="qemu64")
    argv = qemu.command(cfg(tcg=t))
    assert opt_after(argv, "-accel") == ["tcg,thread=multi,tb-size=128"] and opt_after(argv, "-cpu") == ["qemu64"]
    assert qemu.parse_tcg("tb-size=default").accel_arg() == "tcg,thread=single"  # QEMU's own size
    assert qemu.parse_tcg("") == qemu.Tcg()
    # KVM ignores them
    assert opt_after(qemu.command(cfg(accel="kvm", tcg=t)), "-accel") == ["kvm"]


@pytest.mark.parametrize("text", ["thread=many", "tb-size=0", "tb-size=99999", "tb-size=-1", "tb-size=1e3",
                                  "cpu=host", "cpu=max,foo", "threads=multi", "thread"])
def test_bad_tcg_options_are_config_errors(text: str) -> None:
    with pytest.raises(qemu.ConfigError):
        qemu.parse_tcg(text)


def test_a_bad_tcg_in_a_config_is_refused_by_command() -> None:
    with pytest.raises(qemu.ConfigError, match="tb-size"):
        qemu.command(cfg(tcg=qemu.Tcg(tb_size_mb=0)))


def test_uefi_boot_of_a_uki_with_a_tpm() -> None:
    """vm.attest: OVMF as pflash (code read-only, the VM's own variables), the UKI as -kernel with
    no -initrd (it carries its own), the command line still given (measured into PCR 12), and
    a TPM on the swtpm connection's fd."""
    argv = qemu.command(cfg(kernel="/b/fractal.efi", ovmf=("/usr/share/OVMF/CODE.fd", "/run/x/VARS.fd"), tpm_fd=9),
                        qboot_exists=True)
    assert "-bios" not in argv and "-initrd" not in argv
    assert opt_after(argv, "-kernel") == ["/b/fractal.efi"]
    assert opt_after(argv, "-drive")[:2] == ["if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/CODE.fd",
                                            "if=pflash,format=raw,unit=1,file=/run/x/VARS.fd"]
    assert "socket,id=tpmchr,fd=9" in opt_after(argv, "-chardev")
    assert opt_after(argv, "-tpmdev") == ["emulator,id=tpm0,chardev=tpmchr"]
    assert "tpm-tis,tpmdev=tpm0" in opt_after(argv, "-device")
    assert 9 in qemu.inherited_fds(cfg(tpm_fd=9))
    assert "fractal.mode=agent" in opt_after(argv, "-append")[0]


def test_uefi_boot_needs_q35_and_no_other_firmware() -> None:
    for bad in (dict(machine="microvm"), dict(firmware="/x/bios.bin")):
        with pytest.raises(qemu.ConfigError, match="OVMF"):
            qemu.command(cfg(ovmf=("/c", "/v"), **bad))


def test_system_image_on_virtio_pmem_is_a_read_only_private_file_mapping() -> None:
    """hack/bench/sysimage.py's erofs-pmem candidate (docs/vm.md "The candidates, measured")."""
    size = 34 * qemu.PMEM_ALIGN
    argv = qemu.command(cfg(system_image="/proc/self/fd/7", system_device="pmem", system_image_size=size))
    assert opt_after(argv, "-object")[-1] == (f"memory-backend-file,id=sysmem,mem-path=/proc/self/fd/7,size={size},"
                                              "share=off,readonly=on")
    assert "virtio-pmem-pci,memdev=sysmem,id=syspmem" in opt_after(argv, "-device")
    assert "-drive" not in argv  # no virtio-blk disk besides
    assert opt_after(argv, "-m") == [f"512M,slots=1,maxmem={512 * (1 << 20) + size}"]
    assert "fractal.sysdev=pmem" in qemu.kernel_cmdline(cfg(system_image="/i", system_device="pmem",
                                                              system_image_size=size)).split()


def test_the_default_system_image_device_is_unchanged() -> None:
    argv = qemu.command(cfg(system_image="/proc/self/fd/7"))
    assert opt_after(argv, "-m") == ["512M"]
    assert not any("pmem" in a or "sysdev" in a for a in argv)


@pytest.mark.parametrize("kw, msg", [
    (dict(system_device="nvme"), "expected one of"),
    (dict(system_device="pmem"), "multiple of 2 MiB"),  # no size
    (dict(system_device="pmem", system_image_size=qemu.PMEM_ALIGN + 4096), "multiple of 2 MiB"),
    (dict(system_device="pmem", system_image_size=0), "multiple of 2 MiB"),
    (dict(system_device="pmem", system_image_size=qemu.PMEM_ALIGN, machine="microvm"), "machine q35"),
])
def test_bad_system_image_devices_are_refused(kw: dict, msg: str) -> None:
    with pytest.raises(qemu.ConfigError, match=msg):
        qemu.command(cfg(system_image="/img", **kw))


def test_a_pmem_image_without_an_image_is_refused() -> None:
    with pytest.raises(qemu.ConfigError, match="needs the image"):
        qemu.command(cfg(system_device="pmem", system_image_size=qemu.PMEM_ALIGN))


def test_open_boot_files_gives_a_pmem_image_its_size(tmp_path) -> None:
    for name in ("k", "i"):
        (tmp_path / name).write_text(name)
    with open(tmp_path / "s", "wb") as f:
        f.truncate(3 * qemu.PMEM_ALIGN)
    for device, want in (("pmem", 3 * qemu.PMEM_ALIGN), ("blk", None)):
        c, fds = qemu.open_boot_files(cfg(kernel=str(tmp_path / "k"), initramfs=str(tmp_path / "i"),
                                          system_image=str(tmp_path / "s"), system_device=device))
        try:
            assert c.system_image_size == want
        finally:
            for fd in fds:
                os.close(fd)
