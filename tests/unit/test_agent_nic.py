"""The agent's ``nic`` op: validation of the host's values and the ``ip`` commands (ccpu.agent.nic)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ccpu.agent import nic, protocol
from ccpu.vm import net

GOOD: dict[str, Any] = {"mac": "0A:58:0A:04:00:05", "name": "eth0", "mtu": 1400,
                        "addrs": ["10.4.0.5/24"],
                        "routes": [{"dst": "default", "gateway": "10.4.0.1"},
                                   {"dst": "169.254.1.1/32", "gateway": None},
                                   {"dst": "10.9.0.0/16", "gateway": "10.4.0.254"}]}


def test_parse_and_plan_in_the_init_s_order() -> None:
    cfg = nic.parse(GOOD)
    assert cfg.mac == "0a:58:0a:04:00:05"  # lower-cased: /sys/class/net/*/address is
    assert nic.plan(cfg, "eth1") == [
        ["link", "set", "dev", "eth1", "name", "eth0"],
        ["link", "set", "dev", "eth0", "mtu", "1400", "up"],
        ["addr", "add", "10.4.0.5/24", "dev", "eth0"],
        ["route", "add", "169.254.1.1/32", "dev", "eth0", "scope", "link"],  # on link first
        ["route", "add", "10.9.0.0/16", "via", "10.4.0.254", "dev", "eth0", "onlink"],
        ["route", "add", "default", "via", "10.4.0.1", "dev", "eth0", "onlink"],  # last
    ]
    assert nic.plan(cfg, "eth0")[0] == ["link", "set", "dev", "eth0", "mtu", "1400", "up"]  # no rename


@pytest.mark.parametrize("change", [
    {"mac": "01:00:5e:00:00:01"}, {"mac": "00:00:00:00:00:00"}, {"mac": "0a:58:0a:04:00"}, {"mac": 5},
    {"name": "lo"}, {"name": "eth0 up"}, {"name": "a" * 16}, {"name": "x;rm"}, {"name": ""},
    {"mtu": 67}, {"mtu": 65536}, {"mtu": True}, {"mtu": "1500"},
    {"addrs": ["10.4.0.5"]}, {"addrs": ["fd00::1/64"]}, {"addrs": ["10.4.0.5/33"]}, {"addrs": "10.4.0.5/24"},
    {"addrs": ["10.0.0.1/32"] * (nic.MAX_ADDRS + 1)},
    {"routes": [{"dst": "default", "gateway": "x"}]}, {"routes": [{"dst": "default"}]},
    {"routes": [{"dst": "10.0.0.0/40"}]}, {"routes": ["default"]},
    {"routes": [{"dst": "10.0.0.0/8"}] * (nic.MAX_ROUTES + 1)},
])
def test_parse_refuses_bad_values(change: dict[str, Any]) -> None:
    with pytest.raises(protocol.InvalidArgument):
        nic.parse({**GOOD, **change})


def test_net_agent_args_are_what_the_agent_accepts() -> None:
    iface = net.Interface("eth0", "0a:58:0a:04:00:05", 1400, ("10.4.0.5/24",),
                          (net.Route("default", "10.4.0.1"), net.Route("169.254.1.1/32")))
    cfg = nic.parse(net.agent_args(iface))
    assert (cfg.name, cfg.mac, cfg.mtu, cfg.addrs) == ("eth0", iface.mac, 1400, ("10.4.0.5/24",))
    assert cfg.routes == (nic.Route("default", "10.4.0.1"), nic.Route("169.254.1.1/32", None))
    with pytest.raises(net.NetError):
        net.agent_args(net.Interface("eth0", "ff:ff:ff:ff:ff:ff", 1500, ()))


def test_device_by_mac(tmp_path: Path) -> None:
    for name, mac in (("lo", "00:00:00:00:00:00"), ("eth0", "0a:58:0a:04:00:05")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "address").write_text(mac + "\n")
    (tmp_path / "broken").mkdir()
    assert nic.device_by_mac("0a:58:0a:04:00:05", str(tmp_path)) == "eth0"
    assert nic.device_by_mac("0a:58:0a:04:00:06", str(tmp_path)) is None
    assert nic.device_by_mac("0a:58:0a:04:00:05", str(tmp_path / "none")) is None


def test_only_a_guest_agent_serves_the_op() -> None:
    """A host-mode agent (no --nics) must not touch the host's interfaces: Unimplemented, and
    `nic` is not among its features; the guest's agent lists it and validates before acting."""
    import asyncio

    from ccpu.agent import wire
    from ccpu.agent.server import Outbox, Server

    class Sup:
        reaper = None

        def __getattr__(self, name: str) -> Any:  # the other ops: never called here
            def never(*a: object) -> None:
                raise AssertionError(f"{name} called")
            return never

    async def ask(server: Server, args: dict[str, Any]) -> dict[str, Any]:
        sent: list[bytes] = []

        class Conn:
            closed = False
            name = "c"

            def send(self, raw: bytes) -> None:
                sent.append(raw)

        await server.handle_request(Conn(), 1, "nic", args)  # type: ignore[arg-type]
        reader = asyncio.StreamReader()
        reader.feed_data(sent[0])
        reader.feed_eof()
        frame = await wire.read_frame(reader)
        assert frame is not None
        return wire.decode_control(frame)

    host = Server(Sup(), Outbox())  # type: ignore[arg-type]
    guest = Server(Sup(), Outbox(), nics=True)  # type: ignore[arg-type]
    assert "nic" not in host.features and "nic" in guest.features
    assert asyncio.run(ask(host, GOOD))["error"]["code"] == "Unimplemented"
    assert asyncio.run(ask(guest, {**GOOD, "name": "lo"}))["error"]["code"] == "InvalidArgument"


def test_attest_quote_arguments_are_bounded() -> None:
    """The agent's attest op (ccpu/agent/tpm.py) takes a nonce of bounded hex and a small credential."""
    import base64

    from ccpu.agent import protocol, tpm

    good = {"nonce": "ab" * 32, "credential": base64.b64encode(b"x" * 100).decode()}
    assert tpm.check_quote_args(good) == ("ab" * 32, b"x" * 100)
    for bad in ({**good, "nonce": "ab" * 8 + "a"}, {**good, "nonce": "AB" * 32}, {**good, "nonce": "ab" * 65},
                {**good, "nonce": "-x" * 32}, {**good, "credential": "!!"}, {**good, "credential": ""},
                {**good, "credential": base64.b64encode(b"x" * 5000).decode()}):
        with pytest.raises(protocol.InvalidArgument):
            tpm.check_quote_args(bad)
