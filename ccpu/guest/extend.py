"""The guest's extensions: files the user adds (`fractal guest build --add HOST:GUEST`) and commands
its init supervises beside the agent (`--run-at-boot CMD`) -- what a cpud user needs (docs/vm.md
"Extending the guest").

Why a record in the cache (``$FRACTAL_CACHE/guest/extensions.json``) rather than flags only: every
later build -- the shim's on-demand one before a sandbox boots, `fractal vm run`'s -- must produce
the same extended guest, so the extensions are part of the guest's configuration until replaced or
cleared.  The added files are read from the host at every build and hashed like every other
source: different content gives a different build (and initramfs hash), the same content the same.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .source import Source

RECORD = "extensions.json"
RUN_AT_BOOT_FILE = "etc/fractal/run-at-boot"  # one command per line, read by init.sh
MAX_RUN_AT_BOOT = 16
MAX_COMMAND = 4096
# guest paths an addition may not go below: mount points that would hide it at boot
# (/work, /repo: shares), the init and fractal's own configuration
RESERVED = ("init", "proc", "sys", "dev", "run", "tmp", "repo", "work", ".image", ".root", "etc/fractal")


class ExtensionError(ValueError):
    """An --add or --run-at-boot the build cannot honour (the message says which and why)."""


@dataclass(frozen=True)
class Add:
    host: str  # absolute path on the host (a file or a directory)
    guest: str  # normalised guest path without the leading slash


@dataclass(frozen=True)
class Extensions:
    adds: tuple[Add, ...] = ()
    run_at_boot: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.adds or self.run_at_boot)

    def to_json(self) -> dict:
        return {"add": [{"host": a.host, "guest": "/" + a.guest} for a in self.adds],
                "run_at_boot": list(self.run_at_boot)}

    @classmethod
    def from_json(cls, data: dict) -> Extensions:
        try:
            adds = tuple(parse_add(f"{a['host']}:{a['guest']}") for a in data.get("add", []))
            cmds = tuple(check_command(c) for c in data.get("run_at_boot", []))
        except (TypeError, KeyError, AttributeError) as exc:
            raise ExtensionError(f"malformed extensions record: {exc!r}") from None
        return cls(adds, cmds)


def parse_add(spec: str) -> Add:
    """``HOST_PATH:GUEST_PATH`` -> Add.  The guest path is absolute, has no ``..`` and is not below a
    reserved path; the host path must exist (checked again when the build reads it)."""
    host, sep, guest = spec.rpartition(":")
    if not sep or not host or not guest:
        raise ExtensionError(f"--add {spec!r}: expected HOST_PATH:GUEST_PATH")
    if not guest.startswith("/"):
        raise ExtensionError(f"--add {spec!r}: the guest path must be absolute")
    if ".." in guest.split("/"):
        raise ExtensionError(f"--add {spec!r}: the guest path may not contain '..'")
    norm = posixpath.normpath(guest).strip("/")
    if not norm:
        raise ExtensionError(f"--add {spec!r}: cannot replace the guest's root")
    for r in RESERVED:
        if norm == r or norm.startswith(r + "/"):
            raise ExtensionError(f"--add {spec!r}: /{r} is fractal's (a mount point or its own configuration)")
    return Add(os.path.abspath(host), norm)


def check_command(cmd: str) -> str:
    if not isinstance(cmd, str) or not cmd.strip():
        raise ExtensionError("--run-at-boot: empty command")
    if "\n" in cmd or "\0" in cmd or "\r" in cmd:
        raise ExtensionError(f"--run-at-boot {cmd!r}: one line only")
    if len(cmd) > MAX_COMMAND:
        raise ExtensionError(f"--run-at-boot: command longer than {MAX_COMMAND} bytes")
    return cmd


def make(adds: Iterable[str], run_at_boot: Iterable[str]) -> Extensions:
    """The extensions of the command line's flags (validated)."""
    parsed = tuple(parse_add(a) for a in adds)
    seen: dict[str, str] = {}
    for a in parsed:
        if a.guest in seen:
            raise ExtensionError(f"--add: /{a.guest} is named twice ({seen[a.guest]}, {a.host})")
        seen[a.guest] = a.host
    cmds = tuple(check_command(c) for c in run_at_boot)
    if len(cmds) > MAX_RUN_AT_BOOT:
        raise ExtensionError(f"--run-at-boot: at most {MAX_RUN_AT_BOOT} commands")
    return Extensions(parsed, cmds)


