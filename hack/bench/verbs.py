#!/usr/bin/env python3
"""Benchmark the per-process cost of the shim's verbs and the CLI: console script vs launcher.

containerd executes ``containerd-shim-fractal-v1`` for ``start`` and again for ``delete`` after
every shim exit; users run ``fractal``.  Each is a whole Python process, so its figure is
interpreter start + ``site`` + imports + work.  Measured here, per process, CPU (user+sys of the
child, ``getrusage(RUSAGE_CHILDREN)``: less sensitive to other load than wall time) and wall,
median of ``--runs``, all cases alternating in every round:

* ``delete`` after a clean exit (a bundle holding ``config.json`` and the ``address`` file
  ``start`` writes; no runc state, nothing mounted) and ``fractal --help``,
* each through the console script pip wrote (``site`` runs) and through the ``python -S``
  launcher ``fractal install`` writes (ccpu/cli/launcher.py; rendered here for both),
* the floors ``python3 -c pass`` and ``python3 -S -c pass``;
* with ``--base DIR`` (a tree of an older commit, e.g. ``git archive BASE ccpu shim | tar -x -C
  DIR``) each case also with ``PYTHONPATH=DIR``, for a before/after in the same run.

No containerd needed.  ``start`` is not here (it needs a containerd to answer): hack/bench/shim.py
measures it end to end.

    python3 hack/bench/verbs.py [--runs 15] [--base DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO))

from ccpu.cli import launcher  # noqa: E402
from hack.bench.common import byte_compile, launcher_paths  # noqa: E402


def one(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall ms, CPU ms) of one process."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.monotonic()
    r = subprocess.run(argv, capture_output=True, env=env, timeout=120)
    wall = (time.monotonic() - t) * 1e3
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise RuntimeError(f"{argv} failed ({r.returncode}): {r.stderr[-400:]!r}")
    return wall, (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--base", type=Path, help="an older tree to compare with (PYTHONPATH=BASE)")
    ap.add_argument("--json", type=Path, metavar="FILE")
    args = ap.parse_args(argv)
    py = sys.executable
    scripts = Path(sysconfig.get_path("scripts"))
    work = Path(tempfile.mkdtemp(prefix="fractal-bench-verbs-"))
    try:
        return measure(args, py, scripts, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(args: argparse.Namespace, py: str, scripts: Path, work: Path) -> int:
    byte_compile()  # as an install has it (and PYTHONDONTWRITEBYTECODE would recompile every run)
    if args.base:
        import compileall

        compileall.compile_dir(str(args.base), quiet=1)
    paths = launcher_paths(py)
    for mod, name in (("shim.main", "shim"), ("ccpu.cli", "fractal")):
        (work / name).write_text(launcher.render(py, paths, mod))
        (work / name).chmod(0o755)
    bundle = work / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps({"annotations": {"io.fractal.mode": "host"}}))
    (bundle / "address").write_text("unix:///run/containerd/s/" + "ab" * 32)
    delete = ["-namespace", "ns", "-address", str(work / "nonexistent.sock"), "-publish-binary", "/bin/true",
              "-id", "c1", "-bundle", str(bundle), "delete"]
    cases = {
        "delete, console script": [str(scripts / "containerd-shim-fractal-v1"), *delete],
        "delete, launcher -S": [str(work / "shim"), *delete],
        "fractal --help, console script": [str(scripts / "fractal"), "--help"],
        "fractal --help, launcher -S": [str(work / "fractal"), "--help"],
        "python3 -c pass": [py, "-c", "pass"],
        "python3 -S -c pass": [py, "-S", "-c", "pass"],
    }
    trees = {"this": str(REPO)}
    if args.base:
        trees = {"base": str(args.base.resolve()), **trees}
    raw: dict[str, dict[str, list[tuple[float, float]]]] = {c: {t: [] for t in trees} for c in cases}
    load0 = os.getloadavg()
    for _ in range(args.runs):
        for case, cmd in cases.items():
            for tree, path in trees.items():
                env = dict(os.environ, PYTHONPATH=path, FRACTAL_RUN_DIR=str(work / "run"))
                raw[case][tree].append(one(cmd, env))
    load1 = os.getloadavg()
    result: dict[str, Any] = {"command": " ".join(["hack/bench/verbs.py", *sys.argv[1:]]),
                              "runs": args.runs, "trees": trees, "loadavg": [load0[0], load1[0]], "cases": {}}
    print(f"per process, median of {args.runs} (ms); load average {load0[0]:.1f} -> {load1[0]:.1f}")
    print(f"{'':34s}" + "".join(f"{t + ' CPU':>12s}{t + ' wall':>12s}" for t in trees))
    for case in cases:
        row = {t: {"cpu_ms": statistics.median(c for _, c in raw[case][t]),
                   "wall_ms": statistics.median(w for w, _ in raw[case][t])} for t in trees}
        result["cases"][case] = row
        print(f"{case:34s}" + "".join(f"{row[t]['cpu_ms']:12.1f}{row[t]['wall_ms']:12.1f}" for t in trees))
    c = result["cases"]
    for what in ("delete", "fractal --help"):
        a, b = c[f"{what}, launcher -S"]["this"]["cpu_ms"], c[f"{what}, console script"]["this"]["cpu_ms"]
        print(f"{what}: launcher / console script CPU = {a / b:.2f}x")
    print(f"command: {result['command']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
