"""Linux platform helpers shared by the shim, the snapshotter, the CLI and the guest's agent.

Standard library only (the guest initramfs ships this package next to ``ccpu.agent``), no
imports from the rest of ``ccpu``: every module here is a thin, typed edge over one kernel
interface (``/proc``, mount syscalls, statx, openat2, mountinfo, namespaces), written once; plus
what the shim and the agent must share to agree -- the one reaper of a process
(``reaper.py``) and the task state table (``taskstate.py``).  ``tests/unit/test_import_graph.py``
checks the stdlib-only rule.
"""
