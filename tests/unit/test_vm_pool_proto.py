"""The pool's protocol and handover edge (shim/pool.py), its config key, its systemd unit."""

from __future__ import annotations

import os
import socket
import threading
from types import SimpleNamespace

import pytest

from ccpu.cli.install import render_pool_unit
from shim import config, pool
from shim.layerview import valid_view_dir


def settings(**kw: object) -> SimpleNamespace:
    base = dict(memory_mb=512, cpus=2, accel="auto", share="auto", memory_reserve_mb=64, qemu_uid_base=7)
    base.update(kw)
    return SimpleNamespace(**base)


def test_target_must_be_a_sandbox_run_dir() -> None:
    assert pool.target_ok("/run/fractal", "/run/fractal/vms/ns/group")
    for bad in ("/run/fractal/vms/ns", "/run/fractal/vms/ns/group/x", "/run/fractal/vms/../x/y",
                "/run/fractal/pool/vms/ns", "/etc/vms/ns/g", "/run/fractal/vms/ns/..", "run/fractal/vms/a/b",
                "/run/fractal/vms//g"):
        assert not pool.target_ok("/run/fractal", bad), bad


def test_key_differs_for_every_boot_setting() -> None:
    k = pool.vm_key(settings(), "virtiofs")
    assert k == pool.vm_key(settings(), "virtiofs")
    assert k != pool.vm_key(settings(), "9p")
    for field, value in (("memory_mb", 1024), ("cpus", 1), ("accel", "tcg"), ("memory_reserve_mb", 32),
                         ("qemu_uid_base", 0)):
        assert k != pool.vm_key(settings(**{field: value}), "virtiofs"), field


def test_fds_travel_with_the_message_and_none_leak_on_error() -> None:
    a, b = socket.socketpair()
    r, w = os.pipe()
    try:
        pool.send(a, {"ok": True, "fds": ["x"]}, [r])
        msg, fds = pool.receive(b)
        assert msg == {"ok": True, "fds": ["x"]} and len(fds) == 1
        os.write(w, b"hi")
        assert os.read(fds[0], 2) == b"hi"  # the same pipe
        os.close(fds[0])
        a.sendall(b"[1]\n")
        with pytest.raises(pool.PoolError):
            pool.receive(b)
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()


def serve_once(path: str, reply: dict, fds: list[int]) -> threading.Thread:
    if os.path.exists(path):
        os.unlink(path)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)

    def run() -> None:
        conn, _ = srv.accept()
        pool.receive(conn)
        pool.send(conn, reply, fds)
        conn.close()
        srv.close()

    t = threading.Thread(target=run)
    t.start()
    return t


def test_adopt_without_a_pool_or_with_an_incomplete_handover(tmp_path) -> None:  # noqa: ANN001
    run_dir = str(tmp_path)
    h, why = pool.adopt(run_dir, settings(share="9p"), f"{run_dir}/vms/n/g")
    assert h is None and "no pool" in why
    os.makedirs(pool.pool_dir(run_dir))
    r, w = os.pipe()
    before = len(os.listdir("/proc/self/fd"))
    t = serve_once(pool.socket_path(run_dir), {"ok": True, "vm": {}, "fds": ["agent", "qemu"]}, [r, w])
    h, why = pool.adopt(run_dir, settings(share="9p"), f"{run_dir}/vms/n/g")
    t.join()
    assert h is None and "incomplete" in why
    assert len(os.listdir("/proc/self/fd")) == before  # what came was closed
    os.close(r)
    os.close(w)
    t = serve_once(pool.socket_path(run_dir), {"ok": False, "why": "no ready VM"}, [])
    h, why = pool.adopt(run_dir, settings(share="9p"), f"{run_dir}/vms/n/g")
    t.join()
    assert h is None and why == "no ready VM"


def test_config_pool_bounds() -> None:
    assert config.VmSettings().pool == 1
    assert config.parse_toml("[vm]\npool = 0\n", "t").vm.pool == 0
    assert config.parse_toml("[vm]\npool = 3\n", "t").vm.pool == 3
    for bad in ("-1", "17", "true", '"2"'):
        with pytest.raises(config.ConfigError, match="vm.pool"):
            config.parse_toml(f"[vm]\npool = {bad}\n", "t")


def test_pooled_view_path_must_be_absolute_and_normal() -> None:
    assert valid_view_dir("/run/fractal/pool/views/x")
    for bad in ("run/x", "/run/../x", "/", "/run/x/", 5, None):
        assert not valid_view_dir(bad), bad


def test_pool_unit_leaves_adopted_vms_alone() -> None:
    unit = render_pool_unit("/usr/bin/python3", "/etc/x.toml")
    assert "KillMode=process" in unit and "ExecStart=/usr/bin/python3 -m shim.poold\n" in unit
    assert "ExecStopPost=/usr/bin/python3 -m shim.poold cleanup" in unit
    assert "Environment=FRACTAL_CONFIG=/etc/x.toml" in unit


def test_adopt_hands_over_the_qmp_channel_with_the_rest(tmp_path) -> None:  # noqa: ANN001
    run_dir = str(tmp_path)
    os.makedirs(pool.pool_dir(run_dir))
    pipes = [os.pipe() for _ in range(6)]
    names = ["agent", "console", "qemu", "virtiofsd", "volumes", "qmp"]
    t = serve_once(pool.socket_path(run_dir), {"ok": True, "vm": {"hotplug_slots": [0, 1]}, "fds": names},
                   [r for r, _w in pipes])
    h, why = pool.adopt(run_dir, settings(share="9p"), f"{run_dir}/vms/n/g")
    t.join()
    try:
        assert h is not None, why
        assert set(h.fds) == {"agent", "console", "qemu", "volumes", "qmp"} and len(h.helpers) == 1
        os.write(pipes[5][1], b"q")
        assert os.read(h.fds["qmp"], 1) == b"q"  # the QMP fd is the one sent last
    finally:
        if h is not None:
            h.close()
        for r, w in pipes:
            os.close(r)
            os.close(w)


def test_hotplug_slots_from_the_pool_are_bounded() -> None:
    from shim.vm import _hotplug_slots

    assert _hotplug_slots(None) == [] and _hotplug_slots([1, 0]) == [1, 0]
    for bad in ([0, 0], [-1], [99], ["0"], [True], "01", list(range(20))):
        with pytest.raises(ValueError):
            _hotplug_slots(bad)


def test_nics_use_only_the_free_slots_and_refuse_a_dead_vm() -> None:
    from ccpu.vm import nics, qmp

    a, b = socket.socketpair()
    try:
        n = nics.Nics(qmp.Qmp(a, negotiated=True), [1, 0, 1], lambda: False)
        assert n.slots == [0, 1] and n.free_slots() == [0, 1]
        assert n.qmp is not None and n.qmp.negotiated
        with pytest.raises(nics.NicError, match="running VM"):
            n.attach("/proc/self/ns/net")
        with pytest.raises(nics.NicError, match="not connected"):
            n.detach("/proc/self/ns/net")
        n.close()
        assert n.qmp is None and a.fileno() == -1
    finally:
        a.close()
        b.close()
