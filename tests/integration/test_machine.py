"""Issue 15 item 5 through containerd: an attested machine reached only over a NIC.

The machine is hack/machine.py's QEMU guest: OVMF + the build's fractal.efi + an swtpm TPM, no
virtio-serial port and no share -- one virtio-net NIC on a tap in a network namespace made here,
the system image and the host CA's certificate on disks of their own.  Its agent listens on TCP
with a TLS key made at boot; the shim (``[remote.attest]``) checks its TPM quote -- the build's
PCR 11, the PCR 12 of its command line (which names the host CA), and the TLS key of this very
connection in the quote's qualifying data -- before it creates any container.

Negative cases here: a client certificate of another CA and a plaintext client get nothing from
the machine; a tampered UKI (one initramfs byte) is refused before any container, naming PCR 11.
A replayed quote and a relayed one (naming another TLS key) need a lying agent: their checks are
tested against a real TPM in tests/unit/test_attest.py.  Under TCG a boot takes ~45 s.

Booted as on hardware (``esp=True``): the machine's own UKI (``fractal guest uki --esp``: its
command line built in) on a disk image, no -kernel, no -append -- attested with PCR 4 in the
boot-entry order and PCR 12 zeros, and it runs a container; one byte of that UKI changed is
refused naming PCR 4 and 11; the same UKI started by a loader with a command line, naming PCR 12.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ccpu import pki
from hack import machine as machine_mod
from hack.containerd_env import FractalEnv, mounts_under
from tests.harness import shim_daemons, wait_for

pytestmark = pytest.mark.skipif(bool(__import__("ccpu.vm.tpm", fromlist=["x"]).missing_tools()) or
                                not os.path.exists("/usr/lib/systemd/boot/efi/linuxx64.efi.stub"),
                                reason="needs ovmf, swtpm, swtpm-tools, tpm2-tools, systemd-boot-efi")

RUNTIME = "io.containerd.fractal.v1"
REMOTE = ["--annotation", "io.fractal.mode=remote"]


@pytest.fixture(scope="module")
def guest():  # noqa: ANN201
    from ccpu.guest import initramfs

    g = initramfs.build(offline=True)
    assert g.uki is not None and g.image is not None
    return g


@pytest.fixture
def pki_dir(tmp_path: Path) -> Path:
    d = tmp_path / "pki"
    pki.init(str(d), ["127.0.0.1"])  # the agent's own certificate is unused: a machine makes its key at boot
    return d


@pytest.fixture
def env(registry) -> Iterator[tuple[FractalEnv, str, str]]:  # noqa: ANN001
    e = FractalEnv()
    with e:
        ns = e.new_namespace()
        ref = registry.ref("busybox")
        e.pull(ref, namespace=ns)
        yield e, ns, ref
        assert e.remove_namespace(ns) == []


def _fractal(env: FractalEnv, *args: str) -> subprocess.CompletedProcess[str]:
    e = {**os.environ, "FRACTAL_RUN_DIR": str(env.fractal_run_dir)}
    for k in ("CONTAINERD_ADDRESS", "CONTAINERD_NAMESPACE"):
        e.pop(k, None)
    return subprocess.run([sys.executable, "-m", "ccpu.cli", *args], capture_output=True, text=True,
                          env=e, timeout=300)


def _stopped(env: FractalEnv, ns: str, cid: str) -> bool:
    return any(ln.startswith(cid) and "STOPPED" in ln for ln in env.ctr("tasks", "ls", namespace=ns).stdout.splitlines())


def _client_refused(m: machine_mod.Machine, tls_dir: Path) -> str:
    """A hello from a client certificate of ``tls_dir``'s CA, then a plaintext hello: what came back."""
    from ccpu.agent import protocol, tls, wire
    from ccpu.agent.client import AgentClient

    host, port = m.endpoint.rsplit(":", 1)

    async def tls_hello() -> str:
        ctx = tls.attested_client_context(str(tls_dir / "host.pem"), str(tls_dir / "host.key"))
        try:
            client = await AgentClient.connect_tls(host, int(port), ctx, timeout=30)
            try:
                return repr(await asyncio.wait_for(client.hello(), 30))
            finally:
                await client.close()
        except Exception as exc:  # noqa: BLE001 - any refusal
            return f"refused: {type(exc).__name__}"

    async def plaintext() -> str:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(wire.encode_control(protocol.request(1, "hello", {"version": 1})))
        await writer.drain()
        try:
            answer = await asyncio.wait_for(reader.read(65536), 30)
        except (ConnectionError, TimeoutError):
            answer = b""
        writer.close()
        return repr(answer)

    return asyncio.run(tls_hello()) + " / " + asyncio.run(plaintext())


