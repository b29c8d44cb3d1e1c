"""``containerd-shim-fractal-v1 -info``: the RuntimeInfo containerd 2.x asks shims for (shim/info.py).

Directly (the bytes on stdout decode as ``containerd.types.RuntimeInfo``) and through containerd
2.x: ``ctr plugins inspect-runtime`` -> Introspection.PluginInfo(io.containerd.runtime.v2, task)
-> containerd runs ``<shim> -info`` and hands the decoded message back; ctr prints it as JSON,
with the features Any decoded into runtime-spec's ``features.Features`` by containerd's typeurl.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from hack.containerd_env import FractalEnv, peer_missing

ON_CI = os.environ.get("CI", "").lower() not in ("", "0", "false")
RUNTIME = "io.containerd.fractal.v1"
SHIM = "containerd-shim-fractal-v1"


def _shim() -> str:
    path = shutil.which(SHIM)
    if path is None:
        if ON_CI:
            pytest.fail(f"{SHIM} not on PATH (pip install -e . installs it)", pytrace=False)
        pytest.skip(f"{SHIM} not on PATH (pip install -e .)")
    return path


def _runc_features() -> dict:
    r = subprocess.run(["runc", "features"], capture_output=True, text=True, check=True)
    return json.loads(r.stdout)


def _info(stdin: bytes):  # noqa: ANN202
    from ccpu.api.gen.containerd.types import introspection_pb2 as pb

    r = subprocess.run([_shim(), "-info"], input=stdin, capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    info = pb.RuntimeInfo()
    info.ParseFromString(r.stdout)
    return info


def test_info_flag_prints_runtime_info_proto() -> None:
    info = _info(b"")
    assert info.name == RUNTIME
    assert info.version.version == "0.1.0"
    assert not info.HasField("options")
    assert info.features.type_url == "types.containerd.io/opencontainers/runtime-spec/1/features/Features"
    features = json.loads(info.features.value)
    assert features == _runc_features()
    assert "user" in features["linux"]["namespaces"]
    assert not info.annotations


def test_info_echoes_our_runtime_options_only() -> None:
    from google.protobuf import any_pb2

    from ccpu.api.gen.containerd.pkg.runtimeoptions.v1 import api_pb2 as ro
    from ccpu.api.gen.containerd.runtime.v2.runc.options import oci_pb2 as runc_opts

    ours = any_pb2.Any(type_url="runtimeoptions.v1.Options",
                       value=ro.Options(config_path="/etc/fractal/x.toml").SerializeToString())
    info = _info(ours.SerializeToString())
    assert info.options == ours
    theirs = any_pb2.Any(type_url="containerd.runc.v1.Options",
                         value=runc_opts.Options(binary_name="crun").SerializeToString())
    info = _info(theirs.SerializeToString())
    assert not info.HasField("options")
    assert info.name == RUNTIME


@pytest.fixture(scope="module")
def env2() -> FractalEnv:
    why = peer_missing("containerd2")
    if why:
        if ON_CI:
            pytest.fail(f"containerd 2.x should have been built by hack/setup.sh: {why}", pytrace=False)
        pytest.skip(f"containerd 2.x needed for -info through containerd: {why}")
    with FractalEnv(containerd="2", snapshotter=False) as env:
        yield env


def test_ctr_inspect_runtime_through_containerd2(env2: FractalEnv, tmp_path: Path) -> None:
    r = env2.ctr("plugins", "inspect-runtime", "--runtime", RUNTIME, namespace=None)
    info = json.loads(r.stdout)
    assert info["Name"] == RUNTIME
    assert info["Version"]["Version"] == "0.1.0"
    assert info["Options"] is None
    runc = _runc_features()
    # containerd decoded our Any as runtime-spec features.Features (JSON field names kept)
    assert info["Features"]["ociVersionMax"] == runc["ociVersionMax"]
    assert info["Features"]["linux"]["namespaces"] == runc["linux"]["namespaces"]
    assert info["Features"]["mountOptions"] == runc["mountOptions"]

    cfg = tmp_path / "fractal.toml"
    cfg.write_text('mode = "host"\n')
    r = env2.ctr("plugins", "inspect-runtime", "--runtime", RUNTIME,
                 "--runtime-config-path", str(cfg), namespace=None)
    info = json.loads(r.stdout)
    assert info["Name"] == RUNTIME
    assert info["Options"]["config_path"] == str(cfg), info["Options"]
