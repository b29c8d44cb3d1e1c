"""The attested machine of issue 15 item 5, as a QEMU guest (the test stand-in for hardware).

Booted exactly like an attested VM -- OVMF, fractal's ``fractal.efi`` (the UKI: the firmware
measures it, systemd-stub measures its sections and the command line) and an swtpm TPM of its own
with an EK certificate from fractal's local CA -- but with **no virtio-serial port and no share**:

* one virtio-net NIC on a tap inside a network namespace made here, bridged there to one end of a
  veth pair whose other end is on the host (link-local 169.254.X.1/30 host side, .2 the machine);
* the EROFS system image as a disk of its own (the measured init hashes it: fractal.verify_image=1);
* the host CA's certificate on a small disk (serial fractal-ca): any medium would do, the agent
  accepts it only if its sha256 is the ``fractal.ca=`` of the measured command line;
* the command line names the listening address, the static address (``fractal.net=``) and the CA.

Two ways to boot it:

* ``esp=False``: QEMU's ``-kernel fractal.efi -append CMDLINE`` -- the build's UKI, the command
  line from the loader (measured into PCR 12);
* ``esp=True``: like a USB stick on hardware -- a per-machine UKI with the command line built in
  (``fractal guest uki``: ccpu.guest.uki.with_cmdline) as EFI/BOOT/BOOTX64.EFI on a disk image
  (ccpu.guest.esp), no ``-kernel``, no ``-append``: OVMF's boot manager finds the file itself,
  measures it after the boot-option action and the separator (PCR 4 in the boot-entry order),
  and the stub measures the built-in command line with the sections (PCR 11; PCR 12 stays 0).

    python3 -m hack.machine --tls-dir /etc/fractal/pki [--esp]   # boots one, prints the endpoint + config

Killing the QEMU process (:meth:`Machine.kill`) is a machine losing power: nothing answers on the
link any more (no RST), the host notices by TCP keepalive.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PORT = 7443
ESP_DISK_SERIAL = "fractal-esp"
MAC = "52:54:00:f7:15:05"
CA_DISK_SERIAL = "fractal-ca"


def _sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=30)


def ca_disk(ca_pem: bytes, path: Path) -> None:
    """The CA certificate as a raw disk: the PEM, zero-padded to whole 512-byte sectors."""
    path.write_bytes(ca_pem + bytes(-len(ca_pem) % 512 or 512))


def machine_cmdline(base: str, *, ip: str, prefix: int, listen: str, ca_fingerprint: str) -> str:
    """The measured command line of a machine: ``base`` (the VM's, with verify_image) + its NIC,
    its listening address and the host CA.  Pure."""
    return " ".join([base, f"fractal.net=eth0,{MAC},1500,{ip}/{prefix}", f"fractal.listen={listen}",
                     f"fractal.ca={ca_fingerprint}"])


@dataclass
class Machine:
    """One booted machine; :meth:`stop` (or the context manager) takes everything down."""

    workdir: Path
    netns: str
    host_link: str
    host_ip: str
    ip: str
    endpoint: str
    cmdline: str
    manifest: Path
    ek_ca: list[Path]
    #: booted from a disk image with its own UKI (``manifest`` is then that UKI's, from
    #: ``fractal guest uki``: the host's [remote.attest.uki]); None: QEMU's -kernel/-append
    esp: Path | None = None
    esp_seconds: float = 0.0  # how long `fractal guest uki --esp` took (benchmarks)
    qemu: subprocess.Popen[bytes] | None = None
    swtpm: subprocess.Popen[bytes] | None = None
    fds: list[int] = field(default_factory=list)

    @property
    def console(self) -> Path:
        return self.workdir / "console.log"

    def console_tail(self, n: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.console.read_text(errors="replace")[-n:]
        return "(no console)"

    def config_toml(self, tls_dir: str | Path, extra: str = "") -> str:
        """The host's fractal config for remote mode with attestation of this machine."""
        cas = ", ".join(f'"{p}"' for p in self.ek_ca)
        head = ('mode = "host"\nallowed_annotations = [".*"]\n'
                f'[remote]\nendpoints = ["{self.endpoint}"]\ntls_dir = "{tls_dir}"\nconnect_timeout = 30\n')
        if self.esp is not None:  # its own UKI: the command line is in it, its manifest says so
            return head + f'[remote.attest]\nek_ca = [{cas}]\n[remote.attest.uki]\n"{self.endpoint}" = ' \
                          f'"{self.manifest}"\n{extra}'
        return head + (f'[remote.attest]\nmanifest = "{self.manifest}"\nek_ca = [{cas}]\n'
                       f'[remote.attest.cmdline]\n"{self.endpoint}" = "{self.cmdline}"\n{extra}')

    def wait_listening(self, timeout: float = 400.0) -> None:
        """Until the agent accepts TCP connections (then closes ours: no TLS was spoken)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.qemu is not None and self.qemu.poll() is not None:
                raise RuntimeError(f"the machine's QEMU exited {self.qemu.returncode}: {self.console_tail()}")
            if "fractal-init" in self.console_tail() and "exec agent on tcp" in self.console_tail():
                with contextlib.suppress(OSError):
                    host, port = self.endpoint.rsplit(":", 1)
                    with socket.create_connection((host, int(port)), timeout=2):
                        return
            time.sleep(0.5)
        raise TimeoutError(f"the machine's agent did not listen within {timeout:.0f}s: {self.console_tail()}")

    def kill(self) -> None:
        """SIGKILL the machine's QEMU: the machine loses power."""
        if self.qemu is not None and self.qemu.poll() is None:
            self.qemu.kill()
            self.qemu.wait(30)

    def stop(self) -> None:
        self.kill()
        if self.swtpm is not None and self.swtpm.poll() is None:
            self.swtpm.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.swtpm.wait(10)
            if self.swtpm.poll() is None:
                self.swtpm.kill()
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()
        _sh("ip", "link", "del", self.host_link, check=False)
        _sh("ip", "netns", "del", self.netns, check=False)

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def without_loader(argv: list[str]) -> list[str]:
    """QEMU's argv with no ``-kernel`` and no ``-append``: the firmware boots from a disk.  Pure."""
    out: list[str] = []
    it = iter(argv)
    for a in it:
        if a in ("-kernel", "-append", "-initrd"):
            next(it)
            continue
        out.append(a)
    return out


def machine_uki(guest: Any, cmdline: str, workdir: Path,
                tamper: Callable[[bytes], bytes] | None = None) -> tuple[Path, Path]:
    """The machine's own UKI (the build's with ``cmdline`` built in) on a disk image, and its
    manifest, made by ``fractal guest uki --esp`` (the operator's command).  ``tamper``: changes
    the UKI's bytes before they go on the disk, the manifest kept (tests).  Returns (disk
    image, manifest)."""
    import json

    from ccpu.guest import esp

    efi, disk, manifest = workdir / "machine.efi", workdir / "esp.img", workdir / "machine.efi.json"
    res = subprocess.run([sys.executable, "-m", "ccpu.cli", "guest", "uki", "--cmdline", cmdline, "-o", str(efi),
                          "--esp", str(disk), "--json", "--offline"], capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        raise RuntimeError(f"fractal guest uki: {res.stderr.strip()[-500:]}")
    made = json.loads(res.stdout)
    if made["guest_sha256"] != guest.sha256:
        raise RuntimeError(f"fractal guest uki used guest build {made['guest_sha256']}, not {guest.sha256}")
    if tamper is not None:
        efi.write_bytes(tamper(efi.read_bytes()))
        esp.build(efi, disk)
    return disk, manifest


def boot(guest: Any, ca_pem: bytes, workdir: Path, *, uki: Path | None = None, memory_mb: int = 768,
         tpm_ca_dir: Path | None = None, esp: bool = False,
         tamper: Callable[[bytes], bytes] | None = None, loader: bool = False) -> Machine:
    """Boot a machine from the guest build ``guest`` (ccpu.guest.initramfs.Guest) trusting the
    host CA ``ca_pem``; ``uki``: another EFI image to boot instead of the build's (a tampered
    one, for tests); ``esp``: from a disk image with its own UKI (module docstring), ``tamper``
    applied to that UKI; ``loader``: that UKI handed to QEMU's -kernel with -append instead (a
    loader's command line overriding the built-in one, for tests).  Returns once QEMU runs (see
    :meth:`Machine.wait_listening`)."""
    from ccpu import pki
    from ccpu.guest.kernel import cache_root
    from ccpu.vm import net, qemu, tpm

    if guest.uki is None or guest.image is None:
        raise RuntimeError("the guest build has no UKI or no system image (systemd-boot-efi, layout image)")
    missing = tpm.missing_tools()
    if missing:
        raise RuntimeError(f"missing {', '.join(missing)}")
    workdir.mkdir(parents=True, exist_ok=True)
    tag = secrets.token_hex(3)
    used = _sh("ip", "-o", "addr").stdout
    third = next(x for x in random.sample(range(100, 250), 150) if f"169.254.{x}." not in used)
    host_ip, ip = f"169.254.{third}.1", f"169.254.{third}.2"
    fp = pki.fingerprint(ca_pem)
    base = qemu.kernel_cmdline(qemu.VMConfig(kernel="", initramfs="", console_log="", mode="agent"))
    cmdline = machine_cmdline(base + " fractal.verify_image=1", ip=ip, prefix=30, listen=f"{ip}:{PORT}",
                              ca_fingerprint=fp)
    m = Machine(workdir, f"fr15m-{tag}", f"fr15mh{tag}", host_ip, ip, f"{ip}:{PORT}", cmdline,
                guest.manifest_path, [])
    try:
        # the network: host veth end <-> (netns: veth end + tap, bridged) <-> the machine's NIC
        peer = f"fr15mp{tag}"
        _sh("ip", "netns", "add", m.netns)
        _sh("ip", "link", "add", m.host_link, "type", "veth", "peer", "name", peer)
        _sh("ip", "link", "set", peer, "netns", m.netns)
        _sh("ip", "addr", "add", f"{host_ip}/30", "dev", m.host_link)
        _sh("ip", "link", "set", m.host_link, "up")
        for cmd in (("link", "add", "br0", "type", "bridge"), ("link", "set", peer, "master", "br0"),
                    ("link", "set", peer, "up"), ("link", "set", "br0", "up")):
            _sh("ip", "-n", m.netns, *cmd)
        ns_fd = os.open(f"/run/netns/{m.netns}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            tap = net.in_netns(ns_fd, lambda: net.open_tap("tap0"))
        finally:
            os.close(ns_fd)
        m.fds.append(tap)
        for cmd in (("link", "set", "tap0", "master", "br0"), ("link", "set", "tap0", "up")):
            _sh("ip", "-n", m.netns, *cmd)
        # the TPM: manufactured now (its own EK, certified by fractal's local CA)
        ca = tpm.ensure_ca(tpm_ca_dir or tpm.ca_dir(cache_root().parent))
        m.ek_ca = [ca.root_cert, ca.issuer_cert]
        tpm.manufacture(workdir / tpm.STATE_DIR, ca)
        m.swtpm = subprocess.Popen(tpm.swtpm_argv(workdir / tpm.STATE_DIR, tpm.SOCKET), cwd=workdir,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not (workdir / tpm.SOCKET).exists():
            if time.monotonic() > deadline or m.swtpm.poll() is not None:
                raise RuntimeError("swtpm did not start")
            time.sleep(0.05)
        tsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        tsock.connect(str(workdir / tpm.SOCKET))
        tpm_fd = tsock.detach()
        m.fds.append(tpm_fd)
        ca_disk(ca_pem, workdir / "ca.disk")
        if esp:
            t0 = time.monotonic()
            m.esp, m.manifest = machine_uki(guest, cmdline, workdir, tamper)
            m.esp_seconds = time.monotonic() - t0
        if loader and m.esp is not None:
            uki = m.esp.with_name("machine.efi")
        cfg = qemu.VMConfig(kernel=str(uki or guest.uki), initramfs=str(guest.initramfs),
                            console_log=str(m.console), mode="agent", memory_mb=memory_mb, cpus=1,
                            system_image=str(guest.image), ovmf=(tpm.OVMF_CODE, tpm.vars_copy(str(workdir))),
                            tpm_fd=tpm_fd, nics=[qemu.Nic(tap, MAC)], name=f"fractal-machine-{tag}",
                            cmdline_extra=cmdline[len(base):].split())
        argv = qemu.command(cfg)
        assert argv[argv.index("-append") + 1] == cmdline, (argv, cmdline)
        disk = str(workdir / "ca.disk").replace(",", ",,")
        argv += ["-drive", f"file={disk},if=none,id=ca,format=raw,readonly=on,media=disk",
                 "-device", f"virtio-blk-pci,drive=ca,serial={CA_DISK_SERIAL}"]
        if m.esp is not None and not loader:  # the USB stick: the firmware's boot manager starts EFI/BOOT/BOOTX64.EFI
            argv = without_loader(argv)
            stick = str(m.esp).replace(",", ",,")
            argv += ["-drive", f"file={stick},if=none,id=esp,format=raw,readonly=on,media=disk",
                     "-device", f"virtio-blk-pci,drive=esp,serial={ESP_DISK_SERIAL},bootindex=0"]
        m.qemu = qemu.spawn(argv, stdout=subprocess.DEVNULL, stderr=None, cwd=str(workdir),
                            pass_fds=qemu.inherited_fds(cfg))
        return m
    except BaseException:
        m.stop()
        raise


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m hack.machine", description=__doc__.split("\n\n")[0])
    p.add_argument("--tls-dir", required=True, help="the host's `fractal pki` dir (its ca.pem is trusted)")
    p.add_argument("--esp", action="store_true", help="boot a per-machine UKI from a disk image (no -kernel)")
    p.add_argument("--workdir", help="where the machine's files go (default: a temp dir)")
    ns = p.parse_args(argv)
    from ccpu.guest import initramfs

    guest = initramfs.build(offline=True)
    work = Path(ns.workdir or tempfile.mkdtemp(prefix="fractal-machine-"))
    with boot(guest, Path(ns.tls_dir, "ca.pem").read_bytes(), work, esp=ns.esp) as m:
        m.wait_listening()
        print(f"endpoint: {m.endpoint}\nconsole: {m.console}\n--- fractal config ---\n{m.config_toml(ns.tls_dir)}",
              flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            assert m.qemu is not None
            m.qemu.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
