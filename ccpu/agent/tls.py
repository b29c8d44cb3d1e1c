"""Mutual TLS for the agent protocol over TCP (remote mode; docs/remote.md, docs/security.md).

Why these settings, on both ends:

* TLS 1.3 only: no renegotiation, no static-RSA or CBC suites to get wrong, forward secrecy
  always; both ends are fractal, so nothing older needs to connect.
* Only the operator's CA is trusted (``ca.pem`` of the TLS dir, never the system store): a
  certificate from any other CA is refused in the handshake.
* The agent REQUIRES a client certificate (``CERT_REQUIRED``): no request is read from a peer
  that did not prove a key the CA certified.  There is no plaintext listener at all.
* The shim checks the agent's name (``check_hostname``: the endpoint's host must be in the
  agent certificate's subjectAltName).
* OpenSSL checks each peer certificate's purpose (extended key usage): an agent's
  certificate (serverAuth) cannot be used as a client and a host's (clientAuth) not as a server.

Standard library only: the agent ships this in a minimal guest/machine image.
"""

from __future__ import annotations

import hashlib
import os
import ssl
from dataclasses import dataclass

#: a TLS handshake that takes longer is dropped (a peer that connects and says nothing)
HANDSHAKE_TIMEOUT = 15.0


class TlsConfigError(ValueError):
    """A TLS dir without its files, or files OpenSSL refuses (the message names them)."""


@dataclass(frozen=True)
class TlsFiles:
    """The CA to trust and our own certificate + key."""

    ca: str
    cert: str
    key: str

    @classmethod
    def in_dir(cls, directory: str, role: str) -> "TlsFiles":
        """``ca.pem``, ``ROLE.pem``, ``ROLE.key`` of a `fractal pki` directory (role ``agent``
        on the machine, ``host`` in the shim)."""
        files = cls(os.path.join(directory, "ca.pem"), os.path.join(directory, f"{role}.pem"),
                    os.path.join(directory, f"{role}.key"))
        missing = [p for p in (files.ca, files.cert, files.key) if not os.path.isfile(p)]
        if missing:
            raise TlsConfigError(f"TLS dir {directory}: missing {', '.join(missing)} "
                                 "(made by `fractal pki init`, docs/remote.md)")
        return files


def _context(purpose: ssl.Purpose, files: TlsFiles) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH
                         else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_verify_locations(cafile=files.ca)  # only this CA: no system store
        ctx.load_cert_chain(files.cert, files.key)
    except (ssl.SSLError, OSError) as exc:
        raise TlsConfigError(f"TLS files {files.cert}, {files.key}, {files.ca}: {exc}") from None
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    return ctx


def server_context(files: TlsFiles) -> ssl.SSLContext:
    """The agent's: TLS 1.3, a client certificate from ``files.ca`` required."""
    return _context(ssl.Purpose.CLIENT_AUTH, files)


def client_context(files: TlsFiles) -> ssl.SSLContext:
    """The shim's: TLS 1.3, the agent's certificate from ``files.ca`` and for the name dialled."""
    ctx = _context(ssl.Purpose.SERVER_AUTH, files)
    ctx.check_hostname = True
    return ctx


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str | None:
    """``sha256:HEX`` of the peer's certificate (DER): the identity the agent pins and the
    shim records (None without TLS)."""
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return "sha256:" + hashlib.sha256(der).hexdigest() if der else None


# --- a machine's boot-time key (issue 15 item 5; docs/hardware.md "The machine over a NIC") --------
#
# An attested machine has no provisioned TLS key: nothing can reach it before its network is up,
# and a key inside the (public, measured) UKI would be everybody's.  Its agent makes an ECDSA key
# in RAM at boot and serves a self-signed certificate; the shim cannot check that certificate
# against any CA, so it pins the key's SPKI hash from the handshake and the TPM quote binds it
# (qualifying data = sha256(nonce || SPKI hash), :func:`binding`).  The client side is checked
# the ordinary way, against one CA: the host CA whose certificate's sha256 is on the measured
# command line (``fractal.ca=sha256:HEX``, PCR 12); the certificate itself comes from any medium
# (:func:`pinned_ca`: a disk of the machine), untrusted until its hash matches.

OPENSSL = "/usr/bin/openssl"
MAX_CA_BYTES = 64 * 1024  # the CA medium read at most (one PEM certificate, padded)
CA_PIN_PREFIX = "sha256:"


def parse_pin(value: str) -> bytes:
    """``sha256:HEX`` (64 lower-case hex digits) -> 32 bytes, or ValueError.  Pure."""
    hexpart = value[len(CA_PIN_PREFIX):] if value.startswith(CA_PIN_PREFIX) else ""
    if len(hexpart) != 64 or any(c not in "0123456789abcdef" for c in hexpart):
        raise ValueError(f"CA fingerprint {value[:80]!r}: expected sha256: and 64 lower-case hex digits")
    return bytes.fromhex(hexpart)


