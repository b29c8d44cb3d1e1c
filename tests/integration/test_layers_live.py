"""`fractal layers ls|add|rm` through a real containerd, the real shim and the fractal snapshotter
(host mode): a running busybox container gets the `tools` image's layers and loses them again
without a restart; errors leave it running; GC references keep added layers alive."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hack.containerd_env import FractalEnv
from tests.harness import wait_for

RUNTIME = "io.containerd.fractal.v1"
HELLO = "/opt/tools/hello.txt"
POLLER = ("echo mine > /mine; while :; do if [ -f /opt/tools/hello.txt ]; then cat /opt/tools/hello.txt > /seen.tmp; "
          "else echo absent > /seen.tmp; fi; mv /seen.tmp /seen; sleep 0.05; done")


def fractal(env: FractalEnv, *args: str, extra_env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    e = {**os.environ, "FRACTAL_RUN_DIR": str(env.fractal_run_dir), **(extra_env or {})}
    for k in ("CONTAINERD_ADDRESS", "CONTAINERD_NAMESPACE"):
        if extra_env is None or k not in extra_env:
            e.pop(k, None)
    return subprocess.run([sys.executable, "-m", "ccpu.cli", *args], capture_output=True, text=True, env=e,
                          timeout=timeout)


def flags(env: FractalEnv, ns: str) -> list[str]:
    return ["-a", str(env.address), "-n", ns]


class Box:
    """One long-running container (the poller) in a namespace of `fenv`."""

    n = 0

    def __init__(self, env: FractalEnv, ns: str, image: str, cid: str, cmd: str = POLLER,
                 snapshotter: str = "fractal", runtime: str = RUNTIME) -> None:
        self.env, self.ns, self.cid = env, ns, cid
        env.run(image, cid, "sh", "-c", cmd, rm=False, namespace=ns, runtime=runtime if runtime != "runc" else None,
                snapshotter=snapshotter, extra=["-d"])
        self.pid = self.task_pid()
        if cmd == POLLER:
            wait_for(lambda: self.sh("cat /seen 2>/dev/null") != "", what="the poller")

    def task_pid(self) -> int:
        r = self.env.ctr("tasks", "ls", namespace=self.ns)
        for line in r.stdout.splitlines()[1:]:
            parts = line.split()
            if parts and parts[0] == self.cid:
                assert parts[2] == "RUNNING", line
                return int(parts[1])
        raise AssertionError(f"{self.cid} has no task: {r.stdout}")

    def sh(self, script: str, check: bool = False) -> str:
        Box.n += 1
        r = self.env.ctr("tasks", "exec", "--exec-id", f"x{Box.n}", self.cid, "sh", "-c", script,
                         namespace=self.ns, check=check)
        return r.stdout.strip()

    def seen(self) -> str:
        return self.sh("cat /seen")

    def remove(self) -> None:
        self.env.ctr("tasks", "kill", "-s", "SIGKILL", self.cid, namespace=self.ns, check=False)
        for _ in range(100):
            if self.env.ctr("tasks", "delete", self.cid, namespace=self.ns, check=False).returncode == 0:
                break
            time.sleep(0.1)
        self.env.ctr("containers", "delete", self.cid, namespace=self.ns, check=False)

    def alive(self) -> bool:
        return self.task_pid() == self.pid


@pytest.fixture
def images(fenv: FractalEnv, registry, namespace: str) -> dict[str, str]:  # noqa: ANN001
    refs = {name: registry.ref(name) for name in ("busybox", "tools")}
    fenv.pull(refs["busybox"], namespace=namespace)
    return refs


@pytest.fixture
def box(fenv: FractalEnv, images: dict[str, str], namespace: str):  # noqa: ANN201
    b = Box(fenv, namespace, images["busybox"], "live1")
    yield b
    b.remove()


def ls_json(env: FractalEnv, ns: str, cid: str) -> dict:
    r = fractal(env, "layers", "ls", *flags(env, ns), "--json", cid)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_add_ls_rm_on_a_running_container(fenv: FractalEnv, images: dict[str, str], namespace: str,
                                          box: Box, registry) -> None:  # noqa: ANN001
    tools = images["tools"]
    assert box.seen() == "absent"
    before = ls_json(fenv, namespace, box.cid)
    assert len(before["layers"]) == 1 and not before["layers"][0]["live"]
    assert before["layers"][0]["image"] == images["busybox"]

    # tools is not pulled yet: `add` pulls it (plain http: the local registry) with --snapshotter fractal
    r = fractal(fenv, "layers", "add", *flags(fenv, namespace), "--plain-http", box.cid, tools)
    assert r.returncode == 0, r.stderr
    assert "added 2 layer(s)" in r.stdout  # tools shares busybox's base layer: only its own two
    assert box.sh(f"cat {HELLO}") == "hello from tools"
    wait_for(lambda: box.seen() == "hello from tools", what="the poller to see the added file")
    assert box.sh("cat /mine") == "mine"
    assert box.alive()

    after = ls_json(fenv, namespace, box.cid)
    rows = after["layers"]
    assert [la["live"] for la in rows] == [True, True, False]
    assert rows[0]["image"] == rows[1]["image"] == tools
    assert all(la["chain_id"].startswith("sha256:") and la["size"] is not None for la in rows)
    table = fractal(fenv, "layers", "ls", *flags(fenv, namespace), box.cid)
    assert table.returncode == 0 and tools in table.stdout and "live" in table.stdout
    # the added image is referenced from the container (containerd's GC)
    info = json.loads(fenv.ctr("containers", "info", box.cid, namespace=namespace).stdout)
    refs = {k: v for k, v in (info.get("Labels") or {}).items() if k.startswith("containerd.io/gc.ref.snapshot.fractal/live-")}
    assert list(refs.values()) == [rows[0]["chain_id"]]
    # the metadata is kept in the bundle
    shim_rec = next(iter(json.loads(p.read_text()) for p in (fenv.fractal_run_dir / "sandboxes" / namespace).glob("*.json")))
    assert shim_rec["address"].startswith("unix://")

    # adding it again: nothing to do, still fine
    r = fractal(fenv, "layers", "add", *flags(fenv, namespace), box.cid, tools)
    assert r.returncode == 0 and "nothing added" in r.stdout, r.stdout + r.stderr

    r = fractal(fenv, "layers", "rm", *flags(fenv, namespace), box.cid, tools)
    assert r.returncode == 0, r.stderr
    assert box.sh(f"cat {HELLO} 2>&1; echo rc=$?").endswith("rc=1")
    wait_for(lambda: box.seen() == "absent", what="the poller to see the file gone")
    assert box.sh("cat /mine") == "mine"
    assert box.alive()
    assert [la["live"] for la in ls_json(fenv, namespace, box.cid)["layers"]] == [False]
    info = json.loads(fenv.ctr("containers", "info", box.cid, namespace=namespace).stdout)
    assert not [k for k in (info.get("Labels") or {}) if "/live-" in k]


def test_environment_instead_of_flags_and_position(fenv: FractalEnv, images: dict[str, str], namespace: str,
                                                   box: Box) -> None:
    fenv.pull(images["tools"], namespace=namespace)
    env = {"CONTAINERD_ADDRESS": str(fenv.address), "CONTAINERD_NAMESPACE": namespace}
    r = fractal(fenv, "layers", "add", "--position", "bottom", box.cid, images["tools"], extra_env=env)
    assert r.returncode == 0, r.stderr
    r = fractal(fenv, "layers", "ls", "--json", box.cid, extra_env=env)
    assert r.returncode == 0, r.stderr
    assert [la["live"] for la in json.loads(r.stdout)["layers"]] == [False, True, True]
    assert box.sh(f"cat {HELLO}") == "hello from tools"
    # remove by digest (a unique prefix, as `ls` prints it)
    chain = json.loads(r.stdout)["layers"][1]["chain_id"]
    r = fractal(fenv, "layers", "rm", box.cid, chain[:19], extra_env=env)
    assert r.returncode == 0, r.stderr
    assert len(json.loads(fractal(fenv, "layers", "ls", "--json", box.cid, extra_env=env).stdout)["layers"]) == 2
    assert box.alive()


def test_add_and_rm_ask_the_shim_not_containerd(fenv: FractalEnv, images: dict[str, str], namespace: str,
                                         box: Box) -> None:
    """`layers add` and `rm` have the shim do the containerd lookups (AddImages, RemoveTargets,
    issue 13): the CLI is given an address where no containerd listens and still adds and
    removes, the GC label is still set and taken off, and --json still names every layer (the
    shim fills in the container's own layers)."""
    tools = images["tools"]
    nowhere = ["-a", str(fenv.fractal_run_dir / "no-containerd.sock"), "-n", namespace]
    r = fractal(fenv, "layers", "add", *nowhere, "--no-pull", box.cid, tools)
    assert r.returncode != 0 and "is not in namespace" in r.stderr, r.stderr
    assert "(pull it with --snapshotter fractal)" in r.stderr, r.stderr
    fenv.pull(tools, namespace=namespace)
    r = fractal(fenv, "layers", "add", *nowhere, "--json", box.cid, tools)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["added"]) == 2 and out["restack_ms"] > 0
    assert [la["live"] for la in out["layers"]] == [True, True, False]
    assert all(la["chain_id"].startswith("sha256:") and la["size"] is not None for la in out["layers"])
    assert out["layers"][2]["image"] == images["busybox"] and out["layers"][0]["image"] == tools
    assert box.sh(f"cat {HELLO}") == "hello from tools"
    info = json.loads(fenv.ctr("containers", "info", box.cid, namespace=namespace).stdout)
    refs = [v for k, v in (info.get("Labels") or {}).items() if "/live-" in k]
    assert refs == [out["layers"][0]["chain_id"]]
    r = fractal(fenv, "layers", "add", *nowhere, box.cid, tools)
    assert r.returncode == 0 and "nothing added" in r.stdout, r.stdout + r.stderr
    assert box.alive()

    # `layers rm` too (RemoveTargets): by a chain ID prefix of one added layer, then by image;
    # the GC label goes with the last of the image's layers
    top = out["layers"][0]["chain_id"]
    r = fractal(fenv, "layers", "rm", *nowhere, "--json", box.cid, top[:19])
    assert r.returncode == 0, r.stderr
    one = json.loads(r.stdout)
    assert one["removed"] == [out["layers"][0]["dir"]] and one["labels_removed"] == []
    assert [la["live"] for la in one["layers"]] == [True, False]
    assert one["layers"][1]["chain_id"] == out["layers"][2]["chain_id"]  # named by the shim
    r = fractal(fenv, "layers", "rm", *nowhere, "--json", box.cid, tools)
    assert r.returncode == 0, r.stderr
    two = json.loads(r.stdout)
    assert two["removed"] == [out["layers"][1]["dir"]] and len(two["labels_removed"]) == 1
    assert [la["live"] for la in two["layers"]] == [False]
    assert box.sh(f"cat {HELLO} 2>&1; echo rc=$?").endswith("rc=1")
    info = json.loads(fenv.ctr("containers", "info", box.cid, namespace=namespace).stdout)
    assert not [k for k in (info.get("Labels") or {}) if "/live-" in k]
    r = fractal(fenv, "layers", "rm", *nowhere, box.cid, tools)
    assert r.returncode != 0 and f"no layers of image {tools} were added" in r.stderr, r.stderr
    assert box.alive()


