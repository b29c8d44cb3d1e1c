"""The host's side of attestation: what a guest must have booted, and the check of its TPM quote.

Flow (the agent's ``attest`` op, ccpu/agent/tpm.py; docs/hardware.md "Attestation"):

1. ``keys``: the guest returns its EK public key, its EK certificate, a fresh AK public key and
   the AK's TPM name.  :func:`check_ek` verifies the certificate chains to the CA the host
   trusts (for local VMs, fractal's swtpm CA: ccpu/vm/tpm.py) and certifies *this* EK.
2. :func:`make_credential` wraps a random secret to the EK, for the AK's name only
   (``tpm2_makecredential``, offline): only the TPM holding that EK, with that AK loaded, opens it.
3. ``quote``: the guest opens the credential and quotes the PCRs with the host's fresh nonce.
   :func:`check_quote` verifies, in order: the opened secret (the AK lives in the certified
   TPM), the nonce inside the signed quote (a replayed quote carries an old one), the signature
   and the PCR digest (``tpm2_checkquote``), then each PCR against :class:`Expected` -- the
   values predicted from the guest build's manifest (ccpu.guest.uki) -- and names what differed.

The TPM structures are parsed by tpm2-tools (``tpm2_print``, ``tpm2_checkquote``), never by hand.
"""

from __future__ import annotations

import base64
import os
import re
import secrets
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import errdefs
from .guest import uki

TPM2 = "tpm2"
NONCE_BYTES = 32
SECRET_BYTES = 32
MAX_BLOB = 64 * 1024  # any one value the guest sends (keys, certificate, quote, signature)


class AttestationError(errdefs.FailedPrecondition):
    """The guest did not prove it booted what the host expects: the message says what differed."""


@dataclass(frozen=True)
class Expected:
    """The PCR values (sha256 bank) a guest must show, and what each stands for (for errors)."""

    pcrs: dict[int, bytes]
    meaning: dict[int, str] = field(default_factory=dict)


def expected(manifest: Mapping[str, Any], cmdline: str | None) -> Expected:
    """What the guest build ``manifest`` predicts: PCR 4 from the Authenticode hashes of its UKI and
    kernel (``uki.pcr4``, in the order of how it boots: ``uki.boot``), PCR 11 from its UKI's
    sections, and PCR 12 from the command line the VM was given (None: the UKI's own, nothing
    measured into 12).  A machine's own UKI (``fractal guest uki``: boot ``entry``) is started by
    the firmware's boot manager, with no loader: its command line is the built-in one (in PCR 11)
    and PCR 12 must be all zeros -- a loader's command line would override the built-in one.  Pure."""
    u = manifest.get("uki") if isinstance(manifest, Mapping) else None
    if not isinstance(u, Mapping) or not isinstance(u.get("sections"), Mapping):
        raise AttestationError("the guest build has no unified kernel image to attest (systemd-boot-efi missing "
                               "when it was built?)")
    boot = u.get("boot", uki.BOOT_LOADER)
    if boot not in uki.BOOTS:
        raise AttestationError(f"the manifest's UKI boots {boot!r}: unknown (known: {', '.join(uki.BOOTS)})")
    sections = {str(k): str(v) for k, v in u["sections"].items()}
    pcrs = {uki.PCR_SECTIONS: uki.pcr11(sections)}
    meaning = {uki.PCR_SECTIONS: "the UKI's sections " + " ".join(
        f"{n}={sections[n][:16]}" for n in uki.MEASURED_ORDER if n in sections)}
    if u.get("authenticode") and u.get("linux_authenticode"):
        pcrs[uki.PCR_BOOT_APP] = uki.pcr4(str(u["authenticode"]), str(u["linux_authenticode"]),
                                          direct_kernel=boot == uki.BOOT_LOADER)
        meaning[uki.PCR_BOOT_APP] = (f"the boot applications the firmware started "
                                     f"({'from a boot entry' if boot == uki.BOOT_ENTRY else 'from the loader'}): "
                                     f"{u.get('file', uki.FILE)} (Authenticode "
                                     f"{str(u['authenticode'])[:16]}) and its kernel "
                                     f"({str(u['linux_authenticode'])[:16]})")
    if boot == uki.BOOT_ENTRY:
        if cmdline is not None:
            raise AttestationError("a UKI booted from a boot entry runs its built-in command line: the host was "
                                   f"given another one to predict ({cmdline!r})")
        pcrs[uki.PCR_CMDLINE] = uki.PCR12_NO_LOADER_CMDLINE
        meaning[uki.PCR_CMDLINE] = ("no command line from a loader (the UKI's built-in one applies: "
                                    f"{str(u.get('cmdline', '?'))!r})")
    elif cmdline is not None:
        pcrs[uki.PCR_CMDLINE] = uki.cmdline_pcr12(cmdline)
        meaning[uki.PCR_CMDLINE] = f"the kernel command line {cmdline!r}"
    return Expected(pcrs, meaning)


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def _blob(reply: Mapping[str, Any], key: str, *, empty_ok: bool = False) -> bytes:
    v = reply.get(key)
    if not isinstance(v, str) or len(v) > MAX_BLOB * 2:
        raise AttestationError(f"the guest's attest reply: {key} missing or too large")
    try:
        data = base64.b64decode(v, validate=True)
    except ValueError:
        raise AttestationError(f"the guest's attest reply: {key} is not base64") from None
    if not data and not empty_ok:
        raise AttestationError(f"the guest's attest reply: {key} is empty")
    return data


