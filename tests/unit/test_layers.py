"""Live layers through the shim (shim/layers.py) against a fake agent, and the CLI's helpers."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ccpu import errdefs
from ccpu import layersmsg
from ccpu.cli import layers as cli_layers
from ccpu import sandboxes
from ccpu.ttrpc import Code, TtrpcError
from shim import layers
from shim.agentsandbox import AgentSandbox
from shim.errors import at_edge
from shim.state import Container, Process, Status

REPO = "/repo"


@dataclass
class M:
    type: str
    source: str
    options: list[str]


class StackAgent:
    """An agent keeping a stack per container: the ``layers`` and ``restack`` ops (in the
    paths the agent sees), with the agent's refusals."""

    def __init__(self) -> None:
        self.stacks: dict[str, list[str]] = {}
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.delay = 0.0

    async def call(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        self.calls.append((op, dict(args)))
        cur = self.stacks[args["container"]]
        if op == "layers":
            return {"lowers": list(cur), "upper": f"{REPO}/active/1/fs", "work": f"{REPO}/active/1/work",
                    "history": []}
        assert op == "restack"
        await asyncio.sleep(self.delay)
        add, remove = args.get("add", []), args.get("remove", [])
        for d in add:
            if d in cur:
                raise errdefs.AlreadyExists(f"layer {d} is already in the container's stack")
        kept = [d for d in cur if d not in remove]
        if not kept and not add:
            raise errdefs.FailedPrecondition("restack would remove every image layer")
        pos = args.get("position", "top")
        i = 0 if pos == "top" else len(kept) if pos == "bottom" else int(pos)
        self.stacks[args["container"]] = kept[:i] + add + kept[i:]
        return {"lowers": list(self.stacks[args["container"]])}


class StackSandbox(AgentSandbox):
    """An agent sandbox over a StackAgent, recording its layer bookkeeping; ``guest`` set, the
    agent sees the repo there (as a VM's guest does)."""

    mode = "host"

    def __init__(self, agent: StackAgent, guest: str | None = None) -> None:
        super().__init__()
        self._agent = agent
        self.guest = guest
        self.adding: list[tuple[str, list[str]]] = []
        self.now: list[tuple[str, list[str]]] = []
        self.refuse: Exception | None = None

    async def agent(self) -> Any:
        return self._agent

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode}

    def layer_path(self, host_dir: str) -> str:
        return host_dir.replace(REPO, self.guest) if self.guest else host_dir

    def host_layer_path(self, agent_dir: str) -> str:
        return agent_dir.replace(self.guest, REPO) if self.guest else agent_dir

    def layers_adding(self, cid: str, host_dirs: list[str]) -> None:
        if self.refuse is not None:
            raise self.refuse
        self.adding.append((cid, list(host_dirs)))

    def layers_now(self, cid: str, host_dirs: list[str]) -> None:
        self.now.append((cid, list(host_dirs)))


class Task:
    """The Task service's side the Layers service uses: its containers by id."""

    def __init__(self, agent: StackAgent) -> None:
        self.agent = agent
        self.containers: dict[str, Container] = {}

    def container(self, cid: str) -> Container | None:
        return self.containers.get(cid)

    def add(self, cid: str, bundle: Path, lowers: list[str], overlay: bool = True,
            agent_lowers: list[str] | None = None) -> Container:
        opts = [f"lowerdir={':'.join(lowers)}", f"upperdir={REPO}/active/1/fs", f"workdir={REPO}/active/1/work"]
        init = Process(container=cid, exec_id="", status=Status.RUNNING)
        c = Container(cid, str(bundle), init, [M("overlay" if overlay else "bind", "overlay", opts)])
        self.containers[cid] = c
        self.agent.stacks[cid] = list(agent_lowers or lowers)
        return c


def call(svc: layers.LayersService, method: str, **payload: Any) -> dict[str, Any]:
    """``method`` as the CLI reaches it: through the daemon's error edge."""
    fn = at_edge(svc.methods())[method][1]
    resp = asyncio.run(fn(layersmsg.request(method, payload), None))
    return layersmsg.answer_dict(resp)


def L(n: int) -> str:
    return f"{REPO}/layers/{n}"


@dataclass
class Fake:
    agent: StackAgent
    task: Task
    sandbox: StackSandbox
    svc: layers.LayersService = field(init=False)

    def __post_init__(self) -> None:
        self.svc = layers.LayersService(self.task, self.sandbox, REPO)


