"""The fractal agent: runs OCI containers with runc on behalf of the shim (docs/agent-protocol.md).

Standard library only (it runs in a minimal guest).  Modules, one job each:
wire (framing), protocol (messages, errors, validation), reaper (the one child reaper + spawn),
runc (CLI wrapper), mounts (rootfs), stdio (pipes/pty relays), process + container (state
machine and operations), server (connections), client (asyncio client for the shim and tests).
"""
