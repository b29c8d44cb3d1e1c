"""ccpu.stack.LayerStack: the one typed layer stack (wire shape, mapping, the agent's check)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ccpu.agent import protocol
from ccpu.stack import LayerStack, StackError


def test_wire_round_trip_keeps_the_agent_protocol_shape() -> None:
    s = LayerStack(("/r/layers/2", "/r/layers/1"), "/c/up", "/c/wk")
    assert s.to_wire() == {"kind": "layers", "lowers": ["/r/layers/2", "/r/layers/1"],
                           "upper": "/c/up", "work": "/c/wk"}
    assert LayerStack.from_wire(s.to_wire()) == s
    ro = LayerStack.from_wire({"kind": "layers", "lowers": ["/a"]})
    assert ro.to_wire() == {"kind": "layers", "lowers": ["/a"]} and not ro.writable


@pytest.mark.parametrize("wire", [
    "x", {"lowers": []}, {"lowers": "/a"}, {"lowers": ["/a", 3]}, {"lowers": ["/a"], "upper": 1},
    {"lowers": ["/a"], "upper": "/u"},
])
def test_malformed_stacks_are_refused(wire: object) -> None:
    with pytest.raises(StackError):
        LayerStack.from_wire(wire)


def test_map_moves_every_path_with_its_role() -> None:
    s = LayerStack(("/h/2", "/h/1"), "/u", "/w")
    moved = s.map(lambda p, role: f"/g{p}" if role == "lower" else p)
    assert moved == LayerStack(("/g/h/2", "/g/h/1"), "/u", "/w")


def test_agent_resolves_a_stack_once_inside_its_roots(tmp_path: Path) -> None:
    for d in ("l1", "up", "wk"):
        (tmp_path / d).mkdir()
    roots = [str(tmp_path)]
    wire = {"kind": "layers", "lowers": [f"{tmp_path}/x/../l1"], "upper": f"{tmp_path}/up",
            "work": f"{tmp_path}/wk"}
    assert protocol.resolve_stack(wire, roots) == LayerStack((f"{tmp_path}/l1",), f"{tmp_path}/up",
                                                             f"{tmp_path}/wk")
    for bad in ({**wire, "lowers": ["/etc"]}, {**wire, "upper": "/tmp"}, {**wire, "work": "wk"},
                {**wire, "lowers": []}):
        with pytest.raises(protocol.InvalidArgument):
            protocol.resolve_stack(bad, roots)
