"""Guest root cannot put setuid/setgid files or device nodes into host dirs through a volume
(issue 10, 6: the read-write 9p volume share).

QEMU's 9p server runs as root on the host and does what the guest asks; a privileged container
in the VM (guest root) asks for a setuid-root copy of a binary, a setgid file and device nodes in
a read-write volume.  On the host none of them may exist as such: any local user could run the
setuid file or open the device.  Ordinary files, modes and owners still arrive as written.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from hack.containerd_env import FractalEnv
from tests.integration.test_shim_vm import (  # noqa: F401  (module fixtures used by name)
    _guest_built, _no_qemu_left, exec_, images, remove, start_detached)

ATTACK = """
cd /data
cp /bin/busybox /tmp/suid && chmod 4755 /tmp/suid && cp -p /tmp/suid copied-suid
echo x > chmod-suid; chmod 4755 chmod-suid
echo x > chmod-sgid; chmod 2755 chmod-sgid
mknod char-dev c 1 3
mknod block-dev b 7 0
echo x > plain; chmod 751 plain
echo x > user-owned; chown 1000:1000 user-owned
ls -ln /data
true
"""


def test_guest_root_cannot_create_setuid_files_or_devices_on_the_host(
        fenv: FractalEnv, namespace: str, images: dict[str, str], tmp_path: Path) -> None:
    vol = tmp_path / "vol"
    vol.mkdir()
    cid = "special-files"
    start_detached(fenv, namespace, images["busybox"], cid, "sleep", "600", extra=(
        "--privileged", "--mount", f"type=bind,src={vol},dst=/data,options=rbind:rw"))
    try:
        r = exec_(fenv, namespace, cid, "atk", "sh", "-c", ATTACK)
        # the guest sees its own setuid file in its tmpfs (the attack itself works there)
        guest = exec_(fenv, namespace, cid, "chk", "stat", "-c", "%a", "/tmp/suid").stdout.strip()
        assert guest == "4755", guest
    finally:
        remove(fenv, namespace, cid)
    found = {p.name: p.lstat() for p in vol.iterdir()}
    report = f"{r.stdout}\n{r.stderr}\nhost: " + ", ".join(f"{n} {oct(s.st_mode)}" for n, s in found.items())
    for name, st in found.items():
        assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID), f"{name} is setuid/setgid on the host\n{report}"
        assert not (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)), f"{name} is a device\n{report}"
    # ordinary writes still arrive as the guest made them (security_model=none: owner and mode)
    assert stat.S_IMODE(found["plain"].st_mode) == 0o751, report
    assert (found["user-owned"].st_uid, found["user-owned"].st_gid) == (1000, 1000), report
    assert os.geteuid() == 0 and found["plain"].st_uid == 0, report
