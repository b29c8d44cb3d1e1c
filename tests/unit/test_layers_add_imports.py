"""What ``fractal layers add`` (and ``rm``) imports: its whole process should cost <= 100 ms (issue 13), and
grpc, protobuf and asyncio were most of it.  The shim does the containerd lookups (AddImages,
shim/layers.py); the CLI finds the shim through its sandbox record and calls it with
ccpu/layerswire.py.  So the CLI runs here for real, in a fresh ``python3 -X importtime``
process, against the project's ttrpc server answering AddImages, and the test asserts *which*
modules got loaded -- never how long that took (the figures are only shown on failure and
with ``pytest -s``; docs/performance.md has the measured ones).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ccpu import layersmsg, sandboxes
from tests.unit.test_layerswire import serving

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = ("grpc", "google.protobuf", "asyncio", "ssl", "_ssl", "ccpu.ttrpc", "ccpu.api",
             "ccpu.client.containerd", "ccpu.layersmsg")

SCRIPT = r"""
import json, sys
before = set(sys.modules)
from ccpu import cli
code = cli.main(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    json.dump({"code": code, "loaded": sorted(set(sys.modules) - before)}, f)
"""


#: what `site` would have loaded anyway, and so hides from the test above: under ``python -S``
#: (the launcher `fractal install` writes, ccpu/cli/launcher.py) these are the CLI's own cost,
#: ~50 ms of imports before issue 13's trims (docs/performance.md)
HEAVY = ("dataclasses", "inspect", "typing", "pathlib", "tempfile", "socket", "logging", "shutil",
         "subprocess", "asyncio", "grpc",
         "argparse", "gettext", "locale", "ccpu.cli.parser")  # parsed by ccpu/cli/fastargs.py


def run_cli(tmp_path: Path, argv: list[str], *flags: str) -> tuple[dict[str, Any], subprocess.CompletedProcess[str]]:
    out = tmp_path / "out.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FRACTAL_RUN_DIR": str(tmp_path / "run"),
           "CONTAINERD_ADDRESS": str(tmp_path / "no-containerd.sock")}
    r = subprocess.run([sys.executable, *flags, "-X", "importtime", "-c", SCRIPT, str(out), *argv],
                       capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=60)
    assert out.exists(), r.stderr[-3000:]
    return json.loads(out.read_text()), r


def forbidden(loaded: list[str]) -> list[str]:
    return [m for m in loaded if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]


def importtime_report(stderr: str) -> str:
    rows = [ln for ln in stderr.splitlines() if ln.startswith("import time:") and "cumulative" not in ln]
    return "\n".join(sorted(rows, key=lambda ln: -int(ln.split("|")[1]))[:25])


def test_layers_add_loads_no_grpc_protobuf_or_asyncio(tmp_path: Path) -> None:
    calls: list[tuple[str, list[str], str]] = []

    async def add_images(req: Any, ctx: Any) -> Any:
        calls.append((req.container, list(req.images), req.position))
        return layersmsg.answer({"container": req.container, "upper": "/u",
                                 "layers": [{"dir": "/r/l9", "live": True, "image": "tools"}],
                                 "added": ["/r/l9"], "skipped": [], "restack_ms": 2.5})

    with serving(add_images) as address:
        sandboxes.write(sandboxes.SandboxRecord(group="c1", namespace="default", mode="host",
                                                shim_pid=os.getpid(), containers=["c1"],
                                                address=address), base=tmp_path / "run")
        res, r = run_cli(tmp_path, ["layers", "add", "--position", "bottom", "c1", "tools"])
    print(importtime_report(r.stderr))
    assert res["code"] == 0, r.stderr[-2000:]
    assert calls == [("c1", ["tools"], "bottom")]
    assert "added 1 layer(s) of tools (restack 2.5 ms)" in r.stdout
    bad = forbidden(res["loaded"])
    assert not bad, f"`fractal layers add` loaded {bad}\n{importtime_report(r.stderr)}"


def test_layers_add_without_site_loads_none_of_the_heavy_stdlib(tmp_path: Path) -> None:
    """Under ``-S`` nothing is loaded before the CLI: every module counts.  dataclasses (with
    inspect, ast, dis), typing, pathlib, tempfile, socket's enums and logging were ~60 % of the
    process's imports; the records, the stack and the wire client do without them."""
    async def add_images(req: Any, ctx: Any) -> Any:
        return layersmsg.answer({"container": req.container, "upper": "/u",
                                 "layers": [{"dir": "/r/l9", "live": True, "image": "tools"}],
                                 "added": ["/r/l9"], "skipped": [], "restack_ms": 2.5})

    with serving(add_images) as address:
        sandboxes.write(sandboxes.SandboxRecord(group="c1", namespace="default", mode="host",
                                                shim_pid=os.getpid(), containers=["c1"],
                                                address=address), base=tmp_path / "run")
        res, r = run_cli(tmp_path, ["layers", "add", "c1", "tools"], "-S")
        assert res["code"] == 0, r.stderr[-2000:]
        assert "added 1 layer(s) of tools" in r.stdout
        heavy = [m for m in res["loaded"] if any(m == h or m.startswith(h + ".") for h in HEAVY)]
        assert not heavy, f"`python -S -m ccpu.cli layers add` loaded {heavy}\n{importtime_report(r.stderr)}"
        res, r = run_cli(tmp_path, ["layers", "add", "--json", "c1", "tools"], "-S")
        assert res["code"] == 0 and json.loads(r.stdout)["added"] == ["/r/l9"], r.stderr[-2000:]
        assert not [m for m in res["loaded"] if m in HEAVY], res["loaded"]


def test_layers_rm_is_as_lean_as_add(tmp_path: Path) -> None:
    """`fractal layers rm` asks the shim's RemoveTargets (it resolves the targets, restacks and
    takes the GC labels off) with ccpu/layerswire.py: under ``-S`` none of the heavy stdlib, no
    grpc, protobuf or asyncio (before: ~340 ms, the whole gRPC client in the CLI's process)."""
    calls: list[tuple[str, list[str]]] = []

    async def remove_targets(req: Any, ctx: Any) -> Any:
        calls.append((req.container, list(req.targets)))
        return layersmsg.answer({"container": req.container, "upper": "/u",
                                 "layers": [{"dir": "/r/l1", "live": False, "chain_id": "sha256:ab"}],
                                 "removed": [{"dir": "/r/l9", "live": True, "image": "tools"}],
                                 "restack_ms": 1.5, "labels_removed": ["gc/tools"]})

    with serving(remove_targets, method="RemoveTargets") as address:
        sandboxes.write(sandboxes.SandboxRecord(group="c1", namespace="default", mode="host",
                                                shim_pid=os.getpid(), containers=["c1"],
                                                address=address), base=tmp_path / "run")
        res, r = run_cli(tmp_path, ["layers", "rm", "c1", "tools", "sha256:abcd"], "-S")
        assert res["code"] == 0, r.stderr[-2000:]
        assert "c1: removed 1 layer(s) (restack 1.5 ms)" in r.stdout
        bad = [m for m in res["loaded"] if any(m == h or m.startswith(h + ".") for h in HEAVY)]
        bad += forbidden(res["loaded"])
        assert not bad, f"`python -S -m ccpu.cli layers rm` loaded {bad}\n{importtime_report(r.stderr)}"
        res, r = run_cli(tmp_path, ["layers", "rm", "--json", "c1", "tools"], "-S")
        assert res["code"] == 0, r.stderr[-2000:]
        out = json.loads(r.stdout)
        assert out["removed"] == ["/r/l9"] and out["labels_removed"] == ["gc/tools"]
        assert out["layers"][0]["chain_id"] == "sha256:ab"
    assert calls == [("c1", ["tools", "sha256:abcd"]), ("c1", ["tools"])]


@pytest.mark.parametrize("verb", ["add", "rm"])
def test_an_older_shim_takes_the_grpc_path(tmp_path: Path, verb: str) -> None:
    """A shim without AddImages / RemoveTargets (it answers UNIMPLEMENTED) sends the CLI down
    the containerd path (here: no containerd, so its error) instead of failing with the
    shim's code."""
    async def add(req: Any, ctx: Any) -> Any:
        raise AssertionError("not called")

    with serving(add, method="Add") as address:
        sandboxes.write(sandboxes.SandboxRecord(group="c1", namespace="default", mode="host",
                                                shim_pid=os.getpid(), containers=["c1"],
                                                address=address), base=tmp_path / "run")
        res, r = run_cli(tmp_path, ["layers", verb, "c1", "tools"])
    assert res["code"] != 0
    assert "grpc" in res["loaded"], "the fallback asks containerd"
    assert "fractal: " in r.stderr and "does not serve" not in r.stderr
