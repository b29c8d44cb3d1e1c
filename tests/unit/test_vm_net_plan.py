"""Pure parts of ccpu.vm.net: reading `ip -j` output, the guest's fractal.net= argument, the tc plan,
and the NICs on QEMU's command line."""

from __future__ import annotations

import json

import pytest

from ccpu.vm import net, qemu
from ccpu.vm.net import Interface, Route

# `ip -j addr show` in a CNI pod netns (trimmed from a real one: lo, eth0 with v4 + v6 link-local)
ADDR_JSON = json.dumps([
    {"ifindex": 1, "ifname": "lo", "flags": ["LOOPBACK", "UP", "LOWER_UP"], "mtu": 65536, "link_type": "loopback",
     "address": "00:00:00:00:00:00",
     "addr_info": [{"family": "inet", "local": "127.0.0.1", "prefixlen": 8, "scope": "host"}]},
    {"ifindex": 2, "link_index": 5, "ifname": "eth0", "flags": ["BROADCAST", "MULTICAST", "UP", "LOWER_UP"],
     "mtu": 1450, "link_type": "ether", "address": "0A:58:0A:F4:01:07",
     "addr_info": [{"family": "inet", "local": "10.244.1.7", "prefixlen": 24, "scope": "global"},
                   {"family": "inet6", "local": "fe80::858:aff:fef4:107", "prefixlen": 64, "scope": "link"}]},
    {"ifindex": 3, "ifname": "net1", "flags": ["BROADCAST", "UP"], "mtu": 1500, "link_type": "ether",
     "address": "aa:bb:cc:00:00:01",
     "addr_info": [{"family": "inet6", "local": "fd00::5", "prefixlen": 64, "scope": "global"}]},
    {"ifindex": 4, "ifname": "tap0_fractal", "flags": ["UP"], "mtu": 1450, "link_type": "ether",
     "address": "7e:d3:7d:90:de:56", "addr_info": [{"family": "inet", "local": "1.2.3.4", "prefixlen": 32}]},
])

ROUTE_JSON = json.dumps([
    {"dst": "default", "gateway": "10.244.1.1", "dev": "eth0", "flags": []},
    {"dst": "10.244.0.0/16", "gateway": "10.244.1.1", "dev": "eth0", "flags": []},
    {"dst": "10.244.1.0/24", "dev": "eth0", "protocol": "kernel", "scope": "link", "prefsrc": "10.244.1.7",
     "flags": []},
    {"dst": "169.254.1.1", "dev": "eth0", "scope": "link", "flags": []},
    {"type": "unreachable", "dst": "192.168.0.0/16", "flags": []},
    {"dst": "172.16.0.0/12", "flags": [], "nexthops": [{"gateway": "10.244.1.1", "dev": "eth0"}]},
])


def test_parse_links_keeps_ipv4_interfaces_only() -> None:
    ifaces = net.parse_links(ADDR_JSON)
    assert ifaces == [Interface("eth0", "0a:58:0a:f4:01:07", 1450, ("10.244.1.7/24",))]


def test_parse_links_of_an_empty_or_host_network_namespace() -> None:
    assert net.parse_links("[]") == []
    assert net.parse_links("") == []


def test_parse_routes_drops_kernel_unreachable_and_multipath() -> None:
    routes = net.parse_routes(ROUTE_JSON)
    assert routes == {"eth0": [Route("default", "10.244.1.1"), Route("10.244.0.0/16", "10.244.1.1"),
                               Route("169.254.1.1/32", None)]}


def test_guest_arg_orders_addresses_on_link_routes_gateway_routes_then_default() -> None:
    iface = net.with_routes(net.parse_links(ADDR_JSON), net.parse_routes(ROUTE_JSON))[0]
    assert net.guest_arg(iface) == ("fractal.net=eth0,0a:58:0a:f4:01:07,1450,10.244.1.7/24,"
                                    "r=169.254.1.1/32,r=10.244.0.0/16@10.244.1.1,gw=10.244.1.1")
    # no spaces: the init splits the kernel command line on whitespace
    assert " " not in net.guest_arg(iface)


def test_guest_arg_without_routes_and_with_several_addresses() -> None:
    iface = Interface("eth1", "02:00:00:00:00:01", 9000, ("10.0.0.2/24", "10.0.1.2/24"))
    assert net.guest_arg(iface) == "fractal.net=eth1,02:00:00:00:00:01,9000,10.0.0.2/24,10.0.1.2/24"


