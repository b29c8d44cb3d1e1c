"""The machine's receiver of streamed layers (ccpu/agent/layerpull.py): verified twice, applied
with the repo's rules, confined, bounded, and never half visible.  Real files, real tar/gzip;
root (mknod, trusted.* xattrs), as the agent."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from ccpu.agent import layerpull
from ccpu.agent.layerpull import LayerBlob, LayerError, LocalRepo

GZ = "application/vnd.oci.image.layer.v1.tar+gzip"


def _tar(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for info, data in entries:
            t.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _file(name: str, data: bytes, mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    i = tarfile.TarInfo(name)
    i.size, i.mode = len(data), mode
    return i, data


def _entry(name: str, kind: bytes, linkname: str = "", mode: int = 0o755) -> tuple[tarfile.TarInfo, None]:
    i = tarfile.TarInfo(name)
    i.type, i.linkname, i.mode = kind, linkname, mode
    return i, None


def _sha(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


def _blob(tar: bytes, chain: str | None = None, **over: object) -> tuple[LayerBlob, bytes]:
    gz = gzip.compress(tar)
    fields = dict(chain_id=chain or _sha(tar), diff_id=_sha(tar), digest=_sha(gz), media_type=GZ, size=len(gz))
    fields.update(over)
    return LayerBlob(**fields), gz  # type: ignore[arg-type]


def _pull(repo: LocalRepo, blob: LayerBlob, data: bytes, container: str = "c1", chunk: int = 7000) -> str:
    rx = repo.receiver(blob)
    for i in range(0, len(data), chunk):
        rx.feed(data[i:i + chunk])
    rx.close()
    return repo.publish(container, rx)


def _leftovers(repo: LocalRepo) -> list[str]:
    return sorted(os.listdir(repo.tmp)) + sorted(os.listdir(repo.layers))


BASIC = _tar([
    _entry("etc", tarfile.DIRTYPE),
    _file("etc/hello", b"hello from the layer\n"),
    _file("bin/tool", b"#!/bin/sh\n", 0o4755),
    _entry("bin/link", tarfile.SYMTYPE, "/etc/hello"),
    _entry("bin/hard", tarfile.LNKTYPE, "bin/tool"),
    _entry("var", tarfile.DIRTYPE),
    _file("var/.wh..wh..opq", b""),
    _file("etc/.wh.gone", b""),
])


def test_a_layer_is_verified_applied_and_published(tmp_path: Path) -> None:
    repo = LocalRepo(str(tmp_path / "repo"), cache_max=0)
    blob, gz = _blob(BASIC)
    path = _pull(repo, blob, gz)
    assert path == repo.path(blob.chain_id) and os.path.isdir(path)
    assert Path(path, "etc/hello").read_bytes() == b"hello from the layer\n"
    assert stat.S_IMODE(os.lstat(Path(path, "bin/tool")).st_mode) == 0o4755
    assert os.readlink(Path(path, "bin/link")) == "/etc/hello"
    assert os.lstat(Path(path, "bin/hard")).st_ino == os.lstat(Path(path, "bin/tool")).st_ino
    wh = os.lstat(Path(path, "etc/gone"))  # the whiteout: a 0/0 character device
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == os.makedev(0, 0)
    for name in layerpull.OPAQUE_XATTRS:
        assert os.getxattr(Path(path, "var"), name) == b"y"
    assert not Path(path, "var/.wh..wh..opq").exists() and not Path(path, "etc/.wh.gone").exists()
    assert repo.refs == {blob.chain_id: ["c1"]} and repo.transfers == 1
    assert os.listdir(repo.tmp) == []
    # a second container: nothing to transfer, one more reference
    assert repo.have("c2", [blob.chain_id]) == []
    assert repo.refs[blob.chain_id] == ["c1", "c2"]
    assert repo.release("c1") == [] and os.path.isdir(path)
    assert repo.release("c2") == [blob.chain_id] and not os.path.exists(path)
    assert _leftovers(repo) == []


def test_a_tampered_stream_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    repo = LocalRepo(str(tmp_path / "repo"))
    blob, gz = _blob(BASIC)
    bad = bytearray(gz)
    bad[len(bad) // 2] ^= 0x01
    with pytest.raises(LayerError, match="digest mismatch"):
        _pull(repo, blob, bytes(bad))
    assert _leftovers(repo) == [] and repo.refs == {}
    assert repo.have("c1", [blob.chain_id]) == [blob.chain_id]


def test_a_wrong_diff_id_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    repo = LocalRepo(str(tmp_path / "repo"))
    blob, gz = _blob(BASIC, diff_id=_sha(b"another tar"))
    with pytest.raises(LayerError, match="diff ID mismatch"):
        _pull(repo, blob, gz)
    assert _leftovers(repo) == [] and repo.refs == {}


def test_a_stream_longer_or_shorter_than_declared_is_refused(tmp_path: Path) -> None:
    repo = LocalRepo(str(tmp_path / "repo"))
    blob, gz = _blob(BASIC)
    with pytest.raises(LayerError, match="longer than its declared"):
        _pull(repo, blob, gz + b"x" * 10)
    with pytest.raises(LayerError, match="got .* of"):
        _pull(repo, blob, gz[:-5])
    assert _leftovers(repo) == []


def test_size_caps(tmp_path: Path) -> None:
    blob, gz = _blob(BASIC)
    args = {"chain_id": blob.chain_id, "diff_id": blob.diff_id, "digest": blob.digest,
            "media_type": GZ, "size": len(gz)}
    with pytest.raises(layerpull.protocol.ResourceExhausted, match="max-layer-mb"):
        LayerBlob.from_args(args, max_blob=len(gz) - 1)
    with pytest.raises(layerpull.protocol.InvalidArgument, match="media type"):
        LayerBlob.from_args({**args, "media_type": "text/plain"})
    with pytest.raises(layerpull.protocol.InvalidArgument, match="digest"):
        LayerBlob.from_args({**args, "digest": "sha256:../../x"})
    # a bomb: 3 MiB of zeros unpacks past a 1 MiB cap
    bomb = _tar([_file("zeros", b"\0" * (3 << 20))])
    repo = LocalRepo(str(tmp_path / "repo"), max_unpacked=1 << 20)
    b2, gz2 = _blob(bomb)
    with pytest.raises(LayerError, match="more than"):
        _pull(repo, b2, gz2)
    assert _leftovers(repo) == []


@pytest.mark.parametrize("entries, why", [
    ([_file("../escape", b"x")], "'..'"),
    ([_file("/etc/abs", b"x")], "absolute"),
    ([_entry("a", tarfile.SYMTYPE, "/etc"), _file("a/passwd", b"owned")], "not a directory"),
    ([_entry("h", tarfile.LNKTYPE, "../../etc/passwd")], "'..'"),
    ([_entry("h", tarfile.LNKTYPE, "etc/passwd")], "not in this layer"),
])
def test_names_are_confined(tmp_path: Path, entries: list, why: str) -> None:  # noqa: ANN001
    repo = LocalRepo(str(tmp_path / "repo"))
    blob, gz = _blob(_tar(entries))
    with pytest.raises(LayerError, match=why):
        _pull(repo, blob, gz)
    assert _leftovers(repo) == []
    assert not (tmp_path / "escape").exists()


def test_huge_extension_headers_and_overlay_xattrs_are_refused(tmp_path: Path) -> None:
    repo = LocalRepo(str(tmp_path / "repo"))
    big, _ = _file("f", b"x")
    big.pax_headers = {"comment": "y" * (2 << 20)}  # tarfile would read it whole into memory
    blob, gz = _blob(_tar([(big, b"x")]))
    with pytest.raises(LayerError, match="extension header"):
        _pull(repo, blob, gz)
    redirect, _ = _entry("d", tarfile.DIRTYPE)
    redirect.pax_headers = {"SCHILY.xattr.trusted.overlay.redirect": "/etc"}
    blob, gz = _blob(_tar([(redirect, None)]))
    with pytest.raises(LayerError, match="overlay xattr"):
        _pull(repo, blob, gz)
    fine, _ = _file("cap", b"x")
    fine.pax_headers = {"SCHILY.xattr.user.note": "kept"}
    blob, gz = _blob(_tar([(fine, b"x")]))
    assert os.getxattr(Path(_pull(repo, blob, gz), "cap"), "user.note") == b"kept"
    assert os.listdir(repo.tmp) == []


def test_a_crash_mid_way_leaves_no_layer_visible(tmp_path: Path) -> None:
    """A crash after part of the stream (or part of the unpack): at the next start, the temp
    files go and no layer dir is there; a layer dir without a reference (crash between rename
    and record) is impossible by order, and recover() removes one if it appears anyway."""
    root = tmp_path / "repo"
    repo = LocalRepo(str(root))
    blob, gz = _blob(BASIC)
    rx = repo.receiver(blob)
    rx.feed(gz[:100])  # ... and the agent dies here
    (Path(repo.tmp) / "half.d" / "etc").mkdir(parents=True)  # an unpack cut short
    stray = Path(repo.layers) / ("0" * 64)
    stray.mkdir()
    again = LocalRepo(str(root))
    assert _leftovers(again) == []
    assert again.have("c1", [blob.chain_id]) == [blob.chain_id]
    _pull(again, blob, gz)
    assert LocalRepo(str(root)).has(blob.chain_id)  # a published one survives a restart


def test_idle_layers_are_cached_up_to_the_cache_size(tmp_path: Path) -> None:
    """A released layer stays for the next sandbox (no transfer), until newer idle layers push
    it past the cache's size; a restart keeps the cache and forgets the old containers."""
    a, gz_a = _blob(_tar([_file("a", b"a" * 5000)]))
    b, gz_b = _blob(_tar([_file("b", b"b" * 5000)]))
    root = str(tmp_path / "repo")
    repo = LocalRepo(root, cache_max=15000)  # one idle layer's tar fits, two do not
    _pull(repo, a, gz_a, "c1")
    _pull(repo, b, gz_b, "c2")
    assert repo.release("c1") == [] and repo.has(a.chain_id)
    assert repo.have("c3", [a.chain_id]) == []  # the next sandbox: nothing to transfer
    assert repo.release("c3") == []
    assert repo.release("c2") == [a.chain_id]  # a is older: evicted; b stays
    assert not repo.has(a.chain_id) and repo.has(b.chain_id)
    assert os.listdir(repo.layers) == [b.chain_id.split(":")[1]]
    _pull(repo, a, gz_a, "c4")  # in use: never evicted, whatever the cache's size
    again = LocalRepo(root, cache_max=15000)  # restart: c4 is gone with the old agent
    assert again.refs == {} and again.has(b.chain_id) is False and again.has(a.chain_id)


