"""nerdctl (built by hack/peers.sh) against the private containerd, with ``--snapshotter fractal``
and ``--runtime io.containerd.fractal.v1``: pull, run --rm, run -d + exec + stop + rm, logs, VM mode.

Runs on whichever containerd the session uses (1.6 by default; FRACTAL_CONTAINERD_VERSION=2 for
2.x).  Everything nerdctl keeps goes under the env's root dir: ``--data-root``, ``--cni-path``,
``--cni-netconfpath``, ``--hosts-dir``, and NERDCTL_TOML points at a file there (never the host's
/var/lib/nerdctl, /etc/cni, /etc/nerdctl).  Containers use ``--network none``: the default bridge
network needs CNI plugins and would touch the host's iptables; the CNI test brings a bridge
network of its own (bridge + host-local plugins only, no iptables).

Without the nerdctl build this module skips -- except under CI, where hack/setup.sh (step 6) is
supposed to have built it.  Known gaps of the shim are xfail with the precise reason
(docs/compat.md).  VM mode runs with nerdctl's /etc/hosts, /etc/resolv.conf and /etc/hostname
copied into the guest and its OCI hooks run on the host (shim/guestspec.py, shim/hooks.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hack.containerd_env import FractalEnv, peer_bin_dir, peer_missing, run_cmd
from shim import procs

ON_CI = os.environ.get("CI", "").lower() not in ("", "0", "false")
RUNTIME = "io.containerd.fractal.v1"


class Nerdctl:
    """``nerdctl --address <private containerd> --namespace NS --snapshotter fractal ...``."""

    def __init__(self, env: FractalEnv, namespace: str) -> None:
        self.binary = str(peer_bin_dir("nerdctl") / "nerdctl")
        self.home = env.root_dir / "nerdctl"
        for d in ("data", "cni", "net.d", "certs.d"):
            (self.home / d).mkdir(parents=True, exist_ok=True)
        self.base = [self.binary, "--address", str(env.address), "--namespace", namespace,
                     "--snapshotter", "fractal",
                     "--data-root", str(self.home / "data"), "--cni-path", str(self.home / "cni"),
                     "--cni-netconfpath", str(self.home / "net.d"),
                     "--hosts-dir", str(self.home / "certs.d"),
                     "--insecure-registry"]  # the local registry is plain HTTP
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("CONTAINERD_ADDRESS", "CONTAINERD_NAMESPACE", "CONTAINERD_SNAPSHOTTER")}
        self.env["NERDCTL_TOML"] = str(self.home / "nerdctl.toml")  # absent: defaults, not /etc/nerdctl

    def __call__(self, *args: str, check: bool = True, timeout: float = 120.0
                 ) -> subprocess.CompletedProcess[str]:
        return run_cmd([*self.base, *args], check=check, timeout=timeout, env=self.env)

    def run(self, image: str, *cmd: str, extra: tuple[str, ...] = (), **kw) -> subprocess.CompletedProcess[str]:  # noqa: ANN003
        return self("run", "--network", "none", "--runtime", RUNTIME, *extra, image, *cmd, **kw)


@pytest.fixture(scope="module")
def nerdctl_built() -> None:
    why = peer_missing("nerdctl")
    if why:
        if ON_CI:
            pytest.fail(f"nerdctl should have been built by hack/setup.sh: {why}", pytrace=False)
        pytest.skip(why)


@pytest.fixture
def nerd(nerdctl_built: None, fenv: FractalEnv, namespace: str) -> Nerdctl:
    return Nerdctl(fenv, namespace)


@pytest.fixture
def busybox(nerd: Nerdctl, registry) -> str:  # noqa: ANN001
    ref = registry.ref("busybox")
    nerd("pull", ref)
    return ref


def test_pull_unpacks_into_fractal(nerd: Nerdctl, busybox: str, fenv: FractalEnv, namespace: str) -> None:
    images = nerd("images").stdout
    assert "fractal/busybox" in images, images
    snaps = fenv.ctr("snapshots", "--snapshotter", "fractal", "ls", namespace=namespace).stdout
    assert "Committed" in snaps, snaps


def test_run_rm_host_mode(nerd: Nerdctl, busybox: str, fenv: FractalEnv, namespace: str) -> None:
    r = nerd.run(busybox, "sh", "-c", "echo hello-nerdctl; cat /proc/1/cmdline | tr '\\0' ' '",
                 extra=("--rm", "--annotation", "io.fractal.mode=host"))
    assert "hello-nerdctl" in r.stdout, r.stdout + r.stderr
    assert fenv.ctr("containers", "ls", "-q", namespace=namespace).stdout.strip() == ""
    r = nerd.run(busybox, "sh", "-c", "exit 7", extra=("--rm",), check=False)
    assert r.returncode == 7, (r.returncode, r.stderr)


def test_detached_exec_stop_rm_host_mode(nerd: Nerdctl, busybox: str, fenv: FractalEnv,
                                         namespace: str) -> None:
    """``-d`` with ``--log-driver none``: the default json-file driver needs binary:// logging
    (see test_logs_json_file)."""
    nerd.run(busybox, "sleep", "300", extra=("-d", "--name", "sleeper", "--log-driver", "none"))
    try:
        ps = nerd("ps").stdout
        assert "sleeper" in ps and "Up" in ps, ps
        info = fenv.ctr("containers", "ls", namespace=namespace).stdout
        assert RUNTIME in info, info
        r = nerd("exec", "sleeper", "sh", "-c", "echo from-exec; exit 3", check=False)
        # nerdctl 2.2 exits 1 and names the process's code: "exec failed with exit code 3"
        assert r.returncode != 0 and "exit code 3" in r.stderr and "from-exec" in r.stdout, \
            (r.returncode, r.stdout, r.stderr)
        assert nerd("exec", "sleeper", "cat", "/proc/1/cmdline").stdout.startswith("sleep")
        nerd("stop", "-t", "1", "sleeper")
        ps = nerd("ps", "-a").stdout
        assert "Exited" in ps, ps
    finally:
        nerd("rm", "-f", "sleeper", check=False)
    assert "sleeper" not in nerd("ps", "-a").stdout
    assert fenv.ctr("containers", "ls", "-q", namespace=namespace).stdout.strip() == ""


def test_logs_json_file(nerd: Nerdctl, busybox: str) -> None:
    """nerdctl run -d logs through its own program (a binary:// log URI the shim starts)."""
    try:
        nerd.run(busybox, "sh", "-c", "echo to-the-log; echo err-line >&2; sleep 300", extra=("-d", "--name", "logger"))
        for _ in range(50):
            out = nerd("logs", "logger").stdout
            if "to-the-log" in out:
                break
            time.sleep(0.1)
        assert "to-the-log" in out
    finally:
        nerd("rm", "-f", "logger", check=False)


def test_run_rm_vm_mode(nerd: Nerdctl, busybox: str) -> None:
    r = nerd.run(busybox, "sh", "-c", "echo hello-from-vm; uname -r; cat /etc/hostname",
                 extra=("--rm", "--annotation", "io.fractal.mode=vm", "--hostname", "vmhost"), timeout=300)
    lines = r.stdout.split()
    assert lines[0] == "hello-from-vm", r.stdout + r.stderr
    assert lines[1] != os.uname().release, "ran on the host kernel, not in the VM"  # the guest's kernel
    assert lines[2] == "vmhost"  # nerdctl's /etc/hostname, a host file copied into the guest


def test_detached_exec_logs_stop_rm_vm_mode(nerd: Nerdctl, busybox: str, fenv: FractalEnv,
                                            namespace: str) -> None:
    """The whole nerdctl lifecycle in VM mode: nerdctl's bind-mounted /etc/hosts etc. are copied
    into the guest, its OCI hooks (name/state bookkeeping) run on the host, logs flow out."""
    nerd.run(busybox, "sh", "-c", "echo vm-log-line; exec sleep 300",
             extra=("-d", "--name", "vmsleeper", "--annotation", "io.fractal.mode=vm",
                    "--add-host", "fractal-test-peer:10.9.8.7"), timeout=300)
    try:
        ps = nerd("ps").stdout
        assert "vmsleeper" in ps and "Up" in ps, ps
        hosts = nerd("exec", "vmsleeper", "cat", "/etc/hosts").stdout
        assert "10.9.8.7" in hosts and "fractal-test-peer" in hosts, hosts
        assert nerd("exec", "vmsleeper", "uname", "-r").stdout.strip() != os.uname().release
        for _ in range(100):
            out = nerd("logs", "vmsleeper").stdout
            if "vm-log-line" in out:
                break
            time.sleep(0.1)
        assert "vm-log-line" in out
        # nerdctl's createRuntime hook ran (on the host): it records StartedAt in its state
        inspect = nerd("inspect", "vmsleeper").stdout
        assert '"StartedAt": "0001-01-01' not in inspect and "StartedAt" in inspect, inspect
        nerd("stop", "-t", "1", "vmsleeper", timeout=120)
        assert "Exited" in nerd("ps", "-a").stdout
    finally:
        nerd("rm", "-f", "vmsleeper", check=False, timeout=120)
    assert "vmsleeper" not in nerd("ps", "-a").stdout
    assert fenv.ctr("containers", "ls", "-q", namespace=namespace).stdout.strip() == ""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run_cmd(["ip", *args], check=check, timeout=30)


@pytest.fixture
def cni_bridge(nerd: Nerdctl) -> Iterator[tuple[str, str, str]]:
    """A CNI bridge network of this test's own in nerdctl's net.d: (name, bridge, gateway).

    bridge + host-local only (no portmap/firewall plugins: the host's iptables stay untouched),
    IPAM state under the env's dir; the bridge and its subnet are this test's (10.216.N.0/24,
    unused on the host) and removed after.  The bridge plugin turns on IPv4 forwarding for a
    gateway: the value is put back."""
    import secrets

    if not Path("/usr/lib/cni/bridge").exists():
        pytest.fail("containernetworking-plugins (hack/setup.sh) is missing: /usr/lib/cni/bridge")
    tag = secrets.token_hex(3)
    used = _ip("-4", "addr").stdout + _ip("-4", "route", "show", "table", "all").stdout
    n = next((n for n in range(100, 250) if f"10.216.{n}." not in used), None)
    assert n is not None, "no free 10.216.N.0/24 on this host"
    name, bridge, gateway = f"fractal-t-{tag}", f"fnb{tag}", f"10.216.{n}.1"
    conf = {"cniVersion": "1.0.0", "name": name, "plugins": [
        {"type": "bridge", "bridge": bridge, "isGateway": True, "ipMasq": False, "hairpinMode": False,
         "ipam": {"type": "host-local", "ranges": [[{"subnet": f"10.216.{n}.0/24", "gateway": gateway}]],
                  "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(nerd.home / "ipam")}}]}
    path = nerd.home / "net.d" / f"{name}.conflist"
    path.write_text(json.dumps(conf))
    forward = Path("/proc/sys/net/ipv4/ip_forward").read_text()
    try:
        yield name, bridge, gateway
    finally:
        path.unlink()
        _ip("link", "del", bridge, check=False)
        Path("/proc/sys/net/ipv4/ip_forward").write_text(forward)


@pytest.mark.parametrize("pooled", [False, True], ids=["booted", "pooled"])
def test_cni_network_in_vm_mode(nerd: Nerdctl, busybox: str, cni_bridge: tuple[str, str, str],
                                fenv: FractalEnv, namespace: str, pooled: bool) -> None:
    """``nerdctl run --network <CNI bridge>`` in VM mode: nerdctl's createRuntime hook sets the
    network up in a netns the shim made (annotation nerdctl/network-namespace), and the shim
    plugs a NIC mirroring its interface into the running guest (QMP + the agent's ``nic`` op).
    The container reaches the bridge's gateway; the host reaches a server in the container on
    its IP; removing the container leaves no veth on the bridge and no tap anywhere.
    ``pooled``: the VM is one the pool had ready (adopted with the pool's QMP channel)."""
    from tests.integration.test_vm_pool import PoolProc, alive

    name, bridge, gateway = cni_bridge
    pool_proc = PoolProc(fenv) if pooled else None
    try:
        ready = pool_proc.ready()[0] if pool_proc is not None else None
        _cni_network_in_vm(nerd, busybox, fenv, namespace, name, bridge, gateway, ready)
    finally:
        if pool_proc is not None:
            pool_proc.stop()
    if ready is not None:  # the shim ends the adopted VM once `rm` has deleted its last task
        deadline = time.monotonic() + 60  # a deadline for the state, never a speed assertion
        while alive(ready["qemu_pid"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(ready["qemu_pid"]), "the adopted QEMU outlived the container"


def _cni_network_in_vm(nerd: Nerdctl, busybox: str, fenv: FractalEnv, namespace: str, name: str, bridge: str,
                       gateway: str, ready: dict | None) -> None:
    import urllib.request

    base = list(nerd.base)
    base[base.index("--cni-path") + 1] = "/usr/lib/cni"  # nerdctl checks the plugins exist
    script = (f"ip -4 -o addr show dev eth0; ping -c 1 -W 10 {gateway} >/dev/null && echo gateway-ok; "
              "mkdir -p /tmp/www && echo served-from-the-vm >/tmp/www/index.html && "
              "echo serving && exec httpd -f -p 8080 -h /tmp/www")
    run_cmd([*base, "run", "-d", "--name", "vmnet", "--runtime", RUNTIME, "--network", name,
             "--annotation", "io.fractal.mode=vm", busybox, "sh", "-c", script], timeout=300, env=nerd.env)
    try:
        out = ""
        for _ in range(300):
            out = nerd("logs", "vmnet").stdout
            if "serving" in out:
                break
            time.sleep(0.1)
        assert "gateway-ok" in out, out
        ip = out.split("inet ", 1)[1].split("/", 1)[0]
        assert ip.startswith(gateway.rsplit(".", 1)[0] + "."), out
        # the guest's NIC is the CNI interface, seen from the host side of the bridge
        assert _ip("-o", "link", "show", "master", bridge).stdout.count("\n") == 1
        body = ""
        for _ in range(100):  # httpd starts right after "serving"
            try:
                with urllib.request.urlopen(f"http://{ip}:8080/", timeout=10) as r:
                    body = r.read().decode()
                break
            except OSError:
                time.sleep(0.1)
        assert body.strip() == "served-from-the-vm"
        if ready is not None:  # the pooled QEMU took the NIC: adopted, not booted
            from tests.integration.test_shim_vm import fractal_ps

            vms = [e["vm"] for e in fractal_ps(fenv, namespace) if e["vm"]]
            assert [v["pid"] for v in vms] == [ready["qemu_pid"]], (vms, ready)
            assert vms[0]["pooled"]["id"] == ready["id"] and len(vms[0]["nics"]) == 1
    finally:
        nerd("rm", "-f", "vmnet", check=False, timeout=120)
    assert _ip("-o", "link", "show", "master", bridge, check=False).stdout.strip() == ""
    assert "_fractal" not in _ip("-o", "link").stdout
    assert fenv.ctr("containers", "ls", "-q", namespace=namespace).stdout.strip() == ""


@pytest.mark.parametrize("pooled", [False, True], ids=["booted", "pooled"])
def test_cni_network_in_vm_mode_survives_a_killed_shim(nerd: Nerdctl, busybox: str,
                                                       cni_bridge: tuple[str, str, str],
                                                       fenv: FractalEnv, namespace: str, pooled: bool) -> None:
    """SIGKILL of the shim of a VM container on a CNI network: QEMU dies with it, and the netns
    the shim held only by an fd goes too, with CNI's veth -- nothing is left on the bridge and no
    tap anywhere, before any cleanup ran; ``rm -f`` then succeeds.  ``pooled``: the VM is one the
    pool had ready (its QEMU is not the shim's child, the tap fd went to it over the handed-over
    QMP channel): containerd's cleanup of the dead shim (the ``delete`` verb) ends that QEMU, and
    with it the tap, before any ``rm``.  The tap is looked for in the very netns the shim made
    (held open by the test meanwhile), so "no tap" cannot pass because the netns vanished."""
    import signal

    from tests.integration.test_shim_vm import fractal_ps
    from tests.integration.test_vm_pool import PoolProc, alive

    name, bridge, _gateway = cni_bridge
    base = list(nerd.base)
    base[base.index("--cni-path") + 1] = "/usr/lib/cni"
    pool_proc = PoolProc(fenv) if pooled else None
    held = -1
    try:
        ready = pool_proc.ready()[0] if pool_proc is not None else None
        run_cmd([*base, "run", "-d", "--name", "vmkill", "--runtime", RUNTIME, "--network", name,
                 "--annotation", "io.fractal.mode=vm", busybox, "sleep", "300"], timeout=300, env=nerd.env)
        assert _ip("-o", "link", "show", "master", bridge).stdout.count("\n") == 1
        (vm,) = [e["vm"] for e in fractal_ps(fenv, namespace) if e["vm"]]
        if ready is not None:  # the pooled QEMU took the NIC: adopted, not booted
            assert vm["pid"] == ready["qemu_pid"] and vm["pooled"]["id"] == ready["id"], (vm, ready)
        (netns,) = vm["nics"]  # the netns the shim made, by its fd
        held = os.open(netns, os.O_RDONLY)  # kept by us: a tap left in it stays visible
        ns_path = f"/proc/{os.getpid()}/fd/{held}"
        assert _taps_in(ns_path), "no tap in the container's netns"
        shims = procs.daemon_pids(str(fenv.address))  # the one rule (shim/procs.py): forked daemons too
        assert shims, "the container's shim must be running"
        for pid in shims:
            os.kill(pid, signal.SIGKILL)
        for _ in range(600):  # a deadline for the state, never a speed assertion
            if not alive(vm["pid"]):
                break
            time.sleep(0.1)
        assert not alive(vm["pid"]), f"QEMU {vm['pid']} outlived its killed shim"
        for _ in range(600):  # the last fd's close unregisters the tap, a moment after QEMU's exit
            if not _taps_in(ns_path):
                break
            time.sleep(0.1)
        assert _taps_in(ns_path) == []  # its tap ended with the QEMU holding it
        os.close(held)
        held = -1
        for _ in range(300):  # the kernel destroys a netns (and its veth) asynchronously
            if _ip("-o", "link", "show", "master", bridge, check=False).stdout.strip() == "":
                break
            time.sleep(0.1)
        assert _ip("-o", "link", "show", "master", bridge, check=False).stdout.strip() == ""
        assert "_fractal" not in _ip("-o", "link").stdout
    finally:
        if held >= 0:
            os.close(held)
        nerd("rm", "-f", "vmkill", check=False, timeout=120)
        if pool_proc is not None:
            pool_proc.stop()
    assert "vmkill" not in nerd("ps", "-a").stdout


def _taps_in(netns_path: str) -> list[str]:
    """The VM taps (ccpu.vm.net.tap_name) in a netns."""
    from ccpu.vm.net import TAP_SUFFIX

    r = subprocess.run(["nsenter", f"--net={netns_path}", "ip", "-j", "link", "show"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return [link["ifname"] for link in json.loads(r.stdout) if link.get("ifname", "").endswith(TAP_SUFFIX)]


def test_nerdctl_paths_stay_in_env(nerd: Nerdctl, busybox: str) -> None:
    """Nothing of nerdctl's lands in the host's default dirs."""
    nerd.run(busybox, "true", extra=("--rm",))
    for host_dir in ("/var/lib/nerdctl", "/etc/cni/net.d/nerdctl-bridge.conflist", "/run/nerdctl"):
        assert not Path(host_dir).exists(), host_dir
    assert any((nerd.home / "data").iterdir())
