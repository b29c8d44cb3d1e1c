"""shim/relay.py: ``start``'s request to the fork-server, and what the verb does with answers.

The verb's process runs for real (``python3 -S``, as the launcher `fractal install` writes runs
it) against a stand-in fork-server on a unix socket: what it sends, what it prints, that it
falls back when nothing usable answers, and which modules it loaded (the point of the relay:
no json, socket, re or enum in containerd's ``start`` process).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path

import pytest

from shim import address as addr
from shim import relay, zygote, zygoteclient

ROOT = Path(__file__).resolve().parents[2]


def test_request_round_trip() -> None:
    env = {"PATH": "/bin", "EMPTY": "", "EQ": "a=b", "FRACTAL_X": "\u00e9"}
    argv = ["-namespace", "ns", "-address", "/run/c.sock", "-id", "c1", "start"]
    data = relay.encode("v1", "/run/bundle", b"\x00\x01opts", argv, env)
    assert data.startswith(relay.MAGIC)
    n = int.from_bytes(data[4:8], "big")
    assert n == len(data) - 8
    req = relay.decode(data[8:])
    assert (req.version, req.cwd, req.options, req.argv, req.env) == ("v1", "/run/bundle", b"\x00\x01opts", argv, env)


@pytest.mark.parametrize("body", [
    b"\x00\x00\x00",  # a cut length
    b"\x00\x00\x00\x09abc",  # a cut field
    relay.encode("v", "/b", b"", ["start"], {})[8:] + b"\x00\x00\x00\x00",  # 6 fields
    relay.encode("v", "/b", b"", ["start"], {})[8:][:-4],  # 4 fields
    relay.encode("v", "relative", b"", ["start"], {})[8:],
])
def test_malformed_requests_are_refused(body: bytes) -> None:
    with pytest.raises(ValueError):
        relay.decode(body)


def test_bad_environment_entries_are_refused() -> None:
    body = b"".join(relay._field(f) for f in (b"v", b"/b", b"", b"start", b"NOEQUALS"))
    with pytest.raises(ValueError, match="environment"):
        relay.decode(body)
    body = b"".join(relay._field(f) for f in (b"v", b"/b", b"", b"start", b"=x"))
    with pytest.raises(ValueError, match="environment"):
        relay.decode(body)


def test_magic_cannot_be_a_spawn_request_length() -> None:
    """The fork-server tells the two request kinds apart by the first 4 bytes."""
    assert int.from_bytes(relay.MAGIC, "big") > zygoteclient.REQUEST_MAX


def test_socket_paths_and_version_agree_with_the_server() -> None:
    assert relay.SOCKET_DIR == addr.SOCKET_DIR
    assert relay.zygote_socket("/run/c.sock") == zygote.socket_path("/run/c.sock")
    assert zygote.code_version() == relay.code_version() == zygoteclient.code_version()


# ---------------------------------------------------------------------------------------------
# the verb for real, against a stand-in fork-server

SCRIPT = r"""
import json, sys
out, sockdir = sys.argv[1], sys.argv[2]
before = set(sys.modules)
from shim import relay
relay.SOCKET_DIR = sockdir
seen = {}
def fallback():  # start in this process: no real socket dir, no real daemon, no new zygote
    from shim import address, start, zygoteclient
    address.SOCKET_DIR = sockdir
    zygoteclient.start_zygote = lambda address: None
    def fake_fork(opts, group, bundle, sock_path, sock, lock_fd, close=()):
        seen["forked"] = group
    start._fork_daemon = fake_fork
    real_run = start.run
    def run(opts, options=None):
        seen["options"] = options.decode()
        return real_run(opts, options)
    start.run = run
if sys.argv[3] == "fallback":  # (what it loads is not checked then)
    fallback()
from shim import main as shim_main
code = shim_main.main(sys.argv[4:], fast_exit=False)
loaded = sorted(set(sys.modules) - before)
with open(out, "w") as f:
    json.dump({"code": code, "loaded": loaded, "seen": seen}, f)
