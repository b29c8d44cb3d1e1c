"""Find the pinned .proto sources of the containerd API, wherever this machine has them.

Why pins: the stubs are generated at build time (``hack/gen_protos.py``, run by ``setup.py``
when a wheel is built and by ``hack/setup.sh`` for the dev tree), never committed.  For the
result to be the same on every machine, the *inputs* must be: each file is pinned by its
module version and its sha256, and a copy is used only when its bytes match the pin.  So
where a copy comes from does not matter, and :data:`PIN_DIGEST` (a hash of the pins) stands
for the inputs in the generator's stamp without reading a single source.

Where copies are looked for, first match wins (every file checked against its sha256):

1. ``proto-src/<module>/<path>`` next to ``setup.py``: an sdist carries the files there
   (``setup.py``'s sdist hook), so a wheel built from an sdist needs no network;
2. a Go source tree laid out by import path: ``$FRACTAL_GOCODE``, else Debian's
   ``/usr/share/gocode/src`` (golang-github-containerd-containerd-dev and friends);
3. Go's module cache: ``<GOMODCACHE>/<module>@<version>/<path>`` (extracted), or the module
   zip in ``<GOMODCACHE>/cache/download`` (checked against its go.sum ``h1:`` hash);
4. the Go module proxy (``$GOPROXY``'s http(s) entries, default https://proxy.golang.org):
   the module zip, checked against the same ``h1:`` hash before any file of it is used.
   ``GOPROXY=off`` forbids downloads.

Debian's cgroups package patches ``metrics.proto`` (gogoproto options), so on Debian that one
module comes from 3 or 4; containerd's and gogo's files are byte-identical to the modules'.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Module:
    path: str  # the Go module path, e.g. github.com/containerd/containerd
    version: str
    h1: str  # go.sum's hash of the module zip (golang.org/x/mod/sumdb/dirhash Hash1)
    files: Mapping[str, str]  # path inside the module -> sha256 of its bytes

    @property
    def key(self) -> str:
        return f"{self.path}@{self.version}"


CONTAINERD = Module(
    "github.com/containerd/containerd", "v1.6.20", "h1:+itjwpdqXpzHB/QAiWc/BZCjjVfcNgw69w/oIeF4Oy0=", {
        "api/events/container.proto": "4e3f32df64aa58aedc106114bf137fdf55e03b9450655871b13e9ff7e67996c8",
        "api/events/content.proto": "7258a5bee1b9860d5c5ab465474802cae88bbe9880692fa88a6260f1c194b396",
        "api/events/image.proto": "01ae61f547a9b04e14b4e5e21a8e5085bf7e4e10bdce8cbd1470d6088a2b3d69",
        "api/events/namespace.proto": "a87474aa504b82a7e0ccacfca49997dea75ffb9f640ee25d097ac32e1ffdaff4",
        "api/events/snapshot.proto": "3dddbd62f95b0ba1f98945dd79a115eb8fc0bd679bf694046c0a92c81f1d13bc",
        "api/events/task.proto": "a65125b5b299889db4f7714743f643ce7ef53336da64b95b66ab2dfcebfa4d77",
        "api/services/containers/v1/containers.proto": "2224a77926abd1cd850614fbe59d3f0f781f6328d772d15b359971e96ac7e128",
        "api/services/content/v1/content.proto": "b218b8649a60429571c594ad300f50950a484db7c4a2a17416a5ed7e42300f9f",
        "api/services/diff/v1/diff.proto": "63a3e72282ec29cd5226f98ecf44af7cd6bc389528bfc052979d89e183d275bb",
        "api/services/events/v1/events.proto": "09fa5b6c84e8c888e0c8d9b343943b676ff63bcfa6f14da383e1eebd46cacf58",
        "api/services/images/v1/images.proto": "a8ac00f10a5ebb07b1617a7d3a09e820485e2c26f0041845526b870d75e5da17",
        "api/services/introspection/v1/introspection.proto": "f4aba784f0df3144d52201f2523d1999fc052bd8f0621ecc83323cab4b45b5b9",
        "api/services/leases/v1/leases.proto": "d741a0a29ba75ba198dd20584b9bbdf7f5e692b70378eac49ee9e375e8373313",
        "api/services/namespaces/v1/namespace.proto": "d6f2f37559fa758c1776281c1f9297c4daab163b8c3a6eb0971dd44bab6893fa",
        "api/services/snapshots/v1/snapshots.proto": "6cc5625ec416aa16c2ea4a2e83a017c43d84c93fc18420a53af80437372ac8e4",
        "api/services/tasks/v1/tasks.proto": "99724f0345c97ceb65ad174a59fb40069a4cdbd38b94c5f75e0a8d65a4cbde72",
        "api/services/ttrpc/events/v1/events.proto": "856f81436237e51be20361fe15f77b322a1fe6e8a9bd089ff98a6241c771fce6",
        "api/services/version/v1/version.proto": "6dd5c453b73f93d831e4deabf60b57b8809f3a3bc7d6885f08354c624268cf57",
        "api/types/descriptor.proto": "844afe66210e4c40d63fdeef640d11205006b56a89d2ffdc2486430f93e326e1",
        "api/types/metrics.proto": "beba6f0f4db465c2550790c1dd7981f89b2fcb41c61169d2058968ad90ba3224",
        "api/types/mount.proto": "9e90f6dc8dd031a967afb04e2b8373bad2b0ed3183301e555a8151911050d352",
        "api/types/platform.proto": "195a0f5ee587f28defeef2233295c75a909d39fb16c98e9c6e21feae04cfe20b",
        "api/types/task/task.proto": "b38936f1b43808891a8d4f81230fa5899e9e50a48683e53ece7d03e1fe02ff7e",
        # outside api/: the shim Task API, runtime and runc options, and the fieldpath plugin
        # that api/ imports
        "runtime/v2/task/shim.proto": "304a8e5cf17785853b00bcfd55a367ec50f10dec55ba0947bcb9db5e30a4eb89",
        "pkg/runtimeoptions/v1/api.proto": "71f1712b920b92859e6d8d44854b80a69698b36a4fea67c6071faf6ed474c2d4",
        "runtime/v2/runc/options/oci.proto": "a5bb5f1e4c4f32e0a254ec8658b7b5157cf762f0c34d7d965823b23ef6c96ef2",
        "protobuf/plugin/fieldpath.proto": "e6a23353e976a57ddca70338dd1e29961903d4a1d7ba38d7c7f80c432381e112",
    })
GOGO = Module(
    "github.com/gogo/protobuf", "v1.3.2", "h1:Ov1cvc58UF3b5XjBnZv7+opcTcQFZebYjWzi34vdm4Q=", {
        "gogoproto/gogo.proto": "f2f77edf7de807ded7884813d851656f4ccb18262db717a8f31061995f3e7324",
    })
# the cgroup v1 metrics a shim returns from Task.Stats (io.containerd.cgroups.v1.Metrics)
CGROUPS = Module(
    "github.com/containerd/cgroups", "v1.0.4", "h1:jN/mbWBEaz+T1pi5OFtnkQ+8qnmEbAr1Oo1FRm5B0dA=", {
        "stats/v1/metrics.proto": "000fb84dc08f042364ef13485b4d14d6cce945be5f6dd647e095625a1328604c",
    })
MODULES: tuple[Module, ...] = (CONTAINERD, GOGO, CGROUPS)

#: stands for every pinned input in the generator's stamp (a pin change = new stubs)
PIN_DIGEST = hashlib.sha256("".join(
    f"{m.key} {m.h1}\n" + "".join(f"  {p} {h}\n" for p, h in sorted(m.files.items()))
    for m in MODULES).encode()).hexdigest()

SDIST_DIR = "proto-src"
DEFAULT_GOCODE = "/usr/share/gocode/src"
DEFAULT_GOPROXY = "https://proxy.golang.org"
MAX_ZIP_BYTES = 64 << 20  # containerd v1.6.20's module zip is 2.8 MB


class SourceError(RuntimeError):
    pass


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def zip_h1(data: bytes) -> str:
    """go.sum's ``h1:`` hash of a module zip: sha256 over the sorted lines
    ``"<sha256 hex>  <name>\\n"`` of its files (dirhash.Hash1)."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        lines = "".join(f"{sha256(z.read(n))}  {n}\n" for n in sorted(z.namelist()))
    return "h1:" + base64.b64encode(hashlib.sha256(lines.encode()).digest()).decode()


