"""QMP message building and parsing (ccpu.vm.qmp), and the QEMU command line's hot-plug parts."""

from __future__ import annotations

import json
import socket
import threading

import pytest

from ccpu.vm import qemu, qmp


def test_encode_is_one_json_line() -> None:
    line = qmp.encode("getfd", {"fdname": "hpfd0"})
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == {"execute": "getfd", "arguments": {"fdname": "hpfd0"}}
    assert json.loads(qmp.encode("qmp_capabilities")) == {"execute": "qmp_capabilities"}


@pytest.mark.parametrize("line", [b"not json", b"[1, 2]", b"\"x\"", b"{" + b" " * qmp.MAX_LINE + b"}"])
def test_parse_refuses_what_is_not_an_object(line: bytes) -> None:
    with pytest.raises(qmp.QmpError):
        qmp.parse(line)


def test_hotplug_commands_plug_into_the_reserved_port() -> None:
    (nd, nd_args), (dev, dev_args) = qmp.hotplug_commands(1, "02:00:00:00:00:01", 1400)
    ids = qmp.nic_ids(1)
    assert (nd, dev) == ("netdev_add", "device_add")
    assert nd_args == {"type": "tap", "id": ids.netdev, "fd": ids.fd, "vhost": False}
    assert dev_args["driver"] == "virtio-net-pci" and dev_args["netdev"] == ids.netdev
    assert dev_args["bus"] == qmp.root_port_id(1) == "hp1"
    assert dev_args["mac"] == "02:00:00:00:00:01" and dev_args["host_mtu"] == 1400
    (dd, dd_args), (ndd, ndd_args) = qmp.unplug_commands(1)
    assert (dd, dd_args, ndd, ndd_args) == ("device_del", {"id": ids.device}, "netdev_del", {"id": ids.netdev})
    assert len({ids.fd, ids.netdev, ids.device}) == 3 and qmp.nic_ids(0) != ids


@pytest.mark.parametrize("mac, mtu", [("02:00:00:00:00:0G", 1500), ("02:00:00:00:00:01,x=y", 1500),
                                      ("02:00:00:00:00:01", 67), ("02:00:00:00:00:01", 65536)])
def test_hotplug_commands_refuse_bad_values(mac: str, mtu: int) -> None:
    with pytest.raises(ValueError):
        qmp.hotplug_commands(0, mac, mtu)


def test_deleted_event_matches_its_device_only() -> None:
    ev = {"event": "DEVICE_DELETED", "data": {"device": "hpnic0", "path": "/machine/peripheral/hpnic0"}}
    assert qmp.is_deleted_event(ev, "hpnic0")
    assert not qmp.is_deleted_event(ev, "hpnic1")
    assert not qmp.is_deleted_event({"event": "DEVICE_DELETED", "data": "x"}, "hpnic0")
    assert not qmp.is_deleted_event({"event": "RESET"}, "hpnic0")


@pytest.mark.parametrize("watched", [False, True])
def test_client_against_a_scripted_peer(watched: bool) -> None:
    """The client's dialogue: greeting, capabilities, a command whose fd arrives by SCM_RIGHTS,
    an event kept while waiting for a reply, an error reply -- the same with the channel watched
    (every line read by the watcher thread, which negotiates)."""
    ours, theirs = socket.socketpair()
    got: dict[str, object] = {}

    def peer() -> None:
        f = theirs.makefile("rwb", buffering=0)
        theirs.sendall(b'{"QMP": {"version": {}, "capabilities": []}}\n')
        got["caps"] = json.loads(f.readline())
        theirs.sendall(b'{"return": {}}\n')
        msg, fds, _flags, _addr = socket.recv_fds(theirs, 4096, 1)
        got["getfd"], got["fds"] = json.loads(msg), fds
        theirs.sendall(b'{"event": "DEVICE_DELETED", "data": {"device": "hpnic0"}}\n{"return": {}}\n')
        got["bad"] = json.loads(f.readline())
        theirs.sendall(b'{"error": {"class": "GenericError", "desc": "Duplicate ID"}}\n')

    t = threading.Thread(target=peer)
    t.start()
    r, w = socket.socketpair()
    client = qmp.Qmp(ours)
    ends: list[str] = []
    if watched:
        client.watch(ends.append)
        client.watch(ends.append)  # idempotent
    try:
        assert client.execute("getfd", {"fdname": "hpfd0"}, fd=r.fileno()) == {}
        with pytest.raises(qmp.QmpError, match="Duplicate ID"):
            client.execute("device_add", {"id": "x"})
        ev = client.wait_event(lambda e: qmp.is_deleted_event(e, "hpnic0"), 1.0)
        assert ev["data"]["device"] == "hpnic0"
        assert client.watched is watched and not ends
    finally:
        t.join()
        client.close()
        theirs.close()
    assert got["caps"] == {"execute": "qmp_capabilities"}
    assert got["getfd"] == {"execute": "getfd", "arguments": {"fdname": "hpfd0"}}
    fds = got["fds"]
    assert isinstance(fds, list) and len(fds) == 1
    import os
    try:  # the fd that arrived is the same socket
        os.write(fds[0], b"x")
        assert w.recv(1) == b"x"
    finally:
        os.close(fds[0])
        r.close()
        w.close()


