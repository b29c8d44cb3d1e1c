#!/usr/bin/env python3
"""Benchmark containerd-shim-fractal-v1 (host mode) against containerd's runc shim, same containerd.

Each *setup* (``--setups``) is a private :class:`~hack.containerd_env.FractalEnv` (fractal proxy
snapshotter + containerd 1.6) of its own, all up at once and fed by a
:class:`~hack.registry.LocalRegistry`, so every runtime and setup is measured in the SAME run:

* ``installed`` (always first): what a user has after ``fractal install``: the fractal config as
  install writes it (``root = <snapshotter root>`` and nothing else, so the sandbox mode is the
  default ``vm`` and every ``ctr run`` says ``--annotation io.fractal.mode=host``), no
  ``FRACTAL_ROOT``, the shim found on containerd's PATH as the launcher install writes
  (``python -S``, ccpu/cli/launcher.py; rendered by install's own ``shim_change``), byte code
  present (``pip install`` compiles it);
* ``link``: ``installed`` with the shim found as the console script itself (what install's
  symlink was before the launcher, and its fallback): every start and delete runs ``site``;
* ``tuned``: the benchmark's former setup: a config with ``mode = "host"``, ``FRACTAL_ROOT`` in
  containerd's environment, no annotation;
  Daemons come from the warm fork-server (shim/zygote.py), the default; the memory figures
  there include the forked daemons' USS and the fork-server itself;
* ``fork``: ``installed`` with ``FRACTAL_SHIM_SPAWN=fork`` (``start`` forks the daemon, which
  imports everything itself: the default before, and the fallback when no fork-server answers);
* ``exec``: ``installed`` with ``FRACTAL_SHIM_SPAWN=exec`` (a fresh ``python -m shim.daemon``);
* ``base``: ``installed`` running the code of another checkout (``--base DIR``, e.g.
  ``git archive REV ccpu shim snapshotter | tar -x -C DIR`` with the generated stubs copied in):
  a before/after of a change measured in the same run;
* ``dev-shell``: containerd started from a developer's shell on this machine: the shell's PATH
  (a pyenv wrapper script instead of the console script, if that is what PATH finds first) and
  ``PYTHONDONTWRITEBYTECODE=1`` with an editable install that has no byte code (a copy of
  ccpu/ and shim/ without ``__pycache__``) -- the case issue 13 found at twice the time.

1. **Start-to-exit wall time** of ``ctr run --rm --snapshotter S --runtime R IMAGE idN true``: in
   the ``installed`` env for R in (io.containerd.fractal.v1, io.containerd.runc.v2) and S in
   (fractal, overlayfs), in every other setup's env for fractal/fractal; ``--runs`` rounds, the
   order of all configurations rotating every round, after one untimed warm-up each.  Median,
   p90 and the ratio to runc (same snapshotter, same run).
2. **Memory per sandbox**: ``ctr run -d`` of ``sleep`` containers, 1 and then 3 of them in one
   sandbox (``--annotation io.fractal.sandbox=X``; for runc ``io.containerd.runc.v2.group=X``, so
   its shim is shared the same way).  The figure is the summed VmRSS (and PSS) of the processes
   between the container's init and containerd/init: the shim daemon, plus the agent when it
   runs as a process of its own (``FRACTAL_AGENT=process``).  In the ``installed`` env.

The shims run the code of this checkout (``PYTHONPATH`` = the checkout for containerd).  Python
byte code is compiled first (``compileall`` of ccpu/ and shim/), as an installed package
has it: the environment may set PYTHONDONTWRITEBYTECODE, which would otherwise make every shim
start compile its modules from source.

Prints a table, the command, machine info and the goals met/missed; ``--json FILE`` writes all
figures; ``--plot DIR`` draws the start-time distributions as ``DIR/shim-start.svg``
(hack/bench/plots.py).  Must run as root.

    python3 hack/bench/shim.py [--image busybox] [--runs 10] [--setups installed,fork,tuned,dev-shell]
                               [--agent inproc|process] [--json FILE] [--plot DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
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
                               guarded, install_shim_launcher, log, machine_info, percentile, require_root)
from hack.containerd_env import FractalEnv  # noqa: E402

from dataclasses import dataclass  # noqa: E402

FRACTAL_RT = "io.containerd.fractal.v1"
RUNC_RT = "io.containerd.runc.v2"
SNAPSHOTTERS = ("fractal", "overlayfs")
RUNTIMES = (FRACTAL_RT, RUNC_RT)

GOAL_RUN_RATIO = 1.3  # fractal / runc, median `ctr run --rm IMAGE true` (issue 13)
GOAL_RSS_MB = 40.0  # shim + agent RSS per sandbox (1 container)

NS = "bench"


def short(rt: str) -> str:
    return "fractal" if rt == FRACTAL_RT else "runc"


HOST_MODE = ("--annotation", "io.fractal.mode=host")
SHIM_BINARY = "containerd-shim-fractal-v1"


@dataclass(frozen=True)
class Setup:
    """One way containerd and fractal are set up; ``ctr_args``: what every ``ctr run`` adds."""

    name: str
    what: str
    ctr_args: tuple[str, ...] = ()


SETUPS = {s.name: s for s in (
    Setup("installed", "after `fractal install`: config with root only (mode vm by default), "
          "--annotation io.fractal.mode=host, byte code present", HOST_MODE),
    Setup("tuned", "config mode = \"host\" + FRACTAL_ROOT (the benchmark's former setup)"),
    Setup("fork", "installed + FRACTAL_SHIM_SPAWN=fork: start forks the daemon (no fork-server; "
          "its fallback)", HOST_MODE),
    Setup("exec", "installed + FRACTAL_SHIM_SPAWN=exec: a fresh python -m shim.daemon", HOST_MODE),
    Setup("link", "installed, but the shim on PATH is the console script (install's symlink before "
          "the launcher): site and its .pth hooks run at every start/delete", HOST_MODE),
    Setup("base", "installed, with the code of --base DIR (an earlier checkout): before/after in one run",
          HOST_MODE),
    Setup("dev-shell", "containerd from this shell: its PATH, PYTHONDONTWRITEBYTECODE=1, editable "
          "install without byte code", HOST_MODE),
)}


def configure(env: FractalEnv, setup: Setup, scratch: Path, base: Path | None = None) -> dict[str, str]:
    """Restart ``env``'s containerd the way ``setup`` has it; returns what was set (for the report)."""
    from ccpu.cli.fractal_config import with_root

    ce = env.containerd
    ce.extra_env["PYTHONPATH"] = str(REPO)  # the shims run this checkout's code
    if setup.name == "base":
        if base is None:
            raise ValueError("setup base needs --base DIR")
        ce.extra_env["PYTHONPATH"] = str(base)  # before the launcher's own paths: DIR's code runs
    ce.extra_env.pop("PYTHONDONTWRITEBYTECODE", None)
    if setup.name == "tuned":
        return {"config": env.fractal_config.read_text().strip(), "FRACTAL_ROOT": ce.extra_env["FRACTAL_ROOT"]}
    env.fractal_config.write_text(with_root(None, str(env.snapshotter_root)))  # as `fractal install`
    ce.extra_env.pop("FRACTAL_ROOT", None)
    out = {"config": env.fractal_config.read_text().strip()}
    if setup.name in ("fork", "exec"):
        ce.extra_env["FRACTAL_SHIM_SPAWN"] = setup.name
        out["FRACTAL_SHIM_SPAWN"] = setup.name
    if setup.name in ("installed", "fork", "exec", "base"):  # the launcher, as `fractal install` writes it
        out["shim"] = install_shim_launcher(env, scratch / "bin")
        if setup.name == "base":
            out["PYTHONPATH"] = str(base)
    if setup.name == "link":  # the console script itself on PATH (the harness puts its dir first)
        out["shim"] = shutil.which(SHIM_BINARY, path=os.pathsep.join([*ce.path_prepend, os.environ.get("PATH", "")])) or "?"
    if setup.name == "dev-shell":
        found = shutil.which(SHIM_BINARY, path=os.environ.get("PATH", ""))
        if found:  # what a containerd started from this shell runs (e.g. a pyenv wrapper)
            ce.path_prepend = [str(Path(found).parent)]
        code = scratch / "nopyc"
        for d in ("ccpu", "shim"):
            shutil.copytree(REPO / d, code / d, ignore=shutil.ignore_patterns("__pycache__"))
        ce.extra_env.update(PYTHONPATH=str(code), PYTHONDONTWRITEBYTECODE="1")
        out.update(shim=found or "?", PYTHONPATH=str(code), PYTHONDONTWRITEBYTECODE="1")
    ce.stop()
    ce.start()
    return out


