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
