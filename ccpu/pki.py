"""`fractal pki`'s library: a private CA, the host's client certificate and each agent's server
certificate for remote mode's mutual TLS (docs/remote.md, docs/security.md).

Why a CA of its own: the shim must trust exactly the agents the operator set up, and an agent
exactly the hosts allowed to drive it -- never the system's public CAs (a certificate any web
CA issued must not run containers).  Both ends load only this CA (ccpu/agent/tls.py).

Roles are kept apart by the extended key usage: the agent's certificate is for *server*
authentication only, the host's for *client* authentication only, so a stolen agent key cannot
drive another agent and a host key cannot impersonate an agent (OpenSSL checks the purpose of
each peer's certificate).  Keys are ECDSA P-256 (small, fast handshakes).

Files of a pki directory (``write_files``; keys 0600): ``ca.pem`` ``ca.key`` (keep this one
off the machines), ``host.pem`` ``host.key`` (the shim's, ``[remote] tls_dir``) and
``agent.pem`` ``agent.key`` (copied with ``ca.pem`` to the machine: ``--tls-dir``).  An
operator with a CA of their own writes the same file names (docs/remote.md).

Pure apart from ``write_files``/``load_ca``: certificates are values, time is a parameter.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROLES = ("agent", "host")
CA_FILES = ("ca.pem", "ca.key")
DEFAULT_DAYS = 825  # the longest leaf lifetime browsers accepted; rotate before it ends
CA_DAYS = 3650
MAX_NAMES = 64
MAX_NAME_LEN = 253  # a DNS name's limit


class PkiError(ValueError):
    """A bad name, a missing or malformed CA, a refused overwrite: the message says which."""


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, both PEM."""

    cert_pem: bytes
    key_pem: bytes

    @property
    def cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def alt_name(name: str) -> x509.GeneralName:
    """An IP address or a DNS name (checked: a typo must not make a certificate nobody matches)."""
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_LEN:
        raise PkiError(f"bad agent name {name!r}: expected a DNS name or an IP address")
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    labels = name.rstrip(".").split(".")
    if not all(0 < len(label) <= 63 and all(c.isalnum() or c == "-" for c in label)
               and not label.startswith("-") and not label.endswith("-") for label in labels):
        raise PkiError(f"bad agent name {name!r}: expected a DNS name or an IP address")
    return x509.DNSName(name.lower())


def make_ca(common_name: str = "fractal CA", *, days: int = CA_DAYS,
            now: dt.datetime | None = None) -> Issued:
    """A self-signed CA that may sign leaves only (path length 0)."""
    now = now or _now()
    key = _key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def issue(ca: Issued, role: str, names: list[str], *, common_name: str | None = None,
          days: int = DEFAULT_DAYS, now: dt.datetime | None = None,
          not_after: dt.datetime | None = None) -> Issued:
    """A leaf for ``role``: ``agent`` (server auth; ``names`` are the addresses the shim dials,
    at least one) or ``host`` (client auth; ``names`` optional).  ``not_after``: an explicit end
    (tests make expired certificates with it)."""
    if role not in ROLES:
        raise PkiError(f"unknown role {role!r} (known: {', '.join(ROLES)})")
    if role == "agent" and not names:
        raise PkiError("an agent certificate needs at least one name (the address the host dials)")
    if len(names) > MAX_NAMES:
        raise PkiError(f"at most {MAX_NAMES} names")
    if not 1 <= days <= CA_DAYS:
        raise PkiError(f"days must be 1..{CA_DAYS}, got {days}")
    sans = [alt_name(n) for n in names]
    now = now or _now()
    try:
        ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
        ca_cert = ca.cert
    except (ValueError, TypeError) as exc:
        raise PkiError(f"the CA's certificate or key cannot be read: {exc}") from None
    if not isinstance(ca_key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise PkiError("the CA key must be an EC or RSA key")
    key = _key()
    cn = common_name or (names[0] if names else f"fractal {role}")
    eku = ExtendedKeyUsageOID.SERVER_AUTH if role == "agent" else ExtendedKeyUsageOID.CLIENT_AUTH
    end = not_after or now + dt.timedelta(days=days)
    start = min(now - dt.timedelta(minutes=5), end - dt.timedelta(seconds=1))
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                                        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, f"fractal {role}")]))
               .issuer_name(ca_cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                            key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, key_cert_sign=False, crl_sign=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([eku]), critical=True)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
                              critical=False))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def fingerprint(cert_pem_or_der: bytes) -> str:
    """``sha256:HEX`` of a certificate's DER: the identity the agent pins and the shim records."""
    import hashlib

    der = (x509.load_pem_x509_certificate(cert_pem_or_der).public_bytes(serialization.Encoding.DER)
           if cert_pem_or_der.lstrip().startswith(b"-----") else cert_pem_or_der)
    return "sha256:" + hashlib.sha256(der).hexdigest()


# ---------------------------------------------------------------------------------------------
# files


def _write(path: str, data: bytes, mode: int, force: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | (0 if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        raise PkiError(f"{path} exists (--force replaces it)") from None
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)
        f.write(data)


def write_pair(directory: str, stem: str, issued: Issued, *, force: bool = False) -> list[str]:
    """``STEM.pem`` (0644) and ``STEM.key`` (0600) in ``directory`` (made 0700 if missing)."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    cert, key = os.path.join(directory, f"{stem}.pem"), os.path.join(directory, f"{stem}.key")
    _write(key, issued.key_pem, 0o600, force)
    _write(cert, issued.cert_pem, 0o644, force)
    return [cert, key]


def load_ca(directory: str) -> Issued:
    try:
        with open(os.path.join(directory, "ca.pem"), "rb") as c, open(os.path.join(directory, "ca.key"), "rb") as k:
            ca = Issued(c.read(), k.read())
        cert = ca.cert
    except OSError as exc:
        raise PkiError(f"no CA in {directory}: {exc} (make one with `fractal pki init`)") from None
    except ValueError as exc:
        raise PkiError(f"{directory}/ca.pem is not a PEM certificate: {exc}") from None
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    if not bc.ca:
        raise PkiError(f"{directory}/ca.pem is not a CA certificate")
    return ca


def init(directory: str, agent_names: list[str], *, days: int = DEFAULT_DAYS,
         force: bool = False) -> list[str]:
    """A new CA, the host's certificate and one agent certificate for ``agent_names``; the
    files written."""
    if not agent_names:
        raise PkiError("name the agent's address(es): --agent-name ADDR")
    ca = make_ca()
    agent = issue(ca, "agent", agent_names, days=days)  # validates the names before writing
    host = issue(ca, "host", [], common_name="fractal host", days=days)
    return [*write_pair(directory, "ca", ca, force=force),
            *write_pair(directory, "host", host, force=force),
            *write_pair(directory, "agent", agent, force=force)]
