"""Remote mode's mutual TLS: `fractal pki`'s certificates and the agent's TLS listener.

Every refusal is checked over a real TLS connection on loopback with the very contexts the
agent and the shim use (ccpu/agent/tls.py): no client certificate, a client certificate of
another CA, an expired one, a host certificate posing as an agent, TLS 1.2, plaintext.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import socket
import ssl
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from ccpu import pki
from ccpu.agent import endpoint, protocol, tls, wire
from ccpu.agent.client import AgentClient
from ccpu.agent.server import Outbox, Server
from ccpu.cli import main as cli_main


def _pki(tmp: Path, name: str = "pki", agent: str = "127.0.0.1") -> Path:
    d = tmp / name
    pki.init(str(d), [agent])
    return d


def _files(d: Path, role: str) -> tls.TlsFiles:
    return tls.TlsFiles.in_dir(str(d), role)


def _write(d: Path, stem: str, issued: pki.Issued, ca: pki.Issued | None = None) -> Path:
    pki.write_pair(str(d), stem, issued, force=True)
    if ca is not None:
        (d / "ca.pem").write_bytes(ca.cert_pem)
    return d


class _Sup:
    """The agent's supervisor as far as `hello` needs it: its containers."""

    def __init__(self) -> None:
        self.containers: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None


async def _serve(server_ctx: ssl.SSLContext, sup: _Sup | None = None
                 ) -> tuple[asyncio.AbstractServer, int, list[str | None], Server]:
    """The agent's TLS listener as ccpu/agent/__main__.py runs it, on a free loopback port."""
    server = Server(sup or _Sup(), Outbox())  # type: ignore[arg-type]
    seen: list[str | None] = []

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        identity = tls.peer_identity(writer.get_extra_info("ssl_object"))
        seen.append(identity)
        await server.serve(reader, writer, identity)

    listener = await asyncio.start_server(on_conn, "127.0.0.1", 0, ssl=server_ctx,
                                          ssl_handshake_timeout=5)
    port = listener.sockets[0].getsockname()[1]
    return listener, port, seen, server


async def _hello(port: int, ctx: ssl.SSLContext, name: str = "127.0.0.1") -> dict[str, Any]:
    client = await AgentClient.connect_tls("127.0.0.1", port, ctx, server_hostname=name, timeout=5)
    try:
        return await asyncio.wait_for(client.hello(), 5)
    finally:
        await client.close()


def _refused(coro: Any) -> BaseException:
    """The exception a client sees when the agent refuses it (handshake or first read)."""
    with pytest.raises((ssl.SSLError, OSError, protocol.Unavailable, asyncio.IncompleteReadError)) as info:
        asyncio.run(coro)
    return info.value


def test_init_writes_a_chain_with_private_keys(tmp_path: Path) -> None:
    d = _pki(tmp_path)
    for stem in ("ca", "host", "agent"):
        assert stat.S_IMODE(os.stat(d / f"{stem}.key").st_mode) == 0o600
        assert (d / f"{stem}.pem").read_bytes().startswith(b"-----BEGIN CERTIFICATE")
    ca = pki.load_ca(str(d))
    agent = pki.Issued((d / "agent.pem").read_bytes(), b"").cert
    assert agent.issuer == ca.cert.subject
    ca_key = ca.cert.public_key()
    assert isinstance(ca_key, ec.EllipticCurvePublicKey)
    ca_key.verify(agent.signature, agent.tbs_certificate_bytes, ec.ECDSA(agent.signature_hash_algorithm))
    with pytest.raises(pki.PkiError, match="exists"):
        pki.init(str(d), ["127.0.0.1"])  # never overwrites keys silently


def test_bad_names_and_roles_are_refused(tmp_path: Path) -> None:
    ca = pki.make_ca()
    for bad in ("", "bad name", "-x.example", "a" * 300, "x..y"):
        with pytest.raises(pki.PkiError, match="bad agent name"):
            pki.issue(ca, "agent", [bad])
    with pytest.raises(pki.PkiError, match="needs at least one name"):
        pki.issue(ca, "agent", [])
    with pytest.raises(pki.PkiError, match="unknown role"):
        pki.issue(ca, "root", ["x"])
    with pytest.raises(pki.PkiError, match="no CA"):
        pki.load_ca(str(tmp_path / "nothing"))


