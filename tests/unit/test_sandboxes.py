"""Sandbox grouping and the records `fractal ps` reads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ccpu import sandboxes
from ccpu.grouping import sandbox_group


def test_grouping_prefers_fractal_then_cri_annotation() -> None:
    assert sandbox_group("c1", {}) == "c1"
    assert sandbox_group("c1", {"io.kubernetes.cri.sandbox-id": "pod"}) == "pod"
    assert sandbox_group("c1", {"io.kubernetes.cri.sandbox-id": "pod", "io.fractal.sandbox": "mine"}) == "mine"
    assert sandbox_group("c1", {"io.fractal.sandbox": ""}) == "c1"


def test_records_round_trip_and_liveness(tmp_path: Path) -> None:
    live = sandboxes.SandboxRecord("g1", "ns", "host", os.getpid(), agent_pid=123, containers=["a", "b"])
    dead = sandboxes.SandboxRecord("g2", "ns", "vm", 2**22 + 12345, vm={"pid": 1, "accel": "tcg"})
    sandboxes.write(live, tmp_path)
    sandboxes.write(dead, tmp_path)
    got = sandboxes.read_all("ns", tmp_path)
    assert got["g1"] == live and got["g1"].alive
    assert got["g2"].vm == {"pid": 1, "accel": "tcg"} and not got["g2"].alive
    assert sandboxes.read_all("other", tmp_path) == {}
    sandboxes.remove("ns", "g1", tmp_path)
    assert set(sandboxes.read_all("ns", tmp_path)) == {"g2"}


def test_a_leaving_shim_removes_only_its_own_record(tmp_path: Path) -> None:
    """A daemon gives up its socket at Shutdown, so a successor of its group may start and write
    the group's record before the leaving one gets to remove "its" record."""
    sandboxes.write(sandboxes.SandboxRecord("g1", "ns", "host", 4242), tmp_path)  # the successor's
    sandboxes.remove("ns", "g1", tmp_path, owner=4141)
    assert set(sandboxes.read_all("ns", tmp_path)) == {"g1"}
    sandboxes.remove("ns", "g1", tmp_path, owner=4242)
    assert sandboxes.read_all("ns", tmp_path) == {}
    sandboxes.remove("ns", "g1", tmp_path, owner=4242)  # gone already: no error
    (tmp_path / "sandboxes" / "ns" / "g1.json").write_text("{not json")  # junk goes
    sandboxes.remove("ns", "g1", tmp_path, owner=4242)
    assert not (tmp_path / "sandboxes" / "ns" / "g1.json").exists()


@pytest.mark.parametrize("group", ["..", "a/b", ""])
def test_records_refuse_unsafe_names(tmp_path: Path, group: str) -> None:
    with pytest.raises(ValueError):
        sandboxes.write(sandboxes.SandboxRecord(group, "ns", "host", 1), tmp_path)


def test_pod_join_needs_leave() -> None:
    from ccpu.grouping import asks_to_join, from_cri

    pod = {"io.kubernetes.cri.container-type": "sandbox", "io.kubernetes.cri.sandbox-id": "pod",
           "io.fractal.sandbox": "other"}
    assert from_cri(pod) and not from_cri({"io.fractal.sandbox": "other"})
    assert asks_to_join("c1", pod) and not asks_to_join("c1", {"io.fractal.sandbox": "other"})
    assert not asks_to_join("c1", {**pod, "io.fractal.sandbox": "pod"})  # its own pod
    assert sandbox_group("c1", pod, pod_may_join=False) == "pod"
    assert sandbox_group("c1", pod, pod_may_join=True) == "other"
    assert sandbox_group("c1", {"io.fractal.sandbox": "other"}, pod_may_join=False) == "other"