def proxies(environ: Mapping[str, str]) -> list[str]:
    """The http(s) module proxies of ``$GOPROXY`` in order; none after ``off``."""
    out: list[str] = []
    for entry in environ.get("GOPROXY", DEFAULT_GOPROXY).replace("|", ",").split(","):
        entry = entry.strip()
        if entry == "off":
            break
        if entry.startswith(("https://", "http://")):
            out.append(entry.rstrip("/"))
    return out


def gomodcache(environ: Mapping[str, str]) -> Path:
    if environ.get("GOMODCACHE"):
        return Path(environ["GOMODCACHE"])
    gopath = (environ.get("GOPATH") or "").split(os.pathsep)[0]
    return Path(gopath or Path(environ.get("HOME", "/root")) / "go") / "pkg/mod"


def local_dirs(mod: Module, project: Path, environ: Mapping[str, str]) -> list[Path]:
    """Directories that may hold ``mod``'s files at their in-module paths, in trust-free
    order (every file is checked against its pin anyway)."""
    return [project / SDIST_DIR / mod.path,
            Path(environ.get("FRACTAL_GOCODE") or DEFAULT_GOCODE) / mod.path,
            gomodcache(environ) / mod.key]


Fetch = Callable[[str], bytes]


def http_get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as resp:  # noqa: S310 (https proxy URLs)
        data = resp.read(MAX_ZIP_BYTES + 1)
    if len(data) > MAX_ZIP_BYTES:
        raise SourceError(f"{url}: larger than {MAX_ZIP_BYTES} bytes")
    return data