def pinned_ca(data: bytes, pin: bytes) -> str:
    """The PEM CA certificate in ``data`` (a CA medium: PEM, then NUL padding) if its DER's
    sha256 is ``pin``; ValueError naming both hashes otherwise.  Pure."""
    text = data[:MAX_CA_BYTES].rstrip(b"\0").decode("ascii", errors="replace")
    begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
    i = text.find(begin)
    j = text.find(end, i)
    if i < 0 or j < 0 or text.find(begin, i + 1) >= 0:
        raise ValueError("the CA medium does not hold exactly one PEM certificate")
    pem = text[i:j + len(end)] + "\n"
    try:
        der = ssl.PEM_cert_to_DER_cert(pem)
    except ValueError as exc:
        raise ValueError(f"the CA medium's certificate: {exc}") from None
    got = hashlib.sha256(der).digest()
    if got != pin:
        raise ValueError(f"the CA medium's certificate is sha256:{got.hex()}, the measured command line "
                         f"names sha256:{pin.hex()}: refused")
    return pem


def spki_of_pem_public_key(pem: str) -> bytes:
    """The DER SubjectPublicKeyInfo inside a ``PUBLIC KEY`` PEM block.  Pure."""
    import base64

    lines = [ln.strip() for ln in pem.strip().splitlines()]
    if not lines or lines[0] != "-----BEGIN PUBLIC KEY-----" or lines[-1] != "-----END PUBLIC KEY-----":
        raise ValueError("not a PUBLIC KEY PEM block")
    return base64.b64decode("".join(lines[1:-1]), validate=True)


def binding(nonce: bytes, spki_sha256: bytes) -> bytes:
    """The quote's qualifying data on a machine (ccpu/agent/tpm.py ``binding``, ssl-free there)."""
    from .tpm import binding as bind

    return bind(nonce, spki_sha256)


@dataclass(frozen=True)
class BootKey:
    """The machine agent's TLS identity, made at boot in a RAM directory."""

    cert: str
    key: str
    spki_sha256: bytes


def make_boot_key(directory: str, openssl: str = OPENSSL) -> BootKey:
    """A new ECDSA P-256 key and a self-signed serverAuth certificate in ``directory`` (0700, on
    a tmpfs: the key never reaches a disk) with the openssl tool."""
    import subprocess

    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.chmod(directory, 0o700)
    key, cert = os.path.join(directory, "agent.key"), os.path.join(directory, "agent.pem")
    # a machine has no /usr/lib/ssl/openssl.cnf, and `openssl req` refuses to run without one
    conf = os.path.join(directory, "openssl.cnf")
    with open(conf, "w") as f:
        f.write("[req]\ndistinguished_name = dn\n[dn]\n")
    env = {"PATH": "/usr/bin:/bin", "OPENSSL_CONF": conf}
    old = os.umask(0o077)
    try:
        res = subprocess.run([openssl, "req", "-config", conf, "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                              "-nodes", "-keyout", key, "-out", cert, "-subj", "/CN=fractal machine boot key",
                              "-days", "30", "-addext", "basicConstraints=critical,CA:FALSE",
                              "-addext", "keyUsage=critical,digitalSignature",
                              "-addext", "extendedKeyUsage=serverAuth"],
                             capture_output=True, text=True, stdin=subprocess.DEVNULL, env=env)
    finally:
        os.umask(old)
    if res.returncode != 0:
        raise TlsConfigError(f"openssl cannot make the boot key: {(res.stderr or res.stdout).strip()[-300:]}")
    res = subprocess.run([openssl, "pkey", "-in", key, "-pubout"], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise TlsConfigError(f"openssl pkey: {res.stderr.strip()[-300:]}")
    return BootKey(cert, key, hashlib.sha256(spki_of_pem_public_key(res.stdout)).digest())


def boot_server_context(key: BootKey, ca_pem_file: str) -> ssl.SSLContext:
    """The machine agent's: TLS 1.3, its boot key, a client certificate from the pinned CA required."""
    return _context(ssl.Purpose.CLIENT_AUTH, TlsFiles(ca_pem_file, key.cert, key.key))


def attested_client_context(cert: str, key: str) -> ssl.SSLContext:
    """The shim's, towards an attested machine: TLS 1.3 and our client certificate, but the
    server's certificate is not checked against a CA (it is self-signed at boot): the shim pins
    its key and the TPM quote must name it (shim/remotesandbox.py) before anything else is sent."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise TlsConfigError(f"TLS files {cert}, {key}: {exc}") from None
    return ctx
