"""Guest strings in the shim's log: a hostile agent's 1 MiB id must not become a 1 MiB record.

Through the real agent client + Task service (agentpeer.py) and the shim's real log formatters
(ccpu/logfmt.py), the way the shim daemon sets them up.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging

import pytest

from ccpu import logfmt

from .agentpeer import Shim

HUGE = "A" * ((1 << 20) - 200)  # fills one frame, as the 1 MiB container id


@pytest.fixture(params=["text", "json"])
def shim_log(request):  # noqa: ANN001, ANN201
    """The root logger routed through the shim's formatter into a buffer, as shim/daemon.py does."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    buf = io.StringIO()
    logfmt.setup(buf, fmt=request.param, defaults={"namespace": "ns"}, trailing={"pid": 1})
    try:
        yield buf
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])


def records(buf: io.StringIO) -> list[str]:
    return [line for line in buf.getvalue().splitlines() if line]


def test_huge_guest_strings_are_truncated_in_every_record(shim_log) -> None:  # noqa: ANN001
    async def go() -> None:
        shim = await Shim.start()
        try:
            await shim.create("c1")
            await shim.start_task("c1")
            # an exit for a 1 MiB container id, a 1 MiB event name
            shim.peer.event(event="exit", container=HUGE, exec="", pid=1, exit_status=0, exited_at=1)
            shim.peer.event(event=HUGE)
            for _ in range(10):
                await asyncio.sleep(0.01)
            logging.getLogger("shim.task").warning("guest said %s", HUGE)
            logging.getLogger("shim.task").info("x", extra={"fields": {"container": HUGE}})
        finally:
            await shim.close()

    asyncio.run(go())
    lines = records(shim_log)
    for line in lines:
        assert len(line) < 64 * 1024, line[:200]
    assert any("guest said" in line for line in lines)
    # what was cut says so (and how long it was)
    assert any(f"({len(HUGE)} chars)" in line for line in lines)


def test_clip_keeps_short_values_and_json_stays_parseable() -> None:
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(logfmt.JsonFormatter())
    rec = logging.LogRecord("shim", logging.INFO, __file__, 1, "m %s", (HUGE,), None)
    rec.fields = {"container": HUGE, "short": "ok"}
    handler.emit(rec)
    obj = json.loads(buf.getvalue())
    assert obj["short"] == "ok"
    assert len(obj["container"]) <= logfmt.MAX_FIELD + 32
    assert len(obj["msg"]) <= logfmt.MAX_TEXT + 32
