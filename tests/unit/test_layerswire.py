"""ccpu/layerswire.py: the hand-rolled AddImages call of `fractal layers add` against the
generated protobuf classes (byte for byte, field for field) and against the project's real
ttrpc server (ccpu.ttrpc.Server), errors included."""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ccpu import errdefs, layersmsg, layerswire
from ccpu.api.gen.fractal.layers.v1 import layers_pb2 as pb
from ccpu.ttrpc import Server
from ccpu.ttrpc.messages import Request

text = st.text(max_size=40)
i64 = st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1)
doubles = st.floats(allow_nan=False)


@settings(deadline=None, max_examples=200)
@given(container=text, images=st.lists(text, max_size=4), position=text)
def test_request_bytes_equal_the_generated_class(container: str, images: list[str], position: str) -> None:
    want = pb.AddImagesRequest(container=container, images=images, position=position).SerializeToString()
    assert layerswire.add_images_request(container, images, position) == want


@settings(deadline=None, max_examples=200)
@given(container=text, targets=st.lists(text, max_size=4))
def test_remove_request_bytes_equal_the_generated_class(container: str, targets: list[str]) -> None:
    want = pb.RemoveTargetsRequest(container=container, targets=targets).SerializeToString()
    assert layerswire.remove_targets_request(container, targets) == want


@settings(deadline=None, max_examples=200)
@given(service=text, method=text, payload=st.binary(max_size=64),
       timeout=st.integers(min_value=0, max_value=(1 << 63) - 1))
def test_ttrpc_request_bytes_equal_the_generated_class(service: str, method: str, payload: bytes,
                                                       timeout: int) -> None:
    want = Request(service=service, method=method, payload=payload, timeout_nano=timeout)
    assert layerswire.ttrpc_request(service, method, payload, timeout) == want.SerializeToString()


layer_msgs = st.builds(
    lambda d, live, chain, image, size, gc, added: pb.Layer(
        dir=d, live=live, chain_id=chain, image=image, gc_label=gc,
        **({} if size is None else {"size": size}), **({} if added is None else {"added_at": added})),
    text, st.booleans(), text, text, st.none() | i64, text, st.none() | i64)
stack_msgs = st.builds(
    lambda container, repo_root, upper, layers, history, added, skipped, removed, restack, missing, snap, gone: pb.Stack(
        container=container, layers=layers, history=history, added=added, skipped=skipped, removed=removed,
        missing=missing, snapshotter=snap, labels_removed=gone, **({} if repo_root is None else {"repo_root": repo_root}),
        **({} if upper is None else {"upper": upper}), **({} if restack is None else {"restack_ms": restack})),
    text, st.none() | text, st.none() | text, st.lists(layer_msgs, max_size=3),
    st.lists(st.builds(lambda at, a, r, ms: pb.Change(at=at, added=a, removed=r, restack_ms=ms),
                       i64, st.lists(text, max_size=2), st.lists(text, max_size=2), doubles), max_size=2),
    st.lists(text, max_size=2), st.lists(text, max_size=2), st.lists(layer_msgs, max_size=2),
    st.none() | doubles, st.dictionaries(text, text, max_size=2), text, st.lists(text, max_size=2))


@settings(deadline=None, max_examples=300)
@given(msg=stack_msgs)
def test_stack_decodes_as_the_generated_class(msg: Any) -> None:
    got = layerswire.stack(msg.SerializeToString())
    want = layersmsg.answer_dict(msg)
    assert got == want


def test_truncated_answers_are_errors_not_garbage() -> None:
    data = pb.Stack(container="c1", layers=[pb.Layer(dir="/r/l1", live=True)]).SerializeToString()
    for cut in range(1, len(data)):
        try:
            layerswire.stack(data[:cut])
        except ValueError:
            continue  # refused; never an exception of another kind
    with pytest.raises(ValueError):
        layerswire.fields(b"\x80" * 11)  # an endless varint


# -- against the real ttrpc server ----------------------------------------------------------------


@contextmanager
def serving(handler: Any, method: str = "AddImages") -> Iterator[str]:
    """A ccpu.ttrpc Server serving Layers/``method`` with ``handler`` in a thread."""
    sock_dir = tempfile.mkdtemp(prefix="lw", dir="/tmp")
    path = os.path.join(sock_dir, "s.sock")
    loop = asyncio.new_event_loop()
    server = Server()
    server.register(layerswire.SERVICE, {method: (layersmsg.REQUESTS.get(method, pb.AddImagesRequest), handler)})
    started = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.serve_unix(path))
        started.set()
        loop.run_forever()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    started.wait(10)
    try:
        yield "unix://" + path
    finally:
        asyncio.run_coroutine_threadsafe(server.shutdown(grace=1), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        t.join(10)
        loop.close()


def test_call_through_the_project_ttrpc_server() -> None:
    seen: list[Any] = []

    async def add_images(req: Any, ctx: Any) -> Any:
        seen.append(req)
        return layersmsg.answer({"container": req.container, "layers": [{"dir": "/r/l2", "live": True}],
                                 "added": ["/r/l2"], "skipped": [], "restack_ms": 1.5})

    with serving(add_images) as address:
        raw = layerswire.stack(layerswire.call(address, layerswire.add_images_request("c1", ["img"], "2"), 10))
    assert [(r.container, list(r.images), r.position) for r in seen] == [("c1", ["img"], "2")]
    assert raw["added"] == ["/r/l2"] and raw["restack_ms"] == 1.5 and raw["layers"][0]["live"] is True


def test_errors_come_back_with_their_code_and_message() -> None:
    from shim.errors import at_edge

    async def add_images(req: Any, ctx: Any) -> Any:
        raise errdefs.FailedPrecondition("container c1 is stopped")

    table = at_edge({"AddImages": (pb.AddImagesRequest, add_images)})
    with serving(table["AddImages"][1]) as address:
        with pytest.raises(layerswire.WireError) as ei:
            layerswire.call(address, layerswire.add_images_request("c1", ["img"], ""), 10)
        assert ei.value.code == 9 and "container c1 is stopped" in ei.value.message
        with pytest.raises(layerswire.WireError) as ei:  # a method the server does not have
            layerswire.call(address, b"", 10, method="NoSuch")
        assert ei.value.code == layerswire.UNIMPLEMENTED


def test_no_shim_is_unavailable(tmp_path: Any) -> None:
    with pytest.raises(layerswire.WireError) as ei:
        layerswire.call(f"unix://{tmp_path}/none.sock", b"", 1)
    assert ei.value.code == layerswire.UNAVAILABLE
