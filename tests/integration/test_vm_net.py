"""A network namespace connected to the VM (ccpu.vm.net), with real netns, veth, tap, tc and QEMU.

Each test builds what CNI would: a netns with ``eth0`` (one end of a veth pair; 10.213.N.2/24, MTU
1400, default route via .1) and the host end at 10.213.N.1/24.  One VM boot checks both directions:
the guest connects to a TCP server on the host's 10.213.N.1, and the host connects to a server in
the guest on the pod IP 10.213.N.2.  The other tests need no VM (attach/detach and its refusals).
Cleanup always: netns and veth deleted, no QEMU left.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ccpu.vm import net  # noqa: E402

ON_CI = os.environ.get("CI", "").lower() not in ("", "0", "false")


def _missing() -> list[str]:
    missing = []
    if os.geteuid() != 0:
        missing.append("root (netns, veth, tap)")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            missing.append(f"`{tool}` (iproute2)")
    if not os.path.exists("/dev/net/tun"):
        missing.append("/dev/net/tun")
    return missing


@pytest.fixture(scope="module", autouse=True)
def _prerequisites() -> None:
    missing = _missing()
    if missing:
        reason = "VM networking tests need " + ", ".join(missing)
        if ON_CI:
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and res.returncode != 0:
        raise AssertionError(f"ip {' '.join(args)}: {res.stderr}")
    return res


@dataclass
class Pod:
    name: str  # netns name
    path: str  # /var/run/netns/<name>
    host_if: str
    host_ip: str
    pod_ip: str
    mtu: int


def _free_subnet() -> int:
    used = ip("-4", "addr").stdout + ip("-4", "route", "show", "table", "all").stdout
    for _ in range(50):
        n = 100 + secrets.randbelow(150)
        if f"10.213.{n}." not in used:
            return n
    raise AssertionError("no free 10.213.N.0/24 on this host")


@pytest.fixture
def pod() -> Iterator[Pod]:
    tag = secrets.token_hex(3)
    n = _free_subnet()
    p = Pod(f"fractal-t-{tag}", f"/var/run/netns/fractal-t-{tag}", f"vft{tag}", f"10.213.{n}.1", f"10.213.{n}.2",
            1400)
    ip("netns", "add", p.name)
    try:
        ip("link", "add", p.host_if, "mtu", str(p.mtu), "type", "veth", "peer", "name", "eth0", "mtu", str(p.mtu),
           "netns", p.name)
        ip("addr", "add", f"{p.host_ip}/24", "dev", p.host_if)
        ip("link", "set", p.host_if, "up")
        ip("-n", p.name, "addr", "add", f"{p.pod_ip}/24", "dev", "eth0")
        ip("-n", p.name, "link", "set", "eth0", "up")
        ip("-n", p.name, "route", "add", "default", "via", p.host_ip)
        yield p
    finally:
        ip("netns", "del", p.name, check=False)
        ip("link", "del", p.host_if, check=False)  # gone with the netns's end, normally
        deadline = time.monotonic() + 5  # the kernel destroys a netns asynchronously
        while ip("link", "show", p.host_if, check=False).returncode == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert ip("link", "show", p.host_if, check=False).returncode != 0, "veth outlived the test"
    assert p.name not in ip("netns", "list").stdout


def netns_state(p: Pod) -> tuple[str, str, str]:
    """(links, eth0's qdiscs, eth0's IPv4) of the pod netns: what attach adds and detach removes."""
    return (ip("-n", p.name, "-o", "link").stdout, subprocess.run(
        ["tc", "-n", p.name, "qdisc", "show", "dev", "eth0"], capture_output=True, text=True).stdout,
            ip("-n", p.name, "-4", "-o", "addr", "show", "dev", "eth0").stdout)


def qemu_with(needle: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmd.startswith("qemu-system") and needle in cmd:
            found.append(f"{pid}: {cmd[:160]}")
    return found


GUEST_SCRIPT = r"""
import socket, sys
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", 8099))
srv.listen(1)
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
print("guest got:", c.recv(100).decode().strip(), flush=True)
c.sendall(b"hello-from-guest\n")
c.close()
srv.settimeout(30)
conn, peer = srv.accept()
conn.sendall(b"served-by-guest\n")
print("guest accepted from", peer[0], flush=True)
conn.close()
"""


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None and not ON_CI, reason="needs qemu-system-x86_64")
def test_guest_is_the_pod_both_ways(pod: Pod, tmp_path: Path) -> None:
    before = netns_state(pod)
    # host side: a server on the veth's host end; once the guest has talked to it, connect back to the
    # pod IP (where the guest now listens) -- one VM boot for both directions
    srv = socket.create_server((pod.host_ip, 0))
    srv.settimeout(90)
    port = srv.getsockname()[1]
    got: dict[str, object] = {}

    def host() -> None:
        try:
            conn, peer = srv.accept()
            with conn:
                got["peer"] = peer[0]
                conn.sendall(b"hello-from-host\n")
                got["from_guest"] = conn.makefile().readline().strip()
            deadline = time.monotonic() + 30
            while True:
                try:
                    with socket.create_connection((pod.pod_ip, 8099), timeout=5) as c:
                        got["served"] = c.makefile().readline().strip()
                        return
                except OSError as exc:
                    if time.monotonic() > deadline:
                        got["error"] = f"connect to {pod.pod_ip}:8099: {exc}"
                        return
                    time.sleep(0.2)
        except OSError as exc:
            got["error"] = repr(exc)

    t = threading.Thread(target=host, daemon=True)
    t.start()
    (tmp_path / "guest.py").write_text(GUEST_SCRIPT)
    script = (f"cat /sys/class/net/eth0/address /sys/class/net/eth0/mtu; ip -4 -o addr show dev eth0; ip route; "
              f"ping -c 1 -W 10 {pod.host_ip} >/dev/null && echo ping-ok; "
              f"python3.11 -S -I /work/guest.py {pod.host_ip} {port}")
    t0 = time.monotonic()
    try:
        res = subprocess.run([sys.executable, "-m", "ccpu.cli", "vm", "run", "--share-type", "9p",
                              "--share", str(tmp_path), "--netns", pod.path, "--", "sh", "-c", script],
                             cwd=REPO, capture_output=True, text=True, timeout=180,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    finally:
        srv.close()
        t.join(timeout=10)
    wall = time.monotonic() - t0
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr}\n{got}"
    lines = res.stdout.splitlines()
    pod_mac = json.loads(ip("-n", pod.name, "-j", "link", "show", "eth0").stdout)[0]["address"]
    assert lines[0] == pod_mac, "the guest NIC must carry the pod eth0's MAC"
    assert lines[1] == str(pod.mtu)
    assert f"inet {pod.pod_ip}/24" in lines[2]
    assert f"default via {pod.host_ip} dev eth0" in res.stdout
    assert "ping-ok" in lines
    assert "guest got: hello-from-host" in lines
    assert got.get("from_guest") == "hello-from-guest" and got.get("peer") == pod.pod_ip, got
    assert got.get("served") == "served-by-guest", got
    assert f"guest accepted from {pod.host_ip}" in lines
    print(f"boot + both directions: {wall:.1f}s")
    # detached: the netns is as CNI left it (no tap, no qdisc on eth0, the pod IP still on eth0)
    assert netns_state(pod) == before
    assert qemu_with(pod.path) == []


def test_attach_detach_leaves_the_netns_as_it_was(pod: Pod) -> None:
    before = netns_state(pod)
    att = net.attach(pod.path)
    try:
        assert [i.name for i in att.interfaces] == ["eth0"]
        eth0 = att.interfaces[0]
        assert eth0.addrs == (f"{pod.pod_ip}/24",) and eth0.mtu == pod.mtu
        assert eth0.routes == (net.Route("default", pod.host_ip),)
        assert att.cmdline == [f"fractal.net=eth0,{eth0.mac},{pod.mtu},{pod.pod_ip}/24,gw={pod.host_ip}"]
        assert len(att.fds) == 1 and [n.mac for n in att.nics] == [eth0.mac]
        links, qdiscs, _ = netns_state(pod)
        assert "tap0_fractal" in links and "mtu 1400" in links.split("tap0_fractal")[1].splitlines()[0]
        assert "ingress" in qdiscs
        filters = subprocess.run(["tc", "-n", pod.name, "filter", "show", "dev", "eth0", "ingress"],
                                 capture_output=True, text=True).stdout
        assert "Egress Redirect to device tap0_fractal" in filters
        # a second VM cannot take the same netns
        with pytest.raises(net.NetError):
            net.attach(pod.path)
        assert "tap0_fractal" in netns_state(pod)[0]
    finally:
        att.detach()
    assert netns_state(pod) == before
    att.detach()  # idempotent


def test_detach_after_the_pod_is_gone(pod: Pod) -> None:
    att = net.attach(pod.path)
    att.close_fds()
    ip("-n", pod.name, "link", "del", "eth0")  # CNI DEL ...
    ip("netns", "del", pod.name)  # ... and the netns removed: detach must not fail
    att.detach()
    assert att.ns_fd is None and att.fds == []


def test_refusals_leave_nothing_behind(pod: Pod) -> None:
    with pytest.raises(net.NetError, match="own network namespace"):
        net.attach("/proc/self/ns/net")  # the host network: redirecting it would cut the host off
    with pytest.raises(net.NetError):
        net.attach("/var/run/netns/fractal-t-does-not-exist")
    # an ingress qdisc that is not ours: refuse, and leave it (and nothing else) in place
    subprocess.run(["tc", "-n", pod.name, "qdisc", "add", "dev", "eth0", "ingress"], check=True)
    before = netns_state(pod)
    with pytest.raises(net.NetError, match="already has an ingress qdisc"):
        net.attach(pod.path)
    assert netns_state(pod) == before
    # a netns without IPv4 interfaces (a host-network-like pod): nothing to connect, the guest has only lo
    ip("-n", pod.name, "addr", "flush", "dev", "eth0")
    with net.attach(pod.path) as att:
        assert att.links == [] and att.cmdline == [] and att.fds == []


def _ping(addr: str, timeout: float = 10.0) -> bool:
    """One ICMP echo to ``addr`` (a raw socket: the host may have no ping); whether it was answered."""
    import struct

    ident = secrets.randbelow(0xFFFF)
    body = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + b"fractal-nic"
    padded = body + b"\0" * (len(body) % 2)
    csum = sum(struct.unpack(f"!{len(padded) // 2}H", padded))
    csum = (csum >> 16) + (csum & 0xFFFF)
    csum = ~(csum + (csum >> 16)) & 0xFFFF
    packet = body[:2] + struct.pack("!H", csum) + body[4:]
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
        s.sendto(packet, (addr, 0))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            s.settimeout(left)
            try:
                data, peer = s.recvfrom(2048)
            except TimeoutError:
                return False
            icmp = data[(data[0] & 0x0F) * 4:]
            if peer[0] == addr and icmp[0] == 0 and struct.unpack("!H", icmp[4:6])[0] == ident:
                return True
    return False


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None and not ON_CI, reason="needs qemu-system-x86_64")
def test_nic_added_after_boot_then_removed(pod: Pod, tmp_path: Path) -> None:
    """A VM booted without a network gets the pod's NIC live (QMP getfd + netdev_add + device_add,
    then the agent's ``nic`` op): the host reaches the pod IP, which the guest now answers; the
    agent refuses bad values; unplugging leaves the netns as CNI made it (no tap, no qdisc)."""
    import asyncio

    from ccpu import errdefs
    from ccpu.agent.client import AgentClient
    from ccpu.guest import initramfs
    from ccpu.linux.reaper import Reaper
    from ccpu.vm import machine

    before = netns_state(pod)
    guest = initramfs.build(offline=True)

    async def scenario() -> dict[str, object]:
        reaper = Reaper()
        reaper.start(asyncio.get_running_loop(), subreaper=False)
        spec = machine.MachineSpec(
            kernel=str(guest.kernel), initramfs=str(guest.initramfs), workdir=str(tmp_path),
            system_image=str(guest.image) if guest.image else None,
            console=machine.ConsoleFile(str(tmp_path / "console.log")), mode="agent", accel="tcg",
            ports=("fractal.agent",), hotplug_nics=2)
        m = machine.AsyncMachine(spec, reaper)
        seen: dict[str, object] = {}
        try:
            await m.boot()
            sock = m.ports.pop("fractal.agent")
            sock.setblocking(False)
            client = await AgentClient.connect_socket(sock)
            hello = await asyncio.wait_for(client.hello(), 120)
            assert "nic" in hello["features"], hello
            seen["ping_before"] = await asyncio.to_thread(_ping, pod.pod_ip)  # the netns's own stack
            ifaces = await m.attach_nic(pod.path)
            assert [i.name for i in ifaces] == ["eth0"]
            seen["attached"] = netns_state(pod)
            # redirected into the guest, whose NIC is not configured yet: nobody answers
            seen["ping_unconfigured"] = await asyncio.to_thread(_ping, pod.pod_ip, 3.0)
            bad = dict(net.agent_args(ifaces[0]), routes=[{"dst": "default", "gateway": "not-an-ip"}])
            with pytest.raises(errdefs.InvalidArgument):
                await client.call("nic", bad)
            result = await client.call("nic", net.agent_args(ifaces[0]))
            seen["result"] = result
            seen["ping"] = await asyncio.to_thread(_ping, pod.pod_ip)
            await m.detach_nic(pod.path)
            seen["detached"] = netns_state(pod)
            seen["ping_after"] = await asyncio.to_thread(_ping, pod.pod_ip)
            with pytest.raises(machine.MachineError, match="not connected"):
                await m.detach_nic(pod.path)
            await client.close()
        finally:
            await m.stop()
            reaper.stop()
        return seen

    seen = asyncio.run(scenario())
    assert seen["ping_before"] is True
    assert "tap0_fractal" in str(seen["attached"][0])
    assert seen["ping_unconfigured"] is False, "the pod's frames must go to the guest once attached"
    assert seen["result"] == {"name": "eth0", "device": seen["result"]["device"]}
    assert seen["ping"] is True, "the host must reach the pod IP through the NIC added after boot"
    assert seen["detached"] == before, "unplugging must leave the netns as it was"
    assert seen["ping_after"] is True  # the netns's own stack again
    assert netns_state(pod) == before
    assert qemu_with(str(tmp_path)) == []