def fake_shim(guest: str | None = None) -> Fake:
    agent = StackAgent()
    return Fake(agent, Task(agent), StackSandbox(agent, guest))


@pytest.fixture
def fake(tmp_path: Path) -> Fake:
    f = fake_shim()
    f.task.add("c1", tmp_path, [L(1)])
    return f


def test_add_records_and_persists_live_layers(fake, tmp_path: Path) -> None:  # noqa: ANN001
    out = call(fake.svc, "Add", container="c1", layers=[
        {"dir": L(3), "chain_id": "sha256:c3", "image": "tools", "size": 10, "gc_label": "g"},
        {"dir": L(2), "chain_id": "sha256:c2", "image": "tools", "size": 20, "gc_label": "g"},
        {"dir": L(1), "chain_id": "sha256:c1", "image": "tools", "size": 30, "gc_label": "g"}])
    assert out["added"] == [L(3), L(2)] and out["skipped"] == [L(1)]
    assert [la["dir"] for la in out["layers"]] == [L(3), L(2), L(1)]
    assert [la["live"] for la in out["layers"]] == [True, True, False]
    assert out["layers"][0]["image"] == "tools" and out["layers"][0]["size"] == 10
    assert out["restack_ms"] >= 0 and out["repo_root"] == REPO
    assert fake.agent.calls[-1] == ("restack", {"container": "c1", "position": "top", "add": [L(3), L(2)]})
    # the sandbox exposed the new layers first and learnt the new stack after
    assert fake.sandbox.adding == [("c1", [L(3), L(2)])]
    assert fake.sandbox.now == [("c1", [L(3), L(2), L(1)])]
    rec = json.loads((tmp_path / layers.RECORD_NAME).read_text())
    # the record caches metadata only: the stack is the agent's
    assert set(rec["live"]) == {L(3), L(2)} and "stack" not in rec
    # a new service (a restarted shim) reads the record back
    again = call(layers.LayersService(fake.task, fake.sandbox, REPO), "List", container="c1")
    assert [la["live"] for la in again["layers"]] == [True, True, False]
    assert again["layers"][1]["chain_id"] == "sha256:c2"


def test_remove_by_image_and_by_dir(fake) -> None:  # noqa: ANN001
    call(fake.svc, "Add", container="c1", layers=[{"dir": L(5), "image": "a", "gc_label": "ga"}])
    call(fake.svc, "Add", container="c1", layers=[{"dir": L(6), "image": "b", "gc_label": "gb"}], position="bottom")
    assert fake.agent.stacks["c1"] == [L(5), L(1), L(6)]
    out = call(fake.svc, "Remove", container="c1", images=["a"])
    assert [e["dir"] for e in out["removed"]] == [L(5)] and out["removed"][0]["gc_label"] == "ga"
    assert [la["dir"] for la in out["layers"]] == [L(1), L(6)]
    assert fake.sandbox.now[-1] == ("c1", [L(1), L(6)])  # a removed layer may leave a VM's view
    out = call(fake.svc, "Remove", container="c1", layers=[L(6)])
    assert out["removed"][0]["live"] and [la["dir"] for la in out["layers"]] == [L(1)]


@pytest.mark.parametrize("payload, code, text", [
    ({"container": "nope", "layers": [L(2)]}, Code.NOT_FOUND, "not running in this sandbox"),
    ({"container": "c1", "layers": []}, Code.INVALID_ARGUMENT, "non-empty"),
    ({"container": "c1", "layers": ["rel/dir"]}, Code.INVALID_ARGUMENT, "absolute"),
    ({"container": "c1", "layers": [L(2)], "position": "middle"}, Code.INVALID_ARGUMENT, "position"),
    ({"layers": [L(2)]}, Code.INVALID_ARGUMENT, "container is required"),
])
def test_add_rejects_bad_requests(fake, payload, code, text) -> None:  # noqa: ANN001
    with pytest.raises(TtrpcError) as e:
        call(fake.svc, "Add", **payload)
    assert e.value.code == code and text in e.value.message
    assert fake.agent.stacks["c1"] == [L(1)]


