"""ccpu/client/livelayers.py ``Facts``: what the shims remember of images and layers, in memory
and shared through a directory (each sandbox's shim is a new process).  Which facts are sound
to keep is docs/live-layers.md's; here: that a shared fact comes back as written, and that
anything else in that directory reads as unknown."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ccpu.client.images import ImageLayers
from ccpu.client.livelayers import Facts

A = "sha256:" + "a" * 64
B = "sha256:" + "b" * 64
KEY = ("default", "fractal", B, 1733500000123456789)


def test_a_new_process_finds_what_another_learnt(tmp_path: Path) -> None:
    d = str(tmp_path / "facts")
    first = Facts(directory=d)
    first.put("image", "sha256:" + "c" * 64, ImageLayers("reg/x:1", "sha256:" + "d" * 64, (A,), (A,)))
    first.put("dirs", KEY, (("/repo/layers/7", B), ("/repo/layers/3", A)))
    first.put("size", ("fractal", "/repo/layers/7"), 4096)
    assert oct(os.stat(d).st_mode & 0o777) == oct(0o700)
    second = Facts(directory=d)  # nothing in memory
    img = second.get("image", "sha256:" + "c" * 64)
    assert img.chain_ids == (A,) and img.manifest == "sha256:" + "d" * 64
    assert second.get("dirs", KEY) == (("/repo/layers/7", B), ("/repo/layers/3", A))
    assert second.get("size", ("fractal", "/repo/layers/7")) == 4096
    assert second.get("dirs", KEY[:3] + (KEY[3] + 1,)) is None  # another life of the snapshot
    assert Facts().get("size", ("fractal", "/repo/layers/7")) is None  # no directory: memory only


def test_anything_else_in_the_directory_reads_as_unknown(tmp_path: Path) -> None:
    d = tmp_path / "facts"
    Facts(directory=str(d)).put("dirs", KEY, (("/repo/layers/7", B),))
    (path,) = d.glob("dirs-*.json")
    for bad in ({"key": list(KEY), "value": [["relative/dir", B]]},
                {"key": list(KEY), "value": [["/repo/layers/7", "not-a-digest"]]},
                {"key": list(KEY[:3]) + [0], "value": [["/repo/layers/7", B]]},  # another key's
                {"value": [["/repo/layers/7", B]]}):
        path.write_text(json.dumps(bad))
        assert Facts(directory=str(d)).get("dirs", KEY) is None, bad
    path.write_text("{not json")
    assert Facts(directory=str(d)).get("dirs", KEY) is None
    path.write_text(json.dumps({"key": list(KEY), "value": [["/repo/layers/7", B]]}))
    assert Facts(directory=str(d)).get("dirs", KEY) == (("/repo/layers/7", B),)
    d.chmod(0o777)  # a directory others may write is not read at all
    assert Facts(directory=str(d)).get("dirs", KEY) is None


def test_bounded_in_memory_and_on_disk(tmp_path: Path) -> None:
    d = tmp_path / "facts"
    f = Facts(limit=4, directory=str(d))
    for i in range(40):
        f.put("size", ("fractal", f"/repo/layers/{i}"), i)
    assert len(f._maps["size"]) == 4
    assert len(list(d.glob("*.json"))) <= 16
    assert f.get("size", ("fractal", "/repo/layers/39")) == 39
