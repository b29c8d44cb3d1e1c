"""A hostile registry or OCI layout cannot make `fractal image pull/import` touch host paths.

Attack (issue 10 item 3): `fractal image pull` and `import oci:` used descriptor digests as
paths unchecked.  A registry serving a manifest whose digest is ``sha256:../../../<path>``
made the (root) CLI write ``<path>.part`` anywhere, left behind when the digest check failed;
a layout could name any host file, which was read and shipped to containerd.  Every digest
is now checked (``<alg>:<hex>``, sha256/sha512 with their exact length) before any path or
URL use, and a layout's blobs are opened beneath it without following symlinks.

The registry here is a small hostile HTTP server (a real docker-registry refuses such
manifests on push, which is exactly why an attacker runs their own).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest

from hack.containerd_env import FractalEnv

REPO = Path(__file__).resolve().parents[2]
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"


def fractal(*args: str, tmpdir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TMPDIR": str(tmpdir)}  # the pull's temp layout goes here: we can look inside
    return subprocess.run([sys.executable, "-m", "ccpu.cli", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300, env=env)


class HostileRegistry:
    """Serves one manifest (any tag) and the same bytes for every blob, over plain HTTP."""

    def __init__(self, manifest: dict, blob: bytes) -> None:
        self.manifest = json.dumps(manifest).encode()
        self.blob = blob
        self.requests: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                outer.requests.append(self.path)
                if self.path == "/v2/":
                    body, ctype = b"{}", "application/json"
                elif "/manifests/" in self.path:
                    body, ctype = outer.manifest, OCI_MANIFEST
                else:
                    body, ctype = outer.blob, "application/octet-stream"
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "HostileRegistry":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def outside(tmp_path: Path) -> Iterator[Path]:
    """A directory outside the pull's temp dir, where nothing may appear."""
    d = tmp_path / "outside"
    d.mkdir()
    yield d


def traversal_to(path: Path) -> str:
    return "sha256:" + "../" * 16 + str(path).lstrip("/")


def pull_config_from_hostile_registry(fenv: FractalEnv, namespace: str, tmpdir: Path, config_digest: str
                                      ) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """`fractal image pull` of an image whose manifest names ``config_digest``; (result, paths GET)."""
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": 5}, "layers": []}
    tmpdir.mkdir()
    with HostileRegistry(manifest, b"pwned") as reg:
        r = fractal("image", "pull", f"{reg.address}/evil/img:latest", "--plain-http",
                    "-a", str(fenv.address), "-n", namespace, tmpdir=tmpdir)
    return r, reg.requests


def test_pull_refuses_a_digest_that_names_a_host_path(fenv: FractalEnv, namespace: str, tmp_path: Path,
                                                       outside: Path) -> None:
    tmpdir = tmp_path / "tmp"
    r, requests = pull_config_from_hostile_registry(fenv, namespace, tmpdir, traversal_to(outside / "pwned"))
    assert sorted(p.name for p in outside.iterdir()) == []  # neither pwned nor pwned.part
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "refusing descriptor" in r.stderr and "sha256 needs 64 lower-case hex digits" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert list(tmpdir.iterdir()) == []  # the temp layout is gone too
    assert not any("/blobs/" in p for p in requests)  # refused before any download


def test_pull_refuses_a_blob_that_does_not_match_and_leaves_nothing(fenv: FractalEnv, namespace: str,
                                                                     tmp_path: Path) -> None:
    """A well-formed digest whose bytes do not match: the .part file does not outlive the check."""
    tmpdir = tmp_path / "tmp"
    r, _ = pull_config_from_hostile_registry(fenv, namespace, tmpdir,
                                             "sha256:" + hashlib.sha256(b"other").hexdigest())
    assert r.returncode == 1 and "digest mismatch" in r.stderr, r.stderr
    assert list(tmpdir.iterdir()) == []


def _layout(root: Path, index_manifests: list[dict]) -> Path:
    (root / "blobs" / "sha256").mkdir(parents=True)
    (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": index_manifests}))
    return root


def test_import_refuses_a_layout_naming_a_host_path(fenv: FractalEnv, namespace: str, tmp_path: Path,
                                                     outside: Path) -> None:
    secret = outside / "secret"
    secret.write_text(json.dumps({"schemaVersion": 2, "config": {"digest": "sha256:" + "0" * 64, "size": 1},
                                  "layers": []}))
    layout = _layout(tmp_path / "layout", [{"mediaType": OCI_MANIFEST, "digest": traversal_to(secret),
                                            "size": secret.stat().st_size}])
    os.utime(secret, (0, secret.stat().st_mtime))  # relatime: a read now sets atime
    r = fractal("image", "import", f"oci:{layout}", "-a", str(fenv.address), "-n", namespace, tmpdir=tmp_path)
    assert secret.stat().st_atime == 0, "the host file was read"
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "refusing descriptor" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert fenv.ctr("images", "ls", "-q", namespace=namespace).stdout.strip() == ""


def test_import_refuses_a_symlinked_blob(fenv: FractalEnv, namespace: str, tmp_path: Path, outside: Path) -> None:
    """A well-formed digest whose blob file is a symlink to a host file."""
    secret = outside / "secret"
    secret.write_text("{}")
    fake = "sha256:" + hashlib.sha256(b"{}").hexdigest()
    layout = _layout(tmp_path / "layout", [{"mediaType": OCI_MANIFEST, "digest": fake, "size": 2}])
    (layout / "blobs" / "sha256" / fake.split(":")[1]).symlink_to(secret)
    os.utime(secret, (0, secret.stat().st_mtime))
    r = fractal("image", "import", f"oci:{layout}", "-a", str(fenv.address), "-n", namespace, tmpdir=tmp_path)
    assert secret.stat().st_atime == 0, "the host file was read"
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "is a symlink" in r.stderr and "Traceback" not in r.stderr, r.stderr
