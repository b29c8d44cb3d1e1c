"""`fractal install` against containerd 1.6, 1.7 and 2.x, then `fractal uninstall`.

For each version: a private containerd's own config (CRI on, runc the default runtime,
overlayfs the snapshotter, no trace of fractal) is the "user's file"; `fractal install` wires
it (version detected from the binary), `containerd config dump` of that binary shows the wiring
as containerd itself reads it, and a containerd started from the installed file runs the
README's own lines (`ctr image pull --snapshotter fractal`, `ctr run --runtime
io.containerd.fractal.v1 --snapshotter fractal`), a CRI pod through the `fractal` handler, and
`fractal doctor`'s CRI check.  The snapshotter gets no `--root`: it and the shims take the repo
root from the fractal config install wrote.  Then `fractal uninstall` puts every file back byte
for byte.  Nothing under /etc is touched: every path is the env's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from ccpu.cli.wiring import effective_cri_snapshotter
from hack.containerd_env import (CONTAINERD_PEERS, CriConfig, FractalEnv, Snapshotter, peer_bin_dir,
                                 peer_missing, run_cmd, tail)
from tests.cri_pods import Crictl, CriPod

REPO = Path(__file__).resolve().parents[2]
ON_CI = os.environ.get("CI", "").lower() not in ("", "0", "false")
SYSTEM_PATH = ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"]


def fractal(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ccpu.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **(env or {})}, timeout=timeout)


def _need(why: str | None) -> None:
    if why:
        if ON_CI:
            pytest.fail(f"should have been built by hack/setup.sh: {why}", pytrace=False)
        pytest.skip(why)


class ConfigRootSnapshotter(Snapshotter):
    """The snapshotter as `fractal install --systemd`'s unit starts it: no --root."""

    def command(self) -> list[str]:
        return [self.python, "-m", "snapshotter.server", "--address", str(self.address), *self.extra_args]


@pytest.fixture(scope="module")
def pause_image(registry, tmp_path_factory: pytest.TempPathFactory) -> str:  # noqa: ANN001
    """busybox sleeping forever, as the pod sandbox image (no registry.k8s.io here)."""
    _need(None if shutil.which("umoci") else "umoci not on PATH")
    layout = tmp_path_factory.mktemp("pause") / "layout"
    from hack import testimages

    shutil.copytree(testimages.build("busybox"), layout)
    run_cmd(["umoci", "config", "--image", f"{layout}:latest",
             "--config.cmd", "/bin/sleep", "--config.cmd", "2147483647"])
    return registry.server.push(layout, "fractal/pause", "latest")