# ---------------------------------------------------------------------------------------------
# the record


def load(cache: Path) -> Extensions:
    path = cache / RECORD
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return Extensions()
    except (OSError, ValueError) as exc:
        raise ExtensionError(f"{path}: {exc} (fractal guest build --clear-extensions resets it)") from None
    if not isinstance(data, dict):
        raise ExtensionError(f"{path}: not a JSON object (fractal guest build --clear-extensions resets it)")
    return Extensions.from_json(data)


def save(cache: Path, ext: Extensions) -> None:
    """Write (atomically) or, for no extensions, remove the record."""
    path = cache / RECORD
    if not ext:
        path.unlink(missing_ok=True)
        return
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{RECORD}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(ext.to_json(), indent=2) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# the build's sources


def sources(ext: Extensions) -> list[Source]:
    """The files of every addition (a directory with its whole tree; symlinks inside it kept as
    symlinks, the named path itself followed) and the run-at-boot list.  Reads the host."""
    out: list[Source] = []
    for a in ext.adds:
        try:
            st = os.stat(a.host)
        except OSError as exc:
            raise ExtensionError(f"--add {a.host}:/{a.guest}: {exc.strerror}") from None
        if stat.S_ISREG(st.st_mode):
            out.append(Source(a.guest, stat.S_IFREG | stat.S_IMODE(st.st_mode), path=a.host))
        elif stat.S_ISDIR(st.st_mode):
            out += _tree(a)
        else:
            raise ExtensionError(f"--add {a.host}: not a regular file or a directory")
    if ext.run_at_boot:
        out.append(Source(RUN_AT_BOOT_FILE, stat.S_IFREG | 0o644,
                          data="".join(c + "\n" for c in ext.run_at_boot).encode()))
    return out


def _tree(a: Add) -> list[Source]:
    out = [Source(a.guest, stat.S_IFDIR | stat.S_IMODE(os.stat(a.host).st_mode))]
    for dirpath, dirnames, filenames in os.walk(a.host):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            dest = f"{a.guest}/{os.path.relpath(full, a.host)}"
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                out.append(Source(dest, stat.S_IFLNK | 0o777, link=os.readlink(full)))
            elif stat.S_ISDIR(st.st_mode):
                out.append(Source(dest, stat.S_IFDIR | stat.S_IMODE(st.st_mode)))
            elif stat.S_ISREG(st.st_mode):
                out.append(Source(dest, stat.S_IFREG | stat.S_IMODE(st.st_mode), path=full))
            else:
                raise ExtensionError(f"--add {a.host}: {full} is not a regular file, directory or symlink")
    return out


def check_conflicts(base: Sequence[Source], added: Sequence[Source]) -> None:
    """An addition may not replace a file of the guest, nor go below one of its non-directories
    (a symlink such as a multiarch lib dir would send it elsewhere).  Pure."""
    kinds = {s.dest: s.mode for s in base}
    for s in added:
        if s.dest in kinds and not (stat.S_ISDIR(s.mode) and stat.S_ISDIR(kinds[s.dest])):
            raise ExtensionError(f"--add: /{s.dest} is already part of the guest")
        parts = s.dest.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent in kinds and not stat.S_ISDIR(kinds[parent]):
                raise ExtensionError(f"--add: /{parent} is not a directory in the guest (needed for /{s.dest})")


def describe(ext: Extensions, added: Sequence[Source]) -> dict:
    """The manifest's account of the extensions: each addition's files and content hash."""
    adds = []
    for a in ext.adds:
        h = hashlib.sha256()
        files = 0
        for s in sorted(added, key=lambda s: s.dest):
            if s.dest == a.guest or s.dest.startswith(a.guest + "/"):
                h.update(f"{s.dest}\0{s.mode:o}\0".encode())
                h.update(hashlib.sha256(s.read()).digest())
                files += 1
        adds.append({"host": a.host, "guest": "/" + a.guest, "entries": files, "sha256": h.hexdigest()})
    return {"add": adds, "run_at_boot": list(ext.run_at_boot)}