def module_zip(mod: Module, environ: Mapping[str, str], fetch: Fetch) -> zipfile.ZipFile:
    """The module's zip from Go's download cache or a proxy, refused unless its h1 matches."""
    tried: list[str] = []
    cached = gomodcache(environ) / "cache/download" / mod.path / "@v" / f"{mod.version}.zip"
    candidates: list[tuple[str, Callable[[], bytes]]] = []
    if cached.is_file():
        candidates.append((str(cached), cached.read_bytes))
    for proxy in proxies(environ):
        url = f"{proxy}/{mod.path}/@v/{mod.version}.zip"
        candidates.append((url, lambda url=url: fetch(url)))
    for where, get in candidates:
        try:
            data = get()
        except (OSError, urllib.error.URLError, SourceError) as exc:
            tried.append(f"{where}: {exc}")
            continue
        try:
            got = zip_h1(data)
        except zipfile.BadZipFile:
            tried.append(f"{where}: not a zip file")
            continue
        if got != mod.h1:
            tried.append(f"{where}: hash {got}, pinned {mod.h1}")
            continue
        return zipfile.ZipFile(io.BytesIO(data))
    raise SourceError(f"module {mod.key} not found with its pinned hash ({'; '.join(tried) or 'GOPROXY=off'})")


def resolve(project: Path, environ: Mapping[str, str] | None = None,
            fetch: Fetch = http_get) -> dict[tuple[str, str], bytes]:
    """Bytes of every pinned file, keyed by (module path, path in module)."""
    env = os.environ if environ is None else environ
    out: dict[tuple[str, str], bytes] = {}
    for mod in MODULES:
        missing = []
        for rel, want in mod.files.items():
            for d in local_dirs(mod, project, env):
                try:
                    data = (d / rel).read_bytes()
                except OSError:
                    continue
                if sha256(data) == want:
                    out[(mod.path, rel)] = data
                    break
            else:
                missing.append(rel)
        if missing:
            with module_zip(mod, env, fetch) as z:
                for rel in missing:
                    data = z.read(f"{mod.key}/{rel}")
                    if sha256(data) != mod.files[rel]:
                        raise SourceError(f"{mod.key}/{rel}: sha256 differs from its pin")
                    out[(mod.path, rel)] = data
    return out
