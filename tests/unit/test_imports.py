"""ccpu/cli/images.py (`fractal image`): source parsing, tag selection, names, archive members (pure parts)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import pytest

from ccpu.cli import images as M


def test_parse_source():
    assert M.parse_source("oci:/var/img/busybox:1.36") == M.Source("oci", "/var/img/busybox", "1.36")
    assert M.parse_source("oci:/var/img/busybox") == M.Source("oci", "/var/img/busybox")
    assert M.parse_source("oci:./a:b/layout") == M.Source("oci", "./a:b/layout")
    assert M.parse_source("docker-archive:/tmp/x.tar") == M.Source("docker-archive", "/tmp/x.tar")
    assert M.parse_source("docker://alpine:3.20") == M.Source("docker", "alpine:3.20")
    with pytest.raises(M.ImportError_, match="unknown source"):
        M.parse_source("/tmp/x.tar")


@pytest.mark.parametrize("ref,full", [
    ("busybox", "docker.io/library/busybox:latest"),
    ("alpine:3.20", "docker.io/library/alpine:3.20"),
    ("user/app", "docker.io/user/app:latest"),
    ("quay.io/x/y:1", "quay.io/x/y:1"),
    ("127.0.0.1:5000/fractal/busybox:latest", "127.0.0.1:5000/fractal/busybox:latest"),
    ("localhost/app", "localhost/app:latest"),
    ("ghcr.io/a/b@sha256:" + "0" * 64, "ghcr.io/a/b@sha256:" + "0" * 64),
])
def test_normalize_ref(ref, full):
    assert M.normalize_ref(ref) == full


INDEX = {"manifests": [
    {"digest": "sha256:a", "annotations": {M.REF_NAME: "latest"}},
    {"digest": "sha256:b", "annotations": {M.REF_NAME: "1.36"}},
    {"digest": "sha256:c"},
]}


def test_select_manifest():
    assert M.select_manifest(INDEX, "1.36")["digest"] == "sha256:b"
    with pytest.raises(M.ImportError_, match="several images.*latest, 1.36, <none>"):
        M.select_manifest(INDEX, None)
    with pytest.raises(M.ImportError_, match="no tag 'x'"):
        M.select_manifest(INDEX, "x")
    assert M.select_manifest({"manifests": [{"digest": "sha256:z"}]}, None)["digest"] == "sha256:z"


def test_names():
    out = ("unpacking docker.io/fractal/busybox:saved (sha256:" + "a" * 64 + ")...done\n"
           "unpacking localhost/x:1 (sha256:" + "b" * 64 + ")...done\n")
    assert M.imported_names(out) == ["docker.io/fractal/busybox:saved", "localhost/x:1"]
    assert M.default_name(M.Source("oci", "/img/My Image/", "v1")) == "localhost/my-image:v1"
    assert M.default_name(M.Source("docker", "alpine")) == "docker.io/library/alpine:latest"
    assert M.default_name(M.Source("docker-archive", "/x.tar")) is None


def test_pick_platform():
    idx = {"manifests": [{"digest": "sha256:arm", "platform": {"os": "linux", "architecture": "arm64"}},
                         {"digest": "sha256:amd", "platform": {"os": "linux", "architecture": "amd64"}}]}
    assert M.pick_platform(idx, ("linux", "amd64"))["digest"] == "sha256:amd"
    with pytest.raises(M.ImportError_, match="linux/arm64, linux/amd64"):
        M.pick_platform(idx, ("linux", "s390x"))


def _blob(layout, data: bytes) -> dict:
    d = "sha256:" + hashlib.sha256(data).hexdigest()
    p = M.blob_path(layout, d)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return {"digest": d, "size": len(data)}


def test_oci_members_only_the_selected_image(tmp_path):
    (tmp_path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    cfg = _blob(tmp_path, b"{}")
    layer = _blob(tmp_path, b"layer")
    other = _blob(tmp_path, b"other layer")
    man = json.dumps({"schemaVersion": 2, "config": {**cfg, "mediaType": "application/vnd.oci.image.config.v1+json"},
                      "layers": [{**layer, "mediaType": "application/vnd.oci.image.layer.v1.tar"}]}).encode()
    man2 = json.dumps({"schemaVersion": 2, "config": cfg, "layers": [other]}).encode()
    md = {**_blob(tmp_path, man), "mediaType": M.MANIFEST_TYPES[0], "annotations": {M.REF_NAME: "a"}}
    md2 = {**_blob(tmp_path, man2), "mediaType": M.MANIFEST_TYPES[0], "annotations": {M.REF_NAME: "b"}}
    (tmp_path / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [md, md2]}))
    members = M.oci_members(tmp_path, "a", "example.com/x:a")
    arcs = [a for a, _ in members]
    assert arcs[:2] == ["oci-layout", "index.json"]
    assert sorted(arcs[2:]) == sorted(f"blobs/{d['digest'].replace(':', '/')}" for d in (md, cfg, layer))
    idx = json.loads(members[1][1])
    assert idx["manifests"][0]["annotations"][M.CONTAINERD_NAME] == "example.com/x:a"
    buf = io.BytesIO()
    M.write_tar(members, buf, M._NoProgress())
    assert len(buf.getvalue()) == M.tar_size(
        [M.member_size(i) for _, i in members])
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as t:
        assert t.getnames() == arcs
    M.close_members(members)


def test_not_a_layout(tmp_path):
    with pytest.raises(M.ImportError_, match="not an OCI image layout"):
        M.oci_members(tmp_path, None, "x")


def test_progress_lines():
    out = io.StringIO()
    p = M.Progress("import x", 400, out)
    for _ in range(4):
        p.update(100)
    p.close()
    lines = out.getvalue().splitlines()
    assert "25%" in lines[0] and lines[-1].startswith("import x [") and "100%" in lines[-1]


@pytest.mark.parametrize("digest", [
    "sha256:../../etc/passwd", "sha256:" + "A" * 64, "sha256:" + "a" * 63, "sha512:" + "a" * 64,
    "md5:" + "a" * 32, "sha256/" + "a" * 64, "", None, 7, "sha256:" + "a" * 64 + "/x",
])
def test_bad_digests_are_refused_before_any_path_use(tmp_path, digest):
    with pytest.raises(M.ImportError_):
        M.blob_path(tmp_path, digest)
    with pytest.raises(M.ImportError_, match="refusing descriptor"):
        M.children(M.MANIFEST_TYPES[0], {"config": {"digest": digest, "size": 1}, "layers": []})


def test_supported_digests():
    for d in ("sha256:" + "0" * 64, "sha512:" + "f" * 128):
        assert M.descriptor({"digest": d, "size": 3})["digest"] == d
    with pytest.raises(M.ImportError_, match="size"):
        M.descriptor({"digest": "sha256:" + "0" * 64, "size": -1})


def test_layout_with_symlinked_blobs_dir_is_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    layout = tmp_path / "layout"
    layout.mkdir()
    man = _blob(elsewhere, b'{"schemaVersion": 2, "layers": []}')
    (layout / "blobs").symlink_to(elsewhere / "blobs")
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (layout / "index.json").write_text(json.dumps({"manifests": [{**man, "mediaType": M.MANIFEST_TYPES[0]}]}))
    with pytest.raises(M.ImportError_, match="symlink"):
        M.oci_members(layout, None, "x")


def test_oversized_index_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(M, "MAX_DOCUMENT", 10)
    (tmp_path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (tmp_path / "index.json").write_text(json.dumps({"manifests": []}))
    with pytest.raises(M.ImportError_, match="larger than 10 bytes"):
        M.oci_members(tmp_path, None, "x")
