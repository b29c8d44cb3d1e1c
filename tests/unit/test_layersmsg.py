"""ccpu.layersmsg: the fractal.layers.v1 messages both ends use (no JSON in a StringValue)."""

from __future__ import annotations

from ccpu import layersmsg


def test_add_request_round_trip_keeps_an_unknown_size_apart_from_zero() -> None:
    req = layersmsg.request("Add", {"container": "c1", "position": 2, "layers": [
        {"dir": "/r/layers/5", "chain_id": "sha256:x", "image": "img", "size": 0, "gc_label": "g"},
        "/r/layers/6"]})
    assert req.DESCRIPTOR.full_name == "fractal.layers.v1.AddRequest"
    args = layersmsg.request_args(type(req).FromString(req.SerializeToString()))
    assert args == {"container": "c1", "position": "2", "layers": [
        {"dir": "/r/layers/5", "chain_id": "sha256:x", "image": "img", "size": 0, "gc_label": "g"},
        {"dir": "/r/layers/6", "chain_id": "", "image": "", "size": None, "gc_label": ""}]}
    assert layersmsg.request_args(layersmsg.request("Add", {"container": "c1", "layers": []}))["position"] is None


def test_stack_answer_round_trip() -> None:
    view = {"container": "c1", "repo_root": "/r", "upper": None,
            "layers": [{"dir": "/r/layers/5", "live": True, "image": "img", "size": 7, "added_at": 9},
                       {"dir": "/r/layers/1", "live": False}],
            "history": [{"at": 1, "added": ["/r/layers/5"], "removed": [], "restack_ms": 2.5}],
            "added": ["/r/layers/5"], "skipped": [], "restack_ms": 2.5}
    msg = layersmsg.answer(view)
    out = layersmsg.answer_dict(layersmsg.Stack.FromString(msg.SerializeToString()))
    assert out["upper"] is None and out["repo_root"] == "/r" and out["restack_ms"] == 2.5
    assert out["layers"][0] == {"dir": "/r/layers/5", "live": True, "chain_id": "", "image": "img",
                                "size": 7, "gc_label": "", "added_at": 9}
    assert out["layers"][1]["size"] is None and out["layers"][1]["added_at"] is None
    assert out["history"] == view["history"] and out["added"] == ["/r/layers/5"]
    listed = layersmsg.answer_dict(layersmsg.answer({"container": "c1", "layers": []}))
    assert "restack_ms" not in listed and "added" not in listed
