"""Linux platform helpers shared by the shim, the snapshotter, the CLI and the guest's agent.

Standard library only (the guest initramfs ships this package next to ``ccpu.agent``), no
imports from the rest of ``ccpu``: every module here is a thin, typed edge over one kernel
interface (``/proc``, mount syscalls, mountinfo, namespaces), written once.
"""