def ctr_run_argv(env: FractalEnv, ref: str, rt: str, sn: str, cid: str, *extra: str,
                 detach: bool = False, cmd: tuple[str, ...] = ("true",)) -> list[str]:
    argv = ["run", "-d" if detach else "--rm", "--snapshotter", sn, "--fifo-dir", str(env.fifo_dir),
            "--runtime", rt]
    if rt == RUNC_RT:
        argv += ["--runc-root", str(env.runc_root)]
    return env.containerd.ctr_argv(*argv, *extra, ref, cid, *cmd, namespace=NS)


def timed_run(env: FractalEnv, ref: str, rt: str, sn: str, cid: str, *extra: str) -> float:
    argv = ctr_run_argv(env, ref, rt, sn, cid, *extra)
    t0 = time.monotonic()
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    dt = time.monotonic() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
    return dt


def bench_run(envs: dict[str, tuple[FractalEnv, str]], runs: int) -> dict[str, Any]:
    """``envs``: setup name -> (env, image ref), the ``installed`` one first."""
    first = next(iter(envs))
    configs = [(first, rt, sn) for sn in SNAPSHOTTERS for rt in RUNTIMES]
    configs += [(name, FRACTAL_RT, "fractal") for name in envs if name != first]

    def key(name: str, rt: str, sn: str) -> str:
        return f"{short(rt)}/{sn}" if name == first else f"{short(rt)}/{sn}/{name}"

    def one(name: str, rt: str, sn: str, cid: str) -> float:
        env, ref = envs[name]
        extra = SETUPS[name].ctr_args if rt == FRACTAL_RT else ()
        return timed_run(env, ref, rt, sn, cid, *extra)

    times: dict[str, list[float]] = {key(*c): [] for c in configs}
    for c in configs:  # warm-up: page cache, first shim binary start (and its byte code), snapshot GC
        one(*c, f"warm-{short(c[1])}-{c[2]}")
    n = 0
    for i in range(runs):
        order = configs[i % len(configs):] + configs[:i % len(configs)]
        for c in order:
            n += 1
            times[key(*c)].append(one(*c, f"id{n}"))
    out: dict[str, Any] = {"raw": times, "runs": runs, "setups": list(envs)}
    for k, vals in times.items():
        out[k] = {"median": statistics.median(vals), "p90": percentile(vals, 90),
                  "min": min(vals), "max": max(vals)}
    for sn in SNAPSHOTTERS:
        out[f"ratio/{sn}"] = out[f"fractal/{sn}"]["median"] / out[f"runc/{sn}"]["median"]
    for name in envs:
        if name != first:
            out[f"ratio/fractal/{name}"] = out[f"fractal/fractal/{name}"]["median"] / out["runc/fractal"]["median"]
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


