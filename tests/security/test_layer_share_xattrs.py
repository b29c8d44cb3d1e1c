"""A guest cannot change the host's xattrs through the layer share, nor read the host's trusted.*.

Issue 16 made the read-only layer share pass xattrs (virtiofsd `--xattr --posix-acl --xattrmap`,
9p `security_model=passthrough`; docs/vm.md "Layer fidelity").  Attack: root in the guest (a
compromised agent) sets, replaces or removes xattrs on layer files -- a user.overlay.opaque marker
would hide files of every other container stacking that layer, a security.capability would grant
capabilities to a binary in every container, an ACL would open a file -- or reads trusted.* xattrs
the host keeps for itself.  Guard: the share is read-only at its source and trusted.* is refused.
Runs a real guest with `fractal vm run --repo` over each share type.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ccpu.vm import shares

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs qemu-system-x86_64")

ATTACK = r'''
import os
# root in the guest first drops the guest-side read-only flag: only the host's refusal is left
print("remount rw:", os.system("mount -o remount,rw /repo"))
f, d = "/repo/layer/f", "/repo/layer/d"
tries = [
    ("set user.x", lambda: os.setxattr(f, "user.x", b"1")),
    ("replace user.k", lambda: os.setxattr(f, "user.k", b"evil")),
    ("remove user.k", lambda: os.removexattr(f, "user.k")),
    ("mark opaque", lambda: os.setxattr(d, "user.overlay.opaque", b"y")),
    ("unmark opaque", lambda: os.removexattr(d, "user.overlay.opaque")),
    ("set trusted", lambda: os.setxattr(d, "trusted.overlay.opaque", b"y")),
    ("set caps", lambda: os.setxattr(f, "security.capability", bytes.fromhex("0100000200200000" + "00" * 12))),
    ("set acl", lambda: os.setxattr(f, "system.posix_acl_access", bytes.fromhex(
        "02000000" "01000700ffffffff" "04000700ffffffff" "20000700ffffffff"))),  # u::rwx g::rwx o::rwx
    ("chmod", lambda: os.chmod(f, 0o4777)),
]
for what, fn in tries:
    try:
        fn()
        print("ALLOWED", what)
    except OSError as e:
        print("refused", what, e.strerror)
for name in ("trusted.secret", "trusted.overlay.opaque"):
    try:
        print("READ", name, os.getxattr(d, name))
    except OSError as e:
        print("unreadable", name, e.strerror)
print("listed", sorted(n for n in os.listxattr(d) if n.startswith("trusted.")))
'''

SHARES = ["9p", pytest.param("virtiofs", marks=pytest.mark.skipif(
    shares.find_virtiofsd() is None, reason="no virtiofsd (hack/setup.sh builds one)"))]


def _xattrs(p: Path) -> dict[str, bytes]:
    return {n: os.getxattr(p, n, follow_symlinks=False) for n in os.listxattr(p, follow_symlinks=False)}


@pytest.mark.parametrize("share", SHARES)
def test_guest_cannot_touch_host_xattrs_of_layers(tmp_path: Path, share: str) -> None:
    layer = tmp_path / "repo" / "layer"
    (layer / "d").mkdir(parents=True)
    (layer / "f").write_text("layer file\n")
    os.setxattr(layer / "f", "user.k", b"v")
    os.setxattr(layer / "d", "user.overlay.opaque", b"y")
    os.setxattr(layer / "d", "trusted.overlay.opaque", b"y")
    os.setxattr(layer / "d", "trusted.secret", b"host only")
    work = tmp_path / "work"  # the command's share: apart from the repo
    work.mkdir()
    (work / "attack.py").write_text(ATTACK)
    before = {p: (_xattrs(p), os.lstat(p).st_mode) for p in (layer / "f", layer / "d")}
    r = subprocess.run([sys.executable, "-m", "ccpu.cli", "vm", "run", "--share-type", share,
                        "--share", str(work), "--repo", str(tmp_path / "repo"), "--",
                        "python3.11", "/work/attack.py"], cwd=work, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert "remount rw: 0" in out and "refused set user.x" in out, out  # it really tried, on a rw mount
    assert "ALLOWED" not in out, out
    assert "READ" not in out and "listed []" in out, out
    after = {p: (_xattrs(p), os.lstat(p).st_mode) for p in (layer / "f", layer / "d")}
    assert after == before
