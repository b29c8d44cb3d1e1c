#!/usr/bin/env python3
"""Is the guest build reproducible?  Build it twice from the same inputs and compare every hash.

Issue 12 "Must hold": the guest build stays reproducible (same inputs -> same hashes, printed and
recorded).  A single ``--force`` rebuild in the same cache proves less than it seems: the second
build reads the same directories as the first.  Here each build runs `fractal guest build --force
--json` (the user's command, a subprocess) in a **fresh scratch cache** of its own (its own
``FRACTAL_CACHE``, its own ``XDG_CACHE_HOME``), so nothing of the first build can be reused by the
second.  Both scratch caches are made at the same path, one after the other (the first renamed away
once hashed): ``manifest.json`` records the kernel image's path in the cache, so builds in caches at
different paths differ in that file by that path alone.  The downloaded kernel is shared (its unpacked directory is symlinked into both scratch
caches), so this is not a network test; the kernel apt resolves today must already be cached (run
`fractal guest build` once), else the script stops before building.  The recorded extensions
(``guest/extensions.json``), an input of the build, are copied into both.

Printed side by side: every sha256 the manifest records (initramfs, system image, ready zip, kernel
image, UKI and its sections and PCRs, the inputs key), the sha256 of every file in the build
directory (``manifest.json`` itself included), and how long each build took.  Exit 0 only if every
hash is equal; exit 1 naming what differs; exit 2 when a build could not be made.

Usage (root or a user who can write --scratch; FRACTAL_CACHE says where the kernel is cached):

    FRACTAL_CACHE=/var/cache/fractal PYTHONPATH=. python3 hack/guest_repro.py [--layout image]
        [--scratch DIR] [--keep] [--json FILE] [--full]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Manifest keys whose values are hashes (a key ending in one of these, at any depth); any other
#: value that is 64 hex digits is taken for one too (``options.kernel``, ``options.uki_stub``).
HASH_KEYS = ("sha256", "pcr11", "pcr4", "pcr12", "authenticode", "inputs_key")
_HEX64 = re.compile(r"[0-9a-f]{64}")


# ---------------------------------------------------------------------------------------------
# pure


def manifest_hashes(manifest: Mapping, prefix: str = "") -> dict[str, str]:
    """Every hash a build manifest records, by dotted path (``image.sha256``, ``uki.sections..linux``:
    the UKI's per-section hashes are under ``sections``, whose keys are the hashes' names).  Pure."""
    out: dict[str, str] = {}
    for key, value in manifest.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            if key == "sections":  # {".linux": sha256, ...}: every value is a hash
                out.update({f"{path}.{k}": str(v) for k, v in value.items() if isinstance(v, str)})
            else:
                out.update(manifest_hashes(value, path + "."))
        elif isinstance(value, str) and (key.endswith(HASH_KEYS) or _HEX64.fullmatch(value)):
            out[path] = value
    return out


def build_hashes(manifest: Mapping, files: Mapping[str, str]) -> dict[str, str]:
    """One build's hashes: the manifest's, and ``file:NAME`` for every file of its build directory.  Pure."""
    return {**manifest_hashes(manifest), **{f"file:{name}": h for name, h in files.items()}}


@dataclass(frozen=True)
class Row:
    name: str
    one: str | None  # None: this build has no such hash
    two: str | None

    @property
    def equal(self) -> bool:
        return self.one is not None and self.one == self.two


def compare(one: Mapping[str, str], two: Mapping[str, str]) -> list[Row]:
    """Both builds' hashes side by side, by name (a name only one build has is a difference).  Pure."""
    return [Row(n, one.get(n), two.get(n)) for n in sorted(set(one) | set(two))]


def render(rows: list[Row], width: int = 16) -> str:
    """The side-by-side table: name, build 1, build 2 (the first ``width`` hex digits), verdict.  Pure."""
    name_w = max([len(r.name) for r in rows] + [4])
    cut = (lambda h: "(absent)" if h is None else h[:width])
    lines = [f"{'hash':<{name_w}}  {'build 1':<{width}}  {'build 2':<{width}}"]
    for r in rows:
        lines.append(f"{r.name:<{name_w}}  {cut(r.one):<{width}}  {cut(r.two):<{width}}  "
                     f"{'same' if r.equal else 'DIFFERS'}")
    return "\n".join(lines)