@pytest.mark.parametrize("payload, code, text", [
    ({"container": "nope", "images": ["img"]}, Code.NOT_FOUND, "not running in this sandbox"),
    ({"container": "c1", "images": []}, Code.INVALID_ARGUMENT, "name images"),
    ({"container": "c1", "images": ["i"] * 65}, Code.INVALID_ARGUMENT, "at most 64 images"),
    ({"container": "c1", "images": ["i" * 4097]}, Code.INVALID_ARGUMENT, "at most 64 images"),
    ({"container": "c1", "images": ["img"], "position": "middle"}, Code.INVALID_ARGUMENT, "position"),
    ({"container": "c1", "images": ["img"]}, Code.FAILED_PRECONDITION, "containerd's address"),
])
def test_add_images_rejects_bad_requests_before_asking_containerd(fake, payload, code, text) -> None:  # noqa: ANN001
    """(the fake shim knows no containerd: a request that passes the checks fails there)"""
    with pytest.raises(TtrpcError) as e:
        call(fake.svc, "AddImages", **payload)
    assert e.value.code == code and text in e.value.message
    assert fake.agent.stacks["c1"] == [L(1)]


def test_remove_errors(fake) -> None:  # noqa: ANN001
    with pytest.raises(TtrpcError) as e:
        call(fake.svc, "Remove", container="c1", layers=[L(9)])
    assert e.value.code == Code.NOT_FOUND
    with pytest.raises(TtrpcError) as e:
        call(fake.svc, "Remove", container="c1", images=["never-added"])
    assert e.value.code == Code.NOT_FOUND and "no layers of image never-added" in e.value.message
    with pytest.raises(TtrpcError) as e:  # the agent's refusal, with its kind
        call(fake.svc, "Remove", container="c1", layers=[L(1)])
    assert e.value.code == Code.FAILED_PRECONDITION and "every image layer" in e.value.message


def test_a_sandbox_that_cannot_expose_a_layer_fails_the_add(fake) -> None:  # noqa: ANN001
    fake.sandbox.refuse = OSError("bind of /repo/layers/2: permission denied")
    with pytest.raises(TtrpcError) as e:
        call(fake.svc, "Add", container="c1", layers=[L(2)])
    assert e.value.code == Code.FAILED_PRECONDITION
    assert e.value.message == ("container c1: cannot give the sandbox layers /repo/layers/2: "
                               "bind of /repo/layers/2: permission denied")
    assert not [op for op, _ in fake.agent.calls if op == "restack"]


def test_a_failed_restack_leaves_the_sandbox_with_the_stack_as_it_was(fake) -> None:  # noqa: ANN001
    async def already(op: str, args: dict[str, Any]) -> dict[str, Any]:
        if op == "restack":
            raise errdefs.AlreadyExists("layer is already in the container's stack")
        return await StackAgent.call(fake.agent, op, args)

    fake.agent.call = already  # type: ignore[method-assign]
    with pytest.raises(TtrpcError) as e:
        call(fake.svc, "Add", container="c1", layers=[L(4)])
    assert e.value.code == Code.ALREADY_EXISTS
    assert fake.sandbox.adding[-1] == ("c1", [L(4)])  # exposed first ...
    assert fake.sandbox.now == [("c1", [L(1)])]  # ... and taken back: the stack as it was


def test_not_a_layer_stack_or_stopped(tmp_path: Path) -> None:
    f = fake_shim()
    f.task.add("ovl", tmp_path, ["/var/lib/containerd/snapshots/1/fs"])
    c = f.task.add("stopped", tmp_path, [L(1)])
    c.init.status = Status.STOPPED
    with pytest.raises(TtrpcError) as e:
        call(f.svc, "Add", container="ovl", layers=[L(2)])
    assert e.value.code == Code.FAILED_PRECONDITION and "not a stack of fractal layers" in e.value.message
    with pytest.raises(TtrpcError) as e:
        call(f.svc, "List", container="stopped")
    assert e.value.code == Code.FAILED_PRECONDITION and "stopped" in e.value.message
    assert not f.agent.calls


def test_concurrent_adds_are_serialized(fake) -> None:  # noqa: ANN001
    fake.agent.delay = 0.02
    add = at_edge(fake.svc.methods())["Add"][1]

    async def both() -> list[Any]:
        reqs = [layersmsg.request("Add", {"container": "c1", "layers": [{"dir": L(n), "image": f"i{n}"}]})
                for n in (7, 8)]
        return await asyncio.gather(*(add(r, None) for r in reqs))

    asyncio.run(both())
    assert sorted(fake.agent.stacks["c1"][:2]) == [L(7), L(8)] and fake.agent.stacks["c1"][2] == L(1)
    # each restack saw the other's result (the second read the stack after the first changed it)
    layers_calls = [a for op, a in fake.agent.calls if op == "layers"]
    assert len(layers_calls) == 2


