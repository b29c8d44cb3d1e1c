"""Guest limits (ccpu/agent/limits.py) and how a full filesystem is answered (issue 18)."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path
from typing import Any

import pytest

from ccpu.agent import limits, protocol, runc, wire
from ccpu.agent.server import Outbox, Server
from shim.errors import to_ttrpc
from ccpu.ttrpc import Code

MiB = 1 << 20


def test_meminfo_and_the_containers_memory_max() -> None:
    info = limits.meminfo("MemTotal:  500000 kB\nMemFree:   300000 kB\nMemAvailable:  400000 kB\nHugePages_Total: 0\n")
    assert info["MemAvailable"] == 400000 * 1024 and info["HugePages_Total"] == 0
    assert limits.containers_memory_max(info, 64 * MiB) == 400000 * 1024 - 64 * MiB
    # a reserve that would leave (almost) nothing: half of what is there, page-aligned
    small = {"MemAvailable": 80 * MiB + 123}
    assert limits.containers_memory_max(small, 64 * MiB) == (80 * MiB + 123) // 2 // 4096 * 4096


@pytest.mark.parametrize("original, expected", [
    ("/t1/calm", "/fractal/t1/calm"),  # ctr: /<namespace>/<id>
    ("/kubepods/besteffort/pod1/abc", "/fractal/kubepods/besteffort/pod1/abc"),  # CRI, cgroupfs
    ("kubepods-pod1.slice:cri-containerd:abc", "/fractal/c1"),  # systemd style: not for the guest's runc
    ("/t1/../../escape", "/fractal/c1"),
    (None, "/fractal/c1"),
    ("", "/fractal/c1"),
])
def test_every_container_cgroup_goes_below_the_parent(original: Any, expected: str) -> None:
    assert limits.guest_cgroups_path(original, "c1", "/fractal") == expected


def test_adjust_spec_gives_containers_their_own_oom_score() -> None:
    spec: dict[str, Any] = {"process": {"args": ["sh"]}, "linux": {"cgroupsPath": "/ns/c1"}}
    limits.adjust_spec(spec, "c1", "/fractal")
    assert spec["linux"]["cgroupsPath"] == "/fractal/ns/c1"
    assert spec["process"]["oomScoreAdj"] == 0  # not the agent's -1000, which runc would pass on
    spec = {"process": {"oomScoreAdj": 500}}
    limits.adjust_spec(spec, "c2", "/fractal")
    assert spec["process"]["oomScoreAdj"] == 500 and spec["linux"]["cgroupsPath"] == "/fractal/c2"


def test_scratch_arg(tmp_path: Path) -> None:
    roots = [str(tmp_path)]
    assert limits.scratch_arg({}, roots) is None
    assert limits.scratch_arg({"scratch": {"path": f"{tmp_path}/c1", "size": 64 * MiB}}, roots) == (f"{tmp_path}/c1", 64 * MiB)
    for bad, why in (({"path": "/etc", "size": MiB}, "outside"), ({"path": f"{tmp_path}/c", "size": 10}, "outside 1048576"),
                     ({"path": f"{tmp_path}/c", "size": True}, "boolean"), ("x", "object")):
        with pytest.raises(protocol.InvalidArgument, match=why):
            limits.scratch_arg({"scratch": bad}, roots)


def test_scratch_options_bound_inodes_by_size() -> None:
    assert limits.scratch_options(128 * MiB) == f"size={128 * MiB},nr_inodes=131072,mode=0755"
    assert limits.scratch_options(MiB) == f"size={MiB},nr_inodes=1024,mode=0755"


def test_runc_out_of_space_is_resource_exhausted() -> None:
    err = runc.classify("create", "runc create failed: write /run/runc/c1/state.json: no space left on device")
    assert isinstance(err, protocol.ResourceExhausted)
    assert to_ttrpc(err).code == Code.RESOURCE_EXHAUSTED


class _FullSupervisor:
    """What the server needs of a Supervisor, with an operation that hits a full filesystem."""

    containers: dict[str, Any] = {}

    def __init__(self, full: Path) -> None:
        self.full = full

    async def pids(self, args: Any) -> dict[str, Any]:
        raise OSError(errno.ENOSPC, "No space left on device", str(self.full / "x.json"))

    async def stats(self, args: Any) -> dict[str, Any]:
        raise OSError(errno.EIO, "I/O error", "/x")

    def full_filesystem(self, path: str) -> str:
        return f"the thing holding {path} is full"

    def __getattr__(self, name: str) -> Any:  # the other operations are not called here
        return lambda *a, **k: None

    def serialized(self, cid: str) -> Any:
        return _Null()


class _Null:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *a: object) -> None:
        return None


def test_enospc_in_a_request_is_resource_exhausted_naming_what_is_full(tmp_path: Path) -> None:
    async def go() -> list[dict[str, Any]]:
        server = Server(_FullSupervisor(tmp_path), Outbox())  # type: ignore[arg-type]
        sent: list[bytes] = []

        class Conn:
            closed = False
            name = "c"

            def send(self, raw: bytes) -> None:
                sent.append(raw)

        await server.handle_request(Conn(), 1, "pids", {"container": "c1"})  # type: ignore[arg-type]
        await server.handle_request(Conn(), 2, "stats", {"container": "c1"})  # type: ignore[arg-type]
        out = []
        for raw in sent:
            reader = asyncio.StreamReader()
            reader.feed_data(raw)
            reader.feed_eof()
            frame = await wire.read_frame(reader)
            assert frame is not None
            out.append(wire.decode_control(frame))
        return out

    full, other = asyncio.run(go())
    assert full["error"]["code"] == "ResourceExhausted"
    assert full["error"]["message"] == f"pids: No space left on device: the thing holding {tmp_path}/x.json is full"
    assert other["error"]["code"] == "Internal"  # any other OSError is still a bug of ours


def test_full_filesystem_names_the_mount(tmp_path: Path) -> None:
    from ccpu.agent import mounts
    from ccpu.linux import mountinfo

    text = mounts.full_filesystem(str(tmp_path / "nonexistent" / "file"))
    m = mountinfo.containing(os.path.realpath(tmp_path), mountinfo.read())
    assert m is not None
    mp, fstype = m.mountpoint, m.fstype
    assert text.startswith(f"the {fstype} at {mp} is full (") and "MiB free" in text and "inodes free" in text