def test_cli_pki_init_and_agent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "p"
    assert cli_main(["pki", "init", str(d), "--agent-name", "10.9.8.7"]) == 0
    out = tmp_path / "m2"
    assert cli_main(["pki", "agent", str(d), "--agent-name", "m2.example", "--out", str(out)]) == 0
    assert (out / "ca.pem").read_bytes() == (d / "ca.pem").read_bytes()
    assert not (out / "ca.key").exists()  # the CA's key never goes to a machine
    assert cli_main(["pki", "init", str(d), "--agent-name", "10.9.8.7"]) == 1
    assert "exists" in capsys.readouterr().err
    assert cli_main(["pki", "agent", str(tmp_path / "none"), "--agent-name", "x", "--out", str(out)]) == 1
    assert "no CA" in capsys.readouterr().err


def test_mutual_tls_works_and_pins_identity_per_certificate(tmp_path: Path) -> None:
    d = _pki(tmp_path)

    async def go() -> tuple[dict[str, Any], list[str | None]]:
        listener, port, seen, _ = await _serve(tls.server_context(_files(d, "agent")))
        async with listener:
            hello = await _hello(port, tls.client_context(_files(d, "host")))
        return hello, seen

    hello, seen = asyncio.run(go())
    assert hello["version"] == protocol.PROTOCOL_VERSION
    assert seen == [pki.fingerprint((d / "host.pem").read_bytes())]


def test_client_without_certificate_is_refused(tmp_path: Path) -> None:
    d = _pki(tmp_path)
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.load_verify_locations(str(d / "ca.pem"))

    async def go() -> None:
        listener, port, seen, _ = await _serve(tls.server_context(_files(d, "agent")))
        async with listener:
            try:
                await _hello(port, bare)
            finally:
                assert seen == []  # no request was ever read from it

    _refused(go())


@pytest.mark.parametrize("case", ["other-ca", "expired", "agent-cert-as-client"])
def test_bad_client_certificates_are_refused(tmp_path: Path, case: str) -> None:
    d = _pki(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    if case == "other-ca":
        other = pki.make_ca()
        _write(bad, "host", pki.issue(other, "host", []))
    elif case == "expired":
        ca = pki.load_ca(str(d))
        past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=30)
        _write(bad, "host", pki.issue(ca, "host", [], now=past - dt.timedelta(days=1), not_after=past))
    else:  # an agent's key (serverAuth only) cannot drive another agent
        (bad / "host.pem").write_bytes((d / "agent.pem").read_bytes())
        (bad / "host.key").write_bytes((d / "agent.key").read_bytes())
    (bad / "ca.pem").write_bytes((d / "ca.pem").read_bytes())  # it trusts the right agent

    async def go() -> None:
        listener, port, seen, _ = await _serve(tls.server_context(_files(d, "agent")))
        async with listener:
            try:
                await _hello(port, tls.client_context(_files(bad, "host")))
            finally:
                assert seen == []

    _refused(go())


@pytest.mark.parametrize("case", ["other-ca", "host-cert-as-agent", "wrong-name", "expired"])
def test_the_shim_refuses_an_agent_it_should_not_trust(tmp_path: Path, case: str) -> None:
    d = _pki(tmp_path)
    rogue = tmp_path / "rogue"
    rogue.mkdir()
    (rogue / "ca.pem").write_bytes((d / "ca.pem").read_bytes())
    name = "127.0.0.1"
    if case == "other-ca":
        other = pki.make_ca()
        _write(rogue, "agent", pki.issue(other, "agent", ["127.0.0.1"]))
    elif case == "host-cert-as-agent":
        (rogue / "agent.pem").write_bytes((d / "host.pem").read_bytes())
        (rogue / "agent.key").write_bytes((d / "host.key").read_bytes())
    elif case == "wrong-name":
        name = "elsewhere.example"
        (rogue / "agent.pem").write_bytes((d / "agent.pem").read_bytes())
        (rogue / "agent.key").write_bytes((d / "agent.key").read_bytes())
    else:
        ca = pki.load_ca(str(d))
        past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=3)
        _write(rogue, "agent", pki.issue(ca, "agent", ["127.0.0.1"], now=past, not_after=past + dt.timedelta(days=1)))

    async def go() -> None:
        listener, port, _, _ = await _serve(tls.server_context(_files(rogue, "agent")))
        async with listener:
            await _hello(port, tls.client_context(_files(d, "host")), name)

    exc = _refused(go())
    assert isinstance(exc, ssl.SSLCertVerificationError), exc


