"""Guest → shim frames: malformed, oversized, deep or random input on the agent connection.

Through the real shim side (agent client + Task service, agentpeer.py).  Invariants, whatever
the agent sends: no exception escapes into the event loop, the Task service keeps answering
(State of an existing container), the connection either goes on or ends with a protocol error
(then the shim reports the processes exited, as for any lost agent), and memory stays bounded
(measured in a fresh process).  Bounded in count and time so it runs in CI.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ccpu.agent import wire

from .agentpeer import Shim, frame

REPO = Path(__file__).resolve().parents[2]

# JSON values the agent could put anywhere: nested, huge integers, long strings
ints = st.one_of(st.integers(-(2**70), 2**70), st.sampled_from([0, 255, 256, 2**31, 2**32, 2**40, 2**64]))
scalars = st.one_of(st.none(), st.booleans(), ints, st.floats(allow_nan=False, allow_infinity=False),
                    st.text(max_size=50), st.just("c1"), st.just(""))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=20)
events = st.fixed_dictionaries(
    {"event": st.sampled_from(["exit", "oom", "bogus"])},
    optional={"container": st.one_of(st.just("c1"), values), "exec": st.one_of(st.just(""), values),
              "pid": st.one_of(ints, values), "exit_status": st.one_of(ints, values),
              "exited_at": st.one_of(ints, values)})
responses = st.fixed_dictionaries({"id": st.one_of(ints, values)},
                                  optional={"ok": values, "result": values, "error": values})


def frames_for(channel: int) -> st.SearchStrategy[bytes]:
    channels = st.one_of(st.just(channel), st.integers(1, 2**32 - 1))
    return st.one_of(
        events.map(wire.encode_control),
        responses.map(wire.encode_control),
        st.dictionaries(st.text(max_size=8), values, max_size=5).map(wire.encode_control),
        st.tuples(channels, st.binary(min_size=1, max_size=3000)).map(lambda t: wire.encode_data(*t)),
        channels.map(wire.encode_close),
        st.tuples(channels, st.integers(0, 2**32 - 1)).map(
            lambda t: frame(4, t[0], 4, t[1].to_bytes(4, "big"))),
        st.binary(max_size=64).map(lambda b: frame(len(b), 0, 1, b)),  # control, any bytes
        st.binary(max_size=30),  # raw garbage
    )


async def exercise(raw: list[bytes], flow: bool) -> None:
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    shim = await Shim.start(flow=flow)
    try:
        await shim.create("c1", stdout="")
        await shim.start_task("c1")
        for chunk in raw:
            shim.peer.send(chunk)
        await shim.peer.drain()
        for _ in range(3):
            await asyncio.sleep(0.002)
        st_ = await shim.state("c1")  # answers, whatever happened
        assert 0 <= st_.exit_status <= 255
        if shim.client.closed:
            assert any(w in shim.client.close_reason for w in ("ProtocolError", "closed")), \
                shim.client.close_reason
    finally:
        await shim.close()
    await asyncio.sleep(0)
    assert not errors, [str(e.get("exception") or e.get("message")) for e in errors]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), flow=st.booleans())
def test_fuzz_structured_frames(data: st.DataObject, flow: bool) -> None:
    raw = data.draw(st.lists(frames_for(1), min_size=1, max_size=30))
    asyncio.run(exercise(raw, flow))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.binary(min_size=1, max_size=2000), flow=st.booleans())
def test_fuzz_raw_bytes(raw: bytes, flow: bool) -> None:
    asyncio.run(exercise([raw], flow))


def test_fuzz_rss_is_bounded_in_a_fresh_process() -> None:
    """20k random frames (events, junk responses, data up to 70 KB to an unread FIFO, closes,
    deep JSON, garbage) over hundreds of connections: the shim side's RSS stays bounded."""
    out = subprocess.run([sys.executable, "-m", "tests.security.agentpeer", "fuzz", "20000", "7"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["frames"] == 20000 and result["connections"] >= 1
    assert result["growth_kib"] < 24 * 1024, result


async def hung_up_after(shim: Shim, raw: bytes) -> bool:
    """Send `raw`; whether the shim closed the connection (within half a second)."""
    shim.peer.send(raw)
    await shim.peer.drain()
    for _ in range(50):
        if shim.client.closed:
            return True
        await asyncio.sleep(0.01)
    return False


@pytest.mark.parametrize("payload,why", [
    (b"[" * 100_000 + b"]" * 100_000, "not UTF-8 JSON"),  # RecursionError in json
    (b'{"a":' * 65 + b"1" + b"}" * 65, "deeper than 64"),
    (b'{"event": "exit", "container": "c1", "exit_status": Infinity}', "Infinity"),
    (b'{"event": "x", "v": NaN}', "NaN"),
    (b"[1, 2]", "not a JSON object"),
])
def test_malformed_control_messages_are_protocol_errors(payload: bytes, why: str) -> None:
    async def go() -> None:
        shim = await Shim.start()
        try:
            assert await hung_up_after(shim, frame(len(payload), 0, 1, payload))
            assert "ProtocolError" in shim.client.close_reason
            assert why in shim.client.close_reason
        finally:
            await shim.close()

    asyncio.run(go())


def test_oversized_frame_is_refused_from_its_header() -> None:
    """A header announcing 4 GiB is refused at once: the shim does not wait for (or allocate)
    the payload."""
    async def go() -> None:
        shim = await Shim.start()
        try:
            assert await hung_up_after(shim, frame(2**32 - 1, 1, 2))
            assert "exceeds" in shim.client.close_reason
        finally:
            await shim.close()

    asyncio.run(go())
