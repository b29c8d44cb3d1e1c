"""An attested machine's TLS (issue 15 item 5; ccpu/agent/tls.py): the host CA pinned by the
fingerprint on the measured command line, the agent's key made at boot, the shim pinning that
key's SPKI hash from the handshake (which the quote then binds: tests/unit/test_attest.py).

Checked over real loopback TLS connections with the production contexts."""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
from pathlib import Path

import pytest

from ccpu import attest, pki
from ccpu.agent import __main__ as agent_main
from ccpu.agent import tls
from ccpu.agent.client import AgentClient
from tests.unit.test_remote_tls import _pki, _plaintext_hello, _refused, _serve, _write


def _pin(ca_pem: bytes) -> str:
    return pki.fingerprint(ca_pem)


def test_pin_syntax() -> None:
    assert tls.parse_pin("sha256:" + "ab" * 32) == bytes.fromhex("ab" * 32)
    for bad in ("", "sha256:", "sha256:" + "AB" * 32, "sha1:" + "ab" * 32, "sha256:" + "ab" * 31,
                "sha256:" + "zz" * 32, "ab" * 32):
        with pytest.raises(ValueError, match="expected sha256:"):
            tls.parse_pin(bad)


def test_the_ca_medium_is_accepted_only_with_the_pinned_hash(tmp_path: Path) -> None:
    d = _pki(tmp_path)
    ca_pem = (d / "ca.pem").read_bytes()
    pin = tls.parse_pin(_pin(ca_pem))
    # a disk: the PEM then zeros up to its size
    assert "BEGIN CERTIFICATE" in tls.pinned_ca(ca_pem + bytes(4096), pin)
    other = pki.make_ca().cert_pem
    with pytest.raises(ValueError, match="the measured command line names sha256:" + pin.hex()):
        tls.pinned_ca(other, pin)
    with pytest.raises(ValueError, match="exactly one"):
        tls.pinned_ca(ca_pem + other, pin)  # which one would be trusted? neither
    with pytest.raises(ValueError, match="exactly one"):
        tls.pinned_ca(b"\0" * 512, pin)


def test_the_quote_binding_is_nonce_then_key() -> None:
    nonce, key = b"n" * 32, b"k" * 32
    assert tls.binding(nonce, key) == hashlib.sha256(nonce + key).digest()
    assert tls.binding(nonce, key) != tls.binding(nonce, b"j" * 32)
    with pytest.raises(ValueError):
        tls.binding(nonce, b"short")
    assert attest.expected_extra(nonce, None) == nonce
    assert attest.expected_extra(nonce, key) == tls.binding(nonce, key)


def test_the_ca_fingerprint_on_a_command_line() -> None:
    assert attest.ca_fingerprint_on("console=ttyS0 fractal.ca=sha256:ab fractal.mode=agent") == "sha256:ab"
    assert attest.ca_fingerprint_on("console=ttyS0") is None


def _boot(tmp_path: Path, ca_pem: bytes) -> tuple[ssl.SSLContext, bytes]:
    medium = tmp_path / "ca.disk"
    medium.write_bytes(ca_pem + bytes(1024))
    return agent_main.boot_tls(_pin(ca_pem), str(medium), str(tmp_path / "bootkey"))


def test_the_shim_pins_the_boot_key_it_talks_to(tmp_path: Path) -> None:
    """Mutual TLS with the boot key: the agent sees the host's certificate; the SPKI hash the
    shim takes from the handshake is the one the agent's quotes bind."""
    d = _pki(tmp_path)
    ctx, spki = _boot(tmp_path, (d / "ca.pem").read_bytes())
    assert (tmp_path / "bootkey").stat().st_mode & 0o077 == 0

    async def go() -> tuple[bytes, list[str | None]]:
        listener, port, seen, _ = await _serve(ctx)
        async with listener:
            client = await AgentClient.connect_tls("127.0.0.1", port, tls.attested_client_context(
                str(d / "host.pem"), str(d / "host.key")), timeout=5)
            try:
                await asyncio.wait_for(client.hello(), 5)
                return attest.spki_sha256(client.peer_certificate()), seen
            finally:
                await client.close()

    got, seen = asyncio.run(go())
    assert got == spki
    assert seen == [pki.fingerprint((d / "host.pem").read_bytes())]