def verdict(rows: list[Row]) -> tuple[int, str]:
    """(exit status, the line that says it): 0 when every hash is equal, 1 naming those that differ.  Pure."""
    if not rows:
        return 1, "no hashes to compare"
    bad = [r.name for r in rows if not r.equal]
    if bad:
        return 1, f"NOT reproducible: {len(bad)} of {len(rows)} hashes differ: {', '.join(bad)}"
    return 0, f"reproducible: all {len(rows)} hashes equal"


# ---------------------------------------------------------------------------------------------
# I/O


class ReproError(RuntimeError):
    """A build could not be made (exit 2): not a reproducibility verdict."""


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check_kernel_cached(kernel_dir: Path) -> str:
    """The kernel apt resolves today must be in the cache already (so no build downloads)."""
    sys.path.insert(0, str(ROOT))
    from ccpu.guest import kernel

    try:
        package, version = kernel.resolve_package()
    except kernel.KernelError as exc:
        raise ReproError(f"cannot resolve the guest kernel with apt: {exc}") from None
    name = f"{kernel.release_of(package)}_{version}"
    if not (kernel_dir / name / "kernel.json").exists():
        raise ReproError(f"the kernel apt resolves ({name}) is not in {kernel_dir}: run `fractal guest build` "
                         "once first (this script does not download)")
    return name


def scratch_cache(base: Path, kernel_dir: Path, extensions: Path | None) -> Path:
    """A fresh FRACTAL_CACHE: guest/kernel -> the shared kernels (read-only use), the extensions copied."""
    guest = base / "guest"
    guest.mkdir(parents=True)
    (guest / "kernel").symlink_to(kernel_dir.resolve(), target_is_directory=True)
    if extensions is not None and extensions.exists():
        shutil.copy2(extensions, guest / "extensions.json")
    return base


def build_once(cache: Path, layout: str | None) -> tuple[dict[str, str], float, dict]:
    """`fractal guest build --force --json` in ``cache`` -> (its hashes, seconds, the JSON it printed)."""
    env = {**os.environ, "FRACTAL_CACHE": str(cache), "XDG_CACHE_HOME": str(cache / "xdg"),
           "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "ccpu.cli", "guest", "build", "--force", "--json"]
    if layout:
        cmd += ["--layout", layout]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    took = time.monotonic() - t0
    if proc.returncode != 0:
        raise ReproError(f"guest build in {cache} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    out = json.loads(proc.stdout)
    manifest_path = Path(out["manifest"])
    if not manifest_path.resolve().is_relative_to(cache.resolve()):
        raise ReproError(f"the build in {cache} wrote outside it: {manifest_path}")
    manifest = json.loads(manifest_path.read_text())
    files = {p.name: sha256_file(p) for p in sorted(manifest_path.parent.iterdir()) if p.is_file()}
    return build_hashes(manifest, files), took, out


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layout", choices=("image", "initramfs"), default=None,
                    help="passed to both builds (default: the build's default, as `fractal guest build`)")
    ap.add_argument("--scratch", type=Path, default=None, help="where the two scratch caches go (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="leave the scratch caches (to diff the builds' files)")
    ap.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the figures as JSON")
    ap.add_argument("--full", action="store_true",
                    help="print the hashes whole (default: their first 16 hex digits; compared whole either way)")
    args = ap.parse_args(argv)

    source = Path(os.environ.get("FRACTAL_CACHE", "/var/cache/fractal")) / "guest"
    kernel_dir = source / "kernel"
    try:
        kname = check_kernel_cached(kernel_dir)
    except ReproError as exc:
        print(f"guest_repro: {exc}", file=sys.stderr)
        return 2
    if args.scratch is not None:
        args.scratch.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="fractal-repro-", dir=args.scratch))
    print(f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {git_commit()}, kernel {kname}, "
          f"load {os.getloadavg()[0]:.1f}, scratch {base}", flush=True)
    try:
        hashes, times = [], []
        for n in (1, 2):
            cache = scratch_cache(base / "cache", kernel_dir, source / "extensions.json")
            h, took, _ = build_once(cache, args.layout)
            cache.rename(base / f"build{n}")  # the next build's fresh cache at the same path
            print(f"build {n}: {took:.1f} s in a fresh {cache} (load {os.getloadavg()[0]:.1f})", flush=True)
            hashes.append(h)
            times.append(took)
    except ReproError as exc:
        print(f"guest_repro: {exc}", file=sys.stderr)
        return 2
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    rows = compare(hashes[0], hashes[1])
    print(render(rows, width=64 if args.full else 16))
    status, line = verdict(rows)
    print(line)
    if args.json:
        args.json.write_text(json.dumps({"commit": git_commit(), "kernel": kname, "seconds": times,
                                         "builds": hashes, "status": status}, indent=2) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
