"""The agent's ``files``/``dirs`` create args (VM containers' copied host files, the pod's shm)."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest

from ccpu.agent import protocol
from ccpu.agent.placed import place_files


def _file(path: str, data: bytes, mode: int = 0o644) -> dict:
    return {"path": path, "data": base64.b64encode(data).decode(), "mode": mode}


def test_files_and_dirs(tmp_path: Path) -> None:
    bundle, scratch = tmp_path / "bundles" / "c1", tmp_path / "containers"
    bundle.mkdir(parents=True)
    scratch.mkdir()
    shm = scratch / "@shm" / "abc"
    place_files({"files": [_file(f"{bundle}/files/0-hosts", b"127.0.0.1 x\n", 0o640)],
                  "dirs": [str(shm)]}, str(bundle), [str(scratch)])
    f = bundle / "files" / "0-hosts"
    assert f.read_bytes() == b"127.0.0.1 x\n"
    assert stat.S_IMODE(f.stat().st_mode) == 0o640
    assert stat.S_IMODE(shm.stat().st_mode) == 0o1777
    # idempotent for the shared dir (the pod's second container)
    place_files({"dirs": [str(shm)]}, str(bundle), [str(scratch)])


def test_files_on_the_containers_scratch(tmp_path: Path) -> None:
    """A VM container's copies go onto its own tmpfs (limits.py); elsewhere is still refused."""
    bundle, scratch = tmp_path / "bundles" / "c1", tmp_path / "containers" / "c1"
    bundle.mkdir(parents=True)
    scratch.mkdir(parents=True)
    place_files({"files": [_file(f"{scratch}/files/0-hosts", b"h\n")]}, str(bundle), [], str(scratch))
    assert (scratch / "files" / "0-hosts").read_bytes() == b"h\n"
    with pytest.raises(protocol.InvalidArgument, match="outside"):
        place_files({"files": [_file(f"{tmp_path}/containers/c2/files/x", b"h")]}, str(bundle), [], str(scratch))


@pytest.mark.parametrize("args, why", [
    ({"files": [_file("/etc/passwd", b"x")]}, "outside"),
    ({"files": [_file("BUNDLE/../escape", b"x")]}, "outside"),
    ({"files": [{"path": "BUNDLE/f", "data": "not base64!"}]}, "base64"),
    ({"files": [_file("BUNDLE/f", b"x", 0o17777)]}, "bad mode"),
    ({"files": ["BUNDLE/f"]}, "objects"),
    ({"dirs": ["/tmp/elsewhere"]}, "outside"),
    ({"sysctls": {"kernel.core_pattern": "|/x"}}, "only net"),
    ({"sysctls": {"net.ipv4/../../kernel/x": "1"}}, "only net"),
    ({"sysctls": {"net.ipv4.ip_forward": "1\n"}}, "one-line"),
])
def test_bad_requests(tmp_path: Path, args: dict, why: str) -> None:
    bundle = tmp_path / "b"
    bundle.mkdir()
    fixed = {k: v if isinstance(v, dict) else
             [({**e, "path": e["path"].replace("BUNDLE", str(bundle))} if isinstance(e, dict)
               else e.replace("BUNDLE", str(bundle)) if k == "files" else e) for e in v]
             for k, v in args.items()}
    with pytest.raises(protocol.InvalidArgument, match=why):
        place_files(fixed, str(bundle), [str(tmp_path / "scratch")])
    assert not os.path.exists(tmp_path / "escape")


def test_symlink_in_bundle_is_not_followed(tmp_path: Path) -> None:
    bundle = tmp_path / "b"
    (bundle / "files").mkdir(parents=True)
    target = tmp_path / "target"
    target.write_text("keep")
    os.symlink(target, bundle / "files" / "0-hosts")
    with pytest.raises((protocol.InvalidArgument, OSError)):
        place_files({"files": [_file(f"{bundle}/files/0-hosts", b"x")]}, str(bundle), [])
    assert target.read_text() == "keep"
