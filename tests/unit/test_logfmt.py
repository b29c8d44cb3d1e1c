"""ccpu/logfmt.py: logrus-style records, context fields, the ttrpc wrapper; snapshotter --debug."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import shlex
import sys
import tempfile
from pathlib import Path

import pytest

from ccpu import logfmt
from tests.harness import private_snapshotter

PAIR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|[^ ]+)')


def parse(line: str) -> dict[str, str]:
    """A logrus text line back into its fields (values unquoted as Go's strconv.Unquote)."""
    out = {}
    for key, raw in PAIR.findall(line):
        out[key] = json.loads(raw) if raw.startswith('"') else raw
    return out


def record(msg: str, *args: object, level: int = logging.INFO, name: str = "shim.task",
           exc_info=None, **extra: object) -> logging.LogRecord:  # noqa: ANN001
    r = logging.LogRecord(name, level, __file__, 1, msg, args, exc_info)
    r.__dict__.update(extra)
    return r


@pytest.fixture
def fmt() -> logfmt.LogfmtFormatter:
    return logfmt.LogfmtFormatter(defaults={"namespace": "default", "sandbox": "g1"},
                                  trailing={"runtime": logfmt.RUNTIME, "pid": 42})


def test_text_line_order_quoting_and_fields(fmt: logfmt.LogfmtFormatter) -> None:
    with logfmt.bound(container="c1", exec=""):
        line = fmt.format(record("created %s (pid %d)", "c1", 7))
    assert "\n" not in line
    keys = [k for k, _ in PAIR.findall(line)]
    assert keys == ["time", "level", "msg", "namespace", "sandbox", "container", "logger",
                    "runtime", "pid"]  # "exec" was empty: left out
    f = parse(line)
    assert f["level"] == "info" and f["msg"] == "created c1 (pid 7)"
    assert f["container"] == "c1" and f["namespace"] == "default" and f["sandbox"] == "g1"
    assert f["runtime"] == "io.containerd.fractal.v1" and f["pid"] == "42"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z", f["time"])
    # bare values stay bare (as logrus), values with other characters are quoted
    assert " container=c1 " in line and ' msg="created c1 (pid 7)" ' in line
    assert line.startswith('time="')


def test_quote_like_logrus() -> None:
    assert logfmt.quote("abc-1.2_x/y@z^+") == "abc-1.2_x/y@z^+"
    assert logfmt.quote("") == '""'
    assert logfmt.quote('a "b"\\c\nd\te\x01') == '"a \\"b\\"\\\\c\\nd\\te\\x01"'
    assert logfmt.quote("ünï") == '"ünï"'


def test_levels_exceptions_and_extra_fields(fmt: logfmt.LogfmtFormatter) -> None:
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        line = fmt.format(record("failed", level=logging.ERROR, exc_info=sys.exc_info(),
                                 fields={"topic": "/tasks/exit"}))
    assert "\n" not in line
    f = parse(line)
    assert f["level"] == "error" and f["topic"] == "/tasks/exit"
    assert f["error"].startswith("Traceback") and "RuntimeError: boom\nsecond line" in f["error"]
    assert parse(fmt.format(record("x", level=logging.DEBUG)))["level"] == "debug"
    assert parse(fmt.format(record("x", level=logging.WARNING)))["level"] == "warning"
    assert parse(fmt.format(record("x", level=logging.CRITICAL)))["level"] == "fatal"


def test_json_format_same_keys() -> None:
    f = logfmt.JsonFormatter(defaults={"namespace": "n"})
    with logfmt.bound(container="c"):
        obj = json.loads(f.format(record('say "hi"')))
    assert obj["msg"] == 'say "hi"' and obj["level"] == "info" and obj["namespace"] == "n"
    assert obj["container"] == "c" and obj["logger"] == "shim.task"
    assert list(obj)[:3] == ["time", "level", "msg"]


def test_context_is_per_task_and_inherited() -> None:
    """What a request binds is seen by the tasks it starts, never by a concurrent request."""
    seen: dict[str, dict[str, str]] = {}

    async def request(cid: str) -> None:
        logfmt.bind(container=cid)
        await asyncio.sleep(0.01)

        async def child() -> None:
            await asyncio.sleep(0)
            seen[cid + "-child"] = logfmt.fields()

        await asyncio.create_task(child())
        seen[cid] = logfmt.fields()

    async def main() -> None:
        await asyncio.gather(request("a"), request("b"))
        seen["outside"] = logfmt.fields()

    asyncio.run(main())
    assert seen["a"] == {"container": "a"} and seen["b"] == {"container": "b"}
    assert seen["a-child"] == {"container": "a"} and seen["b-child"] == {"container": "b"}
    assert seen["outside"] == {}


def test_with_request_fields_binds_container_and_exec() -> None:
    from google.protobuf import wrappers_pb2

    from ccpu.api.gen.containerd.runtime.v2.task import shim_pb2 as pb

    stream = io.StringIO()
    logfmt.setup(stream, debug=True, defaults={"namespace": "ns1"})
    log = logging.getLogger("shim.task")

    async def handler(msg, ctx):  # noqa: ANN001, ANN202
        log.info("handling")
        return "ok"

    class Ctx:
        service = "containerd.task.v2.Task"

    table = logfmt.with_request_fields({"Kill": (pb.KillRequest, handler),
                                        "Add": (wrappers_pb2.StringValue, handler)})

    async def main() -> None:
        # each call in its own task, as ccpu.ttrpc's server runs them
        assert await asyncio.create_task(table["Kill"][1](pb.KillRequest(id="c9", exec_id="e1"), Ctx())) == "ok"
        await asyncio.create_task(table["Add"][1](wrappers_pb2.StringValue(value='{"container": "c7"}'), Ctx()))

    try:
        asyncio.run(main())
    finally:
        logging.getLogger().handlers[:] = []
        logging.getLogger().setLevel(logging.WARNING)
    lines = [parse(l) for l in stream.getvalue().splitlines()]
    lines = [r for r in lines if r["logger"] != "asyncio"]  # asyncio's own debug record
    assert {"level": "debug", "msg": "containerd.task.v2.Task Kill", "container": "c9",
            "exec": "e1", "namespace": "ns1"}.items() <= lines[0].items()
    assert {"msg": "handling", "container": "c9", "exec": "e1"}.items() <= lines[1].items()
    assert lines[3]["msg"] == "handling" and lines[3]["container"] == "c7" and "exec" not in lines[3]


def test_setup_debug_loggers_only() -> None:
    stream = io.StringIO()
    try:
        logfmt.setup(stream, debug=True, debug_loggers=("fractal",))
        logging.getLogger("grpc._x").debug("noise")
        logging.getLogger("fractal.snapshotter").debug("ours")
    finally:
        logging.getLogger().handlers[:] = []
        logging.getLogger("fractal").setLevel(logging.NOTSET)
        logging.getLogger().setLevel(logging.WARNING)
    out = stream.getvalue()
    assert "ours" in out and "noise" not in out


def _snapshotter_lines(*flags: str) -> list[str]:
    """Start the snapshotter with ``flags``, make one request, stop it; its stderr lines."""
    import grpc

    from ccpu.api.gen.containerd.services.snapshots.v1 import snapshots_pb2 as spb

    with tempfile.TemporaryDirectory(prefix="fractal-logfmt-") as tmp:
        with private_snapshotter(Path(tmp), *flags) as snap:
            with pytest.raises(grpc.RpcError) as ei:
                snap.client.Stat(spb.StatSnapshotRequest(snapshotter="fractal", key="default/1/nope"), timeout=10)
            assert ei.value.code() == grpc.StatusCode.NOT_FOUND
        return snap.output_lines()


def test_snapshotter_debug_emits_debug_records() -> None:
    lines = _snapshotter_lines("--debug")
    recs = [parse(l) for l in lines]
    assert any(r.get("level") == "info" and r.get("msg", "").startswith("serving repo") for r in recs), lines
    stat = [r for r in recs if r.get("level") == "debug" and r.get("msg", "").startswith("Stat ")]
    assert stat, lines
    assert "NOT_FOUND" in stat[0]["msg"] and stat[0]["logger"] == "snapshotter.errors"
    assert stat[0]["pid"].isdigit()


def test_snapshotter_json_format_and_no_debug_by_default() -> None:
    lines = _snapshotter_lines("--log-format", "json")
    recs = [json.loads(l) for l in lines]  # every line is one JSON object
    assert any(r["msg"].startswith("serving repo") and r["level"] == "info" for r in recs), lines
    assert not any(r["level"] == "debug" for r in recs), lines