def test_tls12_and_plaintext_get_no_service(tmp_path: Path) -> None:
    d = _pki(tmp_path)
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.load_verify_locations(str(d / "ca.pem"))
    old.load_cert_chain(str(d / "host.pem"), str(d / "host.key"))
    old.maximum_version = ssl.TLSVersion.TLSv1_2

    async def tls12() -> None:
        listener, port, seen, _ = await _serve(tls.server_context(_files(d, "agent")))
        async with listener:
            try:
                await _hello(port, old)
            finally:
                assert seen == []

    _refused(tls12())

    async def plaintext() -> tuple[bytes, list[str | None]]:
        listener, port, seen, _ = await _serve(tls.server_context(_files(d, "agent")))
        async with listener:
            answer = await _plaintext_hello(port)
        return answer, seen

    answer, seen = asyncio.run(plaintext())
    assert seen == [] and b"agent_pid" not in answer  # at most a TLS alert, never an answer


async def _plaintext_hello(port: int) -> bytes:
    """A `hello` sent in the clear to a TLS-only listener; whatever comes back (at most an alert)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(wire.encode_control(protocol.request(1, "hello", {"version": 1})))
    await writer.drain()
    try:
        answer = await asyncio.wait_for(reader.read(65536), 10)
    except ConnectionError:
        answer = b""
    writer.close()
    return answer


def test_another_identity_cannot_take_over_the_containers(tmp_path: Path) -> None:
    d = _pki(tmp_path)
    ca = pki.load_ca(str(d))
    second = _write(tmp_path / "second", "host", pki.issue(ca, "host", [], common_name="other host"), ca)
    sup = _Sup()

    async def go() -> BaseException | None:
        listener, port, _, server = await _serve(tls.server_context(_files(d, "agent")), sup)
        async with listener:
            await _hello(port, tls.client_context(_files(d, "host")))
            sup.containers["c1"] = object()  # the first client's container outlives its connection
            await asyncio.sleep(0.05)
            try:
                await _hello(port, tls.client_context(_files(second, "host")))
            except protocol.FailedPrecondition as exc:
                refused: BaseException | None = exc
            else:
                refused = None
            again = await _hello(port, tls.client_context(_files(d, "host")))  # the owner may return
            assert again["version"] == 1
            sup.containers.clear()
            await _hello(port, tls.client_context(_files(second, "host")))  # no containers: free
            assert server.owner == pki.fingerprint((second / "host.pem").read_bytes())
        return refused

    refused = asyncio.run(go())
    assert refused is not None and "belong to another client identity" in str(refused)


def test_tls_dir_without_files_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(tls.TlsConfigError, match="missing .*agent.pem"):
        tls.TlsFiles.in_dir(str(tmp_path), "agent")


def test_parse_tcp() -> None:
    assert endpoint.parse_tcp("tcp:10.0.0.1:7443") == ("10.0.0.1", 7443)
    assert endpoint.parse_tcp("[fd00::1]:1") == ("fd00::1", 1)
    for bad in ("10.0.0.1", ":80", "h:0", "h:70000", "h:x", "[::1]"):
        with pytest.raises(ValueError):
            endpoint.parse_tcp(bad)


def test_agent_command_line_has_no_plaintext_tcp(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ccpu.agent.__main__ import parse_args

    base = ["--runc-root", str(tmp_path), "--bundle-root", str(tmp_path), "--runc", "/bin/true"]
    with pytest.raises(SystemExit):
        parse_args(["--listen", "tcp:127.0.0.1:7443", *base])
    assert "needs --tls-dir" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--listen", "tcp:127.0.0.1:7443", "--tls-dir", str(tmp_path), *base])
    assert "missing" in capsys.readouterr().err
    d = _pki(tmp_path)
    ns = parse_args(["--listen", "tcp:127.0.0.1:7443", "--tls-dir", str(d), *base])
    assert ns.tcp == ("127.0.0.1", 7443) and ns.tls.verify_mode == ssl.CERT_REQUIRED
    assert ns.tls.minimum_version == ssl.TLSVersion.TLSv1_3


def test_remote_sandbox_skips_unreachable_agents_and_refuses_a_foreign_one(tmp_path: Path) -> None:
    from ccpu import errdefs
    from shim.config import RemoteSettings
    from shim.remotesandbox import RemoteSandbox

    d = _pki(tmp_path)
    rogue = _pki(tmp_path, "rogue")

    async def go() -> tuple[str | None, str, str | None, BaseException]:
        listener, port, seen, _ = await _serve(tls.server_context(_files(d, "agent")))
        foreign, fport, fseen, _ = await _serve(tls.server_context(_files(rogue, "agent")))
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            dead = s.getsockname()[1]
        async with listener, foreign:
            sb = RemoteSandbox(settings=RemoteSettings((f"127.0.0.1:{dead}", f"127.0.0.1:{port}"), str(d), 5))
            await sb.start()
            endpoint, identity = sb.endpoint, sb.identity
            await sb.stop()
            bad = RemoteSandbox(settings=RemoteSettings((f"127.0.0.1:{fport}", f"127.0.0.1:{port}"), str(d), 5))
            with pytest.raises(errdefs.FailedPrecondition) as info:
                await bad.start()
            assert fseen == []
        return endpoint, f"127.0.0.1:{port}", identity, info.value

    endpoint, live, identity, refused = asyncio.run(go())
    assert endpoint == live  # the dead endpoint was skipped
    assert identity == pki.fingerprint((d / "agent.pem").read_bytes())
    assert "does not verify" in str(refused) and "ca.pem" in str(refused)  # never tried the next one


def test_a_shim_daemon_without_ssl_gets_it_back_for_tls(tmp_path: Path) -> None:
    """shim/daemon.py blocks `import ssl` before asyncio loads; a remote sandbox re-enables it."""
    import subprocess
    import sys

    d = _pki(tmp_path)
    code = f"""
