"""crictl (built by hack/peers.sh) against a private containerd 1.6 with its CRI plugin on:
pull into the fractal snapshotter, a host-network pod on runtime handler ``fractal``
(``io.containerd.fractal.v1``, host mode), two containers in it served by ONE shim (group = CRI
sandbox id), exec, logs, stop/rm, stopp/rmp, no leaks.

The sandbox ("pause") image is busybox with Cmd ``/bin/sleep 2147483647``, made here with umoci
on a copy of the busybox OCI layout and pushed to the session registry as ``fractal/pause``.
Pods use the node's network namespace, so no CNI plugin is needed (CNI dirs are empty dirs of
the env).  Everything CRI keeps is under the env's root/state dirs; pod logs under tmp_path.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from hack.containerd_env import CriConfig, FractalEnv, peer_bin_dir, peer_missing, run_cmd


ON_CI = os.environ.get("CI", "").lower() not in ("", "0", "false")
SHIM = "containerd-shim-fractal-v1"


def _pids_of_shims(address: Path) -> list[int]:
    """Shim processes (start or daemon) whose command line names this env's containerd socket."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(address) in cmd and (SHIM in cmd or "shim.daemon" in cmd):
            out.append(int(entry))
    return sorted(out)


class Crictl:
    def __init__(self, env: FractalEnv, home: Path) -> None:
        self.binary = str(peer_bin_dir("cri-tools") / "crictl")
        sock = f"unix://{env.address}"
        cfg = home / "crictl.yaml"
        cfg.write_text(f"runtime-endpoint: {sock}\nimage-endpoint: {sock}\ntimeout: 60\n")
        self.base = [self.binary, "--config", str(cfg), "--runtime-endpoint", sock, "--image-endpoint", sock]
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("CONTAINER_RUNTIME_ENDPOINT", "IMAGE_SERVICE_ENDPOINT", "CRI_CONFIG_FILE")}

    def __call__(self, *args: str, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return run_cmd([*self.base, *args], check=check, timeout=timeout, env=self.env)


@pytest.fixture(scope="module")
def cri_env(registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FractalEnv]:  # noqa: ANN001
    why = peer_missing("cri-tools")
    if why:
        if ON_CI:
            pytest.fail(f"cri-tools should have been built by hack/setup.sh: {why}", pytrace=False)
        pytest.skip(why)
    if os.environ.get("FRACTAL_CONTAINERD_VERSION", "1").strip().removeprefix("v")[:1] not in ("", "1"):
        pytest.skip("FractalEnv(cri=...) renders containerd 1.6's CRI config only")
    if registry.server is None:
        pytest.skip("needs the session registry server (FRACTAL_REGISTRY set) to push the pause image")
    if shutil.which("umoci") is None:
        pytest.skip("umoci not on PATH")
    # pause image: busybox with a long sleep as Cmd (its own Cmd ["sh"] exits at once without stdin)
    layout = tmp_path_factory.mktemp("pause") / "layout"
    from hack import testimages

    shutil.copytree(testimages.build("busybox"), layout)
    run_cmd(["umoci", "config", "--image", f"{layout}:latest",
             "--config.cmd", "/bin/sleep", "--config.cmd", "2147483647"])
    pause = registry.server.push(layout, "fractal/pause", "latest")
    with FractalEnv(snapshotter=True, cri=CriConfig(sandbox_image=pause,
                                                     insecure_registries=(registry.address,))) as env:
        yield env


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
    pod = {
        "metadata": {"name": "fractal-pod", "namespace": "default", "uid": "fractal-pod-uid", "attempt": 0},
        "log_directory": str(logdir),
        "linux": {"security_context": {"namespace_options": {"network": 2}}},  # NODE: no CNI
    }
    pod_json = tmp_path / "pod.json"
    pod_json.write_text(json.dumps(pod))
    pod_id = crictl("runp", "--runtime", "fractal", str(pod_json), timeout=180).stdout.strip()
    cids: list[str] = []
    try:
        shims = _pids_of_shims(env.address)
        assert len(shims) == 1, f"expected one shim for the pod, found {shims}"
        for i in range(2):
            ctr = {
                "metadata": {"name": f"c{i}"},
                "image": {"image": ref},
                "command": ["sh", "-c", f"echo hello-from-c{i}; exec sleep 3600"],
                "log_path": f"c{i}.log",
            }
            ctr_json = tmp_path / f"ctr{i}.json"
            ctr_json.write_text(json.dumps(ctr))
            cid = crictl("create", pod_id, str(ctr_json), str(pod_json), timeout=120).stdout.strip()
            cids.append(cid)
            crictl("start", cid, timeout=60)
        for cid in cids:
            _wait_state(crictl, cid, "CONTAINER_RUNNING")
        ps = crictl("ps", "-p", pod_id, "-q").stdout.split()
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
            crictl("rm", cid)
        cids.clear()
        assert crictl("ps", "-a", "-p", pod_id, "-q").stdout.split() == []
        crictl("stopp", pod_id, timeout=60)
        crictl("rmp", pod_id, timeout=60)
        pod_id = ""
        deadline = time.monotonic() + 15
        while _pids_of_shims(env.address) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _pids_of_shims(env.address) == [], "the pod's shim is still running after rmp"
    finally:
        for cid in cids:
            crictl("rm", "-f", cid, check=False)
        if pod_id:
            crictl("stopp", pod_id, check=False)
            crictl("rmp", "-f", pod_id, check=False)
    mounts = [line for line in Path("/proc/self/mountinfo").read_text().splitlines()
              if str(env.run_dir) in line or str(env.root_dir) in line]
    assert not any("/containers/" in m or "rootfs" in m or "/sandboxes/" in m for m in mounts), mounts