"""


class FakeZygote:
    """Answers one relayed request with ``answer`` (None: closes without a word)."""

    def __init__(self, path: str, answer: bytes | None) -> None:
        self.answer = answer
        self.requests: list[relay.Request] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(4)
        self.sock.settimeout(60)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            head = conn.recv(8, socket.MSG_WAITALL)
            assert head[:4] == relay.MAGIC
            body = conn.recv(int.from_bytes(head[4:], "big"), socket.MSG_WAITALL)
            self.requests.append(relay.decode(body))
            if self.answer is not None:
                conn.sendall(self.answer + b"\n")

    def close(self) -> None:
        self.sock.close()
        self.thread.join(5)


def run_start(tmp_path: Path, answer: bytes | None, *, stdin: bytes = b"",
              fallback: bool = False) -> tuple[dict, subprocess.CompletedProcess, list]:
    sockdir = tempfile.mkdtemp(prefix="r", dir="/tmp")  # socket paths must stay < 108 bytes
    bundle = tmp_path / "bundle"
    bundle.mkdir(exist_ok=True)
    (bundle / "config.json").write_text(json.dumps({"annotations": {"io.fractal.mode": "host"}}))
    address = str(tmp_path / "containerd.sock")
    fake = FakeZygote(relay.zygote_socket(address, sockdir), answer)
    out = tmp_path / "out.json"
    argv = ["-namespace", "ns", "-address", address, "-publish-binary", "/usr/bin/containerd",
            "-id", "c1", "start"]
    env = {k: v for k, v in os.environ.items() if k != "FRACTAL_SHIM_SPAWN"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
    env["FRACTAL_TEST_MARK"] = "relayed"
    env["FRACTAL_RUN_DIR"] = str(tmp_path / "run")  # nothing of this test under /run/fractal
    try:
        r = subprocess.run([sys.executable, "-S", "-c", SCRIPT, str(out), sockdir,
                            "fallback" if fallback else "relay", *argv], input=stdin,
                           capture_output=True, env=env, cwd=bundle, timeout=60)
    finally:
        fake.close()
        import shutil

        shutil.rmtree(sockdir, ignore_errors=True)
    result = json.loads(out.read_text()) if out.exists() else {}
    return result, r, fake.requests


def test_start_relays_everything_and_prints_the_address(tmp_path: Path) -> None:
    result, r, reqs = run_start(tmp_path, b"ok unix:///run/containerd/s/" + b"ab" * 32, stdin=b"\x0a\x02opts")
    assert r.returncode == 0 and result["code"] == 0, r.stderr
    assert r.stdout == b"unix:///run/containerd/s/" + b"ab" * 32
    (req,) = reqs
    assert req.argv[-1] == "start" and req.argv[req.argv.index("-id") + 1] == "c1"
    assert req.cwd == str(tmp_path / "bundle")
    assert req.options == b"\x0a\x02opts"  # containerd's runtime options, as on stdin
    assert req.env["FRACTAL_TEST_MARK"] == "relayed"
    assert req.version == relay.code_version()
    # what containerd's start process loaded: none of start's former work
    loaded = set(result["loaded"])
    ours = {m for m in loaded if m.split(".")[0] in ("shim", "ccpu")}
    assert ours == {"shim", "shim.main", "shim.args", "shim.relay", "shim.sha"}, sorted(ours)
    heavy = {"json", "socket", "re", "enum", "selectors", "array", "fcntl", "struct", "typing",
             "collections", "hashlib", "site"}
    assert sorted(loaded & heavy) == [], sorted(loaded)


def test_an_error_answer_fails_start_with_its_text(tmp_path: Path) -> None:
    result, r, _ = run_start(tmp_path, b"err start needs -namespace, -address and -id")
    assert result["code"] == 1
    assert r.stdout == b""
    assert b"containerd-shim-fractal-v1 start: start needs -namespace" in r.stderr


@pytest.mark.parametrize("answer", [None, b"no version", b"ok not-an-address"])
def test_no_usable_answer_falls_back_to_start_here(tmp_path: Path, answer: bytes | None) -> None:
    """Then ``start`` runs in the verb's process (its socket dir and daemon fork stood in for
    here), with the runtime options the relay had already read from stdin."""
    result, r, reqs = run_start(tmp_path, answer, stdin=b"opts", fallback=True)
    assert len(reqs) == 1 and reqs[0].options == b"opts"
    assert result["code"] == 0, r.stderr
    assert result["seen"]["options"] == "opts" and result["seen"]["forked"] == "c1"
    assert r.stdout.startswith(b"unix://")


def test_the_workers_answer_for_a_failing_start_is_one_err_line() -> None:
    """What the zygote's worker answers when ``start`` fails: containerd shows the text."""
    from shim import start
    from shim.args import parse_args

    opts = parse_args(["-namespace", "ns", "-address", "/run/c.sock", "start"])  # no -id
    assert start.serve_relayed(opts, b"", ()) == b"err start needs -namespace, -address and -id"
    opts = parse_args(["-namespace", "ns", "-address", "/run/c.sock", "-id", "c1", "delete"])
    assert start.serve_relayed(opts, b"", ()).startswith(b"err relayed verb 'delete'")