@dataclass(frozen=True)
class Keys:
    ek_public_pem: bytes
    ek_certificate: bytes  # DER; b"" when the TPM has none
    ak_public_pem: bytes
    ak_name: bytes

    @classmethod
    def from_reply(cls, reply: Mapping[str, Any]) -> Keys:
        return cls(_blob(reply, "ek_public"), _blob(reply, "ek_certificate", empty_ok=True),
                   _blob(reply, "ak_public"), _blob(reply, "ak_name"))


def check_ek(keys: Keys, ca_certs: Sequence[Path]) -> str:
    """The EK certificate's subject if it certifies ``keys``' EK and chains to one of ``ca_certs``
    (leaf's issuer, and so on up to a self-signed one among them)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    if not keys.ek_certificate:
        raise AttestationError("the guest's TPM has no EK certificate: its EK cannot be trusted")
    try:
        leaf = x509.load_der_x509_certificate(keys.ek_certificate)
        ek = serialization.load_pem_public_key(keys.ek_public_pem)
    except ValueError as exc:
        raise AttestationError(f"the guest's EK or EK certificate does not parse: {exc}") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if leaf.public_key().public_bytes(*spki) != ek.public_bytes(*spki):
        raise AttestationError("the guest's EK certificate certifies another key than its EK")
    cas = [x509.load_pem_x509_certificate(p.read_bytes()) for p in ca_certs]
    cert = leaf
    for _ in range(len(cas) + 1):
        issuer = next((c for c in cas if c.subject == cert.issuer), None)
        if issuer is None:
            break
        try:
            cert.verify_directly_issued_by(issuer)
        except Exception as exc:  # noqa: BLE001 - cryptography's InvalidSignature, TypeError for a key type mismatch
            raise AttestationError(f"the guest's EK certificate chain does not verify at {cert.subject.rfc4514_string()}: "
                                   f"{type(exc).__name__}") from None
        if issuer.subject == issuer.issuer:
            return leaf.subject.rfc4514_string()
        cert = issuer
    raise AttestationError(f"the guest's EK certificate (issuer {leaf.issuer.rfc4514_string()}) does not chain to "
                           "the trusted CA")


def _run(argv: list[str], what: str) -> str:
    res = subprocess.run([TPM2, *argv], capture_output=True, text=True)
    if res.returncode != 0:
        raise AttestationError(f"{what}: {(res.stderr or res.stdout).strip()[-400:]}")
    return res.stdout


def make_credential(keys: Keys, secret: bytes) -> bytes:
    """``secret`` wrapped to the EK for the AK's name (tpm2_makecredential, no TPM needed)."""
    with tempfile.TemporaryDirectory(prefix="fractal-attest-") as d:
        Path(d, "ek.pem").write_bytes(keys.ek_public_pem)
        Path(d, "secret").write_bytes(secret)
        _run(["makecredential", "-T", "none", "-u", f"{d}/ek.pem", "-G", "rsa", "-s", f"{d}/secret",
              "-n", keys.ak_name.hex(), "-o", f"{d}/cred"], "tpm2 makecredential")
        return Path(d, "cred").read_bytes()


_PCR_LINE = re.compile(r"^\s*(\d+)\s*:\s*0x([0-9A-Fa-f]{64})\s*$")
_EXTRA = re.compile(r"^extraData:\s*([0-9a-fA-F]*)\s*$", re.M)


def parse_pcrs(text: str) -> dict[int, bytes]:
    """The sha256 PCR values tpm2_checkquote printed (YAML: ``pcrs: sha256: N : 0x...``).  Pure."""
    out: dict[int, bytes] = {}
    bank = None
    for line in text.splitlines():
        if line.strip().endswith(":") and not _PCR_LINE.match(line):
            bank = line.strip()[:-1]
            continue
        m = _PCR_LINE.match(line)
        if m and bank == "sha256":
            out[int(m.group(1))] = bytes.fromhex(m.group(2))
    return out


@dataclass(frozen=True)
class Verified:
    pcrs: dict[int, bytes]
    ek_subject: str

    def describe(self) -> dict[str, Any]:
        return {"ek": self.ek_subject, "pcrs": {str(k): v.hex() for k, v in sorted(self.pcrs.items())}}


def expected_extra(nonce: bytes, tls_key: bytes | None) -> bytes:
    """The qualifying data the quote must carry: the nonce, or for a machine reached over TLS
    with a boot key ``sha256(nonce || SPKI hash of the key of this TLS session)``.  Pure."""
    from .agent.tpm import binding  # not tls.py: no ssl in a VM sandbox's shim daemon

    return nonce if tls_key is None else binding(nonce, tls_key)


