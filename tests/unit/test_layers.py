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
from google.protobuf import wrappers_pb2

from ccpu.cli import layers as cli_layers
from ccpu import sandboxes
from ccpu.ttrpc import Code, TtrpcError
from shim import layers
from shim.state import Status

REPO = "/repo"


@dataclass
class M:
    type: str
    source: str
    options: list[str]


@dataclass
class Init:
    status: Status = Status.RUNNING


@dataclass
class C:
    id: str
    bundle: str
    rootfs: list[M]
    init: Init = field(default_factory=Init)


class Tasks:
    def __init__(self) -> None:
        self.containers: dict[str, C] = {}


class FakeTask:
    """The TaskService's `_call` against an agent that keeps a stack per container."""

    def __init__(self) -> None:
        self.tasks = Tasks()
        self.stacks: dict[str, list[str]] = {}
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.delay = 0.0

    def add(self, cid: str, bundle: Path, lowers: list[str], overlay: bool = True) -> C:
        opts = [f"lowerdir={':'.join(lowers)}", f"upperdir={REPO}/active/1/fs", f"workdir={REPO}/active/1/work"]
        c = C(cid, str(bundle), [M("overlay" if overlay else "bind", "overlay", opts)])
        self.tasks.containers[cid] = c
        self.stacks[cid] = list(lowers)
        return c

    async def _call(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        self.calls.append((op, dict(args)))
        cur = self.stacks[args["container"]]
        if op == "layers":
            return {"lowers": list(cur), "upper": f"{REPO}/active/1/fs", "history": []}
        assert op == "restack"
        await asyncio.sleep(self.delay)
        add, remove = args.get("add", []), args.get("remove", [])
        for d in add:
            if d in cur:
                raise TtrpcError(Code.ALREADY_EXISTS, f"layer {d} is already in the container's stack")
        kept = [d for d in cur if d not in remove]
        if not kept and not add:
            raise TtrpcError(Code.FAILED_PRECONDITION, "restack would remove every image layer")
        pos = args.get("position", "top")
        i = 0 if pos == "top" else len(kept) if pos == "bottom" else int(pos)
        self.stacks[args["container"]] = kept[:i] + add + kept[i:]
        return {"lowers": list(self.stacks[args["container"]])}


def call(svc: layers.LayersService, method: str, **payload: Any) -> dict[str, Any]:
    fn = svc.methods()[method][1]
    resp = asyncio.run(fn(wrappers_pb2.StringValue(value=json.dumps(payload)), None))
    return json.loads(resp.value)


def L(n: int) -> str:
    return f"{REPO}/layers/{n}"


@pytest.fixture
def fake(tmp_path: Path) -> tuple[FakeTask, layers.LayersService]:
    task = FakeTask()
    task.add("c1", tmp_path, [L(1)])
    return task, layers.LayersService(task, object(), REPO)


def test_add_records_and_persists_live_layers(fake, tmp_path: Path) -> None:  # noqa: ANN001
    task, svc = fake
    out = call(svc, "Add", container="c1", layers=[
        {"dir": L(3), "chain_id": "sha256:c3", "image": "tools", "size": 10, "gc_label": "g"},
        {"dir": L(2), "chain_id": "sha256:c2", "image": "tools", "size": 20, "gc_label": "g"},
        {"dir": L(1), "chain_id": "sha256:c1", "image": "tools", "size": 30, "gc_label": "g"}])
    assert out["added"] == [L(3), L(2)] and out["skipped"] == [L(1)]
    assert [la["dir"] for la in out["layers"]] == [L(3), L(2), L(1)]
    assert [la["live"] for la in out["layers"]] == [True, True, False]
    assert out["layers"][0]["image"] == "tools" and out["layers"][0]["size"] == 10
    assert out["restack_ms"] >= 0 and out["repo_root"] == REPO
    assert task.calls[-1] == ("restack", {"container": "c1", "position": "top", "add": [L(3), L(2)]})
    rec = json.loads((tmp_path / layers.RECORD_NAME).read_text())
    assert set(rec["live"]) == {L(3), L(2)} and rec["stack"] == [L(3), L(2), L(1)]
    # a new service (a restarted shim) reads the record back
    again = call(layers.LayersService(task, object(), REPO), "List", container="c1")
    assert [la["live"] for la in again["layers"]] == [True, True, False]
    assert again["layers"][1]["chain_id"] == "sha256:c2"


def test_remove_by_image_and_by_dir(fake) -> None:  # noqa: ANN001
    task, svc = fake
    call(svc, "Add", container="c1", layers=[{"dir": L(5), "image": "a", "gc_label": "ga"}])
    call(svc, "Add", container="c1", layers=[{"dir": L(6), "image": "b", "gc_label": "gb"}], position="bottom")
    assert task.stacks["c1"] == [L(5), L(1), L(6)]
    out = call(svc, "Remove", container="c1", images=["a"])
    assert [e["dir"] for e in out["removed"]] == [L(5)] and out["removed"][0]["gc_label"] == "ga"
    assert [la["dir"] for la in out["layers"]] == [L(1), L(6)]
    out = call(svc, "Remove", container="c1", layers=[L(6)])
    assert out["removed"][0]["live"] and [la["dir"] for la in out["layers"]] == [L(1)]


@pytest.mark.parametrize("payload, code, text", [
    ({"container": "nope", "layers": [L(2)]}, Code.NOT_FOUND, "not running in this sandbox"),
    ({"container": "c1", "layers": []}, Code.INVALID_ARGUMENT, "non-empty"),
    ({"container": "c1", "layers": ["rel/dir"]}, Code.INVALID_ARGUMENT, "absolute"),
    ({"container": "c1", "layers": [L(2)], "position": "middle"}, Code.INVALID_ARGUMENT, "position"),
    ({"layers": [L(2)]}, Code.INVALID_ARGUMENT, "container is required"),
])
def test_add_rejects_bad_requests(fake, payload, code, text) -> None:  # noqa: ANN001
    task, svc = fake
    with pytest.raises(TtrpcError) as e:
        call(svc, "Add", **payload)
    assert e.value.code == code and text in e.value.message
    assert task.stacks["c1"] == [L(1)]


def test_remove_errors(fake) -> None:  # noqa: ANN001
    task, svc = fake
    with pytest.raises(TtrpcError) as e:
        call(svc, "Remove", container="c1", layers=[L(9)])
    assert e.value.code == Code.NOT_FOUND
    with pytest.raises(TtrpcError) as e:
        call(svc, "Remove", container="c1", images=["never-added"])
    assert e.value.code == Code.NOT_FOUND and "no layers of image never-added" in e.value.message
    with pytest.raises(TtrpcError) as e:
        call(svc, "Remove", container="c1", layers=[L(1)])
    assert e.value.code == Code.FAILED_PRECONDITION


def test_not_a_layer_stack_or_stopped(tmp_path: Path) -> None:
    task = FakeTask()
    task.add("ovl", tmp_path, ["/var/lib/containerd/snapshots/1/fs"])
    c = task.add("stopped", tmp_path, [L(1)])
    c.init.status = Status.STOPPED
    svc = layers.LayersService(task, object(), REPO)
    with pytest.raises(TtrpcError) as e:
        call(svc, "Add", container="ovl", layers=[L(2)])
    assert e.value.code == Code.FAILED_PRECONDITION and "not a stack of fractal layers" in e.value.message
    with pytest.raises(TtrpcError) as e:
        call(svc, "List", container="stopped")
    assert e.value.code == Code.FAILED_PRECONDITION and "stopped" in e.value.message
    assert not [op for op, _ in task.calls if op == "restack"]


def test_concurrent_adds_are_serialized(fake) -> None:  # noqa: ANN001
    task, svc = fake
    task.delay = 0.02
    add = svc.methods()["Add"][1]

    async def both() -> list[Any]:
        reqs = [wrappers_pb2.StringValue(value=json.dumps({"container": "c1", "layers": [{"dir": L(n), "image": f"i{n}"}]}))
                for n in (7, 8)]
        return await asyncio.gather(*(add(r, None) for r in reqs))

    asyncio.run(both())
    assert sorted(task.stacks["c1"][:2]) == [L(7), L(8)] and task.stacks["c1"][2] == L(1)
    # each restack saw the other's result (the second read the stack after the first changed it)
    layers_calls = [a for op, a in task.calls if op == "layers"]
    assert len(layers_calls) == 2


def test_layer_path_translation(tmp_path: Path) -> None:
    class VMish:
        def layer_path(self, host_dir: str) -> str:
            return host_dir.replace(REPO, "/guest/repo")

    task = FakeTask()
    task.add("c1", tmp_path, [L(1)])
    task.stacks["c1"] = ["/guest/repo/layers/1"]  # the agent sees guest paths
    svc = layers.LayersService(task, VMish(), REPO)
    out = call(svc, "Add", container="c1", layers=[{"dir": L(2), "image": "x"}])
    assert task.calls[-1][1]["add"] == ["/guest/repo/layers/2"]
    assert [la["dir"] for la in out["layers"]] == [L(2), L(1)]  # host dirs again


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
    with pytest.raises(TtrpcError) as e:
        layers.parse_position(value)
    assert e.value.code == Code.INVALID_ARGUMENT
    with pytest.raises(argparse.ArgumentTypeError):
        cli_layers.parse_position(str(value))
