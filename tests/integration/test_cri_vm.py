"""Kubernetes RuntimeClass in VM mode through crictl: a pod on handler ``fractal`` with
``io.fractal.mode=vm`` is ONE QEMU guest; its containers run inside it; the pod's /dev/shm,
ipc and uts namespaces are shared in the guest; exec, logs, stop, rm; ``rmp`` -> VM gone.
With CNI, the pod's network namespace is connected to the VM (tap + tc redirect, ccpu/vm/net.py):
the host reaches a server in the VM at the pod IP, and the guest reaches the host's bridge.

Uses test_cri's module env (one private containerd per version, CRI on, bridge CNI).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from hack.containerd_env import FractalEnv, http_get
from tests.cri_pods import Crictl, CriPod
from tests.integration.test_cri import (  # noqa: F401  (fixtures are used by name)
    _need, _pids_of_shims, _wait_state, cni_missing, cri_env, pause_image)


def _qemus_of(env: FractalEnv) -> list[int]:
    """QEMU processes started for this env (their run dir is under the env's run dir)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        if cmd and cmd[0].endswith(b"qemu-system-x86_64") and cwd.startswith(str(env.run_dir)):
            out.append(int(entry))
    return out


def _wait_gone(env: FractalEnv) -> None:
    deadline = time.monotonic() + 20
    while (_pids_of_shims(env.address) or _qemus_of(env)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _pids_of_shims(env.address) == [], "the pod's shim is still running after rmp"
    assert _qemus_of(env) == [], "the pod's VM is still running after rmp"


def test_vm_pod_lifecycle(cri_env: FractalEnv, registry, tmp_path: Path) -> None:  # noqa: ANN001
    env = cri_env
    crictl = Crictl(env, tmp_path)
    ref = registry.ref("busybox")
    crictl("pull", ref, timeout=300)
    pod = CriPod(crictl, tmp_path, "vm-pod", host_network=True, mode="vm")
    try:
        qemus = _qemus_of(env)
        assert len(qemus) == 1, f"runp must boot exactly one VM, found {qemus}"
        writer = pod.container("writer", ref, ["sh", "-c", "echo shared-by-pod > /dev/shm/mark; "
                                               "echo hello-from-vm; exec sleep 3600"])
        reader = pod.container("reader", ref, ["sleep", "3600"])
        for cid in pod.cids:
            _wait_state(crictl, cid, "CONTAINER_RUNNING")
        assert _qemus_of(env) == qemus, "both containers must join the pod's VM"
        # inside the guest: its kernel, not the host's
        r = crictl("exec", "-s", reader, "uname", "-r", timeout=120)
        assert r.stdout.strip() and r.stdout.strip() != os.uname().release, r
        # the pod's /dev/shm is one guest dir for all its containers
        r = crictl("exec", "-s", reader, "cat", "/dev/shm/mark", timeout=120)
        assert r.stdout.strip() == "shared-by-pod", r
        # CRI's pod files (hosts, resolv.conf) were copied into the guest
        assert "localhost" in crictl("exec", "-s", reader, "cat", "/etc/hosts", timeout=120).stdout
        # ipc namespace joined by /proc/<pause pid>/ns/ipc: the guest pid the shim reported
        ipc = {crictl("exec", "-s", c, "readlink", "/proc/self/ns/ipc", timeout=120).stdout.strip()
               for c in (writer, reader)}
        assert len(ipc) == 1, ipc
        deadline = time.monotonic() + 30
        while True:
            logs = crictl("logs", writer, check=False)
            if "hello-from-vm" in logs.stdout or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert "hello-from-vm" in logs.stdout, logs
        pod.remove()
        _wait_gone(env)
    finally:
        pod.cleanup()


def test_vm_pod_network(cri_env: FractalEnv, registry, tmp_path: Path) -> None:  # noqa: ANN001
    """The pod IP is the VM's: reachable from the host, and the guest reaches the bridge."""
    _need(cni_missing(), "hack/setup.sh installs containernetworking-plugins")
    env = cri_env
    assert env.cri is not None and env.cri.network == "bridge"
    crictl = Crictl(env, tmp_path)
    ref = registry.ref("busybox")
    crictl("pull", ref, timeout=300)
    pod = CriPod(crictl, tmp_path, "vm-net-pod", host_network=False, mode="vm", hostname="vm-net-pod-host")
    try:
        info = json.loads(crictl("inspectp", "-o", "json", pod.id).stdout)
        ip = info["status"]["network"]["ip"]
        web = pod.container("web", ref, ["sh", "-c", "mkdir -p /www && echo pong-from-vm > /www/index.html"
                                         " && exec httpd -f -p 8080 -h /www"])
        client = pod.container("client", ref, ["sleep", "3600"])
        for cid in pod.cids:
            _wait_state(crictl, cid, "CONTAINER_RUNNING")
        assert crictl("exec", "-s", web, "uname", "-r", timeout=120).stdout.strip() != os.uname().release
        # CRI's /etc/hostname copied in, the uts namespace the pause container's (a guest pid)
        assert crictl("exec", "-s", client, "hostname", timeout=120).stdout.strip() == "vm-net-pod-host"
        assert crictl("exec", "-s", client, "cat", "/etc/hostname", timeout=120).stdout.strip() == "vm-net-pod-host"
        # the guest's eth0 carries the pod IP
        addr = crictl("exec", "-s", client, "ip", "-4", "-o", "addr", timeout=120).stdout
        assert f"inet {ip}/" in addr, addr
        # host -> pod IP -> tap -> VM -> container
        assert "pong-from-vm" in http_get(ip, 8080, timeout=60)
        # container -> the other container over the pod's loopback
        r = crictl("exec", "-s", client, "wget", "-q", "-O", "-", "http://127.0.0.1:8080/", timeout=120)
        assert r.stdout.strip() == "pong-from-vm", r
        # guest -> the bridge's address on the host (the pod's gateway)
        import ipaddress
        import subprocess

        brinfo = json.loads(subprocess.run(["ip", "-j", "-4", "addr", "show", "dev", env.cri.bridge_name],
                                           capture_output=True, text=True, check=True).stdout)
        gw = brinfo[0]["addr_info"][0]["local"]
        assert ipaddress.ip_address(gw) in ipaddress.ip_network(env.cri.subnet)
        r = crictl("exec", "-s", client, "ping", "-c", "1", "-W", "5", gw, check=False, timeout=120)
        assert r.returncode == 0, r
        netns = next(n.get("path", "") for n in info["info"]["runtimeSpec"]["linux"]["namespaces"]
                     if n["type"] == "network")
        pod.remove()
        assert not Path(netns).exists(), f"{netns} left after rmp"
        _wait_gone(env)
    finally:
        pod.cleanup()


def _taps_in(netns_path: str) -> list[str]:
    """The VM taps (ccpu.vm.net.tap_name) in a netns."""
    import subprocess

    from ccpu.vm.net import TAP_SUFFIX

    r = subprocess.run(["nsenter", f"--net={netns_path}", "ip", "-j", "link", "show"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return [link["ifname"] for link in json.loads(r.stdout) if link.get("ifname", "").endswith(TAP_SUFFIX)]


def test_vm_pod_network_on_a_pooled_vm(cri_env: FractalEnv, registry, tmp_path: Path) -> None:  # noqa: ANN001
    """A CRI pod with a pod network adopts the VM the pool had ready (booted with no NIC): the
    pod's interface is plugged live (QMP over the handed-over channel) and configured by the
    agent, so the pod IP is the guest's and serves the host; rmp leaves no QEMU, tap or mount."""
    from tests.integration.test_vm_pool import PoolProc, alive, mounts_below

    _need(cni_missing(), "hack/setup.sh installs containernetworking-plugins")
    env = cri_env
    assert env.cri is not None and env.cri.network == "bridge"
    crictl = Crictl(env, tmp_path)
    ref = registry.ref("busybox")
    crictl("pull", ref, timeout=300)
    p = PoolProc(env)
    pod = None
    try:
        (ready,) = p.ready()
        qemu = ready["qemu_pid"]
        pod = CriPod(crictl, tmp_path, "pooled-net-pod", host_network=False, mode="vm", hostname="pooled-host")
        info = json.loads(crictl("inspectp", "-o", "json", pod.id).stdout)
        ip = info["status"]["network"]["ip"]
        netns = next(n.get("path", "") for n in info["info"]["runtimeSpec"]["linux"]["namespaces"]
                     if n["type"] == "network")
        web = pod.container("web", ref, ["sh", "-c", "mkdir -p /www && echo pong-from-pooled > /www/index.html"
                                         " && exec httpd -f -p 8080 -h /www"])
        _wait_state(crictl, web, "CONTAINER_RUNNING")
        from tests.integration.test_shim_vm import fractal_ps

        (entry,) = [e for e in fractal_ps(env, "k8s.io") if e["vm"] and web in [c["id"] for c in e["containers"]]]
        assert entry["vm"]["pid"] == qemu, (entry["vm"], ready)  # the pooled QEMU: adopted, not booted
        assert entry["vm"]["pooled"] and entry["vm"]["pooled"]["id"] == ready["id"]
        assert entry["vm"]["netns"] == netns
        assert crictl("exec", "-s", web, "uname", "-r", timeout=120).stdout.strip() != os.uname().release
        assert crictl("exec", "-s", web, "cat", "/etc/hostname", timeout=120).stdout.strip() == "pooled-host"
        addr = crictl("exec", "-s", web, "ip", "-4", "-o", "addr", timeout=120).stdout
        assert f"inet {ip}/" in addr, addr  # the NIC plugged after boot carries the pod IP
        assert _taps_in(netns), "no tap in the pod netns"
        # host -> pod IP -> tap -> the pooled VM -> container
        assert "pong-from-pooled" in http_get(ip, 8080, timeout=60)
        pod.remove()
        pod = None
        deadline = time.monotonic() + 60
        while alive(qemu) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive(qemu), "the adopted QEMU outlived rmp"
        assert not Path(netns).exists(), f"{netns} left after rmp"
        # the shim unmounts and removes the sandbox's run dir once QEMU is gone
        deadline = time.monotonic() + 60
        while _pids_of_shims(env.address) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _pids_of_shims(env.address) == [], "the pod's shim is still running after rmp"
        assert mounts_below(str(env.fractal_run_dir / "vms")) == []
    finally:
        if pod is not None:
            pod.cleanup()
        p.stop()
    _wait_gone(env)  # the pool's refill stopped with it: no QEMU, no shim of this env