def test_layer_path_translation(tmp_path: Path) -> None:
    """The sandbox speaks host dirs to the service and its agent's paths to the agent."""
    f = fake_shim(guest="/guest/repo")
    f.task.add("c1", tmp_path, [L(1)], agent_lowers=["/guest/repo/layers/1"])
    out = call(f.svc, "Add", container="c1", layers=[{"dir": L(2), "image": "x"}])
    assert f.agent.calls[-1][1]["add"] == ["/guest/repo/layers/2"]
    assert [la["dir"] for la in out["layers"]] == [L(2), L(1)]  # host dirs again
    assert f.sandbox.adding == [("c1", [L(2)])] and f.sandbox.now == [("c1", [L(2), L(1)])]
    out = call(f.svc, "Remove", container="c1", layers=[L(2)])
    assert f.agent.calls[-1][1]["remove"] == ["/guest/repo/layers/2"]


def test_record_is_written_atomically_and_tolerates_garbage(tmp_path: Path) -> None:
    (tmp_path / layers.RECORD_NAME).write_text("{not json")
    assert layers.load_record(str(tmp_path), "c")["live"] == {}
    layers.save_record(str(tmp_path), {"container": "c", "live": {"/x": {}}, "stack": [], "history": []})
    assert layers.load_record(str(tmp_path), "c")["live"] == {"/x": {}}
    assert layers.load_record(str(tmp_path), "other")["live"] == {}  # another container's: ignored
    assert [p.name for p in tmp_path.iterdir()] == [layers.RECORD_NAME]


def test_cli_helpers() -> None:
    chain = "sha256:" + "ab" * 32
    assert cli_layers.gc_label("fractal", chain) == "containerd.io/gc.ref.snapshot.fractal/live-" + "ab" * 6
    assert cli_layers.parse_position("top") == "top" and cli_layers.parse_position("2") == 2
    with pytest.raises(argparse.ArgumentTypeError, match="position must be"):
        cli_layers.parse_position("-1")
    stack = cli_layers.Stack("c1", "/u", [cli_layers.Layer(L(2), True, chain, "tools", 2048),
                                          cli_layers.Layer(L(1), False, "", "", None)])
    text = cli_layers.format_stack(stack)
    assert "sha256:abababababab" in text and "tools" in text and "live" in text and "2.0 KiB" in text
    assert cli_layers.stack_json(stack)["layers"][1] == {"dir": L(1), "live": False, "chain_id": None,
                                                           "image": None, "size": None, "added_at": None}


def test_sandbox_record_address_and_forward_compatibility(tmp_path: Path) -> None:
    rec = sandboxes.SandboxRecord("g", "ns", "host", os.getpid(), address="unix:///run/containerd/s/x")
    sandboxes.write(rec, tmp_path)
    assert sandboxes.read_all("ns", tmp_path)["g"].address == "unix:///run/containerd/s/x"
    p = tmp_path / "sandboxes" / "ns" / "old.json"  # older (no address) and newer (extra keys) records
    p.write_text(json.dumps({"group": "old", "namespace": "ns", "mode": "host", "shim_pid": 1, "future": 1}))
    got = sandboxes.read_all("ns", tmp_path)["old"]
    assert got.address == "" and got.shim_pid == 1


@pytest.mark.parametrize("value, want", [(None, "top"), ("", "top"), ("top", "top"), ("bottom", "bottom"),
                                         (0, 0), (3, 3), ("12", 12)])
def test_layersapi_positions_both_ends_accept(value: object, want: object) -> None:
    from ccpu import layersapi

    assert layersapi.parse_position(value) == want
    assert layers.parse_position(value) == want  # the shim's, over the same rules


@pytest.mark.parametrize("value", [-1, "-1", True, "middle", "١", 1.5, ["top"]])
def test_layersapi_positions_both_ends_refuse(value: object) -> None:
    from ccpu import layersapi

    with pytest.raises(layersapi.BadPosition):
        layersapi.parse_position(value)
    with pytest.raises(errdefs.InvalidArgument):  # INVALID_ARGUMENT at the service edge
        layers.parse_position(value)
    with pytest.raises(argparse.ArgumentTypeError):
        cli_layers.parse_position(str(value))