def uss_kb(pid: int) -> int:
    """Unique set size: the pages only this process has (Private_Clean + Private_Dirty) -- what a
    daemon forked from a warm zygote really costs, its copy-on-write pages shared with it aside."""
    total = 0
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1])
    return total


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


def bench_memory(env: FractalEnv, ref: str, fractal_args: tuple[str, ...] = (),
                 runtimes: tuple[str, ...] = RUNTIMES, suffix: str = "") -> dict[str, Any]:
    stop = {p for p in (env.containerd.pid,) if p}
    out: dict[str, Any] = {}
    for rt in runtimes:
        for count in (1, 3):
            group = f"mem-{short(rt)}-{count}"
            ann = "io.fractal.sandbox" if rt == FRACTAL_RT else "io.containerd.runc.v2.group"
            cids = [f"{group}-{i}" for i in range(count)]
            try:
                for cid in cids:
                    extra = fractal_args if rt == FRACTAL_RT else ()
                    argv = ctr_run_argv(env, ref, rt, "fractal", cid, *extra, "--annotation", f"{ann}={group}",
                                        detach=True, cmd=("sleep", "600"))
                    subprocess.run(argv, check=True, capture_output=True, timeout=60)
                    wait_running(env, cid)
                time.sleep(1.0)  # let the shim settle (lazy imports, GC)
                procs: set[int] = set()
                for cid in cids:
                    procs.update(shim_processes(task_pid(env, cid), stop))
                detail = [{"pid": p, "rss_kb": _kb(_status(p).get("VmRSS", "")), "pss_kb": pss_kb(p),
                           "uss_kb": uss_kb(p), "cmd": cmdline(p)[:120]} for p in sorted(procs)]
                out[f"{short(rt)}/{count}{suffix}"] = {
                    "processes": len(procs),
                    "rss_mb": sum(d["rss_kb"] for d in detail) / 1024,
                    "pss_mb": sum(d["pss_kb"] for d in detail) / 1024,
                    "uss_mb": sum(d["uss_kb"] for d in detail) / 1024,
                    "detail": detail,
                }
            finally:
                for cid in cids:
                    remove(env, cid)
    return out


