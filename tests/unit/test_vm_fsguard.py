"""ccpu/vm/fsguard.py: the seccomp filter QEMU runs under, checked on a real process (the
filter's effect is the behaviour; its bytes are not)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ccpu.vm import fsguard

PROBE = r"""
import ctypes, json, os, sys
d = sys.argv[1]
def t(fn):
    try:
        fn()
        return 0
    except OSError as e:
        return e.errno
def openat2():
    how = (ctypes.c_uint64 * 3)(os.O_RDONLY, 0, 0)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    if libc.syscall(437, -100, d.encode(), ctypes.byref(how), 24) < 0:
        raise OSError(ctypes.get_errno(), "openat2")
open(d + "/plain", "w").write("x")
res = {
    "chmod 0755": t(lambda: os.chmod(d + "/plain", 0o755)),
    "chmod 4755": t(lambda: os.chmod(d + "/plain", 0o4755)),
    "chmod 2755": t(lambda: os.chmod(d + "/plain", 0o2755)),
    "fchmod 4755": t(lambda: os.fchmod(os.open(d + "/plain", os.O_RDONLY), 0o4755)),
    "create 0644": t(lambda: os.close(os.open(d + "/new", os.O_CREAT | os.O_WRONLY, 0o644))),
    "create 4755": t(lambda: os.close(os.open(d + "/suid", os.O_CREAT | os.O_WRONLY, 0o4755))),
    "mknod fifo": t(lambda: os.mknod(d + "/fifo", 0o600 | 0o010000)),
    "mknod file 4755": t(lambda: os.mknod(d + "/suid2", 0o4755 | 0o100000)),
    "setxattr": t(lambda: os.setxattr(d + "/plain", "user.x", b"1")),
    "listxattr": t(lambda: os.listxattr(d + "/plain")),
    "openat2": t(openat2),
}
if os.geteuid() == 0:
    res["mknod char"] = t(lambda: os.mknod(d + "/chr", 0o666 | 0o020000, os.makedev(1, 3)))
    res["mknod block"] = t(lambda: os.mknod(d + "/blk", 0o666 | 0o060000, os.makedev(7, 0)))
print(json.dumps(res))
"""


def _probe(tmp_path: Path, guarded: bool) -> dict[str, int]:
    r = subprocess.run([sys.executable, "-S", "-c", PROBE, str(tmp_path)], capture_output=True, text=True,
                       preexec_fn=fsguard.installer() if guarded else None, check=True)
    return json.loads(r.stdout)


def test_guarded_process_cannot_make_setid_files_devices_or_xattrs(tmp_path: Path) -> None:
    res = _probe(tmp_path, guarded=True)
    refused = {k for k, v in res.items() if v == errno.EPERM}
    assert refused == {"chmod 4755", "chmod 2755", "fchmod 4755", "create 4755", "mknod file 4755",
                       "setxattr"} | ({"mknod char", "mknod block"} if os.geteuid() == 0 else set()), res
    assert res["openat2"] == errno.ENOSYS, res
    assert all(res[k] == 0 for k in ("chmod 0755", "create 0644", "mknod fifo", "listxattr")), res
    for p in tmp_path.iterdir():
        assert not p.lstat().st_mode & 0o6000, p


def test_the_probe_can_do_all_of_it_without_the_guard(tmp_path: Path) -> None:
    """The reference: without the filter the same calls succeed (so the test above measures the
    filter, not the file system)."""
    res = _probe(tmp_path, guarded=False)
    expected_ok = set(res) - {"setxattr"}  # user xattrs may be unsupported by tmp_path's fs
    assert all(res[k] == 0 for k in expected_ok), res


def test_program_per_architecture() -> None:
    for machine in ("x86_64", "aarch64"):
        code = fsguard.program(machine)
        assert len(code) % 8 == 0 and 0 < len(code) // 8 < 4096
    with pytest.raises(OSError, match="no 9p guard"):
        fsguard.program("sparc")
