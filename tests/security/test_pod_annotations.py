"""Pod author -> out of the VM (issue 10, item 4): the operator decides which ``io.fractal.*``
annotations a Kubernetes pod may use.

``fractal install`` lets containerd's CRI pass ``io.fractal.*`` pod annotations to the shim.
Before the pod policy an annotation beat the operator's config, so any Kubernetes user could
ask for ``io.fractal.mode: host`` (runc on the node instead of a VM), a VM of 255 CPUs / 1 TiB,
or to join another sandbox.  Here, through real containerd CRI (crictl) with the operator's
default config (mode vm, default ``allowed_annotations``, maxima = the host's CPUs and RAM):
each of those pods is refused with InvalidArgument naming the annotation, and ``ctr`` users
(node admins) keep the annotations.

The refused pods never boot a VM (the shim refuses before the guest starts), so these tests
are fast on TCG.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from hack.containerd_env import CriConfig, FractalEnv, peer_missing
from tests.integration.test_cri import Crictl, _need, _pids_of_shims, pause_image  # noqa: F401

RUNTIME = "io.containerd.fractal.v1"
CRI_NS = "k8s.io"


@pytest.fixture(scope="module")
def policy_env(registry, pause_image: str) -> Iterator[FractalEnv]:  # noqa: ANN001, F811
    """A CRI env whose fractal config is the operator's default (no file content at all)."""
    _need(peer_missing("cri-tools"), "cri-tools should have been built by hack/setup.sh")
    cri = CriConfig(sandbox_image=pause_image, insecure_registries=(registry.address,))
    with FractalEnv(snapshotter=True, cri=cri) as env:
        env.fractal_config.write_text("# the operator's defaults (docs/config.md)\n")
        yield env


def _runp(env: FractalEnv, tmp_path: Path, name: str,
          annotations: dict[str, str]) -> subprocess.CompletedProcess[str]:
    crictl = Crictl(env, tmp_path)
    pod = {"metadata": {"name": name, "namespace": "default", "uid": f"{name}-uid", "attempt": 0},
           "log_directory": str(tmp_path),
           "linux": {"security_context": {"namespace_options": {"network": 2}}},  # no CNI
           "annotations": annotations}
    pod_json = tmp_path / f"{name}.json"
    pod_json.write_text(json.dumps(pod))
    return crictl("runp", "--runtime", "fractal", str(pod_json), check=False, timeout=180)


def _remove_pods(env: FractalEnv, tmp_path: Path) -> None:
    crictl = Crictl(env, tmp_path)
    for pod_id in crictl("pods", "-q", check=False).stdout.split():
        crictl("stopp", pod_id, check=False)
        crictl("rmp", "-f", pod_id, check=False)


def _assert_refused(r: subprocess.CompletedProcess[str], annotation: str, why: str) -> None:
    out = r.stdout + r.stderr
    assert r.returncode != 0, f"the pod was started: {out}"
    assert annotation in out and why in out, out
    # InvalidArgument: 1.6 appends "invalid argument"; 2.x's CRI answers with that gRPC code
    assert "invalid argument" in out or "code = InvalidArgument" in out, out


def _no_shim_left(env: FractalEnv) -> None:
    deadline = time.monotonic() + 15
    while _pids_of_shims(env.address) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _pids_of_shims(env.address) == [], "a refused pod's shim is still running"


def test_pod_cannot_choose_host_mode(policy_env: FractalEnv, tmp_path: Path) -> None:
    env = policy_env
    try:
        r = _runp(env, tmp_path, "wants-host", {"io.fractal.mode": "host"})
        _assert_refused(r, "io.fractal.mode", "not allowed for Kubernetes pods")
        # nothing ran on the host: no runc container in CRI's namespace
        runc_state = env.fractal_run_dir / "runc" / CRI_NS
        assert not runc_state.is_dir() or not any(runc_state.iterdir()), list(runc_state.iterdir())
        assert Crictl(env, tmp_path)("pods", "-q").stdout.split() == []
    finally:
        _remove_pods(env, tmp_path)
    _no_shim_left(env)


@pytest.mark.parametrize("annotations, name", [
    ({"io.fractal.vm.cpus": "255"}, "io.fractal.vm.cpus"),
    ({"io.fractal.vm.memory": "1T"}, "io.fractal.vm.memory"),
], ids=["cpus", "memory"])
def test_pod_cannot_size_vm_past_maxima(policy_env: FractalEnv, tmp_path: Path,
                                        annotations: dict[str, str], name: str) -> None:
    env = policy_env
    try:
        r = _runp(env, tmp_path, "too-big", annotations)
        _assert_refused(r, name, "asks for more than this node allows")
    finally:
        _remove_pods(env, tmp_path)
    _no_shim_left(env)


def test_pod_cannot_join_another_sandbox(policy_env: FractalEnv, registry,  # noqa: ANN001
                                         tmp_path: Path) -> None:
    """A node admin's sandbox (host mode, in CRI's containerd namespace) is named by a pod: the
    pod is refused and the victim's shim never serves it."""
    env = policy_env
    ref = registry.ref("busybox")
    env.pull(ref, namespace=CRI_NS)
    victim = "victim-sb"
    ann = ("--annotation", f"io.fractal.sandbox={victim}", "--annotation", "io.fractal.mode=host")
    env.run(ref, "victim", "sleep", "3600", namespace=CRI_NS, runtime=RUNTIME, rm=False,
            extra=("-d", *ann))
    record = env.fractal_run_dir / "sandboxes" / CRI_NS / f"{victim}.json"
    try:
        r = _runp(env, tmp_path, "joiner", {"io.fractal.sandbox": victim})
        _assert_refused(r, "io.fractal.sandbox", "not allowed for Kubernetes pods")
        assert json.loads(record.read_text())["containers"] == ["victim"]
    finally:
        _remove_pods(env, tmp_path)
        env.ctr("task", "delete", "-f", "victim", namespace=CRI_NS, check=False)
        env.ctr("container", "delete", "victim", namespace=CRI_NS, check=False)
    _no_shim_left(env)


def test_ctr_user_keeps_the_mode_annotation(policy_env: FractalEnv, registry) -> None:  # noqa: ANN001
    """``ctr run --annotation io.fractal.mode=host`` (a node admin) still runs on the host under
    the same config that refuses it to pods: the container sees the host's boot id (a VM has
    its own)."""
    env = policy_env
    ref = registry.ref("busybox")
    ns = env.new_namespace("adm")
    env.pull(ref, namespace=ns)
    r = env.run(ref, "admin-host", "cat", "/proc/sys/kernel/random/boot_id", namespace=ns,
                runtime=RUNTIME, extra=("--annotation", "io.fractal.mode=host"))
    assert r.stdout.strip() == Path("/proc/sys/kernel/random/boot_id").read_text().strip(), r