def test_closed_channel_is_an_error() -> None:
    ours, theirs = socket.socketpair()
    theirs.close()
    with pytest.raises(qmp.QmpError, match="closed"):
        qmp.Qmp(ours).execute("query-status")
    ours.close()


@pytest.mark.parametrize("event, words", [
    ({"event": "SHUTDOWN", "data": {"guest": True, "reason": "guest-shutdown"}}, "the guest shut down (guest-shutdown)"),
    ({"event": "SHUTDOWN", "data": {"guest": True, "reason": "guest-reset"}}, "the guest reset itself"),
    ({"event": "SHUTDOWN", "data": {"guest": True, "reason": "guest-panic"}}, "panicked"),
    ({"event": "RESET", "data": {"guest": True, "reason": "guest-reset"}}, "the guest reset itself"),
    ({"event": "GUEST_PANICKED", "data": {"action": "pause"}}, "panicked"),
    ({"event": "SHUTDOWN", "data": {"guest": False, "reason": "host-signal"}}, None),  # ours (a signal)
    ({"event": "SHUTDOWN", "data": "x" * 10}, "the guest shut down (no reason given)"),
    ({"event": "DEVICE_DELETED", "data": {"device": "hpnic0"}}, None),
    ({"event": "STOP"}, None),
])
def test_guest_end_says_which_events_end_the_guest(event: dict, words: str | None) -> None:
    got = qmp.guest_end(event)
    assert got is None if words is None else got is not None and words in got


def test_a_watched_channel_reports_the_guests_end_at_once_and_once() -> None:
    """No command in flight: the watcher still reads the SHUTDOWN as it comes (QEMU has not even
    closed the channel yet), reports it once, and a command after QEMU's end fails clearly."""
    ours, theirs = socket.socketpair()
    ends: list[str] = []
    seen = threading.Event()

    def on_end(words: str) -> None:
        ends.append(words)
        seen.set()

    client = qmp.Qmp(ours, negotiated=True)
    client.watch(on_end)
    try:
        theirs.sendall(b'{"event": "SHUTDOWN", "data": {"guest": false, "reason": "host-qmp-quit"}}\n')
        theirs.sendall(b'{"event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-shutdown"}}\n')
        assert seen.wait(30), "the guest's end was not reported while the channel is still open"
        theirs.sendall(b'{"event": "RESET", "data": {"guest": true, "reason": "guest-reset"}}\n')
        theirs.close()  # QEMU exits
        assert client._watcher is not None
        client._watcher.join(30)
        with pytest.raises(qmp.QmpError, match="closed"):
            client.execute("query-status")
        with pytest.raises(qmp.QmpError, match="closed"):
            client.wait_event(lambda e: False, 30)
    finally:
        client.close()
    assert ends == ["the guest shut down (guest-shutdown)"]
    assert client._watcher is not None
    client._watcher.join(30)
    assert not client._watcher.is_alive()


def test_closing_a_watched_channel_ends_its_watcher() -> None:
    ours, theirs = socket.socketpair()
    client = qmp.Qmp(ours, negotiated=True)
    client.watch(lambda words: None)
    client.close()
    assert client._watcher is not None
    client._watcher.join(30)
    assert not client._watcher.is_alive()
    theirs.close()


def _cfg(**kw: object) -> qemu.VMConfig:
    return qemu.VMConfig(kernel="/k", initramfs="/i", console_log="/c", **kw)  # type: ignore[arg-type]


def test_command_line_reserves_root_ports_and_qmp() -> None:
    argv = qemu.command(_cfg(qmp_fd=7, hotplug_slots=2))
    joined = " ".join(argv)
    assert "-chardev socket,id=qmp,fd=7,server=off -mon chardev=qmp,mode=control" in joined
    assert "pcie-root-port,id=hp0,bus=pcie.0,chassis=1" in joined
    assert "pcie-root-port,id=hp1,bus=pcie.0,chassis=2" in joined
    assert 7 in qemu.inherited_fds(_cfg(qmp_fd=7, hotplug_slots=2))
    assert "pcie-root-port" not in " ".join(qemu.command(_cfg()))


@pytest.mark.parametrize("kw, why", [
    ({"hotplug_slots": 2}, "QMP"),
    ({"hotplug_slots": qemu.MAX_HOTPLUG_SLOTS + 1, "qmp_fd": 3}, "hotplug slots"),
    ({"hotplug_slots": 1, "qmp_fd": 3, "machine": "microvm"}, "q35"),
])
def test_command_line_refuses_unusable_hotplug(kw: dict, why: str) -> None:
    with pytest.raises(qemu.ConfigError, match=why):
        qemu.command(_cfg(**kw))
