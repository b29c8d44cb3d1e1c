"""Fixtures for integration and security tests: a private containerd (+ fractal snapshotter) and a local registry.

Loaded as a plugin by tests/conftest.py, so tests/integration/ and tests/security/ share one
containerd per session.

Why the shape:
* One containerd for the whole session (starts in well under a second, but pulls are slow), with
  a fresh containerd namespace per test so tests stay independent.
* Integration tests need root, containerd, ctr and runc.  Without them the whole directory is
  skipped with the reason -- except under CI (``CI`` set), where a missing prerequisite is an error,
  so the skip can never hide the feature on the machine that is supposed to test it.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Iterator

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from hack.containerd_env import FractalEnv, Snapshotter  # noqa: E402

ON_CI = os.environ.get("CI", "").lower() not in ("", "0", "false")
TEST_IMAGES = ("busybox", "edge", "tools")
CACHE = Path(os.environ.get("FRACTAL_CACHE", "/var/cache/fractal"))
#: the directories whose tests run through real containerd / QEMU (marked `integration`)
SYSTEM_TEST_DIRS = {REPO / "tests" / "integration", REPO / "tests" / "security"}


# containerd matrix: FRACTAL_CONTAINERD_VERSION=2 (or `--containerd 2` when this directory is
# given on pytest's command line) runs every FractalEnv on containerd 2.x built by hack/peers.sh
# instead of the distribution's 1.6.  tests/integration/test_containerd2.py runs the snapshotter
# and shim suites that way.


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--containerd", choices=("1", "1.7", "2"), default=None,
                     help="containerd version for the private containerd (default: "
                          "$FRACTAL_CONTAINERD_VERSION or 1 = the distribution's 1.6); 1.7 and 2 = "
                          "hack/peers.sh's containerd 1.7 / 2.x")


def pytest_configure(config: pytest.Config) -> None:
    try:
        wanted = config.getoption("--containerd")
    except ValueError:
        wanted = None
    if wanted:
        os.environ["FRACTAL_CONTAINERD_VERSION"] = wanted


def containerd_matrix_version() -> str:
    """"1", "1.7" or "2": which containerd this session's envs run."""
    from hack.containerd_env import containerd_version_wanted

    return containerd_version_wanted()


def _missing_prerequisites() -> list[str]:
    missing = []
    if os.geteuid() != 0:
        missing.append("not running as root")
    tools = ("containerd", "ctr", "runc")
    from hack.containerd_env import CONTAINERD_PEERS

    peer = CONTAINERD_PEERS.get(containerd_matrix_version())
    if peer:
        from hack.containerd_env import peer_missing

        why = peer_missing(peer)
        if why:
            missing.append(why)
        tools = ("runc",)
    for tool in tools:
        if shutil.which(tool) is None:
            missing.append(f"`{tool}` not on PATH")
    return missing


def _unavailable(reason: str) -> None:
    """Skip locally; fail under CI (where the prerequisites are promised to exist)."""
    if ON_CI:
        pytest.fail(f"integration prerequisite missing on CI: {reason}", pytrace=False)
    pytest.skip(reason)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    missing = _missing_prerequisites()
    for item in items:
        if not set(Path(str(item.fspath)).parents) & SYSTEM_TEST_DIRS:
            continue
        item.add_marker(pytest.mark.integration)
        if missing and not ON_CI:
            item.add_marker(pytest.mark.skip(reason="integration tests need " + "; ".join(missing)))


@pytest.fixture(autouse=True)
def _integration_prerequisites(request: pytest.FixtureRequest) -> None:
    """System tests need their prerequisites (skip locally, fail under CI); unit tests do not."""
    if not set(Path(str(request.node.fspath)).parents) & SYSTEM_TEST_DIRS:
        return
    missing = _missing_prerequisites()
    if missing:
        _unavailable("; ".join(missing))


# ---------------------------------------------------------------------------------------------
# registry


@dataclass
class Registry:
    """The session's local registry with the test images pushed to ``fractal/<name>:latest``."""

    address: str
    server: Any = field(repr=False, default=None)
    pushed: dict[str, str] = field(default_factory=dict)

    def ref(self, name: str) -> str:
        return f"{self.address}/fractal/{name}:latest"


def wait_for(cond: Any, timeout: float = 30.0, what: str = "condition", interval: float = 0.1) -> Any:
    """`cond()`'s first truthy value, polled every `interval` s; AssertionError naming `what`
    after `timeout` s (a deadline for a state to be reached, never a speed assertion)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def shim_daemons(env: FractalEnv, namespace: str, group: str) -> list[int]:
    """Pids of the shim daemon serving sandbox ``group`` of ``namespace`` in ``env``: found by the
    rule tools use (shim/procs.py: its comm and its socket), never by its command line -- a daemon
    forked by the fork-server carries the fork-server's, which names no namespace."""
    from shim import address, procs

    want = address.socket_path(str(env.address), namespace, group)
    return [p.pid for p in procs.find(str(env.address)) if p.socket == want]


