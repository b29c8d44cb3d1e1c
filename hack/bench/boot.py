#!/usr/bin/env python3
"""`fractal boot` (issue 17 part 1): booting an image from the repo with no copy, against the
copy-based alternative (the image's root unpacked from a tarball, then booted), in the same run.

Alternated round by round on the `machine` test image (hack/testimages.py; its init prints a
line and powers off), medians reported:

- **repo**: ``fractal boot REF``: the image's repo layers shared read-only, stacked in the guest.
- **copy**: the alternative that extracts the image first (``run-tgz``, dracut's container root
  from a downloaded rootfs): a fresh unpack of the image's ``--export tgz`` tarball (into an empty
  cache, as a first boot of it does) + ``fractal boot`` of that tarball.  Its boot part alone is
  reported too.
- **bytes**: what each leaves on disk for the root: the repo approach adds nothing beyond the
  layers containerd already unpacked; the copy, the unpacked tree (``du``).

    python3 hack/bench/boot.py [--rounds 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO))

from hack.bench.common import (bench_env, byte_compile, command_line, dump_logs_on_failure, finish,  # noqa: E402
                               guarded, log, machine_info, require_root)

NS = "bench-boot"
MARKER = b"fractal-boot-oneshot: pid1=init"


def _boot(args: list[str], cache: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO), "FRACTAL_CACHE": cache}
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "ccpu.cli", "boot", *args], capture_output=True, env=env,
                       stdin=subprocess.DEVNULL, timeout=900)
    dt = time.monotonic() - t0
    if r.returncode != 0 or MARKER not in r.stdout:
        raise RuntimeError(f"fractal boot {args[-1]}: exit {r.returncode}\n{r.stderr.decode()[-2000:]}"
                           f"\n{r.stdout.decode()[-2000:]}")
    return dt


def _du(path: str) -> int:
    out = subprocess.run(["du", "-s", "-B1", path], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def report(result: dict[str, Any]) -> tuple[str, list[tuple[str, bool, str]]]:
    m = result["median_s"]
    lines = [f"fractal boot, `machine` image, {result['rounds']} rounds (medians)",
             f"  repo (no copy)        {m['repo']:7.2f} s",
             f"  copy: unpack + boot   {m['copy']:7.2f} s   (unpack {m['unpack']:.2f} s, boot {m['copy_boot']:.2f} s)",
             f"  ratio repo / copy     {m['repo'] / m['copy']:7.2f}",
             f"  root on disk: repo adds 0 B; the copy {result['copy_bytes'] / 1024:.0f} KiB "
             f"(the image's layers: {result['layer_bytes'] / 1024:.0f} KiB)"]
    goals = [("repo boot not slower than unpack + boot", m["repo"] <= m["copy"] * 1.1,
              f"{m['repo']:.2f} s vs {m['copy']:.2f} s")]
    return "\n".join(lines), goals


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if not require_root("containerd, QEMU and virtiofsd"):
        return 2
    byte_compile()
    result: dict[str, Any] = {"machine": machine_info(), "command": command_line("hack/bench/boot.py", argv),
                              "rounds": args.rounds}
    cache = os.environ.get("FRACTAL_CACHE", "/var/cache/fractal")

    def measure() -> None:
        with bench_env("machine") as (env, refs), dump_logs_on_failure(env), \
                tempfile.TemporaryDirectory(prefix="fractal-bench-boot-") as tmp:
            env.pull(refs["machine"], namespace=NS)
            image = ["-a", str(env.address), "-n", NS, refs["machine"]]
            tgz = os.path.join(tmp, "machine.tgz")
            subprocess.run([sys.executable, "-m", "ccpu.cli", "boot", *image, "--export", "tgz", tgz], check=True,
                           env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True)
            from ccpu.boot import tgz as tgzmod

            times: dict[str, list[float]] = {"repo": [], "copy": [], "unpack": [], "copy_boot": []}
            for i in range(args.rounds):
                log(f"round {i + 1}/{args.rounds}")
                times["repo"].append(_boot(image, cache))
                fresh = os.path.join(tmp, f"cache-{i}")
                t0 = time.monotonic()
                unpacked = tgzmod.unpack(tgz, os.path.join(fresh, "boot", "tgz"))
                times["unpack"].append(time.monotonic() - t0)
                # the boot finds the tree it just unpacked (same cache): its boot part alone
                boot_env_cache = fresh
                for link in Path(cache).iterdir():  # the guest build and virtiofsd, as in the real cache
                    if not (Path(fresh) / link.name).exists():
                        os.symlink(link.resolve(), Path(fresh) / link.name)
                times["copy_boot"].append(_boot([tgz], boot_env_cache))
                times["copy"].append(times["unpack"][-1] + times["copy_boot"][-1])
                result["copy_bytes"] = _du(os.path.join(unpacked, tgzmod.ROOT))
            result["times_s"] = times
            result["median_s"] = {k: statistics.median(v) for k, v in times.items()}
            lays = env.snapshotter_root / "layers"
            result["layer_bytes"] = _du(str(lays)) if lays.is_dir() else 0

    rc = guarded(measure)
    return rc if rc else finish(result, report, args.json)


if __name__ == "__main__":
    sys.exit(main())
