#!/usr/bin/env python3
"""A throwaway local image registry (Debian's docker-registry) for tests and demos.

Why: containerd pulls images from registries, and these machines reach none. The
test images from ``hack/testimages.py`` are OCI layouts on disk; this serves them
over plain HTTP on 127.0.0.1 so ``ctr images pull --plain-http 127.0.0.1:PORT/edge:latest``
and the snapshotter see a real pull path (manifests, blobs, remote digests).

Each instance gets its own generated config and storage under ``data_dir``, a free
port unless one is given, and its own process group; ``stop()`` (also run by the
context manager, at interpreter exit, and via PDEATHSIG if this Python process is
killed) takes the whole group down, so tests never leak registries or ports.

CLI::

    python3 hack/registry.py serve --data DIR [--port P] [--push-all] [--with-debian]
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

if __package__ in (None, ""):  # run as a script: make `hack` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hack import testimages  # noqa: E402

REGISTRY_BIN = "docker-registry"
HOST = "127.0.0.1"

CONFIG_TEMPLATE = """\
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: true
http:
  addr: {addr}
  headers:
    X-Content-Type-Options: [nosniff]
"""

#: appended for a registry with users (docker-registry's htpasswd auth: bcrypt entries only)
AUTH_TEMPLATE = """\
auth:
  htpasswd:
    realm: fractal-test
    path: {htpasswd}
"""


def htpasswd_line(user: str, password: str) -> str:
    """One ``user:$2b$...`` line of an htpasswd file, as docker-registry reads them (bcrypt;
    the ``bcrypt`` package is a test dependency, apache2-utils' htpasswd is not needed)."""
    import bcrypt

    return f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()}\n"


