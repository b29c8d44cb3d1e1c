"""TCP endpoints of remote mode (``HOST:PORT``), parsed without importing ssl: the shim's config
reads them in a daemon that keeps ``ssl`` unimported until a remote sandbox needs it
(shim/daemon.py ``skip_ssl``).  Standard library only."""

from __future__ import annotations


def parse_tcp(address: str) -> tuple[str, int]:
    """``HOST:PORT`` / ``[V6]:PORT`` (an optional ``tcp:`` prefix) -> (host, port)."""
    text = address[4:] if address.startswith("tcp:") else address
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, sep, port_text = text.rpartition(":")
    if not host or not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return host, int(port_text)