import sys; sys.modules["ssl"] = None
import asyncio
from shim.remotesandbox import allow_ssl
allow_ssl()
from ccpu.agent import tls
from tests.unit.test_remote_tls import _serve, _hello, _files
from pathlib import Path
async def go():
    listener, port, seen, _ = await _serve(tls.server_context(_files(Path({str(d)!r}), "agent")))
    async with listener:
        print((await _hello(port, tls.client_context(_files(Path({str(d)!r}), "host"))))["version"])
asyncio.run(go())
"""
    root = str(Path(__file__).resolve().parents[2])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=root,
                         env={**os.environ, "PYTHONPATH": root})
    assert out.stdout.strip() == "1", out.stderr[-2000:]


class _ReapSup(_Sup):
    """Containers whose init exits a moment after SIGKILL (delete refused until then)."""

    def __init__(self) -> None:
        super().__init__()
        self.killed: list[tuple[str, int]] = []

    async def kill(self, args: dict[str, Any]) -> dict[str, Any]:
        self.killed.append((args["container"], args["signal"]))
        return {}

    async def delete(self, args: dict[str, Any]) -> dict[str, Any]:
        cid = args["container"]
        if sum(1 for k in self.killed if k[0] == cid) < 1 or self.containers[cid] == "running":
            self.containers[cid] = "exiting"  # the exit is reported after a first refusal
            raise protocol.FailedPrecondition("cannot delete a running process")
        del self.containers[cid]
        return {}

    def serialized(self, cid: str) -> Any:
        return asyncio.Lock()


@pytest.mark.parametrize("owner_returns", [False, True])
def test_a_lost_owners_containers_are_reaped_unless_it_returns(tmp_path: Path, owner_returns: bool) -> None:
    d = _pki(tmp_path)
    sup = _ReapSup()

    async def go() -> None:
        server = Server(sup, Outbox(), orphan_grace=0.3 if not owner_returns else 30)  # type: ignore[arg-type]

        async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.serve(reader, writer, tls.peer_identity(writer.get_extra_info("ssl_object")))

        listener = await asyncio.start_server(on_conn, "127.0.0.1", 0, ssl=tls.server_context(_files(d, "agent")))
        port = listener.sockets[0].getsockname()[1]
        async with listener:
            client = await AgentClient.connect_tls("127.0.0.1", port, tls.client_context(_files(d, "host")), timeout=5)
            await client.hello()
            sup.containers.update({"c1": "running", "c2": "running"})
            await client.close()  # the link breaks: no shutdown
            if owner_returns:
                for _ in range(100):
                    if server._orphans is not None:
                        break
                    await asyncio.sleep(0.02)
                assert server._orphans is not None  # reaping was scheduled
                back = await AgentClient.connect_tls("127.0.0.1", port, tls.client_context(_files(d, "host")),
                                                     timeout=5)
                await back.hello()
                assert server._orphans is None and sup.killed == [] and len(sup.containers) == 2
                await back.close()
                server._orphans.cancel()
                return
            for _ in range(300):  # bounded wait for the reaping (not a speed check)
                if not sup.containers:
                    break
                await asyncio.sleep(0.05)
        assert sup.containers == {} and sorted(sup.killed) == [("c1", 9), ("c2", 9)]
        assert server.owner is None

    asyncio.run(go())


def test_unmounting_a_removed_rootfs_is_done(tmp_path: Path) -> None:
    """A dead shim's bundle removed by containerd detaches the remote agent's rootfs mount and
    takes its dir: the agent's delete must still complete (it reaps the orphans)."""
    from ccpu.agent.mounts import unmount

    unmount(str(tmp_path / "gone" / "rootfs"), 2)  # no FileNotFoundError


