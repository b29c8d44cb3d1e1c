"""hack/protosrc.py: the pinned .proto sources are taken only when their bytes match the pins,
from whichever place has them; a module zip only when its go.sum hash matches."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import pytest

from hack import protosrc
from hack.protosrc import Module


def _zip(module: Module, files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for rel, data in files.items():
            z.writestr(f"{module.key}/{rel}", data)
    return buf.getvalue()


def _module(files: dict[str, bytes], h1: str = "") -> Module:
    return Module("example.com/m", "v1.0.0", h1, {k: hashlib.sha256(v).hexdigest() for k, v in files.items()})


@pytest.fixture
def one_module(monkeypatch: pytest.MonkeyPatch) -> tuple[Module, bytes]:
    files = {"a/x.proto": b"syntax = 'proto3';\n", "b/y.proto": b"package y;\n"}
    data = _zip(_module(files), files)
    mod = _module(files, protosrc.zip_h1(data))
    monkeypatch.setattr(protosrc, "MODULES", (mod,))
    return mod, data


def _env(tmp_path: Path, **kw: str) -> dict[str, str]:
    return {"FRACTAL_GOCODE": str(tmp_path / "gocode"), "GOMODCACHE": str(tmp_path / "modcache"), **kw}


def test_local_tree_with_matching_bytes_needs_no_download(tmp_path: Path, one_module) -> None:
    mod, _ = one_module
    for rel, data in (("a/x.proto", b"syntax = 'proto3';\n"), ("b/y.proto", b"package y;\n")):
        f = tmp_path / "gocode" / mod.path / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(data)

    def no_fetch(url: str) -> bytes:
        raise AssertionError(f"downloaded {url}")

    got = protosrc.resolve(tmp_path, _env(tmp_path), fetch=no_fetch)
    assert got[(mod.path, "b/y.proto")] == b"package y;\n"


def test_a_patched_local_copy_is_replaced_by_the_module_file(tmp_path: Path, one_module) -> None:
    mod, data = one_module
    f = tmp_path / "gocode" / mod.path / "a/x.proto"  # as Debian patches cgroups' metrics.proto
    f.parent.mkdir(parents=True)
    f.write_bytes(b"syntax = 'proto3';\noption (gogoproto.x) = true;\n")
    urls: list[str] = []
    got = protosrc.resolve(tmp_path, _env(tmp_path, GOPROXY="https://p.example,direct"),
                           fetch=lambda url: urls.append(url) or data)
    assert urls == ["https://p.example/example.com/m/@v/v1.0.0.zip"]
    assert got[(mod.path, "a/x.proto")] == b"syntax = 'proto3';\n"


def test_sdist_copy_is_used_first(tmp_path: Path, one_module) -> None:
    mod, data = one_module
    for rel, content in (("a/x.proto", b"syntax = 'proto3';\n"), ("b/y.proto", b"package y;\n")):
        f = tmp_path / protosrc.SDIST_DIR / mod.path / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(content)
    got = protosrc.resolve(tmp_path, _env(tmp_path, GOPROXY="off"))
    assert len(got) == 2


def test_a_zip_with_another_hash_is_refused(tmp_path: Path, one_module) -> None:
    mod, _ = one_module
    tampered = _zip(mod, {"a/x.proto": b"syntax = 'proto3';\n", "b/y.proto": b"package evil;\n"})
    with pytest.raises(protosrc.SourceError, match="pinned " + mod.h1.replace("+", r"\+")):
        protosrc.resolve(tmp_path, _env(tmp_path, GOPROXY="https://p.example"), fetch=lambda url: tampered)


def test_module_cache_zip_then_next_proxy(tmp_path: Path, one_module) -> None:
    mod, data = one_module
    cached = tmp_path / "modcache/cache/download" / mod.path / "@v" / f"{mod.version}.zip"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"not a zip")  # a broken cache entry is skipped, not trusted
    calls: list[str] = []

    def fetch(url: str) -> bytes:
        calls.append(url)
        if "first" in url:
            raise OSError("connection refused")
        return data

    got = protosrc.resolve(tmp_path, _env(tmp_path, GOPROXY="https://first.example|https://second.example"),
                           fetch=fetch)
    assert len(got) == 2 and [u.split("/")[2] for u in calls] == ["first.example", "second.example"]


def test_goproxy_off_names_what_was_tried(tmp_path: Path, one_module) -> None:
    with pytest.raises(protosrc.SourceError, match="example.com/m@v1.0.0 not found"):
        protosrc.resolve(tmp_path, _env(tmp_path, GOPROXY="off"))


def test_proxies_parsing() -> None:
    assert protosrc.proxies({}) == ["https://proxy.golang.org"]
    assert protosrc.proxies({"GOPROXY": "https://a/,direct"}) == ["https://a"]
    assert protosrc.proxies({"GOPROXY": "off,https://a"}) == []


def test_the_real_pins_cover_what_the_generator_stages() -> None:
    from hack import gen_protos

    staged = {p.staged for p in gen_protos.collect_inputs()}
    assert "ccpu/api/gen/containerd/services/snapshots/v1/snapshots.proto" in staged
    assert "ccpu/api/gen/cgroups/stats/v1/metrics.proto" in staged
    assert "ccpu/api/gen/gogoproto/gogo.proto" in staged
    assert "ccpu/api/gen/fractal/layers/v1/layers.proto" in staged  # the project's own API
    assert len(staged) == (sum(len(m.files) for m in protosrc.MODULES) + len(gen_protos.VENDORED_PROTOS)
                           + len(gen_protos.PROJECT_PROTOS))