@pytest.mark.parametrize("case", ["other-ca", "no-certificate", "plaintext"])
def test_the_machine_refuses_clients_of_another_ca_and_plaintext(tmp_path: Path, case: str) -> None:
    d = _pki(tmp_path)
    ctx, _ = _boot(tmp_path, (d / "ca.pem").read_bytes())
    bad = tmp_path / "bad"
    bad.mkdir()
    _write(bad, "host", pki.issue(pki.make_ca(), "host", []))

    async def go() -> tuple[bytes, list[str | None]]:
        listener, port, seen, _ = await _serve(ctx)
        async with listener:
            if case == "plaintext":
                return await _plaintext_hello(port), seen
            if case == "other-ca":
                cctx = tls.attested_client_context(str(bad / "host.pem"), str(bad / "host.key"))
            else:
                cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                cctx.check_hostname, cctx.verify_mode = False, ssl.CERT_NONE
            try:
                client = await AgentClient.connect_tls("127.0.0.1", port, cctx, timeout=5)
                try:
                    await asyncio.wait_for(client.hello(), 5)
                finally:
                    await client.close()
            finally:
                assert seen == []  # no request read
            return b"", seen

    if case == "plaintext":
        answer, seen = asyncio.run(go())
        assert seen == [] and b"agent_pid" not in answer
    else:
        _refused(go())


def test_agent_flags_for_a_machine(tmp_path: Path) -> None:
    d = _pki(tmp_path)
    medium = tmp_path / "ca.disk"
    medium.write_bytes(pki.make_ca().cert_pem)  # not the pinned one
    base = ["--listen", "tcp:127.0.0.1:7443", "--runc-root", str(tmp_path / "runc"), "--repo", str(tmp_path / "r"),
            "--runc", "/bin/true"]
    with pytest.raises(SystemExit):
        agent_main.parse_args(base)  # no plaintext TCP
    with pytest.raises(SystemExit):
        agent_main.parse_args([*base, "--tls-ca-pin", _pin((d / "ca.pem").read_bytes())])  # where is the CA?
    with pytest.raises(SystemExit):
        agent_main.parse_args([*base, "--tls-ca-pin", _pin((d / "ca.pem").read_bytes()), "--tls-ca-file",
                               str(medium), "--tls-boot-dir", str(tmp_path / "k")])
    medium.write_bytes((d / "ca.pem").read_bytes())
    ns = agent_main.parse_args([*base, "--tls-ca-pin", _pin((d / "ca.pem").read_bytes()), "--tls-ca-file",
                                str(medium), "--tls-boot-dir", str(tmp_path / "k")])
    assert len(ns.tls_spki) == 32 and ns.tcp == ("127.0.0.1", 7443)


def test_the_shim_refuses_a_machine_that_trusts_another_ca(tmp_path: Path) -> None:
    """Before any TPM request: the command line the operator booted the machine with must name
    this host's CA (else someone else could drive the machine), and the agent must offer attest."""
    from shim.config import RemoteAttest, RemoteSettings
    from shim.remotesandbox import RemoteSandbox

    d = _pki(tmp_path)
    other = _pin(pki.make_ca().cert_pem)
    ep = "10.0.0.2:7443"

    class Client:
        def peer_certificate(self) -> bytes:
            raise AssertionError("no TPM or key step before the CA check")

    def sandbox(cmdline: str) -> RemoteSandbox:
        att = RemoteAttest(str(tmp_path / "manifest.json"), (str(tmp_path / "ca.pem"),), ((ep, cmdline),))
        return RemoteSandbox(settings=RemoteSettings((ep,), str(d), 5.0, att))

    with pytest.raises(attest.AttestationError, match=f"trusts CA {other}, this host's is "
                       f"{_pin((d / 'ca.pem').read_bytes())}"):
        asyncio.run(sandbox(f"console=ttyS0 fractal.ca={other}")._attest(Client(), ep, {"features": ["attest"]}))
    with pytest.raises(attest.AttestationError, match="trusts CA None"):
        asyncio.run(sandbox("console=ttyS0")._attest(Client(), ep, {"features": ["attest"]}))
    with pytest.raises(attest.AttestationError, match="offers no attest"):
        asyncio.run(sandbox("console=ttyS0")._attest(Client(), ep, {"features": []}))


