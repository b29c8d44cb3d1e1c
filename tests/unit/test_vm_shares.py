"""Share type choice and virtiofsd flags (pure)."""

from __future__ import annotations

import pytest

from ccpu.vm import shares
from ccpu.vm.qemu import Share


def test_decide_prefers_request_then_env_then_availability() -> None:
    assert shares.decide(None, None, "/v")[0] == "virtiofs"
    assert shares.decide(None, None, None)[0] == "9p"
    assert shares.decide(None, "9p", "/v")[0] == "9p"
    assert shares.decide("virtiofs", "9p", "/v")[0] == "virtiofs"
    with pytest.raises(ValueError, match="no virtiofsd"):
        shares.decide("virtiofs", None, None)
    with pytest.raises(ValueError):
        shares.decide(None, "nfs", None)


def test_virtiofsd_argv_read_only_and_no_tag() -> None:
    argv = shares.virtiofsd_argv("/bin/virtiofsd", Share("fractalrepo", "/repo", "/repo", True, "virtiofs", "/s"), "/s")
    assert argv[:5] == ["/bin/virtiofsd", "--shared-dir", "/repo", "--socket-path", "/s"]
    assert "--readonly" in argv and "--tag" not in argv
    rw = shares.virtiofsd_argv("/bin/virtiofsd", Share("t", "/w", "/work", False, "virtiofs", "/s"), "/s")
    assert "--readonly" not in rw


def test_only_a_read_only_layer_share_passes_xattrs() -> None:
    """Layers: capabilities, user.* (opaque markers), ACLs; host trusted.* hidden and refused."""
    layers = Share("fractallayers", "/r/layers", "/repo/layers", True, "virtiofs", "/s", layers=True)
    argv = shares.virtiofsd_argv("/bin/virtiofsd", layers, "/s")
    assert "--readonly" in argv and "--xattr" in argv and "--posix-acl" in argv
    rules = argv[argv.index("--xattrmap") + 1]
    assert rules.startswith(":bad:all:trusted.:trusted.:") and rules.endswith(":ok:all:::")
    for other in (Share("t", "/w", "/work", False, "virtiofs", "/s"), Share("t", "/w", "/work", True, "virtiofs", "/s")):
        assert not {"--xattr", "--posix-acl", "--xattrmap"} & set(shares.virtiofsd_argv("/bin/virtiofsd", other, "/s"))


def test_connect_waits_for_a_socket_bound_but_not_yet_listening(tmp_path) -> None:
    import socket
    import threading

    from ccpu.vm import shares

    path = str(tmp_path / "vfs.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)  # virtiofsd's window between bind() and listen()
    timer = threading.Timer(0.2, srv.listen, (1,))
    timer.start()
    try:
        conn = shares.connect(path, timeout=5)
        conn.close()
        refused = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        refused.bind(str(tmp_path / "dead.sock"))
        with pytest.raises(ConnectionRefusedError):
            shares.connect(str(tmp_path / "dead.sock"), timeout=0.1)
        refused.close()
    finally:
        timer.join()
        srv.close()