def test_fractal_agent_serve_runs_the_agent_on_tcp_with_tls(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    def execv(path: str, argv: list[str]) -> None:
        seen.append(argv)

    monkeypatch.setattr(os, "execv", execv)
    cli_main(["agent", "serve", "--listen", "10.0.0.2:7443", "--tls-dir", "/etc/fractal/tls"])
    argv = seen[0]
    assert argv[1:3] == ["-m", "ccpu.agent"]
    assert argv[argv.index("--listen") + 1] == "tcp:10.0.0.2:7443"
    assert argv[argv.index("--tls-dir") + 1] == "/etc/fractal/tls"
    # by default the machine keeps its own repo (layers streamed by the shim)
    assert argv[argv.index("--repo") + 1] == "/var/lib/fractal-agent"
    assert "--bundle-root" not in argv and "--layer-root" not in argv
    seen.clear()
    cli_main(["agent", "serve", "--listen", "10.0.0.2:7443", "--tls-dir", "/etc/fractal/tls", "--no-repo"])
    argv = seen[0]  # the host's paths, mounted on the machine at the same place
    assert "--repo" not in argv and "--bundle-root" in argv and "--layer-root" in argv


def test_the_agent_starts_without_ssl() -> None:
    """The VM guest ships no ssl module (ccpu/guest/initramfs.py): the agent must not need it
    unless it listens on TCP (seen failing: every VM's init died at the agent's import)."""
    import subprocess
    import sys

    root = str(Path(__file__).resolve().parents[2])
    code = ('import sys; sys.modules["ssl"] = None; sys.modules["_ssl"] = None\n'
            'import ccpu.agent.__main__, ccpu.agent.server, ccpu.agent.client\n'
            'print("ok")')
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=root,
                         env={**os.environ, "PYTHONPATH": root})
    assert out.stdout.strip() == "ok", out.stderr[-2000:]