def build_test_image(name: str) -> Path:
    """Build (or reuse from the cache) ``$FRACTAL_CACHE/images/<name>`` with hack/testimages.py."""
    if not (REPO / "hack" / "testimages.py").exists():
        _unavailable("hack/testimages.py does not exist yet")
    from hack import testimages

    return testimages.build(name)


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """Local registry with busybox, edge and tools pushed; ``.ref(name)`` gives the image ref.

    ``FRACTAL_REGISTRY=127.0.0.1:PORT`` reuses an already running registry that has the images
    (faster edit-test loops, debugging); nothing is built or pushed then.
    """
    existing = os.environ.get("FRACTAL_REGISTRY")
    if existing:
        yield Registry(address=existing)
        return
    if not (REPO / "hack" / "registry.py").exists():
        _unavailable("hack/registry.py does not exist yet")
    from hack.registry import LocalRegistry

    server = LocalRegistry(tmp_path_factory.mktemp("registry"))
    server.start()
    try:
        reg = Registry(address=server.address, server=server)
        for name in TEST_IMAGES:
            layout = build_test_image(name)
            server.push(layout, f"fractal/{name}", "latest")
            reg.pushed[name] = reg.ref(name)
        yield reg
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------
# containerd environments


@pytest.fixture(scope="session")
def fenv() -> Iterator[FractalEnv]:
    """Private containerd wired to the fractal snapshotter (``--snapshotter fractal``)."""
    if not (REPO / "snapshotter" / "server.py").exists():
        _unavailable("snapshotter/server.py does not exist yet")
    with FractalEnv(snapshotter=True, snapshotter_args=["--debug"] if os.environ.get("FRACTAL_DEBUG") else ()) as env:
        yield env


@pytest.fixture(scope="session")
def plain_env() -> Iterator[FractalEnv]:
    """Private containerd without the fractal snapshotter (overlayfs baseline, harness tests)."""
    with FractalEnv(snapshotter=False) as env:
        yield env


def _namespace(env: FractalEnv) -> Iterator[str]:
    ns = env.new_namespace()
    yield ns
    problems = env.remove_namespace(ns)
    if problems:
        # Not a test failure of the feature, but it would make later tests interfere: report it.
        pytest.fail("namespace cleanup failed:\n" + "\n".join(problems), pytrace=False)


@pytest.fixture
def namespace(fenv: FractalEnv) -> Iterator[str]:
    """A unique containerd namespace in ``fenv``; its images, containers and snapshots are removed after."""
    yield from _namespace(fenv)


@pytest.fixture
def plain_namespace(plain_env: FractalEnv) -> Iterator[str]:
    """Same as ``namespace`` but in ``plain_env``."""
    yield from _namespace(plain_env)


# ---------------------------------------------------------------------------------------------
# a snapshotter of a test's own


@dataclass
class PrivateSnapshotter:
    """A running ``python3 -m snapshotter.server`` no containerd knows, and a Snapshots client."""

    daemon: Snapshotter
    client: Any  # snapshots_pb2_grpc.SnapshotsStub

    def output_lines(self) -> list[str]:
        """What the snapshotter wrote (stdout and stderr), without the harness's own lines."""
        text = self.daemon.log_path.read_text() if self.daemon.log_path.exists() else ""
        return [line for line in text.splitlines() if line and not line.startswith("==== ")]


@contextmanager
def private_snapshotter(tmp: Path, *args: str) -> Iterator[PrivateSnapshotter]:
    """A snapshotter process of its own on a fresh repo under ``tmp`` (socket ``tmp/s.sock``,
    output in ``tmp/snapshotter.log``), started with the extra ``args``; stopped on exit.

    Snapshots made straight over gRPC must not live in a session env's snapshotter: containerd's
    metadata GC walks its backends and removes every snapshot its database does not name
    (metadata/snapshot.go garbageCollect), so such a snapshot vanishes whenever a GC runs.
    """
    import grpc

    from ccpu.api.gen.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc

    daemon = Snapshotter(tmp / "root", tmp / "s.sock", tmp / "snapshotter.log", extra_args=args)
    daemon.start()
    try:
        with grpc.insecure_channel(f"unix:{daemon.address}") as ch:
            yield PrivateSnapshotter(daemon, pb_grpc.SnapshotsStub(ch))
    finally:
        daemon.stop(timeout=30)