class RegistryError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when the parent dies (e.g. pytest SIGKILLed)."""
    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class LocalRegistry:
    """docker-registry on 127.0.0.1; use as ``with LocalRegistry(tmpdir) as reg: reg.push(...)``."""

    def __init__(self, data_dir: Path | str, port: int | None = None, start_timeout: float = 15.0,
                 users: dict[str, str] | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.port = port
        #: user -> password: the registry then asks for them (HTTP Basic, htpasswd); push() logs in
        self.users = dict(users or {})
        self.start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------------

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT`` (only meaningful once started)."""
        if self.port is None:
            raise RegistryError("registry not started: no port yet")
        return f"{HOST}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path:
        return self.data_dir / "registry.log"

    def start(self) -> LocalRegistry:
        with self._lock:
            if self.running:
                return self
            fixed_port = self.port is not None
            attempts = 1 if fixed_port else 3  # free_port() can race with other processes
            last_err: Exception | None = None
            for _ in range(attempts):
                if not fixed_port:
                    self.port = free_port()
                try:
                    self._spawn_and_wait()
                    atexit.register(self.stop)
                    return self
                except RegistryError as e:
                    last_err = e
                    self._kill()
            raise last_err or RegistryError("registry failed to start")

    def _spawn_and_wait(self) -> None:
        (self.data_dir / "storage").mkdir(parents=True, exist_ok=True)
        config = self.data_dir / "config.yml"
        text = CONFIG_TEMPLATE.format(storage=self.data_dir / "storage", addr=self.address)
        if self.users:
            htpasswd = self.data_dir / "htpasswd"
            htpasswd.write_text("".join(htpasswd_line(u, pw) for u, pw in self.users.items()))
            text += AUTH_TEMPLATE.format(htpasswd=htpasswd)
        config.write_text(text)
        with self.log_path.open("ab") as log:
            try:
                self._proc = subprocess.Popen(
                    [REGISTRY_BIN, "serve", str(config)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # own process group: stop() kills it whole
                    preexec_fn=_die_with_parent,
                )
            except FileNotFoundError as e:
                raise RegistryError(f"{REGISTRY_BIN} not found: apt-get install docker-registry") from e
        deadline = time.monotonic() + self.start_timeout
        url = f"http://{self.address}/v2/"
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RegistryError(f"docker-registry exited with {self._proc.returncode}:\n{self._log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=1) as r:
                    if r.status == 200:
                        return
            except urllib.error.HTTPError as e:
                if e.code == 401:  # auth configured elsewhere still means "up"
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.05)
        raise RegistryError(f"docker-registry did not answer GET {url} within {self.start_timeout}s:\n{self._log_tail()}")

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=5)
        else:
            proc.wait()

    def stop(self) -> None:
        """Stop the registry and its process group; safe to call repeatedly."""
        with self._lock:
            self._kill()
            atexit.unregister(self.stop)

    def __enter__(self) -> LocalRegistry:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- content -----------------------------------------------------------------

    def ref(self, repo: str, tag: str = "latest") -> str:
        """Reference as containerd wants it: ``127.0.0.1:PORT/REPO:TAG``."""
        return f"{self.address}/{repo}:{tag}"

    def push(self, layout_dir: Path | str, repo: str, tag: str = "latest", src_tag: str = testimages.TAG) -> str:
        """Copy an OCI layout's ``src_tag`` to ``REPO:TAG`` here; return the reference."""
        if not self.running:
            raise RegistryError("registry not running")
        layout = Path(layout_dir)
        if not (layout / "index.json").is_file():
            raise RegistryError(f"{layout} is not an OCI layout (no index.json)")
        ref = self.ref(repo, tag)
        cmd = [
            "skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false",
            f"oci:{layout}:{src_tag}", f"docker://{ref}",
        ]  # fmt: skip
        if self.users:  # an auth file, so no password appears on a command line
            user, password = next(iter(self.users.items()))
            authfile = self.data_dir / "push-auth.json"
            authfile.write_text(docker_auth_file(self.address, user, password))
            cmd[4:4] = ["--dest-authfile", str(authfile)]
        try:
            subprocess.run(cmd, check=True, capture_output=True, text=True)
        except FileNotFoundError as e:
            raise RegistryError("skopeo not found: apt-get install skopeo") from e
        except subprocess.CalledProcessError as e:
            raise RegistryError(f"`{' '.join(cmd)}` failed ({e.returncode}):\n{e.stderr.strip()}") from e
        return ref

    def push_test_image(self, name: str, cache: Path | str | None = None, tag: str = "latest") -> str:
        """Push a (built) image from hack/testimages.py under its own name."""
        layout = testimages.layout_path(name, cache)
        if not testimages.is_built(name, cache):
            raise RegistryError(f"test image {name!r} not built: python3 hack/testimages.py build --only {name}")
        return self.push(layout, name, tag)


def docker_auth_file(registry: str, user: str, password: str) -> str:
    """A ``~/.docker/config.json`` (also podman's auth.json) with one registry's credentials."""
    import base64
    import json

    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return json.dumps({"auths": {registry: {"auth": token}}})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Serve a local docker-registry with fractal's test images.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run until Ctrl-C")
    s.add_argument("--data", type=Path, required=True, help="dir for config, storage and log")
    s.add_argument("--port", type=int, default=None)
    s.add_argument("--push-all", action="store_true", help="push every built test image")
    s.add_argument("--build", action="store_true", help="build missing default test images first")
    s.add_argument("--cache", type=Path, default=None, help="test image cache (default $FRACTAL_CACHE)")
    args = ap.parse_args(argv)

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        if args.build:
            testimages.build_all(cache=args.cache)
        with LocalRegistry(args.data, args.port) as reg:
            print(f"registry: serving http://{reg.address} (data {args.data})", flush=True)
            if args.push_all:
                for name in testimages.RECIPES:
                    if testimages.is_built(name, args.cache):
                        print(reg.push_test_image(name, args.cache), flush=True)
            print("registry: Ctrl-C to stop", flush=True)
            while not stop.wait(1):
                if not reg.running:
                    print(f"registry: docker-registry died:\n{reg._log_tail()}", file=sys.stderr)
                    return 1
    except (RegistryError, testimages.ImageBuildError) as e:
        print(f"registry: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