@pytest.mark.parametrize("bad", [
    Interface("eth 0", "02:00:00:00:00:01", 1500, ("10.0.0.2/24",)),
    Interface("a-very-long-ifname", "02:00:00:00:00:01", 1500, ("10.0.0.2/24",)),
    Interface("eth0", "02:00:00:00:00", 1500, ("10.0.0.2/24",)),
    Interface("eth0", "01:00:5e:00:00:01", 1500, ("10.0.0.2/24",)),  # multicast
    Interface("eth0", "02:00:00:00:00:01", 40, ("10.0.0.2/24",)),
    Interface("eth0", "02:00:00:00:00:01", 1500, ("10.0.0.2/33",)),
    Interface("eth0", "02:00:00:00:00:01", 1500, ("10.0.0.2/24,gw=1.2.3.4",)),
    Interface("eth0", "02:00:00:00:00:01", 1500, ("10.0.0.2/24",), (Route("default", "x"),)),
])
def test_invalid_interfaces_are_refused(bad: Interface) -> None:
    with pytest.raises(net.NetError):
        net.guest_arg(bad)


def test_too_much_for_the_kernel_command_line() -> None:
    routes = tuple(Route(f"10.{i}.0.0/16", "10.244.1.1") for i in range(60))
    iface = Interface("eth0", "02:00:00:00:00:01", 1500, ("10.244.1.7/24",), routes)
    with pytest.raises(net.NetError, match="command line"):
        net.guest_cmdline([iface])


def test_tc_plan_redirects_both_ways_and_teardown_undoes_it() -> None:
    plan = net.plan_tc("eth0", "tap0_fractal")
    assert plan == [
        ["qdisc", "add", "dev", "eth0", "ingress"],
        ["filter", "add", "dev", "eth0", "parent", "ffff:", "protocol", "all", "u32", "match", "u8", "0", "0",
         "action", "mirred", "egress", "redirect", "dev", "tap0_fractal"],
        ["qdisc", "add", "dev", "tap0_fractal", "ingress"],
        ["filter", "add", "dev", "tap0_fractal", "parent", "ffff:", "protocol", "all", "u32", "match", "u8", "0",
         "0", "action", "mirred", "egress", "redirect", "dev", "eth0"],
    ]
    assert net.plan_teardown("eth0", "tap0_fractal") == [["tc", "qdisc", "del", "dev", "eth0", "ingress"],
                                                         ["ip", "link", "del", "dev", "tap0_fractal"]]
    # an ingress qdisc we did not add is left alone
    assert net.plan_teardown("eth0", "tap0_fractal", owns_qdisc=False) == [["ip", "link", "del", "dev",
                                                                            "tap0_fractal"]]
    assert net.tap_name(1) == "tap1_fractal" and len(net.tap_name(99)) <= 15


def _cfg(**kw) -> qemu.VMConfig:
    return qemu.VMConfig(kernel="/k", initramfs="/i", console_log="/c", **kw)


def test_nics_on_q35_are_virtio_net_pci_on_the_tap_fd() -> None:
    argv = qemu.command(_cfg(nics=[qemu.Nic(fd=7, mac="0A:58:0A:F4:01:07", mtu=1450)]))
    i = argv.index("-netdev")
    assert argv[i + 1] == "tap,id=net0,fd=7,vhost=off"
    assert argv[i + 2:i + 4] == ["-device",
                                 "virtio-net-pci,netdev=net0,mac=0a:58:0a:f4:01:07,host_mtu=1450,romfile="]


def test_nics_on_microvm_are_virtio_net_device() -> None:
    argv = qemu.command(_cfg(machine="microvm", nics=[qemu.Nic(3, "02:00:00:00:00:01"), qemu.Nic(4, "02:00:00:00:00:02")]))
    devs = [argv[i + 1] for i, a in enumerate(argv) if a == "-device" and "netdev=" in argv[i + 1]]
    assert devs == ["virtio-net-device,netdev=net0,mac=02:00:00:00:00:01,host_mtu=1500",
                    "virtio-net-device,netdev=net1,mac=02:00:00:00:00:02,host_mtu=1500"]


def test_no_nics_no_netdev_and_bad_nics_are_refused() -> None:
    assert "-netdev" not in qemu.command(_cfg())
    for bad in (qemu.Nic(3, "02:00:00:00:00"), qemu.Nic(3, "02:00:00:00:00:01", mtu=10), qemu.Nic(-1, "02:00:00:00:00:01")):
        with pytest.raises(qemu.ConfigError):
            qemu.command(_cfg(nics=[bad]))


def test_guest_cmdline_reaches_the_kernel_command_line() -> None:
    iface = Interface("eth0", "02:00:00:00:00:01", 1500, ("10.0.0.2/24",), (Route("default", "10.0.0.1"),))
    argv = qemu.command(_cfg(cmdline_extra=net.guest_cmdline([iface])))
    append = argv[argv.index("-append") + 1]
    assert append.endswith("fractal.net=eth0,02:00:00:00:00:01,1500,10.0.0.2/24,gw=10.0.0.1")
