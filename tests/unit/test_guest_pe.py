"""The Authenticode hash (ccpu/guest/pe.py) and the PCR 4 prediction built on it (ccpu/guest/uki.py).

The hash is checked against an independent implementation (osslsigncode signs an image and prints
the digest it signed); that it is what OVMF measures is checked by the attestation tests, which
compare the quoted PCR 4 with ``uki.pcr4`` of the build's manifest.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from ccpu.guest import pe, uki

STUB = Path(uki.STUB)
needs_stub = pytest.mark.skipif(not STUB.exists(), reason="needs systemd-boot-efi (hack/setup.sh installs it)")


def _checksum_at(data: bytes) -> int:
    (off,) = struct.unpack_from("<I", data, 0x3C)
    return off + 24 + 64


@needs_stub
def test_hash_skips_the_checksum_and_covers_every_section() -> None:
    stub = STUB.read_bytes()
    base = pe.authenticode_sha256(stub)
    other_sum = bytearray(stub)
    struct.pack_into("<I", other_sum, _checksum_at(stub), 0x12345678)
    assert pe.authenticode_sha256(bytes(other_sum)) == base  # the checksum is not hashed
    for name, (rptr, rsize, _) in pe.sections(stub).items():
        if rsize:
            changed = bytearray(stub)
            changed[rptr + rsize // 2] ^= 0xFF
            assert pe.authenticode_sha256(bytes(changed)) != base, name
    assert pe.authenticode_sha256(stub + b"trailing") != base  # data after the last section counts


@needs_stub
@pytest.mark.skipif(shutil.which("osslsigncode") is None or shutil.which("openssl") is None,
                    reason="needs osslsigncode and openssl (hack/setup.sh installs them)")
def test_hash_agrees_with_osslsigncode_on_a_signed_image(tmp_path: Path) -> None:
    """osslsigncode signs the stub (adding a certificate table) and reports the digest it signed:
    ours, which leaves the certificate table and its directory entry out, must be the same."""
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", tmp_path / "k.pem",
                    "-out", tmp_path / "c.pem", "-subj", "/CN=fractal-test", "-days", "1"],
                   check=True, capture_output=True)
    subprocess.run(["osslsigncode", "sign", "-certs", tmp_path / "c.pem", "-key", tmp_path / "k.pem",
                    "-h", "sha256", "-in", STUB, "-out", tmp_path / "s.efi"], check=True, capture_output=True)
    out = subprocess.run(["osslsigncode", "verify", "-in", tmp_path / "s.efi"], capture_output=True, text=True).stdout
    m = re.search(r"Calculated message digest\s*:\s*([0-9A-Fa-f]{64})", out)
    assert m, out
    signed = (tmp_path / "s.efi").read_bytes()
    assert len(signed) > STUB.stat().st_size
    assert pe.authenticode_sha256(signed).hex() == m.group(1).lower()


@pytest.mark.parametrize("data, message", [
    (b"", "no MZ"),
    (b"MZ" + bytes(10), "truncated"),
    (b"MZ" + bytes(58) + struct.pack("<I", 64) + b"NOPE", "no PE signature"),
])
def test_malformed_images_are_refused_cleanly(data: bytes, message: str) -> None:
    with pytest.raises(pe.PeError, match=message):
        pe.authenticode_sha256(data)


@needs_stub
def test_a_section_past_the_end_is_refused() -> None:
    stub = STUB.read_bytes()
    with pytest.raises(pe.PeError):
        pe.authenticode_sha256(stub[: len(stub) // 2])


def test_pcr4_is_the_firmwares_event_order() -> None:
    """As OVMF's event log shows for QEMU's -kernel: the UKI (measured while it is loaded), the
    boot-option action, the separator, then the kernel the stub loads; a boot entry measures the
    UKI after the separator."""
    u, k = hashlib.sha256(b"uki").hexdigest(), hashlib.sha256(b"kernel").hexdigest()

    def chain(*digests: bytes) -> bytes:
        pcr = bytes(32)
        for d in digests:
            pcr = hashlib.sha256(pcr + d).digest()
        return pcr

    action = hashlib.sha256(b"Calling EFI Application from Boot Option").digest()
    sep = hashlib.sha256(bytes(4)).digest()
    assert uki.pcr4(u, k) == chain(bytes.fromhex(u), action, sep, bytes.fromhex(k))
    assert uki.pcr4(u, k, direct_kernel=False) == chain(action, sep, bytes.fromhex(u), bytes.fromhex(k))
    assert uki.pcr4(u, hashlib.sha256(b"other").hexdigest()) != uki.pcr4(u, k)