class Relay:
    """A man in the middle with a TLS key of its own that forwards everything to the real machine
    (as a client holding a host certificate): the quote the shim gets is genuine and fresh, but
    names the machine's key, not the relay's.  Runs its own event loop in a thread."""

    def __init__(self, m: machine_mod.Machine, pki_dir: Path, workdir: Path) -> None:
        import ssl
        import threading

        from ccpu.agent import tls

        key = tls.make_boot_key(str(workdir))
        self._srv = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._srv.load_cert_chain(key.cert, key.key)
        self._cli = tls.attested_client_context(str(pki_dir / "host.pem"), str(pki_dir / "host.key"))
        self._up = m.endpoint.rsplit(":", 1)
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.port = 0

        async def start() -> None:
            self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self._srv)
            self.port = self.server.sockets[0].getsockname()[1]

        def run() -> None:
            self.loop.run_until_complete(start())
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        ready.wait(10)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection(self._up[0], int(self._up[1]), ssl=self._cli)

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            w.close()

        await asyncio.gather(pipe(reader, uw), pipe(ur, writer))

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def test_containers_run_on_an_attested_machine(env, guest, pki_dir: Path, tmp_path: Path, registry) -> None:  # noqa: ANN001
    e, ns, ref = env
    with machine_mod.boot(guest, (pki_dir / "ca.pem").read_bytes(), tmp_path / "m") as m:
        m.wait_listening()
        # the guest refuses a client of another CA and a plaintext client, serving neither
        rogue = tmp_path / "rogue"
        pki.init(str(rogue), ["127.0.0.1"])
        seen = _client_refused(m, rogue)
        assert seen.startswith("refused:") and "agent_pid" not in seen, seen
        assert "connected (identity" not in m.console_tail(20000), m.console_tail()

        # a relay in the middle: the machine's genuine, fresh quote names another TLS key
        relay = Relay(m, pki_dir, tmp_path / "relay")
        try:
            via = f"127.0.0.1:{relay.port}"
            e.fractal_config.write_text(m.config_toml(pki_dir).replace(f'"{m.endpoint}"', f'"{via}"'))
            r = e.run(ref, "rl", "echo", "SHOULD-NOT-RUN", namespace=ns, runtime=RUNTIME, extra=REMOTE, check=False,
                      timeout=400)
        finally:
            relay.close()
        assert r.returncode != 0 and "SHOULD-NOT-RUN" not in r.stdout
        assert "names another TLS key" in r.stderr, r.stderr
        e.ctr("containers", "rm", "rl", namespace=ns, check=False)

        e.fractal_config.write_text(m.config_toml(pki_dir))
        shared = [*REMOTE, "--annotation", "io.fractal.sandbox=mach", "-d"]
        e.run(ref, "m1", "sh", "-c", "head -1 /etc/passwd > /first; sleep 600", rm=False, namespace=ns,
              runtime=RUNTIME, extra=shared, timeout=400)
        wait_for(lambda: "m1" in e.ctr("tasks", "ls", namespace=ns).stdout, 120, "task m1")
        assert shim_daemons(e, ns, "mach"), "no shim daemon for sandbox mach"  # its exit is waited for below
        first = e.ctr("tasks", "exec", "--exec-id", "x1", "m1", "cat", "/first", namespace=ns, timeout=120).stdout
        assert first.startswith("root:"), first  # a file of the image, read on the machine
        uname = e.ctr("tasks", "exec", "--exec-id", "x2", "m1", "uname", "-r", namespace=ns, timeout=120).stdout
        assert uname.strip() == guest.manifest["kernel"]["release"], uname  # the machine's kernel
        assert "connected (identity" in m.console_tail(200000), m.console_tail()  # it ran there

        from tests.integration.test_shim_vm import fractal_ps

        (entry,) = [x for x in fractal_ps(e, ns) if "m1" in [c["id"] for c in x["containers"]]]
        att = entry["vm"]["attested"]
        from ccpu.guest import uki

        assert att["pcrs"]["11"] == uki.pcr11(guest.manifest["uki"]["sections"]).hex()
        assert att["pcrs"]["12"] == uki.cmdline_pcr12(m.cmdline).hex()
        assert len(att["tls_key"]) == 64
        print("attested machine:", att)
        text = _fractal(e, "ps", "-a", str(e.address), "-n", ns)
        assert f"machine {m.endpoint} attested: PCR 11 {att['pcrs']['11'][:16]}" in text.stdout, text

        tools = registry.ref("tools")
        r = _fractal(e, "layers", "add", "-a", str(e.address), "-n", ns, "--plain-http", "m1", tools)
        assert r.returncode == 0, r.stderr
        hello = e.ctr("tasks", "exec", "--exec-id", "x3", "m1", "cat", "/opt/tools/hello.txt", namespace=ns,
                      timeout=120).stdout
        assert hello.strip() == "hello from tools", hello

        m.kill()  # the machine loses power: no RST, the shim's keepalive notices
        wait_for(lambda: _stopped(e, ns, "m1"), 120, "the task's exit after the machine died")
        e.ctr("tasks", "delete", "m1", namespace=ns)
        e.ctr("containers", "delete", "m1", namespace=ns)
        assert mounts_under(e.run_dir, e.root_dir) == []
        wait_for(lambda: not shim_daemons(e, ns, "mach"), 60, "the shim's exit")


