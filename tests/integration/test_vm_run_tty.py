"""`fractal vm run -it` driven through a pty as a person would (issue 17 part 2), and `vm run` and
`guest build` as a user without root (`nobody`).

The test is the person at the terminal: it starts `fractal vm run -it` on a pty of its own with a
window size, types into it, resizes the window, presses ^C, and reads the screen.  Each check has a
failure mode it catches: the host terminal not raw (the typed line would be echoed twice, once by
the host and once by the guest, and not sent before Enter), a typed key held back by the host (the
end-of-stream marker's hold-back), the window size not relayed (`stty
size`), ^C handled by the host (fractal would die instead of the guest's command trap), the exit
status lost, the terminal left raw afterwards.
"""

from __future__ import annotations

import fcntl
import os
import pty
import pwd
import select
import shutil
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from tests.integration.test_vm_run import guest, qemu_processes  # noqa: F401 -- the session's guest build

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs qemu-system-x86_64")


class Screen:
    """The pty master: what the 'person' sees, and their keyboard."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.text = b""

    def expect(self, what: bytes, timeout: float = 180) -> bytes:
        """Read until `what` is on the screen (after the last expect's match); the text up to it."""
        deadline = time.monotonic() + timeout
        while what not in self.text:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{what!r} not on the screen; it shows:\n{self.text[-2000:]!r}")
            r, _, _ = select.select([self.fd], [], [], min(left, 1))
            if r:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:  # EIO: the program closed the terminal
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"terminal closed before {what!r}; it showed:\n{self.text[-2000:]!r}")
                self.text += chunk
        before, _, self.text = self.text.partition(what)
        return before

    def type(self, keys: bytes) -> None:
        os.write(self.fd, keys)

    def rest(self, timeout: float = 60) -> bytes:
        """Everything until the program closes the terminal."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r, _, _ = select.select([self.fd], [], [], 1)
            if r:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                self.text += chunk
        return self.text


def winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def test_interactive_tty_through_a_pty(guest: Path, tmp_path: Path) -> None:  # noqa: F811
    work = tmp_path / "work"
    work.mkdir()
    (work / "here-9c1e").write_text("")
    script = ("stty size; pwd; ls; echo READY; read line; echo \"got:$line\"; "
              "read x; stty size; trap 'echo TRAPPED-INT; exit 42' INT; "
              # ARMED comes from the foreground child itself: a ^C typed before `sleep` was forked would
              # otherwise reach only the outer sh, whose trap waits for the foreground command to end
              "sh -c 'echo ARMED; exec sleep 1000'; echo NOT-REACHED")
    master, slave = pty.openpty()
    winsize(slave, 33, 101)
    proc = subprocess.Popen(
        [sys.executable, "-m", "ccpu.cli", "vm", "run", "-it", "--share-type", "9p", "--", "sh", "-c", script],
        cwd=work, stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
        preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
        env={**os.environ, "PYTHONPATH": str(REPO), "TERM": "xterm"})
    try:
        screen = Screen(master)
        before = screen.expect(b"READY")
        assert b"33 101" in before, before  # the initial window size
        assert b"/work" in before and b"here-9c1e" in before, before  # the cwd, shared, is where it starts
        # typing key by key, each echoed before the next (by the guest's pty: every hex digit once
        # begins the host's end-of-stream marker, which must not hold an echo back) ...
        line = b"0123456789abcdef"
        for key in line:
            screen.type(bytes([key]))
            screen.expect(bytes([key]))
        time.sleep(1)  # not a timing assertion: just let a (wrong) second echo show up before we look
        screen.type(b"\r")
        # ... and only once: a host terminal left cooked would echo too
        echoed = screen.expect(b"got:" + line)
        assert not any(c in echoed for c in line), echoed
        # resize the window: SIGWINCH on the host, the new size in the guest
        winsize(master, 40, 120)  # the kernel sends SIGWINCH to fractal, the terminal's foreground
        time.sleep(1)
        screen.type(b"\r")
        assert b"40 120" in screen.expect(b"ARMED")
        screen.type(b"\x03")  # ^C: to the guest's foreground process, not to fractal
        screen.expect(b"TRAPPED-INT")
        rest = screen.rest()
        assert proc.wait(timeout=120) == 42, rest
        assert b"NOT-REACHED" not in rest
        attrs = termios.tcgetattr(slave)
        assert attrs[3] & termios.ECHO and attrs[3] & termios.ICANON, "the terminal was left raw"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
        os.close(slave)
    assert qemu_processes(str(work)) == []


def test_tty_needs_a_terminal(guest: Path, tmp_path: Path) -> None:  # noqa: F811
    """-it with stdin not a terminal is a usage error (docker says the same); -i alone is fine
    (tests/integration/test_vm_run.py::test_stdin_with_i_reaches_the_command_and_ends_it)."""
    res = subprocess.run([sys.executable, "-m", "ccpu.cli", "vm", "run", "-it", "--", "true"], cwd=tmp_path,
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 2 and "not a TTY" in res.stderr, res.stderr


def _python_for(user: str) -> str:
    """This interpreter if `user` may run it (not one under /root), else the distribution's."""
    ok = subprocess.run(["runuser", "-u", user, "--", sys.executable, "-c", "import grpc"], capture_output=True)
    return sys.executable if ok.returncode == 0 else "/usr/bin/python3"


