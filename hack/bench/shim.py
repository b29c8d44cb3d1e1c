#!/usr/bin/env python3
"""Benchmark containerd-shim-fractal-v1 (host mode) against containerd's runc shim, same containerd.

Everything runs in one private :class:`~hack.containerd_env.FractalEnv` (fractal proxy snapshotter +
containerd 1.6) fed by a :class:`~hack.registry.LocalRegistry`, so both runtimes are measured in
the SAME run, on the same images and snapshots:

1. **Start-to-exit wall time** of ``ctr run --rm --snapshotter S --runtime R IMAGE idN true`` for
   R in (io.containerd.fractal.v1, io.containerd.runc.v2) and S in (fractal, overlayfs); ``--runs``
   rounds, the order of the four configurations rotating every round, after one untimed warm-up
   each.  Median, p90 and the fractal/runc ratio per snapshotter.
2. **Memory per sandbox**: ``ctr run -d`` of ``sleep`` containers, 1 and then 3 of them in one
   sandbox (``--annotation io.fractal.sandbox=X``; for runc ``io.containerd.runc.v2.group=X``, so
   its shim is shared the same way).  The figure is the summed VmRSS (and PSS) of the processes
   between the container's init and containerd/init: the shim daemon, plus the agent when it
   runs as a process of its own (``FRACTAL_AGENT=process``).

Python byte code is compiled first (``compileall`` of ccpu/ and shim/), as an installed package
has it: the environment may set PYTHONDONTWRITEBYTECODE, which would otherwise make every shim
start compile its modules from source.

Prints a table, the command, machine info and the goals met/missed; ``--json FILE`` writes all
figures; ``--plot DIR`` draws the start-time distributions as ``DIR/shim-start.svg``
(hack/bench/plots.py).  Must run as root.

    python3 hack/bench/shim.py [--image busybox] [--runs 10] [--agent inproc|process] [--json FILE]
        [--plot DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent.parent
if __package__ in (None, ""):  # run as a script: make `hack` and `ccpu` importable
    sys.path.insert(0, str(REPO))

from hack.bench.common import (bench_env, byte_compile, command_line, dump_logs_on_failure, finish,  # noqa: E402
                               guarded, log, machine_info, percentile, require_root)
from hack.containerd_env import FractalEnv  # noqa: E402

FRACTAL_RT = "io.containerd.fractal.v1"
RUNC_RT = "io.containerd.runc.v2"
SNAPSHOTTERS = ("fractal", "overlayfs")
RUNTIMES = (FRACTAL_RT, RUNC_RT)

GOAL_RUN_RATIO = 1.5  # fractal / runc, median `ctr run --rm IMAGE true`
GOAL_RSS_MB = 40.0  # shim + agent RSS per sandbox (1 container)

NS = "bench"


def short(rt: str) -> str:
    return "fractal" if rt == FRACTAL_RT else "runc"


def ctr_run_argv(env: FractalEnv, ref: str, rt: str, sn: str, cid: str, *extra: str,
                 detach: bool = False, cmd: tuple[str, ...] = ("true",)) -> list[str]:
    argv = ["run", "-d" if detach else "--rm", "--snapshotter", sn, "--fifo-dir", str(env.fifo_dir),
            "--runtime", rt]
    if rt == RUNC_RT:
        argv += ["--runc-root", str(env.runc_root)]
    return env.containerd.ctr_argv(*argv, *extra, ref, cid, *cmd, namespace=NS)


def timed_run(env: FractalEnv, ref: str, rt: str, sn: str, cid: str) -> float:
    argv = ctr_run_argv(env, ref, rt, sn, cid)
    t0 = time.monotonic()
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    dt = time.monotonic() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
    return dt


def bench_run(env: FractalEnv, ref: str, runs: int) -> dict[str, Any]:
    configs = [(rt, sn) for sn in SNAPSHOTTERS for rt in RUNTIMES]
    times: dict[str, list[float]] = {f"{short(rt)}/{sn}": [] for rt, sn in configs}
    for rt, sn in configs:  # warm-up: page cache, first shim binary start, snapshot GC
        timed_run(env, ref, rt, sn, f"warm-{short(rt)}-{sn}")
    n = 0
    for i in range(runs):
        order = configs[i % len(configs):] + configs[:i % len(configs)]
        for rt, sn in order:
            n += 1
            times[f"{short(rt)}/{sn}"].append(timed_run(env, ref, rt, sn, f"id{n}"))
    out: dict[str, Any] = {"raw": times, "runs": runs}
    for key, vals in times.items():
        out[key] = {"median": statistics.median(vals), "p90": percentile(vals, 90),
                    "min": min(vals), "max": max(vals)}
    for sn in SNAPSHOTTERS:
        out[f"ratio/{sn}"] = out[f"fractal/{sn}"]["median"] / out[f"runc/{sn}"]["median"]
    return out


# ---------------------------------------------------------------------------------------------
# memory


def _status(pid: int) -> dict[str, str]:
    out = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return out


def _kb(value: str) -> int:
    return int(value.split()[0]) if value else 0


def pss_kb(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def shim_processes(task_pid: int, stop: set[int]) -> list[int]:
    """Ancestors of a container's init up to (not including) containerd / pid 1: its shim (and
    the agent, when that is a process of its own)."""
    out = []
    pid = int(_status(task_pid).get("PPid", "0") or 0)
    while pid > 1 and pid not in stop:
        out.append(pid)
        pid = int(_status(pid).get("PPid", "0") or 0)
    return out


def task_pid(env: FractalEnv, cid: str) -> int:
    r = env.ctr("tasks", "ls", namespace=NS)
    for line in r.stdout.splitlines()[1:]:
        parts = line.split()
        if parts and parts[0] == cid:
            return int(parts[1])
    raise RuntimeError(f"task {cid} not listed: {r.stdout}")


def wait_running(env: FractalEnv, cid: str, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        r = env.ctr("tasks", "ls", namespace=NS)
        for line in r.stdout.splitlines()[1:]:
            parts = line.split()
            if parts and parts[0] == cid and parts[-1] == "RUNNING":
                return int(parts[1])
        if time.monotonic() > deadline:
            raise RuntimeError(f"{cid} not RUNNING after {timeout}s: {r.stdout}")
        time.sleep(0.05)


def remove(env: FractalEnv, cid: str) -> None:
    env.ctr("tasks", "kill", "-s", "SIGKILL", cid, namespace=NS, check=False)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        r = env.ctr("tasks", "ls", namespace=NS, check=False)
        if not any(line.split()[0] == cid and line.split()[-1] == "RUNNING"
                   for line in r.stdout.splitlines()[1:] if line.split()):
            break
        time.sleep(0.05)
    env.ctr("tasks", "delete", "-f", cid, namespace=NS, check=False)
    env.ctr("containers", "rm", cid, namespace=NS, check=False)


def bench_memory(env: FractalEnv, ref: str) -> dict[str, Any]:
    stop = {p for p in (env.containerd.pid,) if p}
    out: dict[str, Any] = {}
    for rt in RUNTIMES:
        for count in (1, 3):
            group = f"mem-{short(rt)}-{count}"
            ann = "io.fractal.sandbox" if rt == FRACTAL_RT else "io.containerd.runc.v2.group"
            cids = [f"{group}-{i}" for i in range(count)]
            try:
                for cid in cids:
                    argv = ctr_run_argv(env, ref, rt, "fractal", cid, "--annotation", f"{ann}={group}",
                                        detach=True, cmd=("sleep", "600"))
                    subprocess.run(argv, check=True, capture_output=True, timeout=60)
                    wait_running(env, cid)
                time.sleep(1.0)  # let the shim settle (lazy imports, GC)
                procs: set[int] = set()
                for cid in cids:
                    procs.update(shim_processes(task_pid(env, cid), stop))
                detail = [{"pid": p, "rss_kb": _kb(_status(p).get("VmRSS", "")), "pss_kb": pss_kb(p),
                           "cmd": cmdline(p)[:120]} for p in sorted(procs)]
                out[f"{short(rt)}/{count}"] = {
                    "processes": len(procs),
                    "rss_mb": sum(d["rss_kb"] for d in detail) / 1024,
                    "pss_mb": sum(d["pss_kb"] for d in detail) / 1024,
                    "detail": detail,
                }
            finally:
                for cid in cids:
                    remove(env, cid)
    return out


# ---------------------------------------------------------------------------------------------
# report


def report(result: dict[str, Any]) -> tuple[str, list[tuple[str, bool, str]]]:
    lines = []
    m = result["machine"]
    lines.append(f"command: {result['command']}")
    lines.append(f"machine: {m['nproc']} CPU {m['cpu']}, {m['mem_total']}, kernel {m['kernel']}, "
                 f"{m['containerd']}, python {m['python']}, fs {m['filesystem']}")
    lines.append(f"image: {result['image_ref']}; FRACTAL_AGENT={result['agent']} "
                 f"FRACTAL_SHIM_SPAWN={result['spawn']}")
    goals: list[tuple[str, bool, str]] = []
    run = result.get("run")
    if run:
        lines.append("")
        lines.append(f"ctr run --rm IMAGE idN true  ({run['runs']} runs each, alternating)")
        lines.append(f"  {'runtime/snapshotter':<22}{'median s':>10}{'p90 s':>10}{'min s':>10}{'max s':>10}")
        for sn in SNAPSHOTTERS:
            for rt in RUNTIMES:
                k = f"{short(rt)}/{sn}"
                v = run[k]
                lines.append(f"  {k:<22}{v['median']:>10.3f}{v['p90']:>10.3f}{v['min']:>10.3f}{v['max']:>10.3f}")
            lines.append(f"  {'ratio fractal/runc':<22}{run[f'ratio/{sn}']:>10.2f}")
        r = run["ratio/fractal"]
        goals.append((f"run --rm ratio (fractal snapshotter) <= {GOAL_RUN_RATIO}", r <= GOAL_RUN_RATIO,
                      f"{r:.2f}x"))
    mem = result.get("memory")
    if mem:
        lines.append("")
        lines.append("memory per sandbox (processes between the container's init and containerd)")
        lines.append(f"  {'runtime/containers':<22}{'procs':>6}{'RSS MB':>10}{'PSS MB':>10}")
        for rt in RUNTIMES:
            for count in (1, 3):
                v = mem[f"{short(rt)}/{count}"]
                lines.append(f"  {short(rt) + '/' + str(count):<22}{v['processes']:>6}"
                             f"{v['rss_mb']:>10.1f}{v['pss_mb']:>10.1f}")
        v = mem["fractal/1"]["rss_mb"]
        goals.append((f"shim+agent RSS per sandbox <= {GOAL_RSS_MB:.0f} MB", v <= GOAL_RSS_MB, f"{v:.1f} MB"))
    lines.append("")
    for what, ok, val in goals:
        lines.append(f"goal {'MET   ' if ok else 'MISSED'} {what}: {val}")
    return "\n".join(lines), goals


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image", default="busybox", choices=["busybox", "edge", "debian"])
    ap.add_argument("--runs", type=int, default=10, help="timed runs per configuration (default 10)")
    ap.add_argument("--agent", choices=["inproc", "process"], default=os.environ.get("FRACTAL_AGENT", "inproc"),
                    help="FRACTAL_AGENT for the shims (default: inproc)")
    ap.add_argument("--spawn", choices=["fork", "exec"], default=os.environ.get("FRACTAL_SHIM_SPAWN", "fork"),
                    help="FRACTAL_SHIM_SPAWN: how `start` starts the daemon (default: fork)")
    ap.add_argument("--skip", action="append", default=[], choices=["run", "memory"])
    ap.add_argument("--json", type=Path, metavar="FILE")
    ap.add_argument("--plot", type=Path, metavar="DIR", help="draw the start-time figure as DIR/shim-start.svg")
    ap.add_argument("--no-compile", action="store_true", help="do not byte-compile ccpu/ and shim/ first")
    args = ap.parse_args(argv)
    if args.plot:
        from hack.bench import plots

        plots.require(ap.error)
    if not require_root():
        return 2
    os.environ["FRACTAL_AGENT"] = args.agent  # containerd's environment -> the shims'
    os.environ["FRACTAL_SHIM_SPAWN"] = args.spawn
    if not args.no_compile:
        byte_compile()

    result: dict[str, Any] = {
        "command": command_line("hack/bench/shim.py", argv),
        "machine": machine_info(),
        "agent": args.agent,
        "spawn": args.spawn,
        "goals": {"run_ratio_max": GOAL_RUN_RATIO, "rss_mb_max": GOAL_RSS_MB},
    }
    t_all = time.monotonic()

    def measure() -> None:
        with bench_env(args.image) as (env, refs):
            ref = result["image_ref"] = refs[args.image]
            log(f"env {env.id} up; pulling {ref}")
            for sn in SNAPSHOTTERS:
                env.pull(ref, namespace=NS, snapshotter=sn)
            with dump_logs_on_failure(env):
                if "run" not in args.skip:
                    t = time.monotonic()
                    result["run"] = bench_run(env, ref, args.runs)
                    log(f"run done in {time.monotonic() - t:.1f}s")
                if "memory" not in args.skip:
                    result["memory"] = bench_memory(env, ref)
                    log("memory done")
            env.remove_namespace(NS)

    rc = guarded(measure)
    if rc:
        return rc
    result["seconds"] = time.monotonic() - t_all
    rc = finish(result, report, args.json)
    if args.plot and "run" in result:
        from hack.bench import plots

        title = f"Container start, {result['run']['runs']} runs each (FRACTAL_AGENT={args.agent})"
        out = plots.plot_start_latency(plots.start_series(result['run']), args.plot / 'shim-start.svg', title)
        print(f"wrote {out}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
