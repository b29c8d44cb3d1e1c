"""The agent's ``attest`` op: prove to the host what this guest booted, with the TPM.

Two steps on one connection, before the host creates any container (shim/vm.py, ccpu/attest.py):

``{"step": "keys"}``
    the TPM's endorsement key (EK, the standard RSA template, whose public part the EK
    certificate in NV index :data:`EK_CERT_NV` names), a fresh attestation key (AK, restricted
    signing, RSASSA-SHA256) made under it, and the AK's TPM name.  The host checks the EK
    certificate against its CA and answers with a credential only this TPM can open, and only
    for this AK (``tpm2_makecredential``).
``{"step": "quote", "nonce": HEX, "credential": B64}``
    ``tpm2_activatecredential`` opens the credential (the TPM refuses unless the AK named in it is
    loaded beside the EK: that binds the AK to the certified EK), then ``tpm2_quote`` signs the
    PCRs :data:`PCRS` together with the host's nonce.  The host checks the opened secret, the
    signature, the nonce and the PCR values.

Why tpm2-tools (subprocesses) and not hand-written TPM commands: the issue asks for the real TPM
stack (tpm2-tss); the guest's Python is the distribution's without tpm2-pytss, and tpm2-tools is one
binary (``tpm2``, multi-call) plus tpm2-tss's libraries that the guest build puts in its image.
Everything here is bounded: the nonce is a fixed-size hex string, the credential a small blob.
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Mapping

TYPE_CHECKING = False  # typing only for checkers: the agent's ready path loads this module (hello.py)
if TYPE_CHECKING:
    from typing import Any

from . import protocol

TPM2 = "/usr/bin/tpm2"
TCTI = "device:/dev/tpmrm0"
EK_CERT_NV = "0x01c00002"  # TCG EK Credential Profile: the RSA 2048 EK certificate
PCRS = (4, 11, 12)  # firmware: the boot application; systemd-stub: the UKI's sections, the command line
PCR_SELECTION = "sha256:" + ",".join(str(p) for p in PCRS)
NONCE_BYTES = (16, 64)
MAX_CREDENTIAL = 4096
WORK = "/run/fractal/attest"

_HEX = re.compile(r"^[0-9a-f]+$")


async def _tpm2(reaper: Any, argv: list[str]) -> bytes:
    from ccpu.linux import reaper as reaper_mod

    try:
        spawned = reaper_mod.spawn(reaper, [TPM2, argv[0], "-T", TCTI, *argv[1:]],
                                   stdout=reaper_mod.PIPE, stderr=reaper_mod.PIPE)
    except OSError as exc:
        raise protocol.FailedPrecondition(f"tpm2 {argv[0]}: {exc.strerror or exc}") from None
    res = await spawned.result()
    if res.status != 0:
        raise protocol.FailedPrecondition(f"tpm2 {argv[0]}: "
                                          f"{res.stderr.decode(errors='replace').strip()[-400:] or res.status}")
    return res.stdout


def _b64(path: str) -> str:
    with open(path, "rb") as f:
        return base64.b64encode(f.read()).decode()


def check_quote_args(args: Mapping[str, Any]) -> tuple[str, bytes]:
    """(nonce hex, credential bytes) from a ``quote`` request, or InvalidArgument.  Pure."""
    nonce = args.get("nonce")
    if not isinstance(nonce, str) or not _HEX.match(nonce) or not \
            NONCE_BYTES[0] * 2 <= len(nonce) <= NONCE_BYTES[1] * 2 or len(nonce) % 2:
        raise protocol.InvalidArgument(f"nonce: expected {NONCE_BYTES[0]}..{NONCE_BYTES[1]} bytes as lower-case hex")
    cred = args.get("credential")
    if not isinstance(cred, str) or len(cred) > MAX_CREDENTIAL * 2:
        raise protocol.InvalidArgument("credential: expected base64 of a small blob")
    try:
        blob = base64.b64decode(cred, validate=True)
    except ValueError:
        raise protocol.InvalidArgument("credential: not base64") from None
    if not 0 < len(blob) <= MAX_CREDENTIAL:
        raise protocol.InvalidArgument(f"credential: expected 1..{MAX_CREDENTIAL} bytes")
    return nonce, blob


def available() -> bool:
    """Whether this guest can attest: tpm2-tools and a TPM device."""
    return os.access(TPM2, os.X_OK) and os.path.exists(TCTI.split(":", 1)[1])


def binding(nonce: bytes, spki_sha256: bytes) -> bytes:
    """The quote's qualifying data on a machine: ``sha256(nonce || sha256(SPKI of the TLS key))``
    -- the TPM signs that this boot made the quote *and* serves this TLS key.  Here, not in
    tls.py: the host's check (ccpu/attest.py) runs in a shim daemon that has no ssl.  Pure."""
    import hashlib

    if len(spki_sha256) != 32:
        raise ValueError("the key's SPKI hash must be 32 bytes")
    return hashlib.sha256(nonce + spki_sha256).digest()


