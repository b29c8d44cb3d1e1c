"""ccpu/vm/pageout.py: which of QEMU's mappings are its boot files, and paging out a real one."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ccpu.vm import pageout

MAPS = """\
55a564dc5000-55a5651cc000 r--p 00000000 fe:00 10166344                   /usr/bin/qemu-system-x86_64
7fce74000000-7fce77edb000 rw-p 00000000 fe:00 853923                     /proc/self/fd/9 (deleted)
7fce78000000-7fce78a3d000 rw-p 00000000 00:00 0
7fcebd800000-7fcebdd0e000 r--p 00000000 08:01 77                         /x/initramfs.cpio
"""


def test_boot_files_are_found_by_device_and_inode_not_by_path() -> None:
    kernel, initrd = (os.makedev(0xFE, 0), 853923), (os.makedev(8, 1), 77)
    assert pageout.file_ranges(MAPS, [kernel, initrd]) == [
        (0x7FCE74000000, 0x7FCE77EDB000 - 0x7FCE74000000), (0x7FCEBD800000, 0x7FCEBDD0E000 - 0x7FCEBD800000)]
    assert pageout.file_ranges(MAPS, [(os.makedev(0xFE, 0), 1)]) == []  # same device, other file
    assert pageout.file_ranges(MAPS, []) == []


def _rss_of(pid: int, path: str) -> int:
    with open(f"/proc/{pid}/smaps") as f:
        mine, rss = False, 0
        for line in f:
            if "-" in line.split(" ", 1)[0] and len(line.split()) >= 5:
                mine = line.rstrip().endswith(path)
            elif mine and line.startswith("Rss:"):
                rss += int(line.split()[1])
    return rss


@pytest.mark.skipif(os.geteuid() != 0, reason="process_madvise of another process needs CAP_SYS_NICE")
def test_a_child_s_mapped_file_leaves_its_resident_set(tmp_path) -> None:  # noqa: ANN001
    path = tmp_path / "boot.img"
    path.write_bytes(os.urandom(8 << 20))
    code = ("import mmap, sys; f = open(sys.argv[1], 'rb'); m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ);"
            "sum(m[i] for i in range(0, len(m), 4096)); print('ready', flush=True); sys.stdin.read()")
    child = subprocess.Popen([sys.executable, "-c", code, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"ready\n"
        before = _rss_of(child.pid, str(path))
        assert before >= 7 << 10  # kB: the child touched every page
        assert pageout.page_out(child.pid, [str(path)]) == 8 << 20
        assert _rss_of(child.pid, str(path)) < before // 4
        assert pageout.page_out(child.pid, [str(tmp_path)]) == 0  # not mapped: nothing to do
    finally:
        child.kill()
        child.wait()


def test_the_process_is_pinned_by_a_pidfd_before_its_maps_are_read(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """A pid read from /proc before the pidfd is opened could be another process by the time the
    advice is given (the pid reused): the pidfd must come first, so the maps read are those of the
    process the advice goes to, or the advice fails (ESRCH) on a dead one."""
    path = tmp_path / "boot.img"
    path.write_bytes(b"x" * 4096)
    order: list[str] = []
    real_open, real_read = pageout.os.pidfd_open, pageout.Path.read_text

    def pidfd_open(pid: int) -> int:
        order.append("pidfd")
        return real_open(pid)

    def read_text(self, *a, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        if str(self).endswith("/maps"):
            order.append("maps")
        return real_read(self, *a, **kw)

    monkeypatch.setattr(pageout.os, "pidfd_open", pidfd_open)
    monkeypatch.setattr(pageout.Path, "read_text", read_text)
    assert pageout.page_out(os.getpid(), [str(path)]) == 0  # not mapped here: nothing advised
    assert order == ["pidfd", "maps"]
