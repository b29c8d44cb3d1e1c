"""Registry credentials for `fractal image pull`: where docker and podman keep them, and which
entry answers for a given registry and repository.

Why our own reading instead of oras' `load_configs`: oras reads only ``~/.docker/config.json``
(plus paths it is handed), merges files in no defined order and matches hosts exactly, while a
user who ran ``podman login`` has the credentials in ``${XDG_RUNTIME_DIR}/containers/auth.json``
and one who set ``$REGISTRY_AUTH_FILE`` expects that file to win (containers-auth.json(5)).  So
this module finds the user name and password; oras still does the authenticating (its basic or
token backend, ccpu/cli/images.py), so we never build an Authorization header ourselves.

Secrets stay secret: `Credentials` never prints its password (``repr`` included), and no error
raised here quotes a file's content, only its path.

Stdlib only (the CLI's start-up); the only I/O is reading the files and running a docker
credential helper (`run_helper`, replaceable in tests).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

#: an auth file larger than this is not an auth file
MAX_AUTH_FILE = 1 << 20
DOCKER_HUB = "docker.io"
#: the names docker writes for Docker Hub in config.json
DOCKER_HUB_ALIASES = ("docker.io", "index.docker.io", "registry-1.docker.io", "index.docker.io/v1")


class RegistryAuthError(Exception):
    """Credentials were asked for and cannot be had; the message names the file or helper, never a secret."""


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)
    #: where they came from, for messages: a file path, a helper name or the command line
    source: str = "--username/--password-stdin"

    def __str__(self) -> str:
        return f"user {self.username!r} from {self.source}"


def auth_files(env: Mapping[str, str], home: Path) -> list[Path]:
    """The auth files to look in, most authoritative first (podman's order, then docker's).

    ``$REGISTRY_AUTH_FILE`` (podman, skopeo, buildah), ``${XDG_RUNTIME_DIR}/containers/auth.json``
    (``podman login``'s default), ``${XDG_CONFIG_HOME:-~/.config}/containers/auth.json``, then
    ``${DOCKER_CONFIG:-~/.docker}/config.json`` (``docker login``).
    """
    files: list[Path] = []
    if env.get("REGISTRY_AUTH_FILE"):
        files.append(Path(env["REGISTRY_AUTH_FILE"]))
    if env.get("XDG_RUNTIME_DIR"):
        files.append(Path(env["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    files.append(Path(env.get("XDG_CONFIG_HOME") or home / ".config") / "containers" / "auth.json")
    files.append(Path(env.get("DOCKER_CONFIG") or home / ".docker") / "config.json")
    seen: set[Path] = set()
    return [f for f in files if not (f in seen or seen.add(f))]  # type: ignore[func-returns-value]


def normalize_key(key: str) -> str:
    """An ``auths`` key as a bare ``host[:port][/path]``: docker writes ``https://index.docker.io/v1/``."""
    key = key.strip()
    for scheme in ("https://", "http://"):
        key = key.removeprefix(scheme)
    key = key.rstrip("/")
    for api in ("/v2", "/v1"):
        if key.endswith(api) and key.count("/") == 1:
            key = key[: -len(api)]
    return key


def candidate_keys(registry: str, repository: str) -> list[str]:
    """Keys that may hold credentials for ``registry/repository``, most specific first.

    podman allows per-repository entries (``quay.io/team/app``, then ``quay.io/team``), then the
    host; Docker Hub goes by several names.
    """
    hosts = list(DOCKER_HUB_ALIASES) if registry in DOCKER_HUB_ALIASES else [registry]
    keys: list[str] = []
    parts = [p for p in repository.split("/") if p]
    for n in range(len(parts), 0, -1):
        keys += [f"{h}/{'/'.join(parts[:n])}" for h in hosts]
    return keys + hosts


def _decode_auth(value: object, where: str) -> tuple[str, str]:
    if not isinstance(value, str):
        raise RegistryAuthError(f"{where}: 'auth' is not a string")
    try:
        text = base64.b64decode(value, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise RegistryAuthError(f"{where}: 'auth' is not base64 of user:password") from None
    user, sep, password = text.partition(":")
    if not sep or not user:
        raise RegistryAuthError(f"{where}: 'auth' is not base64 of user:password")
    return user, password


def from_document(doc: Mapping[str, object], registry: str, repository: str, source: str,
                  run_helper: Callable[[str, str], tuple[str, str] | None]) -> Credentials | None:
    """The credentials one auth file gives for ``registry/repository``, or None.

    Inline ``auths`` entries first; then ``credHelpers[registry]``, then ``credsStore`` (docker's
    credential helpers, run through ``run_helper(helper, server)``).
    """
    auths = doc.get("auths") if isinstance(doc.get("auths"), dict) else {}
    by_key = {normalize_key(k): v for k, v in auths.items() if isinstance(k, str)}  # type: ignore[union-attr]
    for key in candidate_keys(registry, repository):
        entry = by_key.get(key)
        if not isinstance(entry, dict):
            continue
        where = f"{source} (auths entry {key!r})"
        if entry.get("auth"):
            user, password = _decode_auth(entry["auth"], where)
            return Credentials(user, password, source)
        if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
            return Credentials(entry["username"], entry["password"], source)
        if entry.get("identitytoken"):
            raise RegistryAuthError(f"{where}: holds an identity token (OAuth refresh token), which "
                                    "fractal cannot use; log in with a user name and password")
    helpers = doc.get("credHelpers") if isinstance(doc.get("credHelpers"), dict) else {}
    helper = helpers.get(registry) or doc.get("credsStore")  # type: ignore[union-attr]
    if isinstance(helper, str) and helper:
        found = run_helper(helper, registry)
        if found:
            return Credentials(found[0], found[1], f"docker-credential-{helper} (named in {source})")
    return None


def run_docker_helper(helper: str, server: str, timeout: float = 30) -> tuple[str, str] | None:
    """``docker-credential-HELPER get``: (user, secret), or None when it knows no such server."""
    if not helper.replace("-", "").replace("_", "").isalnum():
        raise RegistryAuthError(f"credential helper name {helper[:40]!r} is not a plain name")
    binary = f"docker-credential-{helper}"
    try:
        r = subprocess.run([binary, "get"], input=server.encode(), capture_output=True, timeout=timeout)
    except FileNotFoundError:
        raise RegistryAuthError(f"{binary} (a docker credential helper named in an auth file) is not on PATH") from None
    except subprocess.TimeoutExpired:
        raise RegistryAuthError(f"{binary} get did not answer within {timeout:.0f}s") from None
    if r.returncode != 0:
        return None  # "credentials not found in native keychain"
    try:
        payload = json.loads(r.stdout)
        return str(payload["Username"]), str(payload["Secret"])
    except (ValueError, KeyError, TypeError):
        raise RegistryAuthError(f"{binary} get answered something that is not its JSON") from None


def read_auth_file(path: Path) -> dict | None:
    """The file's JSON object; None when it does not exist."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_AUTH_FILE + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise RegistryAuthError(f"cannot read auth file {path}: {e.strerror}") from None
    if len(data) > MAX_AUTH_FILE:
        raise RegistryAuthError(f"auth file {path} is larger than {MAX_AUTH_FILE} bytes")
    try:
        doc = json.loads(data)
    except ValueError as e:  # the position only: the text may hold secrets
        raise RegistryAuthError(f"auth file {path} is not JSON (line {getattr(e, 'lineno', '?')})") from None
    if not isinstance(doc, dict):
        raise RegistryAuthError(f"auth file {path} is not a JSON object")
    return doc


def find(registry: str, repository: str, env: Mapping[str, str] | None = None, home: Path | None = None,
         run_helper: Callable[[str, str], tuple[str, str] | None] = run_docker_helper) -> Credentials | None:
    """The first auth file (`auth_files` order) with credentials for ``registry/repository``."""
    env = os.environ if env is None else env
    home = Path(env.get("HOME") or Path.home()) if home is None else home
    for path in auth_files(env, home):
        doc = read_auth_file(path)
        if doc is not None:
            found = from_document(doc, registry, repository, str(path), run_helper)
            if found:
                return found
    return None


def login_hint(registry: str) -> str:
    """What to tell a user whose pull was refused for want of credentials."""
    return (f"log in with `docker login {registry}` or `podman login {registry}` (fractal reads "
            "$REGISTRY_AUTH_FILE, ${XDG_RUNTIME_DIR}/containers/auth.json, ~/.docker/config.json), "
            "or pass --username USER --password-stdin")
