"""ccpu/cli: the edge every command shares -- exit codes, help, version, global flags, JSON,
one-line errors -- run as the user runs it (``python3 -m ccpu.cli``, a fresh process)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from ccpu import cli
from ccpu.client.snapshots import lowerdirs
from ccpu.repo import Repo

TREE = Path(__file__).resolve().parents[2]


def fractal(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    e = {**os.environ, "PYTHONPATH": str(TREE), **(env or {})}
    return subprocess.run([sys.executable, "-m", "ccpu.cli", *args], capture_output=True, text=True, env=e,
                          cwd=TREE, timeout=60)


def test_bare_fractal_prints_help_and_succeeds_like_ctr() -> None:
    r = fractal()
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout.startswith("usage: fractal") and "layers" in r.stdout and "image" in r.stdout
    r = fractal("layers")  # a group alone: its own help
    assert r.returncode == 0 and r.stdout.startswith("usage: fractal layers") and "add" in r.stdout


@pytest.mark.parametrize("argv", [["bogus"], ["--bogus"], ["ps", "--bogus"], ["layers", "add", "c"],
                                  ["layers", "add", "--position", "middle", "c", "img"],
                                  ["image", "import", "/tmp/not-a-source-form"], ["repo", "nope"]])
def test_usage_errors_exit_2_with_one_line(argv: list[str]) -> None:
    r = fractal(*argv)
    assert r.returncode == 2, r
    assert r.stdout == "" and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("fractal") and "--help" in r.stderr


@pytest.mark.parametrize("flag", ["--version", "-v"])
def test_version(flag: str) -> None:
    want = tomllib.loads((TREE / "pyproject.toml").read_text())["project"]["version"]
    r = fractal(flag)
    assert r.returncode == 0 and r.stdout == f"fractal {want}\n"


def test_version_falls_back_to_the_trees_pyproject(monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib import metadata

    def missing(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", missing)
    assert cli.version() == tomllib.loads((TREE / "pyproject.toml").read_text())["project"]["version"]


def test_global_namespace_reaches_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    from ccpu.cli import ps

    seen = {}

    def fake(args) -> int:  # noqa: ANN001
        seen.update(address=args.address, namespace=args.namespace)
        return 0

    monkeypatch.setattr(ps, "cmd_ps", fake)
    monkeypatch.setattr(cli, "build_parser", _parser_with(ps, fake))
    assert cli.main(["-a", "/x.sock", "-n", "team", "ps"]) == 0
    assert seen == {"address": "/x.sock", "namespace": "team"}
    assert cli.main(["-n", "team", "ps", "-n", "mine"]) == 0  # the command's own flag wins
    assert seen["namespace"] == "mine"
    assert cli.main(["-n", "ps", "ps"]) == 0  # a namespace named like a command is still a namespace
    assert seen == {"address": None, "namespace": "ps"}


def _parser_with(module, func):  # noqa: ANN001, ANN202
    real = cli.build_parser

    def build(argv=None):  # noqa: ANN001, ANN202
        ap = real(argv)
        ap._subparsers._group_actions[0].choices[module.__name__.rsplit(".", 1)[-1]].set_defaults(func=func)
        return ap

    return build


def test_help_does_not_load_grpc_protobuf_or_sqlite() -> None:
    code = ("import sys, runpy\nsys.argv = ['fractal', '--help']\n"
            "try:\n    runpy.run_module('ccpu.cli', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'google', 'sqlite3', 'tarfile'))\n"
            "print('HEAVY', heavy, file=sys.stderr)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=TREE,
                       env={**os.environ, "PYTHONPATH": str(TREE)}, timeout=60)
    assert "HEAVY []" in r.stderr, r.stderr


def test_help_makes_no_group_parser_and_loads_no_group_module_or_heavy_stdlib() -> None:
    """`fractal --help` (issue 13: <= 80 ms whole process): the group list comes from the
    one-line helps alone -- no group's parser is built, no group module, logging, dataclasses
    or typing imported -- run under `python3 -S` as a launcher would, so `site` hides nothing."""
    import sysconfig

    code = ("import sys, argparse\n"
            "made = []\n"
            "init = argparse.ArgumentParser.__init__\n"
            "def counting(self, *a, **k):\n    made.append(k.get('prog'))\n    init(self, *a, **k)\n"
            "argparse.ArgumentParser.__init__ = counting\n"
            "before = set(sys.modules)\n"
            "from ccpu.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('MADE', len(made), 'LOADED', sorted(set(sys.modules) - before), file=sys.stderr)")
    path = os.pathsep.join([str(TREE), sysconfig.get_path("purelib")])
    r = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=TREE,
                       env={**os.environ, "PYTHONPATH": path}, timeout=60)
    line = next(ln for ln in r.stderr.splitlines() if ln.startswith("MADE"))
    made = int(line.split()[1])
    loaded = set(eval(line.split(" LOADED ", 1)[1]))  # noqa: S307 - our own printed list
    assert made <= 2, line  # fractal's parser and the probe that finds the named group
    # the CLI's own parsing modules only, no group's
    assert {m for m in loaded if m.startswith("ccpu.")} == {"ccpu.cli", "ccpu.cli.groups", "ccpu.cli.fastargs", "ccpu.cli.parser"}, line
    assert not loaded & {"logging", "dataclasses", "typing", "inspect", "grpc", "sqlite3"}, line
    assert all(f"    {g.name} " in r.stdout for g in cli.GROUPS), r.stdout  # every group listed
    names = [ln.split()[0] for ln in r.stdout.splitlines() if ln.startswith("    ") and ln[4:5].strip()]
    assert names[:len(cli.GROUPS)] == [g.name for g in cli.GROUPS], r.stdout  # in order


def test_a_group_not_named_first_still_gets_a_parser_when_asked() -> None:
    """The probe reads no group from `-n` without a value; the real parse then names one."""
    ap = cli.build_parser(["-n"])
    sub = ap._subparsers._group_actions[0]
    assert sub.choices["repo"].prog == "fractal repo" and "repo" in sub.choices
    assert sub.choices.get("nope") is None


def test_every_listing_command_takes_json() -> None:
    ap = cli.build_parser()
    groups = ap._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    listing = [("ps",), ("doctor",), ("repo", "ls"), ("repo", "du"), ("layers", "ls"), ("layers", "add"),
               ("layers", "rm"), ("image", "import"), ("image", "pull"), ("guest", "build"), ("guest", "show")]
    for path in listing:
        p = groups[path[0]]
        if len(path) == 2:
            p = p._subparsers._group_actions[0].choices[path[1]]  # type: ignore[union-attr]
        assert any("--json" in a.option_strings for a in p._actions), path


def _repo(root: Path) -> None:
    repo = Repo(root, background_removal=False)
    try:
        repo.prepare("ns/1/extract-a", "", {"containerd.io/snapshot.ref": "sha256:" + "a" * 64})
    finally:
        repo.close()


def test_repo_ls_and_du_json_parse(tmp_path: Path) -> None:
    _repo(tmp_path / "repo")
    r = fractal("repo", "ls", "--root", str(tmp_path / "repo"), "--json")
    assert r.returncode == 0, r.stderr
    assert isinstance(json.loads(r.stdout), list)
    r = fractal("repo", "du", "--root", str(tmp_path / "repo"), "--json")
    assert r.returncode == 0, r.stderr
    du = json.loads(r.stdout)
    assert du["snapshots"] == 1 and du["repo"] == str(tmp_path / "repo") and du["on_disk"] > 0


@pytest.mark.parametrize("damage", ["empty", "garbage", "truncated", "missing"])
def test_a_broken_metadata_db_is_one_line_not_a_traceback(tmp_path: Path, damage: str) -> None:
    root = tmp_path / "repo"
    _repo(root)
    db = root / "metadata.db"
    if damage == "empty":
        db.write_bytes(b"")
    elif damage == "garbage":
        db.write_bytes(os.urandom(8192))
    elif damage == "truncated":
        db.write_bytes(db.read_bytes()[:100])
    else:
        db.unlink()
    for cmd in ("ls", "du"):
        r = fractal("repo", cmd, "--root", str(root))
        assert r.returncode == 1, r
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert r.stderr.startswith(f"fractal: {root}") and ("metadata.db" in r.stderr), r.stderr
    if damage != "missing":
        r = fractal("--debug", "repo", "ls", "--root", str(root))  # --debug shows where it came from
        assert r.returncode == 1 and "Traceback" in r.stderr


def test_containerd_down_is_one_line(tmp_path: Path) -> None:
    for argv in (["ps"], ["layers", "ls", "c1"], ["ps", "--json"]):
        r = fractal("-a", str(tmp_path / "no.sock"), *argv)
        assert r.returncode == 1 and r.stdout == ""
        assert r.stderr.startswith("fractal: cannot reach containerd at") and len(r.stderr.splitlines()) == 1


def test_an_unexpected_failure_still_shows_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    from ccpu.cli import ps

    def broken(args) -> int:  # noqa: ANN001
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli, "build_parser", _parser_with(ps, broken))
    with pytest.raises(ZeroDivisionError):
        cli.main(["ps"])


def test_a_sqlite_error_outside_repo_is_not_swallowed() -> None:
    assert not cli.expected_failure(sqlite3.DatabaseError("x"))
    assert cli.expected_failure(OSError(2, "No such file"))


class _M:
    def __init__(self, type_: str, source: str, options: list[str]) -> None:
        self.type, self.source, self.options = type_, source, options


def test_lowerdirs_of_the_snapshotters_mounts() -> None:
    assert lowerdirs([_M("overlay", "overlay", ["index=off", "userxattr", "lowerdir=/r/layers/3/fs:/r/layers/1/fs"])]) \
        == ["/r/layers/3/fs", "/r/layers/1/fs"]
    assert lowerdirs([_M("bind", "/r/layers/1/fs", ["ro", "rbind"])]) == ["/r/layers/1/fs"]  # a one-layer view
    assert lowerdirs([_M("bind", "/r/active/4/fs", ["rw", "rbind"])]) == []  # nothing below an upper
    assert lowerdirs([_M("overlay", "overlay", ["workdir=/w", "upperdir=/u", "lowerdir=/r/layers/2/fs"])]) \
        == ["/r/layers/2/fs"]


def test_the_help_is_as_wide_as_argparse_makes_it_without_importing_shutil(monkeypatch) -> None:  # noqa: ANN001
    """ccpu.cli's formatter computes argparse's width itself (shutil's imports were ~5 ms of
    `fractal layers add`, issue 13): the same text for $COLUMNS set, unset and nonsense."""
    import argparse

    from ccpu import cli

    def both() -> tuple[str, str]:
        out = []
        for cls in (cli.Parser, argparse.ArgumentParser):
            p = cls(prog="fractal", description="word " * 60)
            p.add_argument("--flag", help="a help text long enough to wrap somewhere " * 4)
            out.append(p.format_help())
        return out[0], out[1]

    for columns in ("50", "173", None, "x", "-3"):
        if columns is None:
            monkeypatch.delenv("COLUMNS", raising=False)
        else:
            monkeypatch.setenv("COLUMNS", columns)
        ours, theirs = both()
        assert ours == theirs, columns