def qualifying_data(nonce: str, bind: bytes | None) -> str:
    """What the quote signs beside the PCRs (hex): the host's nonce, or on a machine with a boot
    TLS key :func:`binding` of it.  Pure."""
    return nonce if bind is None else binding(bytes.fromhex(nonce), bind).hex()


async def attest_op(reaper: Any, args: Mapping[str, Any], bind: bytes | None = None) -> dict[str, Any]:
    if not available():
        raise protocol.FailedPrecondition("this guest has no TPM (/dev/tpmrm0) or no tpm2-tools")
    step = args.get("step")
    os.makedirs(WORK, mode=0o700, exist_ok=True)
    if step == "keys":
        return await _keys(reaper)
    if step == "quote":
        nonce, cred = check_quote_args(args)
        reply = await _quote(reaper, qualifying_data(nonce, bind), cred)
        if bind is not None:
            reply["bound_key"] = bind.hex()
        return reply
    raise protocol.InvalidArgument(f"attest step {step!r}: expected keys or quote")


def _w(name: str) -> str:
    return os.path.join(WORK, name)


async def _keys(reaper: Any) -> dict[str, Any]:
    for name in os.listdir(WORK):  # a second attestation starts afresh
        os.unlink(_w(name))
    await _tpm2(reaper, ["createek", "-c", _w("ek.ctx"), "-G", "rsa", "-u", _w("ek.pem"), "-f", "pem"])
    await _tpm2(reaper, ["createak", "-C", _w("ek.ctx"), "-c", _w("ak.ctx"), "-G", "rsa", "-g", "sha256",
                         "-s", "rsassa", "-u", _w("ak.pem"), "-f", "pem", "-n", _w("ak.name")])
    try:
        await _tpm2(reaper, ["nvread", EK_CERT_NV, "-C", "o", "-o", _w("ek.crt")])
        ek_cert = _b64(_w("ek.crt"))
    except protocol.FailedPrecondition:
        ek_cert = ""  # a TPM without an EK certificate: the host decides whether it accepts that
    return {"ek_public": _b64(_w("ek.pem")), "ak_public": _b64(_w("ak.pem")), "ak_name": _b64(_w("ak.name")),
            "ek_certificate": ek_cert, "pcrs": list(PCRS)}


async def _quote(reaper: Any, nonce: str, cred: bytes) -> dict[str, Any]:
    for name in ("ek.ctx", "ak.ctx"):
        if not os.path.exists(_w(name)):
            raise protocol.FailedPrecondition("attest: the keys step must come first")
    import tempfile  # not at import: the agent's ready path loads this module (shutil via tempfile)

    fd, path = tempfile.mkstemp(dir=WORK, prefix="cred-")
    with os.fdopen(fd, "wb") as f:
        f.write(cred)
    try:
        await _tpm2(reaper, ["startauthsession", "--policy-session", "-S", _w("session.ctx")])
        try:
            await _tpm2(reaper, ["policysecret", "-S", _w("session.ctx"), "-c", "e"])
            await _tpm2(reaper, ["activatecredential", "-c", _w("ak.ctx"), "-C", _w("ek.ctx"), "-i", path,
                                 "-o", _w("secret"), "-P", "session:" + _w("session.ctx")])
        finally:
            try:
                await _tpm2(reaper, ["flushcontext", _w("session.ctx")])
            except protocol.FailedPrecondition:
                pass  # the resource manager flushed it already
        await _tpm2(reaper, ["quote", "-c", _w("ak.ctx"), "-l", PCR_SELECTION, "-q", nonce, "-g", "sha256",
                             "-m", _w("quote.msg"), "-s", _w("quote.sig"), "-o", _w("quote.pcrs")])
        return {"secret": _b64(_w("secret")), "message": _b64(_w("quote.msg")),
                "signature": _b64(_w("quote.sig")), "pcr_values": _b64(_w("quote.pcrs"))}
    finally:
        os.unlink(path)