def test_zstd_layers(tmp_path: Path) -> None:
    zstandard = pytest.importorskip("zstandard")
    zs = zstandard.ZstdCompressor().compress(BASIC)
    blob = LayerBlob(_sha(BASIC), _sha(BASIC), _sha(zs), "application/vnd.oci.image.layer.v1.tar+zstd", len(zs))
    repo = LocalRepo(str(tmp_path / "repo"))
    path = _pull(repo, blob, zs)
    assert Path(path, "etc/hello").read_bytes() == b"hello from the layer\n"


# -- through the agent's server, over a real socket (the protocol of the shim's RemoteSandbox) ---


def _serve(tmp_path: Path):  # noqa: ANN202
    import asyncio
    import socket

    from ccpu.agent.client import AgentClient
    from ccpu.agent.container import Supervisor
    from ccpu.agent.server import Outbox, Server

    async def start() -> tuple[AgentClient, Server, LocalRepo, asyncio.Task[None]]:
        repo = LocalRepo(str(tmp_path / "machine"), cache_max=0)
        outbox = Outbox()
        server = Server(Supervisor(None, None, outbox, [], []), outbox, repo=repo)  # type: ignore[arg-type]
        a, b = socket.socketpair()
        reader, writer = await asyncio.open_connection(sock=a)
        task = asyncio.ensure_future(server.serve(reader, writer))
        client = await AgentClient.connect_socket(b)
        return client, server, repo, task

    return start