class FakeLook:
    """ccpu.client.livelayers.Lookups as the shim's AddImages uses it, over a fixed image table
    (the real one is exercised through containerd in tests/integration/test_layers_live.py)."""

    def __init__(self, images: dict[str, list[str]]) -> None:
        from types import SimpleNamespace

        self.images = images
        self.labels: list[dict[str, str]] = []
        self.closed = False
        self.container = SimpleNamespace(snapshotter="fractal", labels={})
        self.client = SimpleNamespace(update_container_labels=lambda cid, labels: self.labels.append(labels),
                                      close=self._close)

    def _close(self) -> None:
        self.closed = True

    def find_image(self, ref: str) -> tuple[Any, str]:
        return (ref, "") if ref in self.images else (None, "is not in namespace 'default'")

    def plan(self, images: list[tuple[str, Any]], present: set[str]) -> Any:
        from ccpu.client.livelayers import Planned

        layers = [{"dir": d, "chain_id": f"sha256:{ref}", "image": ref, "size": 1, "gc_label": f"gc/{ref}"}
                  for ref, _ in images for d in self.images[ref] if d not in present]
        return Planned(layers, {f"gc/{ref}": f"sha256:{ref}" for ref, _ in images} if layers else {})

    def own_layers(self) -> dict[str, str]:
        """Asked by AddImages beside its other lookups (in a thread of its own): recorded, and
        never after the client was closed."""
        assert not self.closed, "the container's own layers were looked up after close"
        self.own_asked = getattr(self, "own_asked", 0) + 1
        return {L(1): "sha256:own"}

    def size(self, chain_id: str) -> int | None:
        assert not self.closed
        return 1

    def own_known(self) -> dict[str, str] | None:
        return None

    def named(self, entry: dict[str, Any]) -> dict[str, Any]:
        assert not self.closed
        own = {L(1): "sha256:0aaa1", L(5): "sha256:0aaa5"}
        return {**entry, "chain_id": entry.get("chain_id") or own.get(entry["dir"], "sha256:own")}


def add_images_shim(fake: Fake, look: FakeLook) -> None:
    fake.svc.containerd = ("/nowhere.sock", "default")
    def lookups(c: Any, fresh: bool) -> FakeLook:  # a fresh (open) client per request, as the shim's
        look.closed = False
        look.fresh = getattr(look, "fresh", []) + [fresh]
        return look

    fake.svc._lookups = lookups  # type: ignore[method-assign]


def test_add_images_labels_then_restacks_and_names_the_stack(fake) -> None:  # noqa: ANN001
    look = FakeLook({"tools": [L(3), L(2)]})
    add_images_shim(fake, look)
    out = call(fake.svc, "AddImages", container="c1", images=["tools"])
    assert fake.agent.stacks["c1"] == [L(3), L(2), L(1)]
    assert out["added"] == [L(3), L(2)] and look.labels == [{"gc/tools": "sha256:tools"}]
    assert [(la["live"], la["chain_id"]) for la in out["layers"]] == [
        (True, "sha256:tools"), (True, "sha256:tools"), (False, "sha256:0aaa1")]
    assert look.closed and look.own_asked == 1
    again = call(fake.svc, "AddImages", container="c1", images=["tools"])
    assert again["added"] == [] and again["skipped"] == ["tools"] and len(look.labels) == 1


def test_add_images_takes_the_label_back_when_the_restack_fails(fake) -> None:  # noqa: ANN001
    look = FakeLook({"tools": [L(2)]})
    add_images_shim(fake, look)
    fake.sandbox.refuse = OSError("bind of /repo/layers/2: permission denied")
    with pytest.raises(TtrpcError) as e:
        call(fake.svc, "AddImages", container="c1", images=["tools"])
    assert e.value.code == Code.FAILED_PRECONDITION
    assert look.labels == [{"gc/tools": "sha256:tools"}, {"gc/tools": ""}]
    assert fake.agent.stacks["c1"] == [L(1)] and look.closed


def test_add_images_reports_missing_images_and_changes_nothing(fake) -> None:  # noqa: ANN001
    look = FakeLook({"tools": [L(2)]})
    add_images_shim(fake, look)
    out = call(fake.svc, "AddImages", container="c1", images=["tools", "absent"])
    assert out["missing"] == {"absent": "is not in namespace 'default'"} and out["snapshotter"] == "fractal"
    assert "restack_ms" not in out and look.labels == [] and fake.agent.stacks["c1"] == [L(1)]