def test_a_tampered_uki_is_refused_before_any_container(env, guest, pki_dir: Path, tmp_path: Path) -> None:  # noqa: ANN001
    """The machine boots a UKI whose initramfs has one byte changed (its /etc/hostname), the
    host's manifest is the build's: the quote's PCR 11 differs and no container is created."""
    from ccpu.guest import initramfs, uki

    e, ns, ref = env
    data = bytearray(guest.initramfs.read_bytes())
    at = data.index(b"fractal\n", data.index(b"etc/hostname\0"))
    data[at] = ord("F")
    (tmp_path / "initramfs.cpio").write_bytes(bytes(data))
    kern = Path(guest.manifest["kernel_image"]["path"]).with_name("vmlinuz")
    bad = uki.build(tmp_path / "bad.efi", kernel=kern, initramfs=tmp_path / "initramfs.cpio",
                    cmdline=initramfs.UKI_CMDLINE, osrel=uki.os_release(guest.manifest["kernel"]["release"], guest.sha256))
    assert bad.sha256 != guest.manifest["uki"]["sha256"]
    with machine_mod.boot(guest, (pki_dir / "ca.pem").read_bytes(), tmp_path / "m", uki=bad.path) as m:
        m.wait_listening()
        e.fractal_config.write_text(m.config_toml(pki_dir))
        r = e.run(ref, "t1", "echo", "SHOULD-NOT-RUN", namespace=ns, runtime=RUNTIME, extra=REMOTE, check=False,
                  timeout=400)
        assert r.returncode != 0 and "SHOULD-NOT-RUN" not in r.stdout
        assert "PCR 11" in r.stderr and "the guest build predicts" in r.stderr, r.stderr
        e.ctr("containers", "rm", "t1", namespace=ns, check=False)
        assert mounts_under(e.run_dir, e.root_dir) == []


def _osrel_byte_changed(image: bytes) -> bytes:
    """The UKI with one byte of its .osrel section changed (``NAME="fractal`` -> ``NAME="Fractal``):
    it boots the same, but it is not what the manifest describes."""
    from ccpu.guest import pe

    at, size, _ = pe.sections(image)[".osrel"]
    i = image.index(b'NAME="fractal', at, at + size) + len(b'NAME="')
    return image[:i] + b"F" + image[i + 1:]


