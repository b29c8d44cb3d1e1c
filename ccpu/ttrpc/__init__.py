"""ttrpc (containerd's lightweight RPC over unix sockets) for asyncio: unary client and server.

Modules: ``framing`` (wire frames), ``messages`` (Request/Response envelopes), ``status`` (codes,
TtrpcError), ``context`` (per-call metadata/deadline), ``server``, ``client``.
"""

from .client import Client
from .context import NAMESPACE_KEY, RequestContext
from .framing import (
    MAX_DATA_LENGTH,
    Flags,
    Frame,
    FrameDecoder,
    MessageType,
    OversizedFrameError,
    ProtocolError,
    TruncatedFrameError,
    read_frame,
    write_frame,
)
from .server import Handler, Server
from .status import Code, TtrpcError, make_status

__all__ = [
    "Client",
    "Code",
    "Flags",
    "Frame",
    "FrameDecoder",
    "Handler",
    "MAX_DATA_LENGTH",
    "MessageType",
    "NAMESPACE_KEY",
    "OversizedFrameError",
    "ProtocolError",
    "RequestContext",
    "Server",
    "TruncatedFrameError",
    "TtrpcError",
    "make_status",
    "read_frame",
    "write_frame",
]
