"""The guest kernel built for the guest (opt-in: `fractal guest kernel`, ccpu/guest/kbuild.py) boots
the fractal guest under real QEMU: everything the guest uses is there without a module.

Skipped when the kernel has not been built (CI builds none: it takes minutes of compiling).  The
rest of the VM tests run on it with FRACTAL_GUEST_KERNEL=built (docs/vm.md "A kernel built for the
guest")."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ccpu.guest import kbuild
from ccpu.guest.kernel import KernelError

REPO = Path(__file__).resolve().parents[2]


def _built() -> str | None:
    try:
        kbuild.find()
    except KernelError as exc:
        return str(exc)
    return None


pytestmark = [pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs qemu-system-x86_64"),
              pytest.mark.skipif(_built() is not None, reason=f"opt-in kernel not built: {_built()}")]


def cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ccpu.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO),
                                                kbuild.KERNEL_ENV: "built"})


def test_the_built_kernel_boots_the_guest_with_everything_built_in(tmp_path: Path) -> None:
    out = cli("guest", "build", "--kernel", "built")
    assert out.returncode == 0, out.stderr
    assert "(built)" in out.stdout, out.stdout
    (tmp_path / "marker-k12").write_text("from the host\n")
    script = ("uname -r; [ -e /proc/modules ] || echo NO-MODULES; wc -c </etc/fractal/modules; "
              "cat /sys/fs/cgroup/cgroup.controllers; ls /work; "
              "grep -o 'page_reporting_order=[0-9]*' /proc/cmdline; cat /sys/module/page_reporting/parameters/page_reporting_order; "
              "cat /proc/filesystems | tr -s '\\t ' ' '")
    res = subprocess.run([sys.executable, "-m", "ccpu.cli", "vm", "run", "--share-type", "virtiofs", "--", "sh", "-c",
                          script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO), kbuild.KERNEL_ENV: "built"})
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].endswith("-fractal"), lines
    assert "NO-MODULES" in lines and lines[2].strip() == "0"  # nothing shipped, nothing loaded
    assert {"cpuset", "cpu", "io", "memory", "pids"} <= set(lines[3].split())
    assert "marker-k12" in lines  # the virtiofs share (fuse + virtiofs built in)
    fs = {line.split()[-1] for line in lines if line.startswith(("nodev", " "))}
    assert {"overlay", "erofs", "9p", "virtiofs", "tmpfs", "cgroup2", "mqueue", "devpts"} <= fs, fs
    # the init's write of order 0 reached the built-in balloon's page reporting (docs/vm.md)
    i = next(n for n, line in enumerate(lines) if line.startswith("page_reporting_order="))
    assert lines[i + 1].strip() == "0", lines

