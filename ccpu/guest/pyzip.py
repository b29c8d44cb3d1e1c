"""The agent's ready path as one file: the .pyc of every module the guest's agent imports before it
answers `hello`, in a stored (uncompressed) zip at the interpreter's own zip entry of sys.path
(``/usr/lib/python311.zip``, which CPython puts first on sys.path and which Debian leaves absent).

Why: under TCG each cold import is a virtio-blk request (plus EROFS metadata) for one small file;
in one contiguous file the system image's read-ahead brings the ready path in with one or two
requests (docs/vm.md "The guest's boot timeline").  Stored, not deflated: the guest would pay to
inflate under TCG, and zlib would be one more import.

Which modules: asked, at build time, from the guest's own interpreter (:data:`PROBE`: what
``ccpu/guest/init.sh`` runs, up to a `hello` answered on a socketpair), so the list follows the
agent's code.  A package goes in whole (every .pyc below its top-level directory): a package found
in the zip has its ``__path__`` in the zip only, so a submodule left out would become unimportable.
Extension modules (.so) cannot be imported from a zip and stay in lib-dynload.

Reproducible: names sorted, every timestamp 1980-01-01, fixed attributes (same .pyc -> same bytes).
"""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass

#: run by the guest's interpreter (-S -I) with the project's tree as argv[1]: the agent's import,
#: its argument parsing (the init's flags) and a first `hello` answered; prints the modules loaded
#: from files, as {name: origin}
PROBE = (
    "import json, sys, socket; sys.path.insert(0, sys.argv[1]); import ccpu.agent.__main__ as m; "
    "ns = m.parse_args(['--fd', '3', '--runc-root', '/r', '--bundle-root', '/b', '--layer-root', '/l', "
    "'--init-done', '/d', '--cgroup-parent', '/fractal', '--memory-reserve-mb', '64', '--nics']); "
    "a, b = socket.socketpair(); "
    "a.sendall(m.hello.wire.encode_control({'id': 1, 'op': 'hello', 'args': {'version': 1}})); "
    "g = m.hello.answer_first(b.fileno(), m.hello.features(ns.nics, False, m.hello.attest_available())); "
    "assert isinstance(g, m.hello.Greeted), g; "
    "import ccpu.linux.stdio; "
    "print(json.dumps({k: getattr(getattr(v, '__spec__', None), 'origin', None) or '' "
    "for k, v in sorted(sys.modules.items())}))"
)

#: fixed for every member: the zip's bytes depend only on the names and contents
DATE = (1980, 1, 1, 0, 0, 0)


class ZipError(ValueError):
    """The ready path cannot be put in a zip (probe failed, a module without its .pyc)."""


@dataclass(frozen=True)
class Ready:
    """The probe's answer: the top-level names whose files go into the zip, and which are packages."""

    modules: tuple[str, ...]  # every module loaded from a file (dotted names), sorted
    tops: tuple[str, ...]  # their top-level names that are .py modules or packages, sorted
    packages: frozenset[str]  # the tops that are packages


def zip_path(stdlib: str) -> str:
    """``/usr/lib/python3.11`` -> ``usr/lib/python311.zip`` (CPython's own sys.path entry: the
    prefix's lib dir + python + major + minor + .zip), relative to the guest's root."""
    head, tail = os.path.split(stdlib.rstrip("/"))
    if not tail.startswith("python") or "." not in tail:
        raise ZipError(f"{stdlib}: not a pythonX.Y stdlib directory")
    return f"{head.strip('/')}/{tail.replace('.', '')}.zip"


def parse_probe(text: str) -> Ready:
    """PROBE's output -> Ready.  Modules from .py files only (frozen, built-in and extension modules
    need no file of the zip).  Pure."""
    try:
        loaded = json.loads(text)
    except ValueError as e:
        raise ZipError(f"ready-path probe: unexpected output {text[-200:]!r}") from e
    if not isinstance(loaded, dict):
        raise ZipError("ready-path probe: expected an object")
    mods = sorted(k for k, v in loaded.items() if isinstance(v, str) and v.endswith(".py"))
    packages = {k for k in mods if "." not in k and str(loaded[k]).endswith("/__init__.py")}
    packages |= {k.split(".")[0] for k in mods if "." in k}
    tops = sorted({k.split(".")[0] for k in mods})
    return Ready(tuple(mods), tuple(tops), frozenset(packages))


def probe(python: str, project_root: str) -> Ready:
    """Run PROBE with the guest's interpreter against the project's tree."""
    r = subprocess.run([python, "-S", "-I", "-c", PROBE, project_root], capture_output=True, text=True,
                       timeout=120, env={"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"})
    if r.returncode != 0:
        raise ZipError(f"ready-path probe failed: {r.stderr.strip()[-400:]}")
    return parse_probe(r.stdout)


def member(rel: str, cache_tag: str) -> str | None:
    """A .pyc's path below the stdlib dir -> its name in the zip (``json/__pycache__/decoder.
    cpython-311.pyc`` -> ``json/decoder.pyc``); None for anything else.  Pure."""
    d, name = os.path.split(rel)
    suffix = f".{cache_tag}.pyc"
    if os.path.basename(d) != "__pycache__" or not name.endswith(suffix):
        return None
    parent = os.path.dirname(d)
    return f"{parent + '/' if parent else ''}{name[:-len(suffix)]}.pyc"


def select(pycs: dict[str, bytes], ready: Ready) -> dict[str, bytes]:
    """The zip's members from {name in the zip: bytes} (all .pyc of the stdlib dir, as
    :func:`member` names them): each top-level module's .pyc, each top-level package whole.
    Every probed module must have its .pyc.  Pure."""
    out = {}
    for name, data in pycs.items():
        if "/" in name:  # below a package's directory
            keep = name.split("/")[0] in ready.packages
        else:  # a top-level module
            keep = name.removesuffix(".pyc") in ready.tops and name.removesuffix(".pyc") not in ready.packages
        if keep:
            out[name] = data
    for mod in ready.modules:
        parts = mod.split(".")
        want = ("/".join(parts) + ".pyc", "/".join(parts) + "/__init__.pyc")
        if not any(w in out for w in want):
            raise ZipError(f"ready-path module {mod} has no .pyc in the guest")
    return dict(sorted(out.items()))


def write(members: dict[str, bytes]) -> bytes:
    """A stored zip of ``members`` (name -> bytes), sorted, fixed dates and modes: same members,
    same bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name in sorted(members):
            info = zipfile.ZipInfo(name, DATE)
            info.compress_type = zipfile.ZIP_STORED
            info.create_system = 3
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            z.writestr(info, members[name])
    return buf.getvalue()


def build(pycs: Sequence[tuple[str, bytes]], ready: Ready, cache_tag: str) -> tuple[bytes, list[str]]:
    """(zip bytes, member names) from (path below the stdlib dir, bytes) pairs of compiled .pyc."""
    by_name = {}
    for rel, data in pycs:
        name = member(rel, cache_tag)
        if name is not None:
            by_name[name] = data
    chosen = select(by_name, ready)
    return write(chosen), list(chosen)
