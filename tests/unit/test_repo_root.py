"""Where the shim and the snapshotter learn the repo root (shim/config.py repo_root), and the
hint an "outside the agent's roots" error carries (shim/errors.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ccpu import errdefs

from ccpu.defaults import DEFAULT_ROOT
from shim import config, errors
from snapshotter import server


def test_root_from_the_global_file(tmp_path: Path) -> None:
    f = tmp_path / "config.toml"
    f.write_text('root = "/srv/x/"\nmode = "host"\n')
    r = config.repo_root({"FRACTAL_CONFIG": str(f)})
    assert r.path == "/srv/x" and r.source == f"root in {f}"


def test_environment_wins_over_the_file(tmp_path: Path) -> None:
    f = tmp_path / "config.toml"
    f.write_text('root = "/srv/x"\n')
    r = config.repo_root({"FRACTAL_CONFIG": str(f), "FRACTAL_ROOT": "/srv/y"})
    assert r.path == "/srv/y" and "FRACTAL_ROOT" in r.source


def test_default_when_nothing_says_otherwise(tmp_path: Path) -> None:
    r = config.repo_root({}, read=lambda path, required: config.Config())
    assert r.path == DEFAULT_ROOT and "no root in /etc/fractal/config.toml" in r.source


@pytest.mark.parametrize("bad", ['root = "relative/dir"', "root = 3", 'root = "/a\\u0000b"'])
def test_a_bad_root_is_an_error_naming_the_file(tmp_path: Path, bad: str) -> None:
    f = tmp_path / "config.toml"
    f.write_text(bad + "\n")
    with pytest.raises(config.ConfigError, match=f"{f}: root: expected an absolute directory path"):
        config.repo_root({"FRACTAL_CONFIG": str(f)}, strict=True)
    lenient = config.repo_root({"FRACTAL_CONFIG": str(f)})  # the shim: its sandbox fails with the error
    assert lenient.path == DEFAULT_ROOT and "expected an absolute directory path" in lenient.source


def test_a_runtime_config_file_cannot_move_the_root(tmp_path: Path) -> None:
    glob, rt = tmp_path / "config.toml", tmp_path / "vm.toml"
    glob.write_text('root = "/srv/x"\n')
    rt.write_text('root = "/srv/elsewhere"\n')
    with pytest.raises(config.ConfigError, match="root can only be set in the global config file"):
        config.resolve({}, runtime_config=str(rt), global_file=str(glob))
    rt.write_text('mode = "host"\n')
    assert config.resolve({}, runtime_config=str(rt), global_file=str(glob)).root == "/srv/x"


def test_outside_roots_error_says_where_the_root_came_from(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "config.toml"
    f.write_text('mode = "host"\n')
    monkeypatch.setenv("FRACTAL_CONFIG", str(f))
    monkeypatch.delenv("FRACTAL_ROOT", raising=False)
    err = errors.to_ttrpc(errdefs.InvalidArgument("work dir '/srv/x/active/2/work' is outside the agent's roots"))
    assert f"the shim's repo root is {DEFAULT_ROOT} (the default: no root in {f}" in err.message
    assert f'set root = "..." in {f}' in err.message and "FRACTAL_ROOT" in err.message
    other = errors.to_ttrpc(errdefs.InvalidArgument("args must be a list"))
    assert other.message == "args must be a list"


def test_snapshotter_default_root_comes_from_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "config.toml"
    f.write_text("root = 7\n")
    monkeypatch.setenv("FRACTAL_CONFIG", str(f))
    monkeypatch.delenv("FRACTAL_ROOT", raising=False)
    served: list[Path] = []
    monkeypatch.setattr(server, "serve", lambda root, address, **kw: served.append(root))
    monkeypatch.setattr(server.asyncio, "run", lambda coro: None)
    monkeypatch.setattr("ccpu.logfmt.setup", lambda *a, **kw: None)  # leave the test's logging alone
    assert server.main(["--address", str(tmp_path / "s.sock")]) == 1  # a bad file: refuse to start
    f.write_text(f'root = "{tmp_path}/repo"\n')
    assert server.main(["--address", str(tmp_path / "s.sock")]) == 0
    assert served == [tmp_path / "repo"]