async def _stream(client, blob: LayerBlob, data: bytes, container: str = "c1", cut: bool = False):  # noqa: ANN001, ANN202
    import asyncio

    ch = client.open_channel()
    args = {"container": container, "chain_id": blob.chain_id, "diff_id": blob.diff_id,
            "digest": blob.digest, "media_type": blob.media_type, "size": blob.size, "channel": ch.number}
    call = asyncio.ensure_future(client.call("layers_pull", args))
    await asyncio.sleep(0)
    await ch.write(data[:len(data) // 2] if cut else data)
    if cut:
        await client.close()  # the link breaks mid-stream
        return call
    await ch.close_write()
    return await call


def test_the_server_pulls_refuses_a_tampered_stream_and_releases(tmp_path: Path) -> None:
    import asyncio

    from ccpu import errdefs

    blob, gz = _blob(BASIC)

    async def scenario() -> None:
        client, server, repo, task = await _serve(tmp_path)()
        hello = await client.hello()
        assert "layers:pull" in hello["features"] and hello["repo"] == repo.root
        have = await client.call("layers_have", {"container": "c1", "chain_ids": [blob.chain_id]})
        assert have == {"missing": [blob.chain_id], "layers": repo.layers}
        bad = bytearray(gz)
        bad[-12] ^= 0xFF
        with pytest.raises(errdefs.InvalidArgument, match="digest mismatch"):
            await _stream(client, blob, bytes(bad))
        assert _leftovers(repo) == [] and not server._pulls
        done = await _stream(client, blob, gz)
        assert done["path"] == repo.path(blob.chain_id) and done["transfers"] == 1
        have = await client.call("layers_have", {"container": "c2", "chain_ids": [blob.chain_id]})
        assert have["missing"] == []
        assert (await client.call("layers_release", {"container": "c1"}))["removed"] == []
        assert (await client.call("layers_release", {"container": "c2"}))["removed"] == [blob.chain_id]
        assert _leftovers(repo) == []
        with pytest.raises(errdefs.InvalidArgument, match="chain ID"):
            await client.call("layers_have", {"container": "c1", "chain_ids": ["sha256:../../etc"]})
        # the link breaks mid-stream: the pull ends, its temp file goes, no layer appears
        await _stream(client, blob, gz, cut=True)
        await asyncio.wait_for(task, 10)
        for _ in range(100):
            if not server._pulls:
                break
            await asyncio.sleep(0.05)
        assert not server._pulls and _leftovers(repo) == []

    asyncio.run(scenario())


# -- the shim's side (shim/remotesandbox.py) against the real server, the blob source faked ------


class _Source:
    """A BlobSource stand-in: the blobs of a dict; ``fail_after`` chunks, then a read error."""

    def __init__(self, blobs: dict[str, tuple[LayerBlob, bytes]], fail_after: int | None = None) -> None:
        self.blobs = blobs
        self.fail_after = fail_after
        self.sent = 0

    def resolve(self, container: str, chain_ids: list[str]) -> dict[str, LayerBlob]:
        return {c: self.blobs[c][0] for c in chain_ids}

    def chunks(self, digest: str):  # noqa: ANN201
        data = next(gz for b, gz in self.blobs.values() if b.digest == digest)
        for n, i in enumerate(range(0, len(data), 4096)):
            if self.fail_after is not None and n >= self.fail_after:
                raise OSError("containerd went away")
            self.sent += 1
            yield data[i:i + 4096]


def test_the_remote_sandbox_pulls_what_is_missing_and_ends_a_failed_stream(tmp_path: Path) -> None:
    import asyncio

    from ccpu import errdefs
    from shim.config import RemoteSettings
    from shim.remotesandbox import RemoteSandbox

    big = _tar([_file("etc/big", os.urandom(64 << 10))])
    blob, gz = _blob(big)

    async def scenario() -> None:
        client, server, repo, task = await _serve(tmp_path)()
        await client.hello()
        sb = RemoteSandbox(settings=RemoteSettings(endpoints=("127.0.0.1:1",)), repo_root=str(tmp_path))
        sb._client = client
        sb._ready = asyncio.get_running_loop().create_future()
        sb._ready.set_result(client)
        sb.machine_repo = repo.root
        # a read error mid-stream: Unavailable, the agent refuses the short stream, nothing stays
        sb._source = _Source({blob.chain_id: (blob, gz)}, fail_after=3)
        with pytest.raises(errdefs.Unavailable, match="containerd went away"):
            await sb._have_and_pull("c1", ["/host/layers/1"], [blob.chain_id])
        for _ in range(100):
            if not server._pulls:
                break
            await asyncio.sleep(0.05)
        assert not server._pulls and _leftovers(repo) == []
        await asyncio.wait_for(sb._release("c1"), 10)  # the container's turn is free again
        # then the whole blob: on the machine, the host dir mapped to it
        sb._source = source = _Source({blob.chain_id: (blob, gz)})
        await sb._have_and_pull("c1", ["/host/layers/1"], [blob.chain_id])
        assert sb.layer_path("/host/layers/1") == repo.path(blob.chain_id)
        assert sb.host_layer_path(repo.path(blob.chain_id)) == "/host/layers/1"
        assert Path(repo.path(blob.chain_id), "etc/big").stat().st_size == 64 << 10
        sent = source.sent
        await sb._have_and_pull("c2", ["/host/layers/1"], [blob.chain_id])  # present: not sent again
        assert source.sent == sent and repo.refs[blob.chain_id] == ["c1", "c2"]
        await client.close()
        await asyncio.wait_for(task, 10)

    asyncio.run(scenario())
