"""shim/mountrecord.py's record of mounts (pure): what may be recorded, the undo order, and that a
damaged record is refused rather than trusted."""

from __future__ import annotations

import json

import pytest

from shim.mountrecord import MountRecord, MountRecordError
from shim.volumes import VolumeError, volume_path


def test_volume_path_stays_in_its_container_dir() -> None:
    assert volume_path("c1/0", "c1") == "volumes/c1/0"
    for name in ("c2/0", "c1/../c2/0", "c1", "c1/0/x", "../c1/0", "c1/", "c1/.", "/c1/0"):
        with pytest.raises(VolumeError):
            volume_path(name, "c1")


def test_undo_order_children_first_then_the_view() -> None:
    rec = MountRecord()
    for p in ("volumes", "volumes/a/0", "volumes/a/1", "volumes/ab/0"):
        rec.add(p)
    rec.set_id("volumes", 10)
    rec.set_id("volumes/a/0", 11)
    assert [e.path for e in rec.below("volumes/a")] == ["volumes/a/1", "volumes/a/0"]
    assert [e.path for e in rec.below("volumes")] == ["volumes/ab/0", "volumes/a/1", "volumes/a/0", "volumes"]
    rec.drop("volumes/a/1")
    assert [(e.path, e.mnt_id) for e in rec.below("volumes/a")] == [("volumes/a/0", 11)]
    with pytest.raises(MountRecordError):
        rec.add("volumes/a/0")  # twice
    with pytest.raises(MountRecordError):
        rec.set_id("volumes/zz/0", 3)
    assert [e.path for e in rec.below()] == ["volumes/ab/0", "volumes/a/0", "volumes"]


def test_json_round_trip() -> None:
    rec = MountRecord()
    rec.add("volumes")
    rec.set_id("volumes", 42)
    rec.add("volumes/c/0")
    back = MountRecord.from_json(rec.to_json())
    assert [(e.path, e.mnt_id) for e in back.entries] == [("volumes", 42), ("volumes/c/0", None)]


@pytest.mark.parametrize("text", [
    "", "[]", "{}", '{"mounts": {}}',
    json.dumps({"mounts": [{"path": "/", "id": 1}]}),
    json.dumps({"mounts": [{"path": "volumes/../..", "id": 1}]}),
    json.dumps({"mounts": [{"path": "volumes//c", "id": 1}]}),
    json.dumps({"mounts": [{"path": "volumes/c/", "id": 1}]}),
    json.dumps({"mounts": [{"path": "/".join("a" * 9), "id": 1}]}),
    json.dumps({"mounts": [{"path": "volumes", "id": 1}, {"path": "volumes", "id": 2}]}),
    json.dumps({"mounts": [{"path": "volumes/c/0", "id": "1"}]}),
    json.dumps({"mounts": [{"path": "volumes/c/0", "id": True}]}),
    json.dumps({"mounts": [{"path": "volumes/c/0", "id": -1}]}),
    json.dumps({"mounts": [{"path": "volumes/c/0"}]}),
    json.dumps({"mounts": [{"path": f"volumes/c/{i}", "id": i + 1} for i in range(5000)]}),
])
def test_a_damaged_record_is_refused(text: str) -> None:
    with pytest.raises(MountRecordError, match="unreadable mount record"):
        MountRecord.from_json(text)
