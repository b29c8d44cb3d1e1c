"""Share backends: 9p (built into QEMU) or virtiofs (a virtiofsd per share), chosen automatically.

virtiofsd is not packaged in Debian bookworm; hack/setup.sh builds it from
crates.io into ``$FRACTAL_CACHE/virtiofsd/bin``.  When it is there, virtiofs
is used; otherwise 9p.  ``FRACTAL_SHARE=9p|virtiofs`` overrides.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from . import hostos
from .hostos import LINUX, HostOS
from .qemu import SHARE_TYPES, Share, spawn

log = logging.getLogger(__name__)


def find_virtiofsd() -> str | None:
    """FRACTAL_VIRTIOFSD, the cache's build, /usr/libexec/virtiofsd or PATH -- or None."""
    env = os.environ.get("FRACTAL_VIRTIOFSD")
    cache = Path(os.environ.get("FRACTAL_CACHE", "/var/cache/fractal")) / "virtiofsd" / "bin" / "virtiofsd"
    for cand in (env, str(cache), "/usr/libexec/virtiofsd", shutil.which("virtiofsd")):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


def decide(requested: str | None, env: str | None, virtiofsd: str | None, root: bool = True,
           host: HostOS = LINUX) -> tuple[str, str]:
    """(share type, reason).  Pure.  An explicit request wins over the environment over availability.
    Without root the default is 9p: QEMU serves it as the user, while virtiofsd's sandbox
    (``--sandbox chroot``) needs root.  A host without vhost-user (macOS) has 9p only."""
    for source, value in (("requested", requested), ("FRACTAL_SHARE", env)):
        if value:
            if value not in SHARE_TYPES:
                raise ValueError(f"{source} share type {value!r}: expected one of {SHARE_TYPES}")
            if value == "virtiofs" and not host.virtiofs:
                raise ValueError(f"virtiofs is Linux only (virtiofsd, vhost-user); on {host.name} shares are 9p")
            if value == "virtiofs" and not virtiofsd:
                raise ValueError("virtiofs requested but no virtiofsd found (hack/setup.sh builds one)")
            return value, source
    if not host.virtiofs:
        return "9p", f"{host.name}: QEMU serves 9p itself (no virtiofsd there)"
    if virtiofsd and not root:
        return "9p", "not root: virtiofsd's chroot sandbox needs root; QEMU serves 9p as this user"
    if virtiofsd:
        return "virtiofs", f"virtiofsd at {virtiofsd}"
    return "9p", "no virtiofsd"


def choose(requested: str | None = None) -> tuple[str, str]:
    t, why = decide(requested, os.environ.get("FRACTAL_SHARE") or None, find_virtiofsd(), os.geteuid() == 0,
                    hostos.current())
    log.info("share type %s (%s)", t, why)
    return t, why


def virtiofsd_argv(binary: str, share: Share, socket_path: str, extra: Sequence[str] = ()) -> list[str]:
    """virtiofsd for one share.  Pure.

    `--sandbox chroot` keeps the daemon inside the shared dir without needing user
    namespaces; `--readonly` makes read-only shares read-only at the source (not only
    a mount option the guest could drop).  No `--tag`: QEMU 7.1-8.0 crash on the
    vhost-user CONFIG feature it enables.
    """
    argv = [binary, "--shared-dir", share.host_path, "--socket-path", socket_path,
            "--sandbox", "chroot", "--cache", "auto", "--log-level", "error"]
    if share.readonly:
        argv.append("--readonly")
        if share.layers:
            argv += LAYER_XATTRS
    return argv + list(extra)


# A read-only layer share passes xattrs: file capabilities (security.capability), user.* (and
# with them the repo's user.overlay.opaque markers, ccpu/repo/opaque.py) and POSIX ACLs.  The map
# hides the host's trusted.* from listings and refuses them to the guest: virtiofsd keeps no
# CAP_SYS_ADMIN, so it could not read them anyway, and no guest request ever reaches them.
LAYER_XATTRS = ["--xattr", "--posix-acl", "--xattrmap", ":bad:all:trusted.:trusted.::ok:all:::"]


def start_virtiofsd(binary: str, share: Share, socket_path: str, timeout: float = 10.0, *,
                    cwd: str | None = None, stderr: int | None = subprocess.PIPE,
                    extra: Sequence[str] = (), die_with_parent: bool = True, nice: int = 0) -> subprocess.Popen:
    """Start virtiofsd and wait for its socket (QEMU fails if it connects too early).

    ``cwd``: a relative ``socket_path`` is relative to it.  ``extra``: more virtiofsd arguments.
    Its exit is watched with ``proc.poll()`` while it starts: an asyncio caller whose reaper
    collects children calls this on the loop's thread, where that reaper cannot run meanwhile."""
    proc = spawn(virtiofsd_argv(binary, share, socket_path, extra), stdout=subprocess.DEVNULL, stderr=stderr, cwd=cwd,
                 die_with_parent_=die_with_parent, nice=nice)
    where = os.path.join(cwd, socket_path) if cwd else socket_path
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RuntimeError(f"virtiofsd for {share.host_path} exited ({proc.returncode}): {err.strip()[-400:]}")
        if os.path.exists(where):  # never connect to probe: virtiofsd serves one connection
            return proc
        time.sleep(0.01)
    proc.kill()
    raise RuntimeError(f"virtiofsd did not create {socket_path} within {timeout}s")


def connect(socket_path: str, timeout: float = 10.0) -> "socket.socket":
    """The one connection a virtiofsd serves, made here and handed to QEMU as an fd (QEMU may run
    as a user that cannot reach the socket's directory).  virtiofsd binds before it listens: a
    connect in between is refused, so that is retried (briefly: a daemon that died stays refused)."""
    import socket

    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(socket_path)
            return s
        except ConnectionRefusedError:
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)
        except BaseException:
            s.close()
            raise
