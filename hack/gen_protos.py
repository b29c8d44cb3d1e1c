#!/usr/bin/env python3
"""Generate Python protobuf/gRPC stubs for the containerd API (and fractal's own) into ``ccpu/api/gen/``.

Why this exists: containerd's .proto files import each other as
``github.com/containerd/containerd/...`` and protoc turns import paths into Python
module paths, and ``github.com`` is not a valid Python package name. So we copy
the needed files into a staging tree under a rewritten path
(``ccpu/api/gen/containerd/...``, ``ccpu/api/gen/gogoproto/...``), rewrite their
``import "..."`` lines to match, and run grpcio-tools' protoc on that tree. The
proto ``package`` statements are left untouched, so fully-qualified wire names
(e.g. ``containerd.services.snapshots.v1.Snapshots``) stay exactly what containerd
expects; only the *file* names in the descriptor pool change.

Sources: the pinned files of ``hack/protosrc.py`` (containerd v1.6.20's API, gogo's
gogo.proto, cgroups' metrics.proto; each checked by sha256, found in an sdist, Debian's
golang-*-dev trees, Go's module cache or the Go module proxy) plus the 2.x-only files vendored
in this repo.  Mapping:

    github.com/containerd/containerd/api/<p>     -> ccpu/api/gen/containerd/<p>
    github.com/containerd/containerd/<other p>   -> ccpu/api/gen/containerd/<other p>
    github.com/containerd/cgroups/<p>            -> ccpu/api/gen/cgroups/<p>
                                                    (stats/v1/metrics.proto, the Task.Stats
                                                    payload io.containerd.cgroups.v1.Metrics)
    gogoproto/gogo.proto (gogo-protobuf)         -> ccpu/api/gen/gogoproto/gogo.proto
    google/protobuf/*.proto                      -> not staged (grpcio-tools ships them)
    google/rpc/status.proto                      -> not staged (googleapis-common-protos
                                                    provides google.rpc.status_pb2; staging
                                                    a private copy would register the symbol
                                                    google.rpc.Status twice)
    hack/protos/containerd/<p> (in this repo)    -> ccpu/api/gen/containerd/<p>
                                                    (containerd 2.x-only files, vendored from
                                                    the containerd/api module: the pinned tree
                                                    is 1.6's.  types/introspection.proto
                                                    = RuntimeInfo, what the shim's ``-info``
                                                    prints for containerd 2.x)
    hack/protos/fractal/<p> (in this repo)       -> ccpu/api/gen/fractal/<p>
                                                    (the project's own API: fractal.layers.v1,
                                                    the shim's live-layer service)

Two callers: ``hack/setup.sh`` (into this tree, for the dev install) and ``setup.py``'s
build_py hook (``generate(out_root=<build dir>)``, so every wheel carries stubs made from the
same pinned inputs).

Outputs are regenerated only when the inputs, this script or the grpcio-tools
version change (stamp file ``ccpu/api/gen/.stamp``), because the stubs are
imported by everything and regenerating them while something runs is wasteful.
The new tree is swapped in with renames so concurrent importers never see a
half-written package.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script (hack/setup.sh) or imported by setup.py
    sys.path.insert(0, str(REPO_ROOT))
from hack import protosrc  # noqa: E402

GEN_PKG = "ccpu/api/gen"  # as a path relative to the repo root / staging root
GEN_DIR = REPO_ROOT / GEN_PKG
STAMP_NAME = ".stamp"
# Bump when the staging/rewriting logic changes in a way that alters the output.
RECIPE_VERSION = "4"

GOCODE = Path(os.environ.get("FRACTAL_GOCODE", protosrc.DEFAULT_GOCODE))  # google/rpc fallback
CONTAINERD_IMPORT = protosrc.CONTAINERD.path
CGROUPS_IMPORT = protosrc.CGROUPS.path

# containerd 2.x-only protos, vendored (with their provenance) under hack/protos/containerd/:
# path there == path under containerd's api/ dir.  A file that is also pinned from the 1.6
# module is an error (the two would map to the same staged path).
VENDORED_DIR = REPO_ROOT / "hack/protos/containerd"
VENDORED_PROTOS = ("types/introspection.proto",)

# the project's own protos (package fractal.*): path there == import path under "fractal/"
PROJECT_DIR = REPO_ROOT / "hack/protos/fractal"
PROJECT_PROTOS = ("layers/v1/layers.proto",)

IMPORT_RE = re.compile(r'^(\s*import\s+(?:weak\s+|public\s+)?")([^"]+)(";.*)$', re.MULTILINE)


class GenError(RuntimeError):
    pass


@dataclass(frozen=True)
class StagedProto:
    origin: str  # where the bytes came from, for messages
    staged: str  # path relative to the staging root, e.g. ccpu/api/gen/containerd/...
    read: Callable[[], bytes]


def staged_name(import_path: str) -> str | None:
    """Map an import path as written in a .proto to its staged path.

    Returns None for files that are not staged (well-known google protos).
    """
    if import_path.startswith(CONTAINERD_IMPORT + "/"):
        rel = import_path[len(CONTAINERD_IMPORT) + 1 :]
        if rel.startswith("api/"):
            rel = rel[len("api/") :]
        return f"{GEN_PKG}/containerd/{rel}"
    if import_path.startswith(CGROUPS_IMPORT + "/"):
        return f"{GEN_PKG}/cgroups/{import_path[len(CGROUPS_IMPORT) + 1 :]}"
    if import_path in ("gogoproto/gogo.proto", "github.com/gogo/protobuf/gogoproto/gogo.proto"):
        return f"{GEN_PKG}/gogoproto/gogo.proto"
    if import_path.startswith("fractal/"):
        return f"{GEN_PKG}/{import_path}"
    if import_path.startswith("google/"):
        return None
    raise GenError(f"don't know how to stage imported proto {import_path!r}")


def collect_inputs() -> list[StagedProto]:
    """Every proto to stage, without reading the pinned ones (see :func:`input_digest`)."""
    pinned: dict[tuple[str, str], bytes] = {}

    def reader(key: tuple[str, str]) -> Callable[[], bytes]:
        def read() -> bytes:
            if not pinned:  # resolved once, on first use: may download
                try:
                    pinned.update(protosrc.resolve(REPO_ROOT))
                except protosrc.SourceError as exc:
                    raise GenError(f"containerd API protos: {exc}") from None
            return pinned[key]
        return read

    protos = [StagedProto(f"{m.key}/{rel}", _staged(f"{m.path}/{rel}"), reader((m.path, rel)))
              for m in protosrc.MODULES for rel in m.files]
    for rel in VENDORED_PROTOS:
        src = VENDORED_DIR / rel
        if not src.is_file():
            raise GenError(f"{src} not found (vendored proto missing from the checkout)")
        protos.append(StagedProto(str(src), _staged(f"{CONTAINERD_IMPORT}/api/{rel}"), src.read_bytes))
    for rel in PROJECT_PROTOS:
        src = PROJECT_DIR / rel
        if not src.is_file():
            raise GenError(f"{src} not found (project proto missing from the checkout)")
        protos.append(StagedProto(str(src), _staged(f"fractal/{rel}"), src.read_bytes))
    staged = [p.staged for p in protos]
    if len(set(staged)) != len(staged):
        raise GenError("two protos map to the same staged path")
    return protos


def _staged(import_path: str) -> str:
    name = staged_name(import_path)
    if name is None:
        raise GenError(f"{import_path} would not be staged")
    return name


def rewrite_imports(text: str, origin: str) -> str:
    def repl(m: re.Match[str]) -> str:
        target = staged_name(m.group(2))
        return m.group(0) if target is None else f"{m.group(1)}{target}{m.group(3)}"

    out = IMPORT_RE.sub(repl, text)
    if "github.com/" in "\n".join(l for l in out.splitlines() if l.lstrip().startswith("import")):
        raise GenError(f"unrewritten github.com import left in {origin}")
    return out


def well_known_include() -> Path:
    import grpc_tools  # type: ignore[import-untyped]

    path = Path(grpc_tools.__file__).parent / "_proto"
    if not (path / "google/protobuf/descriptor.proto").is_file():
        raise GenError(f"grpcio-tools well-known protos not found under {path}")
    return path


def google_rpc_include() -> Path:
    """Directory containing google/rpc/status.proto, preferring the pip package.

    The pip copy matches the google.rpc.status_pb2 module that is imported at
    run time; Debian's gogo/googleapis copy is the fallback.
    """
    candidates: list[Path] = []
    try:
        import google.rpc  # type: ignore[import-untyped]

        candidates += [Path(p).parent.parent for p in google.rpc.__path__]
    except ImportError:
        pass
    candidates.append(GOCODE / "github.com/gogo/googleapis")
    for c in candidates:
        if (c / "google/rpc/status.proto").is_file():
            return c
    raise GenError("google/rpc/status.proto not found: pip install googleapis-common-protos")


def tools_version() -> str:
    return importlib.metadata.version("grpcio-tools")


def input_digest(protos: list[StagedProto]) -> str:
    """Hash of everything the output depends on.  Pinned files count by their pins (the
    bytes used must match them), so checking the stamp needs neither network nor sources."""
    h = hashlib.sha256()
    h.update(f"recipe={RECIPE_VERSION}\ngrpcio-tools={tools_version()}\npins={protosrc.PIN_DIGEST}\n".encode())
    h.update(Path(__file__).read_bytes())
    for p in protos:
        h.update(p.staged.encode() + b"\0")
        if not p.origin.startswith(tuple(m.key + "/" for m in protosrc.MODULES)):
            h.update(hashlib.sha256(p.read()).digest())
    return h.hexdigest()


def up_to_date(digest: str, gen_dir: Path = GEN_DIR) -> bool:
    stamp = gen_dir / STAMP_NAME
    return stamp.is_file() and stamp.read_text().strip() == digest


def run_protoc(stage: Path, out: Path, protos: list[StagedProto]) -> None:
    args = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{stage}",
        f"-I{google_rpc_include()}",
        f"-I{well_known_include()}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *[p.staged for p in protos],
    ]
    # A subprocess rather than protoc.main() so we can drop the harmless
    # "Import gogoproto/gogo.proto is unused" warnings (containerd imports gogo
    # everywhere, the Go options are meaningless for Python).
    res = subprocess.run(args, capture_output=True, text=True)
    noise = [l for l in res.stderr.splitlines() if l and "is unused." not in l]
    if noise:
        print("\n".join(noise), file=sys.stderr)
    if res.returncode != 0:
        raise GenError(f"protoc failed with exit code {res.returncode}")


def add_init_files(root: Path) -> None:
    for d in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        init = d / "__init__.py"
        if not init.exists():
            init.write_text('"""Generated by hack/gen_protos.py; do not edit or commit."""\n')


def generate(force: bool = False, quiet: bool = False, out_root: Path = REPO_ROOT) -> bool:
    """Generate stubs into ``out_root/ccpu/api/gen`` if needed; return True if files were
    (re)written.  ``out_root``: this tree (dev), or setup.py's build dir (wheels)."""
    gen_dir = out_root / GEN_PKG
    protos = collect_inputs()
    digest = input_digest(protos)
    if not force and up_to_date(digest, gen_dir):
        if not quiet:
            print(f"gen_protos: {GEN_PKG} up to date ({len(protos)} protos)")
        return False
    if not quiet:
        print(f"gen_protos: generating {len(protos)} protos into {gen_dir} (grpcio-tools {tools_version()})")
    gen_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".gen-", dir=gen_dir.parent) as tmp:
        tmpdir = Path(tmp)
        stage, out = tmpdir / "stage", tmpdir / "out"
        for p in protos:
            dst = stage / p.staged
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text(rewrite_imports(p.read().decode("utf-8"), p.origin))
        out.mkdir()
        run_protoc(stage, out, protos)
        new_gen = out / GEN_PKG
        add_init_files(new_gen)
        (new_gen / STAMP_NAME).write_text(digest + "\n")
        # Swap in with renames so importers see either the old or the new tree.
        old = tmpdir / "old"
        if gen_dir.exists():
            gen_dir.rename(old)
        new_gen.rename(gen_dir)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--force", action="store_true", help="regenerate even if the stamp matches")
    ap.add_argument("--check", action="store_true", help="exit 1 if regeneration is needed")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)
    try:
        if args.check:
            ok = up_to_date(input_digest(collect_inputs()))
            print(f"gen_protos: {'up to date' if ok else 'needs regeneration'}")
            return 0 if ok else 1
        generate(force=args.force, quiet=args.quiet)
    except GenError as e:
        print(f"gen_protos: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
