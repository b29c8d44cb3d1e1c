"""ccpu/client/registryauth.py: which auth file and entry give a registry's credentials; the
pull's flags and challenge handling in ccpu/cli/images.py (the pure parts)."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from ccpu.cli import images as M
from ccpu.client import registryauth as RA


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def no_helper(helper: str, server: str) -> None:
    raise AssertionError(f"no helper expected, got {helper} for {server}")


def test_auth_files_order(tmp_path: Path) -> None:
    env = {"REGISTRY_AUTH_FILE": "/x/auth.json", "XDG_RUNTIME_DIR": "/run/user/0"}
    assert RA.auth_files(env, Path("/root")) == [
        Path("/x/auth.json"), Path("/run/user/0/containers/auth.json"),
        Path("/root/.config/containers/auth.json"), Path("/root/.docker/config.json")]
    assert RA.auth_files({"DOCKER_CONFIG": "/d", "XDG_CONFIG_HOME": "/c"}, Path("/h")) == [
        Path("/c/containers/auth.json"), Path("/d/config.json")]


@pytest.mark.parametrize("key,norm", [
    ("https://index.docker.io/v1/", "index.docker.io"),
    ("quay.io", "quay.io"), ("http://127.0.0.1:5000/", "127.0.0.1:5000"),
    ("quay.io/team/app", "quay.io/team/app"),
])
def test_normalize_key(key: str, norm: str) -> None:
    assert RA.normalize_key(key) == norm


def test_candidate_keys_most_specific_first() -> None:
    assert RA.candidate_keys("quay.io", "team/app") == ["quay.io/team/app", "quay.io/team", "quay.io"]
    assert "index.docker.io" in RA.candidate_keys("docker.io", "library/busybox")


def test_inline_auth_and_repository_entries() -> None:
    doc = {"auths": {"quay.io": {"auth": b64("host:pw1")}, "quay.io/team": {"auth": b64("team:pw:2")}}}
    c = RA.from_document(doc, "quay.io", "team/app", "f.json", no_helper)
    assert (c.username, c.password, c.source) == ("team", "pw:2", "f.json")  # password may hold ':'
    c = RA.from_document(doc, "quay.io", "other/app", "f.json", no_helper)
    assert (c.username, c.password) == ("host", "pw1")
    assert RA.from_document(doc, "ghcr.io", "x/y", "f.json", no_helper) is None


def test_docker_hub_legacy_key() -> None:
    doc = {"auths": {"https://index.docker.io/v1/": {"auth": b64("me:pw")}}}
    assert RA.from_document(doc, "docker.io", "library/busybox", "f", no_helper).username == "me"


def test_credential_helpers() -> None:
    calls = []

    def helper(name: str, server: str) -> tuple[str, str]:
        calls.append((name, server))
        return ("u", "secret")

    doc = {"auths": {"other.io": {}}, "credHelpers": {"ghcr.io": "pass"}, "credsStore": "desktop"}
    c = RA.from_document(doc, "ghcr.io", "a/b", "f", helper)
    assert c.password == "secret" and "docker-credential-pass" in c.source
    RA.from_document(doc, "quay.io", "a/b", "f", helper)
    assert calls == [("pass", "ghcr.io"), ("desktop", "quay.io")]


def test_bad_entries_name_the_file_not_the_secret() -> None:
    with pytest.raises(RA.RegistryAuthError, match="f.json") as e:
        RA.from_document({"auths": {"r.io": {"auth": "!!not base64 TOPSECRET"}}}, "r.io", "a", "f.json", no_helper)
    assert "TOPSECRET" not in str(e.value)
    with pytest.raises(RA.RegistryAuthError, match="identity token"):
        RA.from_document({"auths": {"r.io": {"identitytoken": "tok"}}}, "r.io", "a", "f", no_helper)


def test_find_first_file_with_an_entry_wins(tmp_path: Path) -> None:
    first = tmp_path / "first.json"
    first.write_text(json.dumps({"auths": {"other.io": {"auth": b64("o:o")}}}))
    docker = tmp_path / "home" / ".docker" / "config.json"
    docker.parent.mkdir(parents=True)
    docker.write_text(json.dumps({"auths": {"r.io": {"auth": b64("d:pw")}}}))
    env = {"REGISTRY_AUTH_FILE": str(first)}
    c = RA.find("r.io", "a/b", env=env, home=tmp_path / "home", run_helper=no_helper)
    assert (c.username, c.source) == ("d", str(docker))
    first.write_text(json.dumps({"auths": {"r.io": {"auth": b64("a:pw")}}}))
    assert RA.find("r.io", "a/b", env=env, home=tmp_path / "home", run_helper=no_helper).username == "a"
    assert RA.find("none.io", "a/b", env=env, home=tmp_path / "home", run_helper=no_helper) is None


def test_find_broken_file_does_not_quote_it(tmp_path: Path) -> None:
    bad = tmp_path / "auth.json"
    bad.write_text('{"auths": {"r.io": {"auth": "TOPSECRET"')
    with pytest.raises(RA.RegistryAuthError, match="is not JSON") as e:
        RA.find("r.io", "a", env={"REGISTRY_AUTH_FILE": str(bad)}, home=tmp_path, run_helper=no_helper)
    assert "TOPSECRET" not in str(e.value)


def test_credentials_never_print_their_password() -> None:
    c = RA.Credentials("alice", "TOPSECRET", "f.json")
    assert "TOPSECRET" not in repr(c) and "TOPSECRET" not in str(c) and "alice" in str(c)


@pytest.mark.parametrize("header,scheme,backend", [
    ('Basic realm="fractal-test"', "basic", "basic"),
    ('Bearer realm="https://auth.docker.io/token",service="registry.docker.io"', "bearer", "token"),
    (None, None, "token"), ("", None, "token"),
])
def test_challenge_picks_oras_backend(header, scheme, backend) -> None:  # noqa: ANN001
    assert M.challenge_scheme(header) == scheme
    assert M.oras_backend(scheme) == backend


def test_password_stdin_first_line() -> None:
    assert M.read_password(io.StringIO("p w:d\nnext\n")) == "p w:d"
    assert M.read_password(io.StringIO("pw\r\n")) == "pw"
    with pytest.raises(M.ImportError_, match="no password"):
        M.read_password(io.StringIO(""))


def test_flag_combinations_are_usage_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(M.UsageError, match="needs --username"):
        M.command_line_credentials(SimpleNamespace(username=None, password_stdin=True))
    monkeypatch.setattr("sys.stdin", io.StringIO("pw\n"))
    with pytest.raises(M.UsageError, match="needs --password-stdin"):
        M.command_line_credentials(SimpleNamespace(username="u", password_stdin=False))
    c = M.command_line_credentials(SimpleNamespace(username="u", password_stdin=True))
    assert (c.username, c.password) == ("u", "pw")
    assert M.command_line_credentials(SimpleNamespace(username=None, password_stdin=False)) is None
