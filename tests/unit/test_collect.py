"""`fractal collect` (ccpu/cli/collect.py): redaction, bounds, and a whole bundle written from
a fake machine (config files, sandbox records, a guest console, log files) with parts that fail."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from ccpu import sandboxes
from ccpu.cli import collect as C

REPO = Path(__file__).resolve().parents[2]

CONTAINERD_TOML = '''version = 2
[plugins."io.containerd.grpc.v1.cri".registry.configs."reg.example".auth]
  username = "bob"
  password = "hunter2-containerd"
  identitytoken = """multi
line-secret"""
[proxy_plugins.fractal]
  type = "snapshot"
  address = "/run/fractal/snapshotter.sock"
[plugins."x".registry]
  auth_token = 'tok-123'
  "registry_password" = "quoted-key-secret"
  mirrors = { "docker.io" = { endpoint = ["https://m"] } }
'''


def test_redact_toml_values_of_sensitive_keys_and_tables() -> None:
    out = C.redact_toml(CONTAINERD_TOML)
    for secret in ("hunter2-containerd", "line-secret", "tok-123", "quoted-key-secret", "bob"):
        assert secret not in out, secret
    assert 'password = "<redacted>"' in out and "auth_token = \"<redacted>\"" in out
    assert 'address = "/run/fractal/snapshotter.sock"' in out  # the rest stays as it was
    assert 'type = "snapshot"' in out and "[proxy_plugins.fractal]" in out and "mirrors =" in out


def test_redact_text_forms() -> None:
    text = ('level=info password=abc token="x y" msg=ok\n{"auth": "YWxpY2U6cHc=", "user": "u"}\n'
            "Authorization: Bearer-xyz\nsecret_key: s3\n")
    out = C.redact_text(text)
    for secret in ("abc", "x y", "YWxpY2U6cHc=", "Bearer-xyz", "s3"):
        assert secret not in out, secret
    assert "msg=ok" in out and '"user": "u"' in out and "level=info" in out


def test_bound_keeps_a_logs_end_and_a_documents_start() -> None:
    data = b"".join(b"line %d\n" % i for i in range(1000))
    tail, cut = C.bound(data, 100, keep_end=True)
    assert cut and tail.endswith(b"line 999\n") and b"earlier bytes cut" in tail
    head, cut = C.bound(data, 100, keep_end=False)
    assert cut and head.startswith(b"line 0\n") and b"more bytes cut" in head
    assert C.bound(b"small", 100, keep_end=True) == (b"small", False)


def test_one_failing_part_does_not_fail_the_bundle(tmp_path: Path) -> None:
    def boom() -> str:
        raise RuntimeError("password=leaky")

    out = tmp_path / "b.tar.gz"
    res = C.collect([C.Part("a.txt", lambda: "token=t0p all fine"), C.Part("b.txt", boom),
                     C.Part("c.log", lambda: b"x" * 5000, is_log=True, limit=1000)], out, "top")
    assert [r.ok for r in res] == [True, False, True] and res[2].truncated
    with tarfile.open(out) as tar:
        names = set(tar.getnames())
        assert names == {"top/a.txt", "top/b.txt.error", "top/c.log", "top/manifest.json"}
        assert tar.extractfile("top/a.txt").read() == b"token=<redacted> all fine"
        assert b"leaky" not in tar.extractfile("top/b.txt.error").read()
        manifest = json.load(tar.extractfile("top/manifest.json"))
    assert [p["name"] for p in manifest["parts"]] == ["a.txt", "b.txt", "c.log"]
    assert "leaky" not in json.dumps(manifest)


def test_fractal_collect_bundle(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    sandboxes.write(sandboxes.SandboxRecord(group="web", namespace="k8s.io", mode="vm", shim_pid=os.getpid(),
                                            containers=["web", "side"]), base=run_dir)
    console = run_dir / "vms" / "k8s.io" / "web" / "console.log"
    console.parent.mkdir(parents=True)
    console.write_bytes(b"boot noise\n" * 100000 + b"[    1.0] fractal: agent ready\n")
    fractal_toml = tmp_path / "fractal.toml"
    fractal_toml.write_text('root = "/srv/fractal"\n[vm]\nmemory_mb = 512\napi_token = "fractal-secret"\n')
    containerd_toml = tmp_path / "containerd" / "config.toml"
    containerd_toml.parent.mkdir()
    containerd_toml.write_text(CONTAINERD_TOML)
    (containerd_toml.parent / "conf.d").mkdir()
    (containerd_toml.parent / "conf.d" / "fractal.toml").write_text('[x]\npassword = "dropin-secret"\n')
    snap_log = tmp_path / "snapshotter.log"
    snap_log.write_text('time="t" level=info msg="serving" logger=fractal.snapshotter\n')
    cd_log = tmp_path / "containerd.log"
    cd_log.write_text('level=info msg="other runtime" runtime=io.containerd.runc.v2\n'
                      f'level=info msg="created web" token=shim-secret runtime={C.RUNTIME}\n')
    out = tmp_path / "bundle.tar.gz"
    env = {**os.environ, "FRACTAL_RUN_DIR": str(run_dir), "FRACTAL_CONFIG": str(fractal_toml),
           "FRACTAL_SNAPSHOTTER_METRICS_ADDRESS": f"unix:{tmp_path}/none.sock"}
    r = subprocess.run([sys.executable, "-m", "ccpu.cli", "collect", "-o", str(out), "--json",
                        "-a", str(tmp_path / "no-containerd.sock"), "--containerd-config", str(containerd_toml),
                        "--snapshotter-log", str(snap_log), "--containerd-log", str(cd_log)],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["bundle"] == str(out)
    with tarfile.open(out) as tar:
        files = {m.name.split("/", 1)[1]: tar.extractfile(m).read().decode() for m in tar.getmembers()}
    assert files["versions.txt"].startswith("fractal: ") and "python: " in files["versions.txt"]
    assert "containerd: " in files["versions.txt"] and "kernel: " in files["versions.txt"]
    assert 'root = "/srv/fractal"' in files["config/fractal.toml"]
    assert "[proxy_plugins.fractal]" in files["config/containerd.toml"]
    assert "config/containerd.conf.d/fractal.toml" in files
    assert "fractal doctor" in files["doctor.txt"] or "containerd" in files["doctor.txt"]
    assert json.loads(files["sandboxes.json"])["k8s.io"]["web"]["containers"] == ["web", "side"]
    assert "serving" in files["logs/snapshotter.log"]
    assert "created web" in files["logs/shims.log"] and "runc.v2" not in files["logs/shims.log"]
    vm_console = files["logs/vms/k8s.io/web/console.log"]
    assert vm_console.endswith("agent ready\n") and len(vm_console) <= C.MAX_CONSOLE + 100
    # containerd is not there: ps fails, and says so in its own part
    assert "ps/k8s.io.json.error" in files and "ps/default.json.error" in files
    manifest = json.loads(files["manifest.json"])
    assert {p["name"]: p["ok"] for p in manifest["parts"]}["ps/k8s.io.json"] is False
    everything = "\n".join(files.values())
    for secret in ("hunter2-containerd", "fractal-secret", "dropin-secret", "shim-secret", "line-secret"):
        assert secret not in everything, secret
