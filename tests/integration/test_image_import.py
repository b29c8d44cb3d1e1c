"""`fractal image import` (oci:, docker-archive:) and `fractal image pull` (oras) into the
session's containerd: the image lands unpacked for the fractal snapshotter and runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from hack.containerd_env import FractalEnv

REPO = Path(__file__).resolve().parents[2]


def fractal(env: FractalEnv, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ccpu.cli", *args[:2], *args[2:]], capture_output=True,
                          text=True, cwd=REPO, timeout=timeout, env=dict(os.environ))


def busybox_layout() -> Path:
    from hack import testimages

    return testimages.build("busybox")


def runs(fenv: FractalEnv, ref: str, ns: str, cid: str) -> None:
    assert fenv.run(ref, cid, "echo", "hi", namespace=ns).stdout.strip() == "hi"
    snaps = fenv.ctr("snapshots", "--snapshotter", "fractal", "ls", namespace=ns).stdout
    assert len(snaps.splitlines()) > 1, snaps  # unpacked for fractal
    assert "overlayfs" not in fenv.ctr("images", "ls", namespace=ns).stdout or True


def test_import_oci_layout(fenv: FractalEnv, namespace: str) -> None:
    layout = busybox_layout()
    t0 = time.monotonic()
    r = fractal(fenv, "image", "import", f"oci:{layout}:latest", "-a", str(fenv.address), "-n", namespace)
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    print(f"oci import {took:.2f}s\n{r.stderr}{r.stdout}")
    assert "imported localhost/busybox:latest" in r.stdout
    assert "100%" in r.stderr
    runs(fenv, "localhost/busybox:latest", namespace, "imp-oci")
    # the same again under another name: idempotent, the repo does not grow
    size = fenv.repo_size()
    r = fractal(fenv, "image", "import", f"oci:{layout}", "--name", "example.com/bb:v2", "-a", str(fenv.address),
                "-n", namespace)
    assert r.returncode == 0, r.stderr
    runs(fenv, "example.com/bb:v2", namespace, "imp-oci2")
    assert fenv.repo_size() <= size + 1024 * 1024


def test_import_oci_unknown_tag(fenv: FractalEnv, namespace: str) -> None:
    r = fractal(fenv, "image", "import", f"oci:{busybox_layout()}:nope", "-a", str(fenv.address), "-n", namespace)
    assert r.returncode == 1 and "no tag 'nope'" in r.stderr and "latest" in r.stderr


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo makes the docker-archive")
def test_import_docker_archive(fenv: FractalEnv, namespace: str, tmp_path: Path) -> None:
    tar = tmp_path / "bb.tar"
    subprocess.run(["skopeo", "copy", "-q", f"oci:{busybox_layout()}:latest",
                    f"docker-archive:{tar}:fractal/busybox:saved"], check=True, capture_output=True)
    t0 = time.monotonic()
    r = fractal(fenv, "image", "import", f"docker-archive:{tar}", "-a", str(fenv.address), "-n", namespace)
    assert r.returncode == 0, r.stderr
    print(f"docker-archive import {time.monotonic() - t0:.2f}s\n{r.stderr}{r.stdout}")
    assert "imported docker.io/fractal/busybox:saved" in r.stdout
    runs(fenv, "docker.io/fractal/busybox:saved", namespace, "imp-da")
    r = fractal(fenv, "image", "import", f"docker-archive:{tar}", "--name", "local/renamed:1",
                "-a", str(fenv.address), "-n", namespace)
    assert r.returncode == 0, r.stderr
    names = fenv.ctr("images", "ls", "-q", namespace=namespace).stdout.split()
    assert "local/renamed:1" in names
    runs(fenv, "local/renamed:1", namespace, "imp-da2")


def test_pull_with_oras(fenv: FractalEnv, registry, namespace: str) -> None:
    ref = registry.ref("busybox")
    t0 = time.monotonic()
    r = fractal(fenv, "image", "pull", ref, "--plain-http", "-a", str(fenv.address), "-n", namespace)
    assert r.returncode == 0, r.stderr
    print(f"pull {time.monotonic() - t0:.2f}s\n{r.stderr}{r.stdout}")
    assert f"imported {ref}" in r.stdout and "pull 1/" in r.stderr
    runs(fenv, ref, namespace, "imp-pull")


def test_pull_unreachable_registry(fenv: FractalEnv, namespace: str) -> None:
    r = fractal(fenv, "image", "pull", "127.0.0.1:9/x/y:1", "--plain-http", "-a", str(fenv.address),
                "-n", namespace, timeout=120)
    assert r.returncode == 1 and "cannot reach 127.0.0.1:9" in r.stderr and "Traceback" not in r.stderr


@pytest.fixture
def podman_api(tmp_path: Path):  # noqa: ANN201
    """``podman system service`` on a private socket with private storage, busybox loaded."""
    if shutil.which("podman") is None:
        pytest.skip("podman not installed (hack/setup.sh installs it)")
    base = tmp_path / "pm"
    runroot = Path(tempfile.mkdtemp(prefix="fractal-pm-"))  # podman: runroot at most 50 characters
    pm = ["podman", "--root", str(base / "storage"), "--runroot", str(runroot), "--storage-driver", "vfs",
          "--tmpdir", str(base / "tmp")]
    subprocess.run([*pm, "pull", "-q", f"oci:{busybox_layout()}:latest"], check=True, capture_output=True,
                   timeout=120)
    subprocess.run([*pm, "tag", f"localhost{busybox_layout()}:latest", "localhost/fractal-bb:v1"], check=True,
                   capture_output=True, timeout=60)
    sock = base / "api.sock"
    proc = subprocess.Popen([*pm, "system", "service", "--time", "0", f"unix://{sock}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "podman system service did not start"
            time.sleep(0.05)
        yield f"unix://{sock}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(runroot, ignore_errors=True)


def test_import_from_docker_api(fenv: FractalEnv, namespace: str, podman_api: str) -> None:
    t0 = time.monotonic()
    r = fractal(fenv, "image", "import", "docker://localhost/fractal-bb:v1", "--docker-host", podman_api,
                "-a", str(fenv.address), "-n", namespace)
    assert r.returncode == 0, r.stderr
    print(f"docker:// import {time.monotonic() - t0:.2f}s\n{r.stderr}{r.stdout}")
    assert "imported localhost/fractal-bb:v1" in r.stdout
    runs(fenv, "localhost/fractal-bb:v1", namespace, "imp-docker")
    r = fractal(fenv, "image", "import", "docker://nosuch:1", "--docker-host", podman_api,
                "-a", str(fenv.address), "-n", namespace)
    assert r.returncode == 1 and "no image 'nosuch:1'" in r.stderr


# ------------------------------------------------------------------------------------------
# registry credentials (issue 14 item 4): docker-registry with htpasswd (HTTP Basic) auth

PASSWORD = "pw-Zq8-never-printed"


@pytest.fixture(scope="module")
def auth_registry(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """A second local registry that asks for user alice (bcrypt htpasswd), busybox pushed."""
    pytest.importorskip("bcrypt", reason="the test extra's bcrypt writes the htpasswd file")
    from hack.registry import LocalRegistry

    with LocalRegistry(tmp_path_factory.mktemp("auth-registry"), users={"alice": PASSWORD}) as reg:
        yield reg, reg.push(busybox_layout(), "private/busybox")


def pull_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment with no auth file of the machine's user in sight."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME", "DOCKER_CONFIG")}
    return {**env, "HOME": str(home), **extra}


def pull(fenv: FractalEnv, ref: str, namespace: str, env: dict[str, str], *flags: str,
         stdin: str | None = None, debug: bool = True) -> subprocess.CompletedProcess[str]:
    """``fractal --debug image pull REF``: debug logs on, so a secret in them would show."""
    return subprocess.run([sys.executable, "-m", "ccpu.cli", *(["--debug"] if debug else []),
                           "image", "pull", ref, "--plain-http",
                           "-a", str(fenv.address), "-n", namespace, *flags],
                          capture_output=True, text=True, cwd=REPO, timeout=300, env=env, input=stdin)


def test_pull_without_credentials_says_how_to_log_in(fenv: FractalEnv, namespace: str, auth_registry,
                                                       tmp_path: Path) -> None:
    reg, ref = auth_registry
    r = pull(fenv, ref, namespace, pull_env(tmp_path), debug=False)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "HTTP 401" in lines[0] and f"docker login {reg.address}" in lines[0], r.stderr
    assert "--password-stdin" in lines[0] and "Traceback" not in r.stderr


def test_pull_with_auth_file(fenv: FractalEnv, namespace: str, auth_registry, tmp_path: Path) -> None:
    from hack.registry import docker_auth_file

    reg, ref = auth_registry
    authfile = tmp_path / "auth.json"
    authfile.write_text(docker_auth_file(reg.address, "alice", PASSWORD))
    r = pull(fenv, ref, namespace, pull_env(tmp_path / "home", REGISTRY_AUTH_FILE=str(authfile)))
    assert r.returncode == 0, r.stderr
    assert PASSWORD not in r.stdout + r.stderr
    runs(fenv, ref, namespace, "auth-file")
    # docker's own place, ~/.docker/config.json, as `docker login` leaves it
    (tmp_path / "home" / ".docker").mkdir(parents=True)
    (tmp_path / "home" / ".docker" / "config.json").write_text(docker_auth_file(reg.address, "alice", PASSWORD))
    r = pull(fenv, ref, namespace, pull_env(tmp_path / "home"), "--name", "local/auth:docker")
    assert r.returncode == 0, r.stderr


def test_pull_with_username_and_password_stdin(fenv: FractalEnv, namespace: str, auth_registry,
                                               tmp_path: Path) -> None:
    reg, ref = auth_registry
    r = pull(fenv, ref, namespace, pull_env(tmp_path), "--username", "alice", "--password-stdin",
             stdin=PASSWORD + "\n")
    assert r.returncode == 0, r.stderr
    assert PASSWORD not in r.stdout + r.stderr
    runs(fenv, ref, namespace, "auth-stdin")
    wrong = "wrong-" + PASSWORD
    r = pull(fenv, ref, namespace, pull_env(tmp_path), "-u", "alice", "--password-stdin",
             stdin=wrong + "\n")
    assert r.returncode == 1 and "refused the credentials (user 'alice'" in r.stderr, r.stderr
    assert wrong not in r.stdout + r.stderr and "Traceback" not in r.stderr
    r = pull(fenv, ref, namespace, pull_env(tmp_path), "--password-stdin", stdin="x\n")
    assert r.returncode == 2 and "needs --username" in r.stderr
    # nothing the daemons logged holds the secret either (they never see it: oras pulls)
    for log in fenv.log_dir.glob("*.log"):
        assert PASSWORD not in log.read_text(errors="replace"), log