def test_remove_targets_by_image_takes_the_label_off(fake) -> None:  # noqa: ANN001
    """`fractal layers rm C IMAGE` through the shim (RemoveTargets): the image's added layers
    go, and so does its GC label, which no remaining added layer uses."""
    look = FakeLook({"tools": [L(3), L(2)], "edge": [L(4)]})
    add_images_shim(fake, look)
    call(fake.svc, "AddImages", container="c1", images=["tools"])
    call(fake.svc, "AddImages", container="c1", images=["edge"])
    look.labels.clear()
    out = call(fake.svc, "RemoveTargets", container="c1", targets=["tools"])
    assert fake.agent.stacks["c1"] == [L(4), L(1)]
    assert [e["dir"] for e in out["removed"]] == [L(3), L(2)]
    assert out["labels_removed"] == ["gc/tools"] and look.labels == [{"gc/tools": ""}]
    assert [(la["dir"], la["chain_id"]) for la in out["layers"]] == [(L(4), "sha256:edge"), (L(1), "sha256:0aaa1")]
    assert look.closed and look.fresh[-1] is False  # no containerd record needed for a removal


def test_remove_targets_by_chain_id_prefix_and_its_errors(fake, tmp_path: Path) -> None:  # noqa: ANN001
    """Digest prefixes name any layer (the container's own ones too, named through
    containerd); a prefix of two layers is refused, an unknown one is NotFound; each error
    leaves the stack as it was and takes no label off."""
    fake.task.add("c2", tmp_path, [L(5), L(1)])
    look = FakeLook({})
    add_images_shim(fake, look)
    with pytest.raises(TtrpcError) as e:
        call(fake.svc, "RemoveTargets", container="c2", targets=["sha256:0aaa"])
    assert e.value.code == Code.INVALID_ARGUMENT and "matches 2 layers" in e.value.message
    with pytest.raises(TtrpcError) as e:
        call(fake.svc, "RemoveTargets", container="c2", targets=["sha256:" + "0" * 64])
    assert e.value.code == Code.NOT_FOUND and "no layer sha256:" in e.value.message
    with pytest.raises(TtrpcError) as e:
        call(fake.svc, "RemoveTargets", container="c2", targets=["tools"])
    assert e.value.code == Code.NOT_FOUND and "no layers of image tools were added" in e.value.message
    assert fake.agent.stacks["c2"] == [L(5), L(1)]
    out = call(fake.svc, "RemoveTargets", container="c2", targets=["0aaa5"])
    assert fake.agent.stacks["c2"] == [L(1)] and out["removed"][0]["dir"] == L(5)
    assert "labels_removed" not in out and look.labels == []
    with pytest.raises(TtrpcError) as e:  # bounded like AddImages
        call(fake.svc, "RemoveTargets", container="c2", targets=["x"] * (layers.MAX_IMAGES + 1))
    assert e.value.code == Code.INVALID_ARGUMENT


@pytest.mark.parametrize("targets, want", [
    (["tools"], ([], ["tools"])),
    (["sha256:aaaa11", "aaaa11"], (["/l/a"], [])),
    (["bbbb"], (["/l/b"], [])),
])
def test_resolve_targets(targets: list[str], want: object) -> None:
    from ccpu.layersapi import resolve_targets

    stack = [{"dir": "/l/a", "live": True, "chain_id": "sha256:aaaa11" + "0" * 58, "image": "tools"},
             {"dir": "/l/b", "live": False, "chain_id": "sha256:bbbb" + "1" * 60, "image": "busybox"}]
    assert resolve_targets(targets, stack) == want


@pytest.mark.parametrize("target, text", [
    ("busybox", "no layers of image busybox were added"),  # an image layer: by digest only
    ("sha256:cccc", "no layer sha256:cccc"), ("cccccccccccc", "no layer cccccccccccc"),
    ("aaa", "no layers of image aaa"),  # too short to be a prefix
])
def test_resolve_targets_refuses(target: str, text: str) -> None:
    from ccpu.layersapi import BadTarget, resolve_targets

    stack = [{"dir": "/l/b", "live": False, "chain_id": "sha256:aaaa" + "1" * 60, "image": "busybox"}]
    with pytest.raises(BadTarget) as e:
        resolve_targets([target], stack)
    assert text in str(e.value) and not e.value.ambiguous
