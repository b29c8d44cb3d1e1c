"""`start` mechanics: socket bound before exit, reuse of a live group shim, stale sockets."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading

import pytest

from shim import address as addr
from shim import start as start_mod
from shim.args import parse_args


@pytest.fixture
def env(tmp_path, monkeypatch):  # noqa: ANN001, ANN201
    import shutil
    import tempfile

    sockdir = tempfile.mkdtemp(prefix="s", dir="/tmp")  # socket paths must stay < 108 bytes
    monkeypatch.setattr(addr, "SOCKET_DIR", sockdir)
    spawned: list[dict] = []

    class FakePopen:
        def __init__(self, argv, **kw) -> None:  # noqa: ANN001
            spawned.append({"argv": argv, **kw})

    monkeypatch.setattr("subprocess.Popen", FakePopen)
    monkeypatch.setenv("FRACTAL_SHIM_SPAWN", "exec")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    yield tmp_path, bundle, spawned
    shutil.rmtree(sockdir, ignore_errors=True)


def opts(bundle, cid="c1"):  # noqa: ANN001, ANN201
    return parse_args(["-namespace", "ns", "-address", "/run/x/containerd.sock",
                       "-publish-binary", "/usr/bin/containerd", "-id", cid, "-bundle",
                       str(bundle), "start"])


def test_start_binds_and_spawns(env) -> None:  # noqa: ANN001
    tmp, bundle, spawned = env
    address = start_mod.start(opts(bundle))
    path = addr.strip_scheme(address)
    assert address == "unix://" + addr.socket_path("/run/x/containerd.sock", "ns", "c1")
    assert (bundle / "address").read_text() == address
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert len(spawned) == 1
    kw = spawned[0]
    assert kw["start_new_session"] and kw["cwd"] == str(bundle)
    argv = kw["argv"]
    assert argv[1:3] == ["-m", "shim.daemon"]
    assert argv[argv.index("-group") + 1] == "c1"
    assert int(argv[argv.index("-listen-fd") + 1]) in kw["pass_fds"]
    # the listener we handed over was closed in this process, so nobody accepts now:
    # the next start treats the socket as stale and binds again
    assert not addr.can_connect(path)
    start_mod.start(opts(bundle))
    assert len(spawned) == 2


def test_live_group_shim_is_reused(env) -> None:  # noqa: ANN001
    tmp, bundle, spawned = env
    (bundle / "config.json").write_text(json.dumps({"annotations": {"io.fractal.sandbox": "sb"}}))
    path = addr.socket_path("/run/x/containerd.sock", "ns", "sb")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    live = socket.socket(socket.AF_UNIX)
    live.bind(path)
    live.listen(8)
    stop = threading.Event()

    def accept() -> None:
        live.settimeout(0.1)
        while not stop.is_set():
            try:
                live.accept()[0].close()
            except OSError:
                pass

    t = threading.Thread(target=accept)
    t.start()
    try:
        address = start_mod.start(opts(bundle, cid="c2"))
    finally:
        stop.set()
        t.join()
        live.close()
    assert address == "unix://" + path
    assert (bundle / "address").read_text() == address
    assert spawned == []


def test_run_prints_only_the_address(env, capsys, monkeypatch) -> None:  # noqa: ANN001
    tmp, bundle, spawned = env
    import io

    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"\x0a\x03abc")))
    assert start_mod.run(opts(bundle)) == 0
    out, err = capsys.readouterr()
    assert out.startswith("unix://") and "\n" not in out and err == ""


def test_the_fork_server_is_the_default_with_fork_and_exec_as_opt_outs(monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.delenv("FRACTAL_SHIM_SPAWN", raising=False)
    assert start_mod.spawn_mode() == "zygote"
    for mode in ("exec", "fork", "zygote"):
        monkeypatch.setenv("FRACTAL_SHIM_SPAWN", mode)
        assert start_mod.spawn_mode() == mode
    monkeypatch.setenv("FRACTAL_SHIM_SPAWN", "forkk")
    with pytest.raises(ValueError, match="FRACTAL_SHIM_SPAWN='forkk': want one of zygote, fork, exec"):
        start_mod.spawn_mode()


def test_an_unknown_spawn_mode_fails_start_clearly_and_leaves_no_socket(env, monkeypatch, capsys) -> None:  # noqa: ANN001
    import io

    tmp, bundle, spawned = env
    monkeypatch.setenv("FRACTAL_SHIM_SPAWN", "forkk")
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"")))
    assert start_mod.run(opts(bundle)) == 1
    out, err = capsys.readouterr()
    assert out == "" and "FRACTAL_SHIM_SPAWN='forkk'" in err
    assert spawned == [] and os.listdir(addr.SOCKET_DIR) == []


def test_fork_mode_hands_over_socket_and_lock(env, monkeypatch) -> None:  # noqa: ANN001
    """FRACTAL_SHIM_SPAWN=fork (and the zygote's fallback): the daemon is forked with the
    listening socket and the lock fd (which the child must close, or the flock would stay held)."""
    tmp, bundle, spawned = env
    monkeypatch.setenv("FRACTAL_SHIM_SPAWN", "fork")
    forked: list[tuple] = []

    def fake_fork(opts, group, bundle_, sock_path, sock, lock_fd, close=()):  # noqa: ANN001, ANN202
        forked.append((group, bundle_, sock_path, sock.fileno(), lock_fd))
        assert os.fstat(lock_fd)  # still open in the parent while the child is made

    monkeypatch.setattr(start_mod, "_fork_daemon", fake_fork)
    address = start_mod.start(opts(bundle))
    assert spawned == [] and len(forked) == 1
    group, b, path, _, _ = forked[0]
    assert (group, b, "unix://" + path) == ("c1", str(bundle), address)


@pytest.mark.parametrize("outcome", ["served", "absent", "slow"])
def test_zygote_mode_falls_back_to_fork(env, monkeypatch, outcome) -> None:  # noqa: ANN001
    """The default (zygote): the fork-server forks the daemon; when it started none,
    start forks it itself -- and starts a new zygote unless one merely answered slowly."""
    from shim import zygoteclient as zygote

    tmp, bundle, spawned = env
    monkeypatch.delenv("FRACTAL_SHIM_SPAWN")
    asked: list[dict] = []
    started: list[str] = []
    forked: list[str] = []

    def fake_spawn(path, request, sock, timeout=1.0):  # noqa: ANN001, ANN202
        asked.append(request)
        assert path == zygote.socket_path("/run/x/containerd.sock") and sock.fileno() >= 0
        if outcome == "absent":
            raise zygote.Unavailable("no zygote", restart=True)
        if outcome == "slow":
            raise zygote.Unavailable("no answer", restart=False)
        return 4242

    monkeypatch.setattr(zygote, "spawn_daemon", fake_spawn)
    monkeypatch.setattr(zygote, "start_zygote", started.append)
    monkeypatch.setattr(start_mod, "_fork_daemon", lambda *a: forked.append(a[1]))
    start_mod.start(opts(bundle))
    (req,) = asked
    assert (req["group"], req["bundle"], req["id"]) == ("c1", str(bundle), "c1")
    assert req["version"] == zygote.code_version() and "FRACTAL_SHIM_SPAWN" not in req["env"]
    assert forked == ([] if outcome == "served" else ["c1"])
    assert started == (["/run/x/containerd.sock"] if outcome == "absent" else [])
    assert spawned == []
