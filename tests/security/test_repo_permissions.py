"""Unprivileged users of the node cannot reach setuid files (or device nodes) in the repo.

Attack (issue 10 item 2, the class of containerd's CVE-2021-41103): images and containers'
root write setuid-root binaries and device nodes into layers and uppers.  With the repo's dirs
traversable (0711 root, 0755 layer dirs, small sequential ids), a local user could walk to
``<repo>/layers/<id>/edge/setuid`` and run it.  The repo's ROOT, layers/ and active/ are 0700.

Through a real pull (the edge image carries a setuid-root file) and a real running container
(which makes one in its upper), the test looks for every setuid file under the repo as root,
then tries to reach each one as ``nobody``.  It also checks that nothing that must read the
repo broke: a container running as a non-root user on these layers still reads them.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from pathlib import Path

from hack.containerd_env import FractalEnv

RUNTIME = "io.containerd.fractal.v1"
NOBODY = 65534

_PROBE = """
import json, os, sys
out = {}
for p in json.loads(sys.argv[1]):
    try:
        os.stat(p)
        out[p] = "reachable"
    except OSError as e:
        out[p] = os.strerror(e.errno)
print(json.dumps(out))
"""


def as_nobody(paths: list[str]) -> dict[str, str]:
    """os.stat of each path as uid/gid 65534 with no groups: "reachable" or the error."""
    r = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                        "python3", "-I", "-c", _PROBE, json.dumps(paths)],
                       capture_output=True, text=True, timeout=60, check=True)
    return json.loads(r.stdout)


def setuid_files(root: Path) -> list[str]:
    found = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode) and st.st_mode & stat.S_ISUID:
                found.append(p)
    return sorted(found)


def test_nobody_cannot_reach_setuid_files_in_layers_or_uppers(fenv: FractalEnv, registry, namespace: str) -> None:
    ref = registry.ref("edge")
    fenv.pull(ref, namespace=namespace)
    fenv.ctr("run", "-d", "--snapshotter", "fractal", "--fifo-dir", str(fenv.fifo_dir), "--runtime", RUNTIME,
             ref, "suid", "sh", "-c", "cp /bin/busybox /upper-suid && chmod 4755 /upper-suid && touch /ready && sleep 600",
             namespace=namespace)
    root = fenv.snapshotter_root
    deadline = time.monotonic() + 60
    while not any(p.endswith("/fs/ready") for p in map(str, root.glob("active/*/fs/ready"))):
        assert time.monotonic() < deadline, "the container never made its setuid file"
        time.sleep(0.2)
    try:
        found = setuid_files(root)
        assert any(p.endswith("/edge/setuid") and "/layers/" in p for p in found), found  # from the image
        assert any(p.endswith("/fs/upper-suid") and "/active/" in p for p in found), found  # from the container
        # What stops nobody must be the repo itself: everything above it is open to them.
        assert as_nobody([str(root.parent)]) == {str(root.parent): "reachable"}
        reached = {p: r for p, r in as_nobody(found + [str(root / "layers"), str(root / "active")]).items()
                   if r == "reachable"}
        assert reached == {}, f"nobody reaches {sorted(reached)}"
        for d in (root, root / "layers", root / "active", root / "trash"):
            assert d.stat().st_mode & 0o777 == 0o700, d
    finally:
        fenv.ctr("tasks", "kill", "-s", "SIGKILL", "suid", namespace=namespace, check=False)


def test_containers_running_as_nobody_still_read_their_layers(fenv: FractalEnv, registry, namespace: str) -> None:
    """The 0700 dirs are above the layer roots: overlayfs reaches them with the mounter's creds."""
    ref = registry.ref("edge")
    fenv.pull(ref, namespace=namespace)
    r = fenv.run(ref, "asnobody", "su", "-s", "/bin/sh", "nobody", "-c",
                 "id -u; cat /edge/opaque/c; echo w > /tmp/n && cat /tmp/n; ls /edge/setuid",
                 namespace=namespace, runtime=RUNTIME)
    assert r.stdout.split() == [str(NOBODY), "c", "w", "/edge/setuid"]