def test_the_shim_reads_a_machine_ukis_ca_from_its_built_in_command_line(tmp_path: Path) -> None:
    """[remote.attest.uki]: the CA check takes fractal.ca from the command line in the machine's
    UKI manifest (`fractal guest uki`), before any TPM request; a manifest that is not one fails."""
    import json

    from ccpu.errdefs import FailedPrecondition
    from shim.config import RemoteAttest, RemoteSettings
    from shim.remotesandbox import RemoteSandbox

    d = _pki(tmp_path)
    ours, other = _pin((d / "ca.pem").read_bytes()), _pin(pki.make_ca().cert_pem)
    ep = "10.0.0.2:7443"

    class Client:
        def peer_certificate(self) -> bytes:
            raise AssertionError("no TPM or key step before the CA check")

    def run(doc: object) -> None:
        (tmp_path / "m.efi.json").write_text(json.dumps(doc))
        att = RemoteAttest(None, (str(tmp_path / "ca.pem"),), (), ((ep, str(tmp_path / "m.efi.json")),))
        sb = RemoteSandbox(settings=RemoteSettings((ep,), str(d), 5.0, att))
        asyncio.run(sb._attest(Client(), ep, {"features": ["attest"]}))

    u = {"sections": {".linux": "00" * 32}, "boot": "entry", "cmdline": f"console=ttyS0 fractal.ca={other}"}
    with pytest.raises(attest.AttestationError, match=f"trusts CA {other}, this host's is {ours}"):
        run({"uki": u})
    with pytest.raises(FailedPrecondition, match="uki.cmdline is not a string"):
        run({"uki": {**u, "cmdline": 3}})
    with pytest.raises(FailedPrecondition, match="m.efi.json"):
        run([1])
    with pytest.raises(attest.AttestationError, match="built-in command line"):  # a loader's line cannot apply
        att = RemoteAttest(str(tmp_path / "m.efi.json"), (str(tmp_path / "ca.pem"),),
                           ((ep, f"console=ttyS0 fractal.ca={ours}"),))
        (tmp_path / "m.efi.json").write_text(json.dumps({"uki": u}))
        asyncio.run(RemoteSandbox(settings=RemoteSettings((ep,), str(d), 5.0, att))._attest(
            Client(), ep, {"features": ["attest"]}))


def test_the_hosts_quote_check_needs_no_ssl() -> None:
    """A VM sandbox's shim daemon blocks ssl (shim/daemon.py): the attest checks and the quote
    binding must work there (seen failing: vm.attest sandboxes died with "import of ssl halted")."""
    import subprocess
    import sys

    root = str(Path(__file__).resolve().parents[2])
    code = ('import sys; sys.modules["ssl"] = None; sys.modules["_ssl"] = None\n'
            'from ccpu import attest\n'
            'from ccpu.agent import tpm\n'
            'assert attest.expected_extra(b"n" * 32, None) == b"n" * 32\n'
            'assert attest.expected_extra(b"n" * 32, b"k" * 32).hex() == tpm.qualifying_data((b"n" * 32).hex(), b"k" * 32)\n'
            'print("ok")')
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=root,
                         env={**os.environ, "PYTHONPATH": root})
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


def test_a_disk_boot_has_no_loader_arguments() -> None:
    """hack/machine.py's USB-stick boot: QEMU gets neither -kernel nor -append (nor -initrd), so
    OVMF's boot manager must find EFI/BOOT/BOOTX64.EFI itself; every other argument stays."""
    from hack.machine import without_loader

    argv = ["qemu", "-m", "768M", "-kernel", "/b/fractal.efi", "-append", "console=ttyS0 -kernel x", "-initrd",
            "/b/i", "-device", "virtio-blk-pci,drive=sys"]
    assert without_loader(argv) == ["qemu", "-m", "768M", "-device", "virtio-blk-pci,drive=sys"]