def _as_user(user: str, argv: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["runuser", "-u", user, "--", "env", f"PYTHONPATH={REPO}",
                           f"FRACTAL_CACHE={os.environ.get('FRACTAL_CACHE', '/var/cache/fractal')}",
                           *[f"{k}={v}" for k, v in env.items()], _python_for(user), *argv],
                          cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("runuser") is None, reason="needs root to become nobody")
def test_vm_run_as_nobody_sees_only_the_working_directory(guest: Path) -> None:  # noqa: F811
    """`nobody` (no home, no write access to the cache) boots the guest root built and shares its
    working directory: files it writes there are nobody's, nothing else of the host is mounted."""
    import tempfile

    nobody = pwd.getpwnam("nobody")
    work = Path(tempfile.mkdtemp(prefix="fractal-nobody-"))
    try:
        os.chown(work, nobody.pw_uid, nobody.pw_gid)
        script = ("pwd; echo from-guest > made-here; grep -E ' (9p|virtiofs) ' /proc/mounts | cut -d' ' -f2,3; "
                  "test -e /repo/layers && echo REPO-VISIBLE; exit 5")
        res = _as_user("nobody", ["-m", "ccpu.cli", "vm", "run", "-v", "--", "sh", "-c", script], work)
        assert res.returncode == 5, res.stdout + res.stderr
        lines = res.stdout.splitlines()
        assert lines[0] == "/work"
        assert [ln for ln in lines if " 9p" in ln or " virtiofs" in ln] == ["/work 9p"], lines  # nothing else
        assert "REPO-VISIBLE" not in res.stdout
        made = work / "made-here"
        assert made.read_text() == "from-guest\n"
        assert (made.stat().st_uid, made.stat().st_gid) == (nobody.pw_uid, nobody.pw_gid)
        assert "QEMU runs as the calling user" in res.stderr, res.stderr
        assert qemu_processes(str(work)) == []
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("runuser") is None, reason="needs root to become nobody")
def test_a_user_builds_a_guest_into_their_own_cache(guest: Path) -> None:  # noqa: F811
    """A build the shared cache lacks (here: the other layout) goes to the user's ~/.cache, not
    into root's cache (which the user cannot write)."""
    import tempfile

    nobody = pwd.getpwnam("nobody")
    home = Path(tempfile.mkdtemp(prefix="fractal-home-"))
    try:
        os.chown(home, nobody.pw_uid, nobody.pw_gid)
        layout = "initramfs" if "system.erofs" in os.listdir(guest.parent) else "image"
        res = _as_user("nobody", ["-m", "ccpu.cli", "guest", "build", "--json", "--layout", layout], home,
                       HOME=str(home))
        assert res.returncode == 0, res.stderr
        assert '"initramfs": "' + str(home / ".cache" / "fractal" / "guest" / "build") in res.stdout, res.stdout
        # without a home there is nowhere to write: a clear error, not a traceback
        res = _as_user("nobody", ["-m", "ccpu.cli", "guest", "build", "--force", "--layout", layout], home,
                       HOME="/nonexistent")
        assert res.returncode != 0 and "cannot write a guest build" in res.stderr, res.stderr
        assert "Traceback" not in res.stderr
    finally:
        shutil.rmtree(home, ignore_errors=True)