def explain_extra(got_hex: str, *, nonce: bytes, tls_key: bytes | None, claimed_key: str | None) -> str:
    """Why a quote's qualifying data is not the expected one, in words.  Pure."""
    if tls_key is not None and isinstance(claimed_key, str) and len(claimed_key) == 64 and \
            claimed_key != tls_key.hex():
        try:
            other = expected_extra(nonce, bytes.fromhex(claimed_key)).hex()
        except ValueError:
            other = ""
        if other == got_hex:
            return (f"the guest's quote names another TLS key (SPKI sha256 {claimed_key}) than the one of this "
                    f"connection ({tls_key.hex()}): a quote relayed from another machine?")
    return (f"the guest's quote is not for this request: qualifying data {got_hex or '?'} instead of "
            f"{expected_extra(nonce, tls_key).hex()} (a replayed quote, an old nonce?)")


def check_quote(keys: Keys, reply: Mapping[str, Any], *, nonce: bytes, secret: bytes, want: Expected,
                ek_subject: str = "", tls_key: bytes | None = None) -> Verified:
    """The quote step's reply checked (module docstring, step 3); AttestationError says what failed.
    ``tls_key``: the SPKI sha256 of the TLS key the host is talking to, which the quote must name."""
    if _blob(reply, "secret") != secret:
        raise AttestationError("the guest's TPM did not open the credential: its AK is not in the certified TPM")
    msg, sig, pcr_blob = _blob(reply, "message"), _blob(reply, "signature"), _blob(reply, "pcr_values")
    extra = expected_extra(nonce, tls_key)
    with tempfile.TemporaryDirectory(prefix="fractal-attest-") as d:
        for name, data in (("ak.pem", keys.ak_public_pem), ("msg", msg), ("sig", sig), ("pcrs", pcr_blob)):
            Path(d, name).write_bytes(data)
        printed = _run(["print", "-t", "TPMS_ATTEST", f"{d}/msg"], "the guest's quote does not parse")
        m = _EXTRA.search(printed)
        if m is None or m.group(1).lower() != extra.hex():
            claimed = reply.get("bound_key")
            raise AttestationError(explain_extra(m.group(1).lower() if m else "", nonce=nonce, tls_key=tls_key,
                                                 claimed_key=claimed if isinstance(claimed, str) else None))
        out = _run(["checkquote", "-u", f"{d}/ak.pem", "-m", f"{d}/msg", "-s", f"{d}/sig", "-f", f"{d}/pcrs",
                    "-g", "sha256", "-q", extra.hex()], "the guest's quote does not verify with its AK")
    values = parse_pcrs(out)
    wrong = []
    for pcr, value in sorted(want.pcrs.items()):
        got = values.get(pcr)
        if got != value:
            wrong.append(f"PCR {pcr} ({want.meaning.get(pcr, '?')}) is {got.hex() if got else 'not quoted'}, "
                         f"the guest build predicts {value.hex()}")
    if wrong:
        raise AttestationError("the guest booted something else than its build: " + "; ".join(wrong))
    return Verified(values, ek_subject)


def spki_sha256(cert_der: bytes) -> bytes:
    """sha256 of the SubjectPublicKeyInfo of a DER certificate (the TLS peer's, from the handshake)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_der_x509_certificate(cert_der)
    import hashlib

    return hashlib.sha256(cert.public_key().public_bytes(serialization.Encoding.DER,
                                                         serialization.PublicFormat.SubjectPublicKeyInfo)).digest()


def ca_fingerprint_on(cmdline: str) -> str | None:
    """The ``fractal.ca=sha256:HEX`` a machine's command line names (None without one).  Pure."""
    found = [a.split("=", 1)[1] for a in cmdline.split() if a.startswith("fractal.ca=")]
    return found[-1] if found else None


async def attest(call: Any, ca_certs: Sequence[Path], want: Expected, tls_key: bytes | None = None) -> Verified:
    """The whole exchange over an agent client's ``call`` (``await call(op, args)``); ``tls_key``:
    the SPKI sha256 of the peer's TLS key, when the quote must bind it (a machine)."""
    import asyncio

    loop = asyncio.get_running_loop()
    keys = Keys.from_reply(await call("attest", {"step": "keys"}))
    subject = await loop.run_in_executor(None, check_ek, keys, ca_certs)
    secret = os.urandom(SECRET_BYTES)
    cred = await loop.run_in_executor(None, make_credential, keys, secret)
    nonce = new_nonce()
    reply = await call("attest", {"step": "quote", "nonce": nonce.hex(), "credential": base64.b64encode(cred).decode()})
    return await loop.run_in_executor(
        None, lambda: check_quote(keys, reply, nonce=nonce, secret=secret, want=want, ek_subject=subject,
                                  tls_key=tls_key))