def test_errors_leave_the_container_running(fenv: FractalEnv, images: dict[str, str], namespace: str, box: Box,
                                            registry) -> None:  # noqa: ANN001
    f = flags(fenv, namespace)

    def fails(*args: str, want: str) -> None:
        r = fractal(fenv, "layers", *args)
        assert r.returncode != 0, r.stdout
        assert want in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        assert box.alive()

    fails("add", *f, "nope", images["tools"], want="no such container")
    fails("ls", *f, "nope", want="no such container")
    fails("add", *f, "--plain-http", box.cid, f"{registry.address}/fractal/missing:latest",
          want="cannot be pulled")
    fails("add", *f, "--no-pull", box.cid, images["tools"], want="is not in namespace")
    fails("rm", *f, box.cid, "sha256:" + "0" * 64, want="no layer")
    fails("rm", *f, box.cid, images["tools"], want="no layers of image")
    base = ls_json(fenv, namespace, box.cid)["layers"][0]["chain_id"]
    fails("rm", *f, box.cid, base, want="every image layer")
    assert box.sh("cat /mine") == "mine" and box.seen() == "absent"

    # not run by the fractal runtime / not a stack of fractal layers
    runc_box = Box(fenv, namespace, images["busybox"], "plain1", cmd="sleep 300", runtime="runc")
    ovl_box = None
    try:
        r = fractal(fenv, "layers", "add", *f, "plain1", images["tools"])
        assert r.returncode != 0 and "not run by the fractal runtime" in r.stderr, r.stderr
        fenv.pull(images["busybox"], namespace=namespace, snapshotter="overlayfs")
        ovl_box = Box(fenv, namespace, images["busybox"], "ovl1", cmd="sleep 300", snapshotter="overlayfs")
        r = fractal(fenv, "layers", "add", *f, "ovl1", images["tools"])
        assert r.returncode != 0 and "cannot change layers of ovl1" in r.stderr, r.stderr
        assert "not a stack of fractal layers" in r.stderr, r.stderr
        assert ovl_box.alive()
    finally:
        runc_box.remove()
        if ovl_box is not None:
            ovl_box.remove()


