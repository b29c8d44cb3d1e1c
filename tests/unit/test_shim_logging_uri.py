"""Log URIs (binary://, file://) as containerd clients such as nerdctl pass them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shim.logging_uri import LogURIError, is_uri, open_log_uri


def test_binary_uri_starts_the_logger_with_containerd_conventions(tmp_path: Path) -> None:
    script = tmp_path / "logger.sh"
    out = tmp_path / "out.txt"
    script.write_text('#!/bin/sh\nexec 5>&-\necho "$1 $2 $CONTAINER_ID $CONTAINER_NAMESPACE" > "$2.args"\n'
                      'cat <&3 > "$2"\ncat <&4 >> "$2"\n')
    script.chmod(0o755)
    target = open_log_uri(f"binary://{script}?dest={out}", "c1", "ns1", want_stderr=True)
    os.write(target.stdout_fd, b"to stdout\n")
    os.write(target.stderr_fd, b"to stderr\n")
    os.close(target.stdout_fd)
    os.close(target.stderr_fd)
    assert target.pid is not None
    _, status = os.waitpid(target.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert out.read_text() == "to stdout\nto stderr\n"
    assert Path(f"{out}.args").read_text() == f"dest {out} c1 ns1\n"


def test_file_uri_appends_both_streams(tmp_path: Path) -> None:
    log = tmp_path / "sub" / "c.log"
    target = open_log_uri(f"file://{log}", "c1", "ns", want_stderr=True)
    os.write(target.stdout_fd, b"a\n")
    os.write(target.stderr_fd, b"b\n")
    os.close(target.stdout_fd)
    os.close(target.stderr_fd)
    assert log.read_text() == "a\nb\n" and target.pid is None


def test_bad_uris(tmp_path: Path) -> None:
    assert is_uri("binary:///x") and is_uri("file:///x") and not is_uri("/run/fifo")
    with pytest.raises(LogURIError):
        open_log_uri(f"binary://{tmp_path}/missing", "c", "n", False)
    quiet = tmp_path / "never-ready.sh"
    quiet.write_text("#!/bin/sh\nexit 0\n")  # exits without closing fd 5 itself: EOF counts as ready
    quiet.chmod(0o755)
    t = open_log_uri(f"binary://{quiet}", "c", "n", False)
    assert t.stderr_fd == -1
    os.close(t.stdout_fd)
    os.waitpid(t.pid, 0)