@pytest.mark.parametrize("version", ["1", "1.7", "2"], ids=["containerd1.6", "containerd1.7", "containerd2"])
def test_install_wires_each_containerd_and_uninstall_restores(version: str, registry, pause_image: str,  # noqa: ANN001
                                                               tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    if version in CONTAINERD_PEERS:
        _need(peer_missing(CONTAINERD_PEERS[version]))
    _need(peer_missing("cri-tools"))
    # the user's containerd: CRI with runc + overlayfs as the defaults, nothing of fractal
    cri = CriConfig(sandbox_image=pause_image, insecure_registries=(registry.address,),
                    runtime_name="runc", runtime_type="io.containerd.runc.v2", pod_annotations=())
    env = FractalEnv(snapshotter=False, containerd=version, cri=cri)
    cd = env.containerd
    # 2.x: no unpack_config of the user's, i.e. containerd's default entry (overlayfs) in force,
    # which install must keep when it adds fractal's
    cd.config.unpack_snapshotters = ()
    user_text = "# my containerd\n" + cd.config.render().replace('snapshotter = "fractal"', 'snapshotter = "overlayfs"') + "\n"
    assert "proxy_plugins" not in user_text and '"fractal"' not in user_text
    cfg = cd.config_path
    cfg.parent.mkdir(parents=True)
    cfg.write_text(user_text)
    os.chmod(cfg, 0o640)
    cd.config.render = cfg.read_text  # type: ignore[method-assign]  # start from the installed file
    fconf = tmp_path / "fractal.toml"
    fconf_text = '# the operator\'s\nmode = "host"  # fast\nallowed_annotations = [".*"]\n'
    fconf.write_text(fconf_text)
    bindir, snap_sock, snap_root = tmp_path / "bin", env.run_dir / "snap.sock", tmp_path / "repo"
    bindir.mkdir()
    before = {p: p.read_bytes() for p in (cfg, fconf)}

    r = fractal("install", "--containerd", cd.binary, "--containerd-config", str(cfg), "--bin-dir", str(bindir),
                "--address", str(snap_sock), "--root", str(snap_root), "--fractal-config", str(fconf))
    assert r.returncode == 0, r.stderr
    print(r.stdout)
    t = tomllib.loads(fconf.read_text())
    assert t["root"] == str(snap_root) and "# the operator's" in fconf.read_text()

    # containerd's own reading of the installed file
    dump = tomllib.loads(run_cmd([cd.binary, "--config", str(cfg), "config", "dump"], timeout=60).stdout)
    proxy = dump["proxy_plugins"]["fractal"]
    assert (proxy["type"], proxy["address"]) == ("snapshot", str(snap_sock)), proxy
    snap, where = effective_cri_snapshotter(dump, "fractal")
    assert snap == "fractal", (where, dump.get("plugins", {}))
    runc_snap, _ = effective_cri_snapshotter(dump, "runc")
    if version == "1":  # no per-runtime snapshotter: the node-wide one, for runc pods too
        assert where == "global containerd.snapshotter" and runc_snap == "fractal"
        assert "every Kubernetes pod on this node" in r.stdout
    else:
        assert where == "runtimes.fractal.snapshotter" and runc_snap == "overlayfs"
    plugins = dump["plugins"]
    cri_id = "io.containerd.cri.v1.runtime" if version == "2" else "io.containerd.grpc.v1.cri"
    handler = plugins[cri_id]["containerd"]["runtimes"]["fractal"]
    assert handler["runtime_type"] == "io.containerd.fractal.v1" and handler["pod_annotations"] == ["io.fractal.*"]
    if version == "2":
        unpack = plugins["io.containerd.transfer.v1.local"]["unpack_config"]
        assert [(u["platform"], u["snapshotter"]) for u in unpack] == [
            ("linux/amd64", "overlayfs"), ("linux/amd64", "fractal")], unpack

    snapper = ConfigRootSnapshotter(snap_root, snap_sock, tmp_path / "snapshotter.log")
    monkeypatch.setenv("FRACTAL_CONFIG", str(fconf))  # the snapshotter's root comes from there
    monkeypatch.delenv("FRACTAL_ROOT", raising=False)
    path = [str(bindir)] + ([str(peer_bin_dir(CONTAINERD_PEERS[version]))] if version in CONTAINERD_PEERS else [])
    cd.extra_env.update(FRACTAL_CONFIG=str(fconf), PATH=os.pathsep.join(path + SYSTEM_PATH))
    try:
        snapper.start()
        env.start()
        ref = registry.ref("busybox")
        ns = env.new_namespace()
        # the README's lines; on 2.x the pull goes through the transfer service
        env.ctr("image", "pull", "--plain-http", "--snapshotter", "fractal", ref, namespace=ns, timeout=300)
        out = env.run(ref, "readme1", "echo", "from-the-readme", namespace=ns, runtime="io.containerd.fractal.v1")
        assert out.stdout.strip() == "from-the-readme"
        env.ctr("image", "pull", "--plain-http", ref, namespace=env.new_namespace(), timeout=300)  # default: overlayfs
        assert (snap_root / "metadata.db").exists() or any(snap_root.iterdir())  # root from the config

        d = fractal("doctor", "-a", str(env.address), "--snapshotter-address", str(snap_sock), "--json",
                    env={"FRACTAL_CONFIG": str(fconf)})
        checks = {c["name"]: c for c in json.loads(d.stdout)}
        assert checks["cri handler"]["status"] == "ok", checks["cri handler"]
        assert checks["shim"]["status"] == "ok" and str(bindir) in checks["shim"]["detail"], checks["shim"]
        if version == "2":
            assert checks["unpack config"]["status"] == "ok", checks["unpack config"]

        _cri_pod(env, ref, tmp_path)

        u = fractal("uninstall", "--containerd-config", str(cfg))
        assert u.returncode == 0, u.stdout + u.stderr
        assert {p: p.read_bytes() for p in (cfg, fconf)} == before
        assert cfg.stat().st_mode & 0o777 == 0o640
        assert not (cfg.parent / "conf.d").exists() and not list(bindir.iterdir())
        assert not [p for p in cfg.parent.iterdir() if ".fractal-" in p.name]
    finally:
        env.close()
        snapper.stop()


def _cri_pod(env: FractalEnv, ref: str, tmp_path: Path) -> None:
    """A pod through RuntimeClass handler `fractal`: its containers on fractal's snapshotter."""
    crictl = Crictl(env, tmp_path)
    crictl("pull", ref, timeout=300)
    logdir = tmp_path / "podlogs"
    logdir.mkdir()
    with CriPod(crictl, tmp_path, "inst-pod", host_network=True, log_dir=logdir, timeout=180) as pod:
        try:
            cid = pod.container("c", ref, ["sleep", "3600"])
            assert crictl("exec", "-s", cid, "echo", "hi-from-cri").stdout.strip() == "hi-from-cri"
            info = json.loads(env.ctr("containers", "info", cid, namespace="k8s.io").stdout)
            assert info["Snapshotter"] == "fractal" and info["Runtime"]["Name"] == "io.containerd.fractal.v1", info
            pod.remove()
        except Exception:
            print(tail(env.containerd.log_path), file=sys.stderr)
            raise
