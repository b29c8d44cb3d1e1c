#!/usr/bin/env python3
"""Benchmark the agent's start -> `hello` answered inside ONE guest, against another tree's agent
and the interpreter's own start (issue 12: boot -> ready <= 1.3x the bare kernel).

Why not boots: hack/bench/guest.py measures the whole boot -> ready, but on a shared machine (load
5-10 from other sessions) one TCG boot moves by 2x between rounds and the agent's part (~2-3 s of a
6-20 s boot) drowns.  Here one guest (``fractal vm run`` mode, the sandboxes' guest build) starts
each variant many times, alternated round by round, on the guest's own clock:

- **this tree**: ``python3 -S -I`` running ``ccpu.agent --fd 3 --nics ...`` (the init's flags) of
  this checkout, on a socketpair whose other end has the `hello` frame written already; the time is
  spawn -> the answer's frame read complete;
- **baseline** (``--baseline DIR``, e.g. /work/main): the same with that checkout's ``ccpu``;
- **python**: ``python3 -S -I -c pass`` (spawn -> exit): the floor no Python agent goes below.

Both trees' ``ccpu`` are copied into the share and byte-compiled first (the guest image ships .pyc).

    python3 hack/bench/agent_ready.py [--rounds 15] [--baseline /work/main] [--json FILE]
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO))

from ccpu.guest import initramfs  # noqa: E402
from hack.bench.common import run_in_guest  # noqa: E402

#: runs in the guest (its python, -S -I), the share at /work: prints one JSON line
IN_GUEST = r'''
import json, os, socket, struct, subprocess, sys, time
rounds, trees = int(sys.argv[1]), sys.argv[2:]
py = sys.executable
runc = subprocess.run(["sh", "-c", "command -v runc"], capture_output=True, text=True).stdout.strip()
os.makedirs("/run/bench/b", exist_ok=True)
body = json.dumps({"id": 1, "op": "hello", "args": {"version": 1, "window": 1 << 20}}).encode()
HELLO = struct.pack(">IIB", len(body), 0, 1) + body

def agent(tree):
    a, b = socket.socketpair()
    args = ["ccpu.agent", "--fd", str(b.fileno()), "--runc-root", "/run/bench/runc", "--runc", runc,
            "--bundle-root", "/run/bench/b", "--layer-root", "/run/bench/b", "--nics"]
    code = (f"import sys; sys.path.insert(0, {tree!r}); sys.argv = {args!r}; import runpy; "
            "runpy.run_module('ccpu.agent', run_name='__main__', alter_sys=True)")
    a.sendall(HELLO)
    t0 = time.monotonic()
    p = subprocess.Popen([py, "-S", "-I", "-c", code], pass_fds=(b.fileno(),), stderr=subprocess.DEVNULL)
    b.close()
    buf = b""
    while len(buf) < 9 or len(buf) < 9 + struct.unpack(">I", buf[:4])[0]:
        chunk = a.recv(65536)
        if not chunk:
            raise SystemExit(f"agent of {tree} closed before answering")
        buf += chunk
    took = time.monotonic() - t0
    reply = json.loads(buf[9:])
    assert reply.get("ok"), reply
    a.close()  # EOF, no container: the agent exits
    p.wait()
    return took

def python():
    t0 = time.monotonic()
    subprocess.run([py, "-S", "-I", "-c", "pass"], check=True)
    return time.monotonic() - t0

names = [os.path.basename(t) for t in trees] + ["python"]
times = {n: [] for n in names}
for t in trees:  # warm-up: the page cache, each tree's first import
    agent(t)
python()
for i in range(rounds):
    order = names[i % len(names):] + names[:i % len(names)]
    for n in order:
        times[n].append(python() if n == "python" else agent(trees[names.index(n)]))
print("RESULT " + json.dumps(times), flush=True)
'''


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def copy_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src / "ccpu", dst / "ccpu", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    compileall.compile_dir(str(dst / "ccpu"), quiet=1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--baseline", type=Path, metavar="DIR", help="another checkout whose agent to compare")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    guest = initramfs.build(offline=True)
    with tempfile.TemporaryDirectory(prefix="fractal-bench-ready-") as work:
        os.chmod(work, 0o755)
        trees = ["/work/tree"]
        copy_tree(REPO, Path(work, "tree"))
        if args.baseline is not None:
            copy_tree(args.baseline, Path(work, "baseline"))
            trees.append("/work/baseline")
        Path(work, "bench.py").write_text(IN_GUEST)
        times = run_in_guest(guest, work, f"{args.rounds} " + " ".join(trees))
    med = {k: statistics.median(v) for k, v in times.items()}
    load = os.getloadavg()
    print(f"in one guest, {args.rounds} alternated rounds, load average {' '.join(f'{x:.1f}' for x in load)}:")
    for k, v in times.items():
        print(f"  {k:9s} spawn -> hello answered median {med[k]:.3f} s  min {min(v):.3f}  max {max(v):.3f}")
    if "baseline" in med:
        print(f"  this tree / baseline: {med['tree'] / med['baseline']:.2f}x")
        print(f"  beyond the interpreter's start: {med['tree'] - med['python']:.3f} s vs "
              f"{med['baseline'] - med['python']:.3f} s")
    if args.json:
        args.json.write_text(json.dumps({"rounds": args.rounds, "load_average": load, "times": times,
                                         "median": med}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
