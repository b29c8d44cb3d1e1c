"""`vm run -t`'s pure parts (window-size lines, $TERM, the guest's parser) and the rootless choices
(share type, QEMU's user, where a user's guest build goes)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ccpu.agent import vmtty
from ccpu.guest import initramfs as ini
from ccpu.vm import qemu, runproto, shares


def test_winsize_lines_round_trip_and_are_bounded() -> None:
    assert runproto.winsize(33, 101) == b"W 33 101\n"
    assert vmtty.parse_winsize(runproto.winsize(33, 101).strip()) == (33, 101)
    assert runproto.winsize(0, 0) == b"W 24 80\n"  # no terminal size known
    assert vmtty.parse_winsize(runproto.winsize(10**9, 10**9).strip()) == (vmtty.MAX_DIM, vmtty.MAX_DIM)
    for bad in (b"", b"W 1", b"W 0 80", b"W 24 0", b"W -1 80", b"X 24 80", b"W 24 80 1", b"W 99999 80",
                b"W 1e3 80", b"W 123456789 80"):
        assert vmtty.parse_winsize(bad) is None, bad


def test_term_name_is_one_plain_word() -> None:
    assert runproto.term_name("xterm-256color") == "xterm-256color"
    for bad in (None, "", "a b", "x fractal.mode=shell", "a\nb", "-x", "x" * 65):
        assert runproto.term_name(bad) == "vt100"


def test_without_root_shares_default_to_9p_and_qemu_keeps_the_users_uid() -> None:
    assert shares.decide(None, None, "/v", root=False)[0] == "9p"
    assert shares.decide(None, None, "/v", root=True)[0] == "virtiofs"
    assert shares.decide("virtiofs", None, "/v", root=False)[0] == "virtiofs"  # asked for: tried
    cfg = qemu.VMConfig(kernel="/k", initramfs="/i", console_log="/c")
    creds, why = qemu.choose_creds(cfg, qemu.DEFAULT_UID_BASE, 1234, euid=1000)
    assert creds is None and "calling user (uid 1000" in why
    creds, _ = qemu.choose_creds(cfg, qemu.DEFAULT_UID_BASE, 1234, euid=0)
    assert creds is not None and creds.uid == qemu.DEFAULT_UID_BASE + 1234


def test_a_user_without_access_to_the_cache_builds_in_their_own(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    user = ini.user_cache()
    assert user == tmp_path / ".cache" / "fractal" / "guest" / "build"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert ini.user_cache() == tmp_path / "x" / "fractal" / "guest" / "build"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", "/nonexistent")
    assert ini.user_cache() is None
    shared = tmp_path / "shared"
    roots = ini.build_roots(shared, user)
    assert roots == [shared / "build", user]
    assert ini.build_roots(shared, None) == [shared / "build"]
    assert ini.writable_root(roots) == shared / "build"  # root (this test) may write anywhere
    if os.geteuid() != 0:  # the permission check itself only means something for a non-root user
        shared.mkdir(mode=0o555)
        assert ini.writable_root(roots) == user


def test_the_guest_relay_runs_the_command_on_a_pty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ccpu.agent.vmtty on the host: the window size before the command starts, keystrokes through
    the pty's line discipline, ^C as SIGINT to the foreground process, 128+N for a signal."""
    import socket
    import threading

    ctl_h, ctl_g = socket.socketpair()
    in_h, in_g = socket.socketpair()
    out_g, out_h = socket.socketpair()
    ctl_h.sendall(b"W 21 77\n")
    got: dict[str, int] = {}
    cmd = "stty size; read x; echo \"got:$x\"; echo ARMED; exec sleep 100"
    t = threading.Thread(target=lambda: got.update(rc=vmtty.relay(cmd, ctl_g.fileno(), out_g.fileno(),
                                                                     in_g.fileno())))
    t.start()
    seen = b""

    def until(what: bytes) -> None:
        nonlocal seen
        out_h.settimeout(30)
        while what not in seen:
            seen += out_h.recv(4096)

    until(b"21 77")
    in_h.sendall(b"abc\r")
    until(b"got:abc")
    assert seen.count(b"abc") == 2  # the pty's echo, then the command's output
    until(b"ARMED")
    in_h.sendall(b"\x03")
    t.join(30)
    assert got["rc"] == 130  # sleep died of SIGINT