def zygote_memory(env: FractalEnv) -> list[dict[str, Any]]:
    """The fork-server itself (one per containerd, not per sandbox): RSS, PSS, USS (found by
    shim/procs.py's rule)."""
    from shim import procs

    return [{"pid": p, "rss_kb": _kb(_status(p).get("VmRSS", "")), "pss_kb": pss_kb(p), "uss_kb": uss_kb(p)}
            for p in procs.zygote_pids(str(env.address))]


# ---------------------------------------------------------------------------------------------
# report


def report(result: dict[str, Any]) -> tuple[str, list[tuple[str, bool, str]]]:
    lines = []
    m = result["machine"]
    lines.append(f"command: {result['command']}")
    lines.append(f"machine: {m['nproc']} CPU {m['cpu']}, {m['mem_total']}, kernel {m['kernel']}, "
                 f"{m['containerd']}, python {m['python']}, fs {m['filesystem']}")
    lines.append(f"image: {result['image_ref']}; FRACTAL_AGENT={result['agent']} "
                 f"FRACTAL_SHIM_SPAWN={result['spawn']}; load average at start {result.get('loadavg', '?')}")
    goals: list[tuple[str, bool, str]] = []
    run = result.get("run")
    if run:
        lines.append("")
        lines.append(f"ctr run --rm IMAGE idN true  ({run['runs']} runs each, alternating)")
        setups = run.get("setups", ["installed"])
        for name in setups:
            lines.append(f"  setup {name}: {SETUPS[name].what}")
        lines.append(f"  {'runtime/snapshotter[/setup]':<30}{'median s':>10}{'p90 s':>10}{'min s':>10}{'max s':>10}")

        def row(k: str) -> None:
            v = run[k]
            lines.append(f"  {k:<30}{v['median']:>10.3f}{v['p90']:>10.3f}{v['min']:>10.3f}{v['max']:>10.3f}")

        for sn in SNAPSHOTTERS:
            for rt in RUNTIMES:
                row(f"{short(rt)}/{sn}")
            lines.append(f"  {'ratio fractal/runc':<30}{run[f'ratio/{sn}']:>10.2f}")
        for name in setups[1:]:
            row(f"fractal/fractal/{name}")
            lines.append(f"  {'ratio to runc/fractal':<30}{run[f'ratio/fractal/{name}']:>10.2f}")
        r = run["ratio/fractal"]
        goals.append((f"run --rm ratio, {setups[0]} (fractal snapshotter) <= {GOAL_RUN_RATIO}",
                      r <= GOAL_RUN_RATIO, f"{r:.2f}x"))
    mem = result.get("memory")
    if mem:
        lines.append("")
        lines.append("memory per sandbox (processes between the container's init and containerd)")
        lines.append(f"  {'runtime/containers':<22}{'procs':>6}{'RSS MB':>10}{'PSS MB':>10}{'USS MB':>10}")
        for k, v in mem.items():
            lines.append(f"  {k:<22}{v['processes']:>6}{v['rss_mb']:>10.1f}{v['pss_mb']:>10.1f}"
                         f"{v.get('uss_mb', 0.0):>10.1f}")
        for z in result.get("zygote_process", []):
            lines.append(f"  {'zygote (per containerd)':<22}{1:>6}{z['rss_kb'] / 1024:>10.1f}"
                         f"{z['pss_kb'] / 1024:>10.1f}{z['uss_kb'] / 1024:>10.1f}")
        v = mem["fractal/1"]["uss_mb"]  # the issue's measure: a forked daemon shares the zygote's pages
        goals.append((f"shim+agent USS per sandbox <= {GOAL_RSS_MB:.0f} MB", v <= GOAL_RSS_MB, f"{v:.1f} MB"))
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
    ap.add_argument("--spawn", choices=["zygote", "fork", "exec"],
                    default=os.environ.get("FRACTAL_SHIM_SPAWN") or "zygote",
                    help="FRACTAL_SHIM_SPAWN of the setups that do not set it (default: zygote)")
    ap.add_argument("--setups", default="installed,fork,tuned,dev-shell",
                    help="comma-separated, of " + ", ".join(SETUPS) + " (installed is always measured, first)")
    ap.add_argument("--skip", action="append", default=[], choices=["run", "memory"])
    ap.add_argument("--json", type=Path, metavar="FILE")
    ap.add_argument("--plot", type=Path, metavar="DIR", help="draw the start-time figure as DIR/shim-start.svg")
    ap.add_argument("--no-compile", action="store_true", help="do not byte-compile ccpu/ and shim/ first")
    ap.add_argument("--base", type=Path, metavar="DIR", help="the code setup `base` runs (an earlier checkout)")
    args = ap.parse_args(argv)
    if args.plot:
        from hack.bench import plots

        plots.require(ap.error)
    setups = ["installed"] + [n for n in args.setups.split(",") if n and n != "installed"]
    if unknown := [n for n in setups if n not in SETUPS]:
        ap.error(f"unknown setup(s) {unknown}; known: {', '.join(SETUPS)}")
    if not require_root():
        return 2
    os.environ["FRACTAL_AGENT"] = args.agent  # containerd's environment -> the shims'
    os.environ["FRACTAL_SHIM_SPAWN"] = args.spawn
    if "base" in setups and (args.base is None or not (args.base / "shim" / "main.py").is_file()):
        ap.error("setup base needs --base DIR holding an earlier checkout's shim/ and ccpu/")
    if not args.no_compile:
        byte_compile()
        if args.base is not None:
            import compileall

            for d in ("ccpu", "shim"):
                compileall.compile_dir(str(args.base / d), quiet=1)

    result: dict[str, Any] = {
        "command": command_line("hack/bench/shim.py", argv),
        "machine": machine_info(),
        "agent": args.agent,
        "spawn": args.spawn,
        "loadavg": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
        "setups": setups,
        "goals": {"run_ratio_max": GOAL_RUN_RATIO, "rss_mb_max": GOAL_RSS_MB},
    }
    t_all = time.monotonic()

    def measure() -> None:
        import tempfile

        with contextlib.ExitStack() as stack:
            envs: dict[str, tuple[FractalEnv, str]] = {}
            result["setup_env"] = {}
            for name in setups:
                env, refs = stack.enter_context(bench_env(args.image))
                ref = result["image_ref"] = refs[args.image]
                scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fractal-bench-")))
                result["setup_env"][name] = configure(env, SETUPS[name], scratch, args.base)
                log(f"setup {name}: env {env.id} up; pulling {ref}")
                for sn in (SNAPSHOTTERS if name == setups[0] else ("fractal",)):
                    env.pull(ref, namespace=NS, snapshotter=sn)
                stack.enter_context(dump_logs_on_failure(env))
                stack.callback(env.remove_namespace, NS)
                envs[name] = (env, ref)
            if "run" not in args.skip:
                t = time.monotonic()
                result["run"] = bench_run(envs, args.runs)
                log(f"run done in {time.monotonic() - t:.1f}s")
            if "memory" not in args.skip:
                env, ref = envs[setups[0]]
                result["memory"] = bench_memory(env, ref, SETUPS[setups[0]].ctr_args)
                result["zygote_process"] = zygote_memory(env)  # [] unless the fork-server is used
                if "fork" in envs:  # a daemon that imported everything itself, for comparison
                    env, ref = envs["fork"]
                    result["memory"].update(bench_memory(env, ref, SETUPS["fork"].ctr_args,
                                                         runtimes=(FRACTAL_RT,), suffix="/fork"))
                log("memory done")

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
