#!/usr/bin/env python3
"""`fractal vm run` as `virt` (issue 17 part 2): wall time of `vm run -- true` against the bare
kernel, and the keystroke echo latency of `vm run -it` against a local pty.

Alternated round by round (the machine is shared; medians reported):

- **bare**: the guest's kernel with a tiny busybox initramfs, same QEMU flags (hack/bench/guest.py's
  reference): QEMU start -> its init's line on the console.  The kernel's own limit.
- **run()**: ``ccpu.vm.run.run(guest, ["true"])`` in this process: boot, shares, the command, the
  power-off handshake, QEMU gone -- what `vm run` costs without the CLI.
- **CLI**: ``python3 -m ccpu.cli vm run -- true`` as a user types it: plus the interpreter's start,
  the imports and the guest build's up-to-date check (hashing its inputs).
- **echo**: one key typed into `vm run -it -- cat` on a pty until its echo shows (the guest's line
  discipline echoes), against the same on a local `cat` on a pty (the host's): the relay's cost.

    python3 hack/bench/virt.py [--rounds 3] [--keys 30] [--json FILE]
"""

from __future__ import annotations

import argparse
import fcntl
import io
import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import termios
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "hack" / "bench"))

from guest import bare_initramfs, boot_bare  # noqa: E402  (hack/bench/guest.py: the bare reference)

from ccpu.guest import initramfs  # noqa: E402
from ccpu.vm import run as vmrun  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(REPO)}
T = TypeVar("T")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def in_process(guest: initramfs.Guest, work: str) -> float:
    t0 = time.monotonic()
    res = vmrun.run(guest, ["true"], share_dirs=[vmrun.ShareSpec(work, "/work")], stdout=io.BytesIO(),
                    stderr=io.BytesIO(), timeout=300)
    if res.exit_code != 0:
        raise RuntimeError(f"vm run true: exit {res.exit_code}")
    return time.monotonic() - t0


def cli(work: str) -> float:
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "ccpu.cli", "vm", "run", "--", "true"], cwd=work, env=ENV, check=True,
                   stdout=subprocess.DEVNULL, timeout=300)
    return time.monotonic() - t0


def _read_until(fd: int, what: bytes, deadline: float) -> None:
    seen = b""
    while what not in seen:
        r, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not r:
            raise RuntimeError(f"{what!r} never showed; saw {seen[-300:]!r}")
        seen += os.read(fd, 4096)


def echo_latencies(argv: list[str], keys: int, cwd: str) -> list[float]:
    """Seconds from writing one key to the pty to its echo, for `keys` keys, once `READY` shows."""
    master, slave = os.openpty()
    proc = subprocess.Popen(argv, cwd=cwd, stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0), env=ENV)
    os.close(slave)
    out = []
    try:
        _read_until(master, b"READY", time.monotonic() + 300)
        for i in range(keys):
            key = bytes([ord("a") + i % 26])
            t0 = time.monotonic()
            os.write(master, key)
            _read_until(master, key, time.monotonic() + 120)
            out.append(time.monotonic() - t0)
        os.write(master, b"\r\x04")  # end the line, then ^D: cat ends, so does the VM
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return out


def retried(what: str, fn: Callable[[], T]) -> T:
    """One retry: under a starved TCG host the guest kernel sometimes panics in its timer check
    ("IO-APIC + timer doesn't work"); that boot is not a figure of ours."""
    try:
        return fn()
    except (vmrun.VMError, RuntimeError, subprocess.CalledProcessError) as exc:
        log(f"{what}: {str(exc).splitlines()[0]}; retrying once")
        return fn()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--keys", type=int, default=30)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    guest = initramfs.build(offline=True)
    raw: dict[str, list[float]] = {"bare": [], "run()": [], "CLI": [], "echo_vm": [], "echo_local": []}
    script = "echo READY; exec cat"
    with tempfile.TemporaryDirectory(prefix="fractal-bench-virt-") as tmp:
        bare = Path(tmp, "bare.cpio")
        bare_initramfs(bare)
        work = Path(tmp, "work")
        work.mkdir()
        kinds = ["bare", "run()", "CLI", "echo"]
        for r in range(args.rounds):
            for kind in kinds[r % 4:] + kinds[:r % 4]:
                if kind == "bare":
                    raw["bare"].append(retried(kind, lambda: boot_bare(str(guest.kernel), bare, tmp))["ready_s"])
                elif kind == "run()":
                    raw["run()"].append(retried(kind, lambda: in_process(guest, str(work))))
                elif kind == "CLI":
                    raw["CLI"].append(retried(kind, lambda: cli(str(work))))
                else:
                    raw["echo_vm"] += retried(kind, lambda: echo_latencies(
                        [sys.executable, "-m", "ccpu.cli", "vm", "run", "-it", "--", "sh", "-c", script], args.keys,
                        str(work)))
                    raw["echo_local"] += echo_latencies(["sh", "-c", script], args.keys, str(work))
                log(f"round {r} {kind}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in raw.items() if v))
    med = {k: statistics.median(v) for k, v in raw.items()}
    result = {"rounds": args.rounds, "keys": args.keys, "median_s": med, "raw_s": raw,
              "ratios": {"run()_vs_bare": med["run()"] / med["bare"], "CLI_vs_bare": med["CLI"] / med["bare"],
                         "echo_vm_vs_local": med["echo_vm"] / med["echo_local"]}}
    print(f"bare kernel boot (to its init's line)  {med['bare']:.2f} s")
    ratios = result["ratios"]
    print(f"vm run -- true, in process             {med['run()']:.2f} s  ({ratios['run()_vs_bare']:.2f}x bare)")
    print(f"fractal vm run -- true (CLI)           {med['CLI']:.2f} s  ({ratios['CLI_vs_bare']:.2f}x bare)")
    print(f"-it keystroke echo, median              {med['echo_vm'] * 1000:.1f} ms  "
          f"(local pty {med['echo_local'] * 1000:.2f} ms; {ratios['echo_vm_vs_local']:.0f}x; "
          f"p90 {statistics.quantiles(raw['echo_vm'], n=10)[-1] * 1000:.1f} ms)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
