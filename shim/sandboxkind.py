"""Which kind of sandbox a shim runs: the one place a sandbox kind is chosen.

Kept apart from the interface (shim/sandbox.py) so that the interface imports no implementation
and every implementation can import the interface: adding a kind is its module plus a line here
(docs/architecture.md, "Adding a sandbox kind").
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from shim.sandbox import Sandbox

if TYPE_CHECKING:
    from shim.config import Config

log = logging.getLogger("shim.sandbox")

#: ``FRACTAL_AGENT`` values: how host mode runs the agent (shim/hostsandbox.py)
AGENT_MODES = ("inproc", "process")




def agent_mode() -> str:
    mode = os.environ.get("FRACTAL_AGENT", "").strip() or "inproc"
    if mode not in AGENT_MODES:
        log.warning("FRACTAL_AGENT=%r unknown (want inproc or process): using inproc", mode)
        mode = "inproc"
    return mode


def for_config(cfg: Config, *, reaper: Any, namespace: str, group: str, repo_root: str,
               run_dir: str, runc_root: str, bundle_root: str, layer_roots: list[str],
               first_bundle: str | None = None, containerd_address: str | None = None) -> Sandbox:
    """The sandbox for a :class:`shim.config.Config`: a VM, a remote agent (mTLS), or host mode
    (``FRACTAL_AGENT``).
    This is where a sandbox kind is chosen.

    ``first_bundle``: the bundle of the container the shim was started for; a VM boots before
    its Create arrives and must know the pod network namespace (CRI's pause spec) by then."""
    if cfg.mode == "remote":
        from shim.remotesandbox import RemoteSandbox

        return RemoteSandbox(settings=cfg.remote, namespace=namespace, timeouts=cfg.timeouts,
                             repo_root=repo_root, containerd_address=containerd_address)
    if cfg.mode == "vm":
        from shim.vm import VmSandbox, first_netns

        return VmSandbox(reaper=reaper, namespace=namespace, group=group, repo_root=repo_root,
                         run_dir=run_dir, settings=cfg.vm, timeouts=cfg.timeouts,
                         netns=first_netns(first_bundle) if first_bundle else None)
    return host_sandbox(reaper=reaper, runc_root=runc_root, bundle_root=bundle_root,
                        layer_roots=layer_roots, namespace=namespace, timeouts=cfg.timeouts)


def host_sandbox(mode: str | None = None, **kw: Any) -> Sandbox:
    """The host-mode sandbox for ``mode`` (default: ``$FRACTAL_AGENT``, else inproc)."""
    from shim.hostsandbox import HostSandbox, InprocSandbox

    mode = mode or agent_mode()
    return InprocSandbox(**kw) if mode == "inproc" else HostSandbox(**kw)