def test_concurrent_adds_are_serialized(fenv: FractalEnv, registry, images: dict[str, str], namespace: str,
                                        box: Box) -> None:  # noqa: ANN001
    edge = registry.ref("edge")
    for ref in (images["tools"], edge):
        fenv.pull(ref, namespace=namespace)
    results: dict[str, subprocess.CompletedProcess[str]] = {}

    def add(ref: str) -> None:
        results[ref] = fractal(fenv, "layers", "add", *flags(fenv, namespace), box.cid, ref)

    threads = [threading.Thread(target=add, args=(ref,)) for ref in (images["tools"], edge)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for ref, r in results.items():
        assert r.returncode == 0, (ref, r.stderr)
    rows = ls_json(fenv, namespace, box.cid)["layers"]
    assert sorted({la["image"] for la in rows if la["live"]}) == sorted([images["tools"], edge])
    assert box.sh(f"cat {HELLO}") == "hello from tools"
    assert box.sh("test -f /edge/big && echo yes") == "yes"
    assert box.alive()


def _layer_dirs(fenv: FractalEnv, chain_ids: list[str]) -> list[Path]:
    from ccpu.repo import Repo

    repo = Repo.open_readonly(fenv.snapshotter_root)
    try:
        by_chain = {la.chain_id: Path(la.path) for la in repo.layers()}
    finally:
        repo.close()
    return [by_chain[c] for c in chain_ids if c in by_chain]


def test_gc_reference_keeps_added_layers(fenv: FractalEnv, images: dict[str, str], namespace: str, box: Box) -> None:
    tools = images["tools"]
    fenv.pull(tools, namespace=namespace)
    r = fractal(fenv, "layers", "add", *flags(fenv, namespace), box.cid, tools)
    assert r.returncode == 0, r.stderr
    live = [la["chain_id"] for la in ls_json(fenv, namespace, box.cid)["layers"] if la["live"]]
    dirs = _layer_dirs(fenv, live)
    assert len(dirs) == 2 and all(d.is_dir() for d in dirs)

    fenv.ctr("images", "rm", "--sync", tools, namespace=namespace)
    fenv.ctr("leases", "rm", "--sync", fenv.ctr("leases", "create", namespace=namespace).stdout.split()[0],
             namespace=namespace, check=False)  # one more synchronous GC
    time.sleep(0.3)
    assert all(d.is_dir() for d in dirs), "containerd's GC removed layers a running container uses"
    assert box.sh(f"cat {HELLO}") == "hello from tools"
    assert box.alive()

    r = fractal(fenv, "layers", "rm", *flags(fenv, namespace), box.cid, tools)
    assert r.returncode == 0, r.stderr
    lease = fenv.ctr("leases", "create", namespace=namespace).stdout.split()[0]
    fenv.ctr("leases", "rm", "--sync", lease, namespace=namespace)  # GC now: nothing refers to them
    wait_for(lambda: not any(d.exists() for d in dirs), timeout=20, what="the removed layers to be collected")
    assert box.alive() and box.sh("cat /mine") == "mine"

    # pulled again: new snapshots in new dirs.  The shim remembers the image's old dirs
    # (livelayers.Facts), keyed by the top snapshot's creation time, so it must not hand out the
    # collected ones now
    fenv.pull(tools, namespace=namespace)
    r = fractal(fenv, "layers", "add", *flags(fenv, namespace), "--json", box.cid, tools)
    assert r.returncode == 0, r.stderr
    new = [la["dir"] for la in json.loads(r.stdout)["layers"] if la["live"]]
    assert len(new) == 2 and all(Path(d).is_dir() for d in new), new
    assert not set(new) & {str(d) for d in dirs}
    assert box.sh(f"cat {HELLO}") == "hello from tools" and box.alive()


def test_without_the_gc_reference_the_layers_would_go(fenv: FractalEnv, images: dict[str, str], namespace: str,
                                                      box: Box) -> None:
    """Control for the test above: drop the container's label by hand, and the same GC takes the
    added layers' snapshots and the repo removes their dirs under the running container."""
    tools = images["tools"]
    fenv.pull(tools, namespace=namespace)
    assert fractal(fenv, "layers", "add", *flags(fenv, namespace), box.cid, tools).returncode == 0
    live = [la["chain_id"] for la in ls_json(fenv, namespace, box.cid)["layers"] if la["live"]]
    dirs = _layer_dirs(fenv, live)
    info = json.loads(fenv.ctr("containers", "info", box.cid, namespace=namespace).stdout)
    (key,) = [k for k in info["Labels"] if "/live-" in k]
    fenv.ctr("containers", "label", box.cid, f"{key}=", namespace=namespace)
    fenv.ctr("images", "rm", "--sync", tools, namespace=namespace)
    wait_for(lambda: not any(d.exists() for d in dirs), timeout=20, what="the unreferenced layers to be collected")
    assert box.alive()
