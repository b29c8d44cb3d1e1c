"""shim/leftovers.py: a dead shim's VM processes, recorded and killed by pid AND start time."""

from __future__ import annotations

import os
import subprocess

from ccpu.linux.proc import start_time
from shim import leftovers


def test_record_keeps_live_processes_with_their_start_time(tmp_path) -> None:  # noqa: ANN001
    p = subprocess.Popen(["sleep", "60"])
    gone = subprocess.Popen(["true"])
    gone.wait()
    try:
        leftovers.record(str(tmp_path), [("qemu", p.pid), ("virtiofsd", gone.pid)])
        assert leftovers.read_pids(str(tmp_path)) == [("qemu", p.pid, start_time(p.pid))]
        assert not (tmp_path / "pids.tmp").exists()
    finally:
        p.kill()
        p.wait()


def test_read_pids_skips_malformed_lines(tmp_path) -> None:  # noqa: ANN001
    (tmp_path / "pids").write_text("qemu 12 345\nbad\nvirtiofsd x 1\nqemu 1 y\nvirtiofsd 13 346 extra\n")
    assert leftovers.read_pids(str(tmp_path)) == [("qemu", 12, 345)]
    assert leftovers.read_pids(str(tmp_path / "none")) == []


def test_cleanup_dead_checks_start_time(tmp_path) -> None:  # noqa: ANN001
    p = subprocess.Popen(["sleep", "60"])
    try:
        d = tmp_path / "vms" / "ns" / "g"
        d.mkdir(parents=True)
        (d / "pids").write_text(f"qemu {p.pid} 1\n")  # wrong start time: not ours, left alone
        assert leftovers.cleanup_dead(str(d)) == []
        assert p.poll() is None and not d.exists()
        d.mkdir(parents=True)
        leftovers.record(str(d), [("qemu", p.pid)])
        assert leftovers.cleanup_dead(str(d)) == [p.pid]
        assert p.wait(timeout=5) == -9 and not d.exists()
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
    assert os.path.isdir(tmp_path / "vms") and not (tmp_path / "vms" / "ns").exists()
