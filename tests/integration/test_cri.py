"""crictl (built by hack/peers.sh) against a private containerd with its CRI plugin on, once on
containerd 1.6 (config version 2) and once on 2.x (hack/peers.sh's 2.4.2, config version 4; the
module's env is shared by the tests of one version): pull into the fractal snapshotter, pods on
runtime handler ``fractal`` (``io.containerd.fractal.v1``, host mode), two containers in a pod
served by ONE shim (group = CRI sandbox id), exec, logs, stop/rm, stopp/rmp, no leaks.

* ``test_crictl_pod_lifecycle``: a host-network pod (no CNI involved).
* ``test_pod_network_bridge``: a pod with its own network namespace, set up by the real CNI
  plugins of Debian's containernetworking-plugins (/usr/lib/cni: bridge + host-local + loopback;
  ``CriConfig(network="bridge")``, a bridge ``fcni<env id>`` on a free private 10.x /24): the host
  reaches a server in the pod at the pod IP, a second container reaches it over 127.0.0.1, and
  after stopp/rmp the netns and the IP reservation are gone (the bridge goes with the env).

The sandbox ("pause") image is busybox with Cmd ``/bin/sleep 2147483647``, made here with umoci
on a copy of the busybox OCI layout and pushed to the session registry as ``fractal/pause``.
Everything CRI keeps is under the env's root/state dirs; pod logs under tmp_path.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Iterator

import pytest

from hack.containerd_env import CNI_PLUGIN_DIR, CriConfig, FractalEnv, http_get, peer_missing, run_cmd
from tests.cri_pods import Crictl, CriPod


ON_CI = os.environ.get("CI", "").lower() not in ("", "0", "false")


def _pids_of_shims(address: Path) -> list[int]:
    """Our shim daemons started by this env's containerd (shim/procs.py's one rule)."""
    from shim import procs

    return procs.daemon_pids(str(address))


def _need(why: str | None, ci_note: str) -> None:
    if why:
        if ON_CI:
            pytest.fail(f"{ci_note}: {why}", pytrace=False)
        pytest.skip(why)


def cni_missing() -> str | None:
    """None when the CNI plugins the bridge network uses are installed."""
    for p in ("bridge", "host-local", "loopback"):
        if not (CNI_PLUGIN_DIR / p).is_file():
            return f"{CNI_PLUGIN_DIR / p} missing: apt-get install containernetworking-plugins (hack/setup.sh)"
    if shutil.which("ip") is None:
        return "ip (iproute2) not on PATH"
    return None


@pytest.fixture(scope="module")
def pause_image(registry, tmp_path_factory: pytest.TempPathFactory) -> str:  # noqa: ANN001
    """busybox with a long sleep as Cmd (its own Cmd ["sh"] exits at once without stdin)."""
    if registry.server is None:
        pytest.skip("needs the session registry server (FRACTAL_REGISTRY set) to push the pause image")
    _need(None if shutil.which("umoci") else "umoci not on PATH", "hack/setup.sh installs umoci")
    layout = tmp_path_factory.mktemp("pause") / "layout"
    from hack import testimages

    shutil.copytree(testimages.build("busybox"), layout)
    run_cmd(["umoci", "config", "--image", f"{layout}:latest",
             "--config.cmd", "/bin/sleep", "--config.cmd", "2147483647"])
    return registry.server.push(layout, "fractal/pause", "latest")


@pytest.fixture(scope="module", params=["1", "2"], ids=["containerd1", "containerd2"])
def cri_env(request, registry, pause_image: str) -> Iterator[FractalEnv]:  # noqa: ANN001
    """One env per containerd version, shared by the module's tests (CRI + bridge network when
    the CNI plugins are there)."""
    _need(peer_missing("crictl"), "cri-tools should have been built by hack/setup.sh")
    if request.param == "2":
        _need(peer_missing("containerd2"), "containerd 2.x should have been built by hack/setup.sh")
    network = None if cni_missing() else "bridge"
    cri = CriConfig(sandbox_image=pause_image, insecure_registries=(registry.address,), network=network)
    with FractalEnv(snapshotter=True, containerd=request.param, cri=cri) as env:
        yield env
    if env.cri is not None and env.cri.bridge_name:
        assert not Path(f"/sys/class/net/{env.cri.bridge_name}").exists(), "bridge left after teardown"


def _wait_state(crictl: Crictl, cid: str, want: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        info = json.loads(crictl("inspect", "-o", "json", cid).stdout)
        if info["status"]["state"] == want:
            return info
        if time.monotonic() > deadline:
            raise AssertionError(f"{cid} is {info['status']['state']}, wanted {want}: {info['status']}")
        time.sleep(0.2)


def test_crictl_pod_lifecycle(cri_env: FractalEnv, registry, tmp_path: Path) -> None:  # noqa: ANN001
    env = cri_env
    crictl = Crictl(env, tmp_path)
    ref = registry.ref("busybox")
    crictl("pull", ref, timeout=300)
    images = crictl("images").stdout
    assert "fractal/busybox" in images, images
    # unpacked into the fractal snapshotter
    snaps = env.ctr("snapshots", "--snapshotter", "fractal", "ls", namespace="k8s.io").stdout
    assert len(snaps.splitlines()) > 1, snaps

    logdir = tmp_path / "podlogs"
    logdir.mkdir()
    with CriPod(crictl, tmp_path, "fractal-pod", host_network=True, log_dir=logdir) as pod:
        shims = _pids_of_shims(env.address)
        assert len(shims) == 1, f"expected one shim for the pod, found {shims}"
        cids = [pod.container(f"c{i}", ref, ["sh", "-c", f"echo hello-from-c{i}; exec sleep 3600"])
                for i in range(2)]
        for cid in cids:
            _wait_state(crictl, cid, "CONTAINER_RUNNING")
        ps = crictl("ps", "-p", pod.id, "-q").stdout.split()
        assert sorted(ps) == sorted(cids), ps
        shims_now = _pids_of_shims(env.address)
        assert shims_now == shims, f"one shim must serve the whole pod: {shims} then {shims_now}"

        r = crictl("exec", "-s", cids[0], "echo", "hi", timeout=60)
        assert r.stdout.strip() == "hi", r

        for i, cid in enumerate(cids):
            deadline = time.monotonic() + 15
            while True:
                logs = crictl("logs", cid, check=False)
                if f"hello-from-c{i}" in logs.stdout + logs.stderr or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert f"hello-from-c{i}" in logs.stdout, logs
            assert (logdir / f"c{i}.log").is_file()

        for cid in cids:
            crictl("stop", "-t", "2", cid, timeout=60)
            _wait_state(crictl, cid, "CONTAINER_EXITED")
        pod.remove_containers()
        assert crictl("ps", "-a", "-p", pod.id, "-q").stdout.split() == []
        pod.remove()
        deadline = time.monotonic() + 15
        while _pids_of_shims(env.address) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _pids_of_shims(env.address) == [], "the pod's shim is still running after rmp"
    mounts = [line for line in Path("/proc/self/mountinfo").read_text().splitlines()
              if str(env.run_dir) in line or str(env.root_dir) in line]
    assert not any("/containers/" in m or "rootfs" in m or "/sandboxes/" in m for m in mounts), mounts


def _netns_names() -> set[str]:
    d = Path("/var/run/netns")
    return {p.name for p in d.iterdir()} if d.is_dir() else set()


def test_pod_network_bridge(cri_env: FractalEnv, registry, tmp_path: Path) -> None:  # noqa: ANN001
    _need(cni_missing(), "hack/setup.sh installs containernetworking-plugins")
    env = cri_env
    assert env.cri is not None and env.cri.network == "bridge"
    import ipaddress

    crictl = Crictl(env, tmp_path)
    ref = registry.ref("busybox")
    crictl("pull", ref, timeout=300)
    netns_before = _netns_names()
    # network namespace_options default: POD (its own netns, set up by CNI)
    with CriPod(crictl, tmp_path, "net-pod", host_network=False, mode="host") as pod:
        info = json.loads(crictl("inspectp", "-o", "json", pod.id).stdout)
        ip = info["status"]["network"]["ip"]
        assert ipaddress.ip_address(ip) in ipaddress.ip_network(env.cri.subnet), (ip, env.cri.subnet)
        netns = info["info"]["runtimeSpec"]["linux"]["namespaces"]
        netns_path = next(n.get("path", "") for n in netns if n["type"] == "network")
        assert netns_path, f"the pod has no network namespace path: {netns}"
        # pod_annotations = ["io.fractal.*"]: the pod's annotation is in the sandbox's OCI spec
        annotations = info["info"]["runtimeSpec"].get("annotations", {})
        assert annotations.get("io.fractal.mode") == "host", annotations
        # the netns is a real one, different from the host's
        assert os.stat(netns_path).st_ino != os.stat("/proc/self/ns/net").st_ino
        cids = [pod.container("web", ref, ["sh", "-c", "mkdir -p /www && echo pong-from-pod > /www/index.html && "
                                                       "exec httpd -f -p 8080 -h /www"]),
                pod.container("client", ref, ["sleep", "3600"])]
        for cid in cids:
            _wait_state(crictl, cid, "CONTAINER_RUNNING")
        # the host reaches the pod at its IP, through the bridge
        assert "pong-from-pod" in http_get(ip, 8080)
        # the second container shares the pod's netns: the server is on its 127.0.0.1
        deadline = time.monotonic() + 15
        while True:
            r = crictl("exec", cids[1], "wget", "-q", "-O", "-", "http://127.0.0.1:8080/", check=False, timeout=60)
            if "pong-from-pod" in r.stdout or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert r.stdout.strip() == "pong-from-pod", r
        addr = crictl("exec", cids[1], "ip", "-4", "-o", "addr", "show", "eth0", timeout=60).stdout
        assert f"inet {ip}/" in addr, addr
        assert env.cri.bridge_name in Path("/proc/net/dev").read_text()

        pod.remove()
        # CNI DEL released the IP; CRI removed the netns
        assert not Path(netns_path).exists(), f"{netns_path} left after rmp"
        assert _netns_names() <= netns_before, _netns_names() - netns_before
        ipam = Path(env.cri.ipam_data_dir or "")
        leases = [p.name for p in ipam.rglob("*") if p.is_file() and p.name.count(".") == 3]
        assert leases == [], f"host-local still reserves {leases}"
        deadline = time.monotonic() + 15
        while _pids_of_shims(env.address) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _pids_of_shims(env.address) == [], "the pod's shim is still running after rmp"
