"""ccpu/agent/jsonbound.py: JSON from peers with bounded nesting (a clean ValueError, never
RecursionError), and the places that read peer JSON through it."""

from __future__ import annotations

import json

import pytest

from ccpu.agent import jsonbound
from ccpu.agent.wire import Frame, Kind, ProtocolError, decode_control

DEEP = "[" * 100_000 + "]" * 100_000  # past the interpreter's recursion limit
JUST = "[" * (jsonbound.MAX_DEPTH + 1) + "]" * (jsonbound.MAX_DEPTH + 1)


@pytest.mark.parametrize("doc", [DEEP, JUST, '{"a":' * 5000 + "1" + "}" * 5000, DEEP.encode()])
def test_too_deep_is_a_value_error(doc: str | bytes) -> None:
    with pytest.raises(jsonbound.TooDeep):
        jsonbound.loads(doc)


def test_ordinary_documents_pass() -> None:
    spec = {"process": {"args": ["sh"], "env": ["A=b"]}, "linux": {"resources": {"cpu": {"shares": 2}}},
            "many": [[1]] * 5000}  # many brackets, shallow
    assert jsonbound.loads(json.dumps(spec)) == spec
    at_limit = "[" * jsonbound.MAX_DEPTH + "]" * jsonbound.MAX_DEPTH
    assert jsonbound.depth(jsonbound.loads(at_limit)) == jsonbound.MAX_DEPTH
    assert jsonbound.depth(1) == 0 and jsonbound.depth({"a": [1]}) == 2


def test_deep_control_frame_is_a_protocol_error() -> None:
    """A guest's deeply nested control message ends in ProtocolError, not RecursionError."""
    payload = ('{"event": "exit", "x": ' + DEEP + "}").encode()
    with pytest.raises(ProtocolError, match="nested deeper"):
        decode_control(Frame(0, Kind.CONTROL, payload))


def test_deep_spec(tmp_path) -> None:  # noqa: ANN001
    # (the Layers service's requests are protobuf messages now, no JSON: nothing to nest)
    from shim import address

    (tmp_path / "config.json").write_text('{"annotations": {"a": "b"}, "x": ' + DEEP + "}")
    assert address.read_annotations(str(tmp_path)) == {}  # unreadable spec: start still answers


def test_deep_json_in_logging_spec_and_annotations(tmp_path) -> None:  # noqa: ANN001
    """The other readers of peer JSON: the request-field logger, the VM's first spec, nerdctl's
    networks annotation, the agent's spec reader -- a clean answer each, never RecursionError."""
    from google.protobuf import wrappers_pb2

    from ccpu.agent import container, protocol
    from ccpu import logfmt
    from shim import guestspec, vm

    assert logfmt.request_fields(wrappers_pb2.StringValue(value=DEEP)) == {}
    (tmp_path / "config.json").write_text(DEEP)
    assert vm.first_netns(str(tmp_path)) is None
    with pytest.raises(protocol.InvalidArgument):
        container.read_spec(str(tmp_path))
    assert guestspec.nerdctl_cni_networks({"annotations": {"nerdctl/networks": DEEP}}) == []
    assert guestspec.nerdctl_cni_networks({"annotations": {"nerdctl/networks": "5"}}) == []
