"""ccpu/guest/pyzip.py: the agent's ready path as one stored zip (docs/vm.md "The guest's boot timeline")."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ccpu.guest import pyzip

ROOT = Path(__file__).resolve().parents[2]
TAG = "cpython-311"


def test_zip_path_is_the_interpreters_own_sys_path_entry() -> None:
    assert pyzip.zip_path("/usr/lib/python3.11") == "usr/lib/python311.zip"
    assert pyzip.zip_path("/usr/lib/python3.12/") == "usr/lib/python312.zip"
    with pytest.raises(pyzip.ZipError):
        pyzip.zip_path("/usr/lib/stdlib")


def test_the_zip_path_is_first_on_the_guest_interpreters_sys_path() -> None:
    """What CPython itself puts on sys.path (the guest runs this binary with -S -I)."""
    py = "/usr/bin/python3.11"
    if not Path(py).exists():
        pytest.skip("no /usr/bin/python3.11")
    out = subprocess.run([py, "-S", "-I", "-c", "import sys, sysconfig; print(sys.path[0]); "
                          "print(sysconfig.get_path('stdlib'))"], capture_output=True, text=True, check=True)
    first, stdlib = out.stdout.split()
    assert first == "/" + pyzip.zip_path(stdlib)


def test_probe_output_keeps_file_modules_and_finds_packages() -> None:
    ready = pyzip.parse_probe(json.dumps({
        "sys": "built-in", "os": "frozen", "_json": "/usr/lib/python3.11/lib-dynload/_json.cpython-311.so",
        "json": "/usr/lib/python3.11/json/__init__.py", "json.decoder": "/usr/lib/python3.11/json/decoder.py",
        "enum": "/usr/lib/python3.11/enum.py", "ccpu.agent.hello": "/src/ccpu/agent/hello.py",
        "__main__": "", "weird": None}))
    assert ready.modules == ("ccpu.agent.hello", "enum", "json", "json.decoder")
    assert ready.tops == ("ccpu", "enum", "json")
    assert ready.packages == {"ccpu", "json"}
    with pytest.raises(pyzip.ZipError):
        pyzip.parse_probe("Traceback ...")


def test_member_names() -> None:
    assert pyzip.member("json/__pycache__/decoder.cpython-311.pyc", TAG) == "json/decoder.pyc"
    assert pyzip.member("__pycache__/enum.cpython-311.pyc", TAG) == "enum.pyc"
    assert pyzip.member("ccpu/agent/__pycache__/__init__.cpython-311.pyc", TAG) == "ccpu/agent/__init__.pyc"
    assert pyzip.member("json/decoder.py", TAG) is None
    assert pyzip.member("__pycache__/enum.cpython-312.pyc", TAG) is None


def test_a_package_goes_in_whole_and_other_modules_stay_out() -> None:
    """A package found in the zip has its __path__ there only: a submodule left out would be lost."""
    ready = pyzip.parse_probe(json.dumps({"json": "/l/json/__init__.py", "enum": "/l/enum.py",
                                          "ccpu.agent.hello": "/s/ccpu/agent/hello.py",
                                          "ccpu": "/s/ccpu/__init__.py", "ccpu.agent": "/s/ccpu/agent/__init__.py"}))
    pycs = {"json/__init__.pyc": b"j", "json/tool.pyc": b"t", "enum.pyc": b"e", "shutil.pyc": b"s",
            "ccpu/__init__.pyc": b"c", "ccpu/agent/__init__.pyc": b"a", "ccpu/agent/hello.pyc": b"h",
            "ccpu/agent/container.pyc": b"k", "ccpu/linux/__init__.pyc": b"l", "jsonx.pyc": b"x"}
    chosen = pyzip.select(pycs, ready)
    assert list(chosen) == sorted(["json/__init__.pyc", "json/tool.pyc", "enum.pyc", "ccpu/__init__.pyc",
                                   "ccpu/agent/__init__.pyc", "ccpu/agent/hello.pyc", "ccpu/agent/container.pyc",
                                   "ccpu/linux/__init__.pyc"])
    with pytest.raises(pyzip.ZipError, match="enum"):  # a probed module without its .pyc
        pyzip.select({k: v for k, v in pycs.items() if k != "enum.pyc"}, ready)


def test_same_members_same_bytes_stored_with_fixed_dates() -> None:
    a = pyzip.write({"b.pyc": b"2" * 100, "a/x.pyc": b"1"})
    b = pyzip.write({"a/x.pyc": b"1", "b.pyc": b"2" * 100})
    assert a == b
    with zipfile.ZipFile(io.BytesIO(a)) as z:
        infos = z.infolist()
        assert [i.filename for i in infos] == ["a/x.pyc", "b.pyc"]
        assert {i.compress_type for i in infos} == {zipfile.ZIP_STORED}
        assert {i.date_time for i in infos} == {pyzip.DATE}
        assert z.read("b.pyc") == b"2" * 100
    assert pyzip.write({"a/x.pyc": b"1", "b.pyc": b"3" * 100}) != a


def test_the_agents_ready_path_imports_from_a_built_zip(tmp_path: Path) -> None:
    """The real probe against this tree, the zip built from freshly compiled .pyc, and an
    interpreter with only that zip for the project (and the stdlib packages in it) imports the
    ready path from it -- and a module of a zipped package outside the ready path too."""
    ready = pyzip.probe(sys.executable, str(ROOT))
    assert "ccpu.agent.hello" in ready.modules and "ccpu" in ready.packages
    assert not {"asyncio", "logging", "ccpu.agent.container"} & set(ready.modules)
    src = tmp_path / "src"
    shutil.copytree(ROOT / "ccpu", src / "ccpu", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-I", "-m", "compileall", "-q", "-f", "--invalidation-mode", "unchecked-hash",
                    str(src / "ccpu")], check=True, capture_output=True)
    pycs = [(str(p.relative_to(src)), p.read_bytes()) for p in src.rglob("*.pyc")]
    only_ours = pyzip.Ready(tuple(m for m in ready.modules if m.startswith("ccpu")), ("ccpu",), frozenset({"ccpu"}))
    blob, names = pyzip.build(pycs, only_ours, sys.implementation.cache_tag)
    assert "ccpu/agent/hello.pyc" in names and "ccpu/agent/container.pyc" in names
    zpath = tmp_path / "ready.zip"
    zpath.write_bytes(blob)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import ccpu.agent.__main__, ccpu.agent.container; "
            "print('\\n'.join(m.__file__ for n, m in sorted(sys.modules.items()) if n.startswith('ccpu')))")
    out = subprocess.run([sys.executable, "-S", "-I", "-c", code, str(zpath)], capture_output=True, text=True,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    files = out.stdout.split()
    assert files and all(f.startswith(str(zpath) + "/") for f in files), files
