"""shim command line (Go flag syntax), socket addresses, grouping, delete's raw response."""

from __future__ import annotations

import hashlib
import json

import pytest

from shim import address as addr
from shim.args import UsageError, parse_args
from shim.delete import delete_response
from shim.main import main


def test_containerd_start_argv() -> None:
    o = parse_args(["-namespace", "default", "-address", "/run/containerd/containerd.sock",
                    "-publish-binary", "/usr/bin/containerd", "-id", "c1", "-debug", "start"])
    assert (o.namespace, o.address, o.publish_binary, o.id, o.debug, o.verb) == (
        "default", "/run/containerd/containerd.sock", "/usr/bin/containerd", "c1", True, "start")


def test_double_dash_and_equals_forms() -> None:
    o = parse_args(["--namespace", "ns", "-id=x", "--bundle=/b", "-debug=false", "delete"])
    assert (o.namespace, o.id, o.bundle, o.debug, o.verb) == ("ns", "x", "/b", False, "delete")


def test_flags_stop_at_verb_and_double_dash() -> None:
    o = parse_args(["-id", "a", "start", "-id", "b"])
    assert o.id == "a" and o.args == ["start", "-id", "b"]
    o = parse_args(["-id", "a", "--", "-x"])
    assert o.args == ["-x"]


@pytest.mark.parametrize("argv", [["-nope", "x"], ["-id"], ["-debug=maybe"], ["---id", "x"]])
def test_bad_flags(argv: list[str]) -> None:
    with pytest.raises(UsageError):
        parse_args(argv)


def test_main_unknown_verb_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-id", "x", "frobnicate"]) == 2
    assert main(["-bogus"]) == 2


def test_socket_address_matches_containerd() -> None:
    # containerd: sha256(filepath.Join(address, ns, id)), under /run/containerd/s
    digest = hashlib.sha256(b"/run/containerd/containerd.sock/default/c1").hexdigest()
    assert addr.socket_address("/run/containerd/containerd.sock", "default", "c1") == \
        f"unix:///run/containerd/s/{digest}"
    # Join cleans: duplicate and trailing slashes vanish
    assert addr.socket_path("/run//x.sock/", "ns", "g") == addr.socket_path("/run/x.sock", "ns", "g")
    assert len(addr.socket_path("/a", "b", "c")) < 106


def test_go_join_clean() -> None:
    assert addr.go_join("/a/", "b", "") == "/a/b"
    assert addr.go_join("//a", "../b") == "/b"
    assert addr.go_join("a", "./b") == "a/b"


def test_group_id_priority(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    config = tmp_path / "fractal.toml"
    config.write_text("")
    monkeypatch.setenv("FRACTAL_CONFIG", str(config))
    monkeypatch.delenv("FRACTAL_RUNTIME_CONFIG", raising=False)
    assert addr.group_id({}, "c1") == "c1"
    assert addr.group_id({"io.kubernetes.cri.sandbox-id": "pod"}, "c1") == "pod"
    assert addr.group_id({"io.fractal.sandbox": "sb"}, "c1") == "sb"  # ctr: a node admin
    # a Kubernetes pod names another sandbox: not followed unless the operator allows it
    cri = {"io.kubernetes.cri.sandbox-id": "pod", "io.fractal.sandbox": "sb"}
    assert addr.group_id(cri, "c1") == "pod"
    config.write_text('allowed_annotations = ["sandbox"]\n')
    assert addr.group_id(cri, "c1") == "sb"
    config.write_text('allowed_annotations = "sandbox"\n')  # a broken config allows nothing
    assert addr.group_id(cri, "c1") == "pod"
    assert addr.group_id({"io.fractal.sandbox": ""}, "c1") == "c1"
    (tmp_path / "config.json").write_text(json.dumps({"annotations": {"io.fractal.sandbox": "x"}}))
    assert addr.read_annotations(str(tmp_path)) == {"io.fractal.sandbox": "x"}
    assert addr.read_annotations(str(tmp_path / "missing")) == {}


def test_write_address_atomic(tmp_path) -> None:  # noqa: ANN001
    addr.write_address(str(tmp_path), "unix:///run/containerd/s/abc")
    assert (tmp_path / "address").read_text() == "unix:///run/containerd/s/abc"
    assert [p.name for p in tmp_path.iterdir()] == ["address"]


def test_delete_response_decodes() -> None:
    from ccpu.api.gen.containerd.runtime.v2.task import shim_pb2

    raw = delete_response(4242, 137, 1_700_000_000_123_456_789)
    msg = shim_pb2.DeleteResponse.FromString(raw)
    assert (msg.pid, msg.exit_status) == (4242, 137)
    assert (msg.exited_at.seconds, msg.exited_at.nanos) == (1_700_000_000, 123_456_789)
    assert shim_pb2.DeleteResponse.FromString(delete_response(0, 137, 10**9)).pid == 0