def test_a_machine_booted_from_its_esp_disk_attests_and_runs_a_container(env, guest, pki_dir: Path,
                                                                        tmp_path: Path) -> None:  # noqa: ANN001
    """As on hardware with a USB stick: the machine's own UKI (`fractal guest uki`: the command
    line built in) as EFI/BOOT/BOOTX64.EFI on a disk image, no -kernel and no -append.  OVMF's
    boot manager starts it; the quote shows PCR 4 in the boot-entry order (predicted, not seen
    before this test), PCR 11 with the built-in command line, and PCR 12 untouched (no loader)."""
    import json

    from ccpu.guest import esp, uki

    e, ns, ref = env
    with machine_mod.boot(guest, (pki_dir / "ca.pem").read_bytes(), tmp_path / "m", esp=True) as m:
        assert m.esp is not None
        built = json.loads(m.manifest.read_text())
        assert built["uki"]["cmdline"] == m.cmdline and built["uki"]["boot"] == "entry"
        assert esp.read_app(m.esp) == (tmp_path / "m" / "machine.efi").read_bytes()
        m.wait_listening()
        console = m.console_tail(200000)
        assert "BdsDxe: starting Boot" in console, console  # the firmware's boot manager, not QEMU's loader
        e.fractal_config.write_text(m.config_toml(pki_dir))
        assert "[remote.attest.uki]" in e.fractal_config.read_text()
        e.run(ref, "u1", "sh", "-c", "head -1 /etc/passwd > /first; sleep 600", rm=False, namespace=ns,
              runtime=RUNTIME, extra=[*REMOTE, "-d"], timeout=400)
        wait_for(lambda: "u1" in e.ctr("tasks", "ls", namespace=ns).stdout, 120, "task u1")
        first = e.ctr("tasks", "exec", "--exec-id", "x1", "u1", "cat", "/first", namespace=ns, timeout=120).stdout
        assert first.startswith("root:"), first

        from tests.integration.test_shim_vm import fractal_ps

        (entry,) = [x for x in fractal_ps(e, ns) if "u1" in [c["id"] for c in x["containers"]]]
        att = entry["vm"]["attested"]
        print("attested machine (ESP):", att)
        assert att["pcrs"]["4"] == built["uki"]["pcr4"] == uki.pcr4(
            built["uki"]["authenticode"], built["uki"]["linux_authenticode"], direct_kernel=False).hex()
        assert att["pcrs"]["11"] == built["uki"]["pcr11"] != guest.manifest["uki"]["pcr11"]
        assert att["pcrs"]["12"] == "00" * 32
        e.ctr("tasks", "kill", "-s", "SIGKILL", "u1", namespace=ns)
        wait_for(lambda: _stopped(e, ns, "u1"), 120, "u1's exit")
        e.ctr("tasks", "delete", "u1", namespace=ns)
        e.ctr("containers", "delete", "u1", namespace=ns)


def test_a_one_byte_change_to_the_esp_uki_is_refused(env, guest, pki_dir: Path, tmp_path: Path) -> None:  # noqa: ANN001
    """The ESP's UKI with one .osrel byte changed, the manifest of the real one on the host:
    refused before any container, naming PCR 4 and PCR 11."""
    e, ns, ref = env
    with machine_mod.boot(guest, (pki_dir / "ca.pem").read_bytes(), tmp_path / "m", esp=True,
                          tamper=_osrel_byte_changed) as m:
        m.wait_listening()
        e.fractal_config.write_text(m.config_toml(pki_dir))
        r = e.run(ref, "t2", "echo", "SHOULD-NOT-RUN", namespace=ns, runtime=RUNTIME, extra=REMOTE, check=False,
                  timeout=400)
        assert r.returncode != 0 and "SHOULD-NOT-RUN" not in r.stdout
        assert "PCR 11" in r.stderr and "PCR 4" in r.stderr and "the guest build predicts" in r.stderr, r.stderr
        e.ctr("containers", "rm", "t2", namespace=ns, check=False)
        assert mounts_under(e.run_dir, e.root_dir) == []


def test_a_loader_command_line_over_the_machines_uki_is_refused(env, guest, pki_dir: Path, tmp_path: Path) -> None:  # noqa: ANN001
    """The machine's own UKI started by a loader (QEMU's -kernel) that passes a command line --
    the same text as the built-in one: systemd-stub takes the loader's and measures it into
    PCR 12, which the host predicts all zeros for a UKI booted from its boot entry.  Refused
    before any container, naming PCR 12 (and PCR 4: the firmware measured it in the loader's order)."""
    e, ns, ref = env
    with machine_mod.boot(guest, (pki_dir / "ca.pem").read_bytes(), tmp_path / "m", esp=True, loader=True) as m:
        m.wait_listening()
        assert "BdsDxe: starting Boot" not in m.console_tail(200000)  # QEMU's loader, not the boot manager
        e.fractal_config.write_text(m.config_toml(pki_dir))
        r = e.run(ref, "t3", "echo", "SHOULD-NOT-RUN", namespace=ns, runtime=RUNTIME, extra=REMOTE, check=False,
                  timeout=400)
        assert r.returncode != 0 and "SHOULD-NOT-RUN" not in r.stdout
        assert "PCR 12 (no command line from a loader" in r.stderr and "PCR 4" in r.stderr, r.stderr
        assert "PCR 11" not in r.stderr, r.stderr  # the UKI itself is the one described
        e.ctr("containers", "rm", "t3", namespace=ns, check=False)
