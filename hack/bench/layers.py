#!/usr/bin/env python3
"""Benchmark live layers: `fractal layers add` to a running container vs restarting it.

One private :class:`~hack.containerd_env.FractalEnv` (fractal snapshotter + containerd 1.6, the
fractal shim in host mode) fed by a :class:`~hack.registry.LocalRegistry` with the ``busybox``
and ``tools`` test images (``tools`` = busybox's layer + 2 layers of its own: a 3-layer image
sharing its base with the container).  Both images are pulled (``--snapshotter fractal``) first,
so neither side pays for a pull.  Each round, in the same run:

* **live**: ``ctr run -d`` a busybox container running a shell loop, then time
  ``python3 -m ccpu.cli layers add CONTAINER TOOLS`` (wall time of the whole CLI process, the
  CLI's own time after its imports, and the shim-side restack: the agent round trip inside the
  shim), check the file shows up, and time ``layers rm`` the same way; then the same add with
  the containerd lookups in the CLI's own process over gRPC (the path before the shim's
  AddImages, still taken for an older shim); the same add by the CLI started through a
  ``python3 -S`` launcher (ccpu/cli/launcher.py, as ``fractal install`` writes the shim's: no
  ``site``; the shim warm, what it may remember remembered: livelayers.Facts), and ``layers rm``
  through it; and ``python3 -c pass`` / ``python3 -S -c pass`` (the interpreter's floors);
* **restart**: the alternative -- stop that container and start one on the tools image:
  ``ctr task kill -s SIGKILL`` + wait until stopped + ``ctr task rm`` + ``ctr container rm`` +
  ``ctr run -d TOOLS`` until ``ctr task ls`` shows it RUNNING (timed as a whole).

Then the containerd lookups of the shim's ``AddImages`` alone, from this warm process, remembering
nothing vs with what the shim keeps between requests (``lookup_rounds``), alternated.

With ``--base DIR`` the same add is also timed with an older checkout's CLI (``PYTHONPATH=DIR``,
through the launcher; the shim stays this checkout's), for a before/after in the same rounds.
Each CLI process's CPU (user+sys) is recorded beside its wall time: under other load it moves
far less.  The order of live/restart alternates every round.  Prints medians and p90, the ratios, the
command, machine info and the goals (live add <= 0.1x restart, < 100 ms); ``--json FILE``.
Must run as root.

    python3 hack/bench/layers.py [--runs 10] [--agent inproc|process] [--base DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO))

from hack.bench.common import (bench_env, byte_compile, command_line, dump_logs_on_failure, finish,  # noqa: E402
                               guarded, launcher_paths, log, machine_info, percentile, require_root)
from hack.bench.shim import uss_kb  # noqa: E402
from hack.containerd_env import FractalEnv  # noqa: E402

RUNTIME = "io.containerd.fractal.v1"
NS = "bench"
LOOP = "while :; do sleep 1; done"
GOAL_RATIO = 0.1
GOAL_MS = 100.0


def ctr_run(env: FractalEnv, ref: str, cid: str) -> list[str]:
    return env.containerd.ctr_argv("run", "-d", "--snapshotter", "fractal", "--fifo-dir", str(env.fifo_dir),
                                   "--runtime", RUNTIME, ref, cid, "sh", "-c", LOOP, namespace=NS)


def task_state(env: FractalEnv, cid: str) -> str:
    r = env.ctr("tasks", "ls", namespace=NS, check=False)
    for line in r.stdout.splitlines()[1:]:
        parts = line.split()
        if parts and parts[0] == cid:
            return parts[-1]
    return ""


def wait_state(env: FractalEnv, cid: str, want: set[str], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while task_state(env, cid) not in want:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{cid} not {want} after {timeout}s")
        time.sleep(0.005)


def remove(env: FractalEnv, cid: str) -> None:
    env.ctr("tasks", "kill", "-s", "SIGKILL", cid, namespace=NS, check=False)
    with contextlib.suppress(RuntimeError):
        wait_state(env, cid, {"STOPPED", ""}, 20)
    env.ctr("tasks", "delete", "-f", cid, namespace=NS, check=False)
    env.ctr("containers", "rm", cid, namespace=NS, check=False)


#: the CLI as it was before the shim's AddImages: every containerd lookup from the CLI's own
#: process over gRPC (the path an older shim still gets), for the same-run comparison
VIA_CONTAINERD = ("import sys\nfrom ccpu.cli import layers, main\n"
                  "def no_shim(namespace, cid):\n    raise layers._OldShim(cid)\n"
                  "layers._local_shim = no_shim\nsys.exit(main(sys.argv[1:]))")


def cli_launcher() -> Path:
    """The ``fractal`` CLI as a ``python -S`` launcher with the paths ``site`` would add fixed
    (ccpu/cli/launcher.py, the one ``fractal install`` writes for the shim; the checkout comes
    first through ``PYTHONPATH`` as for the other variants): measures that lever for the CLI."""
    import atexit
    import shutil
    import tempfile

    from ccpu.cli import launcher

    work = tempfile.mkdtemp(prefix="fractal-bench-cli-")
    atexit.register(shutil.rmtree, work, True)
    path = Path(work) / "fractal"
    path.write_text(launcher.render(sys.executable, launcher_paths(sys.executable), "ccpu.cli"))
    path.chmod(0o755)
    return path


LAUNCHER: list[Path] = []


#: the CPU (user+sys, ms) of the last fractal_cli process: less sensitive to other load than wall
LAST_CPU: list[float] = [0.0]


def fractal_cli(env: FractalEnv, *args: str, via_containerd: bool = False,
                via_launcher: bool = False, tree: str | None = None) -> tuple[float, dict[str, Any]]:
    import resource

    e = {**os.environ, "FRACTAL_RUN_DIR": str(env.fractal_run_dir)}
    if tree is not None:  # an older checkout's CLI (--base), same shim
        e["PYTHONPATH"] = tree
    if via_launcher:
        if not LAUNCHER:
            LAUNCHER.append(cli_launcher())
        argv = [str(LAUNCHER[0]), "layers", *args]
    else:
        argv = [sys.executable, *(["-c", VIA_CONTAINERD] if via_containerd else ["-m", "ccpu.cli"]), "layers", *args]
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    r = subprocess.run(argv, capture_output=True, text=True, env=e, timeout=120)
    wall = (time.monotonic() - t0) * 1000
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    LAST_CPU[0] = (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) * 1000
    if r.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} failed: {r.stderr.strip()}")
    return wall, json.loads(r.stdout)


def shim_records(env: FractalEnv, cid: str) -> list[dict[str, Any]]:
    """The sandbox records (ccpu/sandboxes.py) listing ``cid``: its shim daemon's pid."""
    out = []
    for p in (env.fractal_run_dir / "sandboxes" / NS).glob("*.json"):
        with contextlib.suppress(OSError, ValueError):
            rec = json.loads(p.read_text())
            if cid in rec.get("containers", []):
                out.append(rec)
    return out


BASE: list[str] = []  # --base: an older checkout whose CLI is measured beside this one's


def live_round(env: FractalEnv, base: str, tools: str, cid: str) -> dict[str, float]:
    subprocess.run(ctr_run(env, base, cid), check=True, capture_output=True, timeout=60)
    wait_state(env, cid, {"RUNNING"})
    flags = ["-a", str(env.address), "-n", NS]
    try:
        add_wall, add = fractal_cli(env, "add", *flags, "--json", cid, tools)  # the shim's first: cold
        add_cpu = LAST_CPU[0]
        if len(add["added"]) != 2:
            raise RuntimeError(f"expected 2 added layers, got {add['added']}")
        out = env.ctr("tasks", "exec", "--exec-id", "chk", cid, "cat", "/opt/tools/hello.txt", namespace=NS).stdout
        if out != "hello from tools\n":
            raise RuntimeError(f"added file not visible: {out!r}")
        shim_uss = sum(uss_kb(rec["shim_pid"]) for rec in shim_records(env, cid)) / 1024
        rm_wall, rm = fractal_cli(env, "rm", *flags, "--json", cid, tools)
        rm_cpu = LAST_CPU[0]
        old_wall, old = fractal_cli(env, "add", *flags, "--json", cid, tools, via_containerd=True)
        if len(old["added"]) != 2:
            raise RuntimeError(f"expected 2 added layers (containerd path), got {old['added']}")
        fractal_cli(env, "rm", *flags, "--json", cid, tools)
        fast_wall, fast = fractal_cli(env, "add", *flags, "--json", cid, tools, via_launcher=True)
        fast_cpu = LAST_CPU[0]
        if len(fast["added"]) != 2:
            raise RuntimeError(f"expected 2 added layers (launcher), got {fast['added']}")
        frm_wall, frm = fractal_cli(env, "rm", *flags, "--json", cid, tools, via_launcher=True)
        frm_cpu = LAST_CPU[0]
        if len(frm["removed"]) != 2 or len(frm["labels_removed"]) != 1:
            raise RuntimeError(f"expected 2 removed layers and 1 label (launcher), got {frm}")
        extra: dict[str, float] = {"rm_launcher_wall_ms": frm_wall, "rm_launcher_cpu_ms": frm_cpu,
                                   "rm_launcher_cli_ms": frm["cli_ms"]}
        if BASE:
            bw, b = fractal_cli(env, "add", *flags, "--json", cid, tools, via_launcher=True, tree=BASE[0])
            extra.update({"base_add_launcher_wall_ms": bw, "base_add_launcher_cpu_ms": LAST_CPU[0],
                          "base_add_launcher_cli_ms": b["cli_ms"]})
            bw, b = fractal_cli(env, "rm", *flags, "--json", cid, tools, via_launcher=True, tree=BASE[0])
            extra.update({"base_rm_launcher_wall_ms": bw, "base_rm_launcher_cpu_ms": LAST_CPU[0]})
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-c", "pass"], check=True, timeout=60)
        floor = (time.monotonic() - t0) * 1000
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-S", "-c", "pass"], check=True, timeout=60)
        floor_s = (time.monotonic() - t0) * 1000
        return {"add_wall_ms": add_wall, "add_cli_ms": add["cli_ms"], "add_restack_ms": add["restack_ms"],
                "rm_wall_ms": rm_wall, "rm_cli_ms": rm["cli_ms"], "rm_cpu_ms": rm_cpu, "rm_restack_ms": rm["restack_ms"],
                "add_via_containerd_wall_ms": old_wall, "add_via_containerd_cli_ms": old["cli_ms"],
                "add_launcher_wall_ms": fast_wall, "add_launcher_cli_ms": fast["cli_ms"],
                "add_cpu_ms": add_cpu, "add_launcher_cpu_ms": fast_cpu, **extra,
                "python_floor_ms": floor, "python_s_floor_ms": floor_s, "shim_uss_mb_after_add": shim_uss}
    finally:
        remove(env, cid)


def lookup_rounds(env: FractalEnv, base: str, tools: str, cid: str, n: int) -> dict[str, list[float]]:
    """The containerd lookups of the shim's AddImages for ``tools`` on a running container, from
    this (warm) process, alternated: ``cold`` remembers nothing (every request before
    livelayers.Facts), ``shared`` a new shim's first request (the facts another shim left in
    the run dir, nothing in memory, the container's own layers not yet named), ``warm`` with
    the Facts and own-layer names a previous request left (what the shim keeps).  Each: a new connection, the container's
    record, the image found, its layers planned, every layer of the answer named (ms)."""
    from ccpu.client.containerd import ContainerdClient
    from ccpu.client.livelayers import Facts, Lookups

    subprocess.run(ctr_run(env, base, cid), check=True, capture_output=True, timeout=60)
    wait_state(env, cid, {"RUNNING"})
    import tempfile

    shared = tempfile.mkdtemp(prefix="fractal-bench-facts-")
    facts = Facts()
    own: dict[str, str] | None = None
    out: dict[str, list[float]] = {"lookups_cold_ms": [], "lookups_shared_ms": [], "lookups_warm_ms": []}

    def once(kind: str) -> tuple[float, dict[str, str] | None]:
        t0 = time.monotonic()
        with ContainerdClient(str(env.address), NS) as client:
            warm = kind == "warm"
            mine = facts if warm else Facts(directory=shared) if kind == "shared" else None
            look = Lookups(client, client.container(cid), facts=mine,
                           own=dict(own) if warm and own else None)
            img, why = look.find_image(tools)
            if img is None:
                raise RuntimeError(f"{tools}: {why}")
            present = set(look.own_layers())
            plan = look.plan([(tools, img)], present)
            named = [look.named({"dir": d, "live": False}) for d in present]
            if len(plan.layers) != 2 or not all(e["chain_id"] for e in named):
                raise RuntimeError(f"unexpected plan {plan} / names {named}")
        return (time.monotonic() - t0) * 1000, look.own_known()

    try:
        _, own = once("warm")  # what the shim's first request leaves behind
        once("shared")  # ... and what it leaves in the shims' run dir
        kinds = ("cold", "shared", "warm")
        for i in range(n):
            for kind in (kinds if i % 2 == 0 else tuple(reversed(kinds))):
                ms, _ = once(kind)
                out[f"lookups_{kind}_ms"].append(ms)
    finally:
        remove(env, cid)
        import shutil

        shutil.rmtree(shared, ignore_errors=True)
    return out


def restart_round(env: FractalEnv, base: str, tools: str, cid: str) -> dict[str, float]:
    subprocess.run(ctr_run(env, base, cid), check=True, capture_output=True, timeout=60)
    wait_state(env, cid, {"RUNNING"})
    new = cid + "-t"
    try:
        t0 = time.monotonic()
        env.ctr("tasks", "kill", "-s", "SIGKILL", cid, namespace=NS)
        wait_state(env, cid, {"STOPPED", ""})
        env.ctr("tasks", "delete", cid, namespace=NS)
        env.ctr("containers", "rm", cid, namespace=NS)
        subprocess.run(ctr_run(env, tools, new), check=True, capture_output=True, timeout=60)
        wait_state(env, new, {"RUNNING"})
        ms = (time.monotonic() - t0) * 1000
        return {"restart_ms": ms}
    finally:
        remove(env, cid)
        remove(env, new)


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "p90": percentile(values, 90), "min": min(values),
            "max": max(values), "n": len(values)}


def report(result: dict[str, Any]) -> tuple[str, list[tuple[str, bool, str]]]:
    s = result["summary"]
    restart = s["restart_ms"]["median"]
    lines = [f"live layers vs restart ({result['runs']} rounds, agent {result['agent']}; "
             f"{result['image']}: 3 layers, 2 not yet in the container)",
             f"{'':<34}{'median':>9}{'p90':>9}{'min':>9}{'max':>9}  (ms)"]
    names = [("add_wall_ms", "layers add: CLI wall time"), ("add_cli_ms", "layers add: CLI after imports"),
             ("add_via_containerd_wall_ms", "  same, lookups in the CLI: wall"),
             ("add_via_containerd_cli_ms", "  same, lookups in CLI: after imp."),
             ("add_launcher_wall_ms", "  same, CLI by python -S launcher"),
             ("add_launcher_cli_ms", "  same, launcher: after imports"),
             ("add_cpu_ms", "layers add: CLI process CPU"),
             ("add_launcher_cpu_ms", "  same, launcher: CPU"),
             ("base_add_launcher_wall_ms", "--base CLI, launcher: wall"),
             ("base_add_launcher_cpu_ms", "--base CLI, launcher: CPU"),
             ("base_add_launcher_cli_ms", "--base CLI, launcher: after imp."),
             ("python_floor_ms", "python3 -c pass (floor)"),
             ("python_s_floor_ms", "python3 -S -c pass (floor)"),
             ("add_restack_ms", "layers add: shim-side restack"), ("rm_wall_ms", "layers rm: CLI wall time"),
             ("rm_cli_ms", "layers rm: CLI after imports"), ("rm_cpu_ms", "layers rm: CLI process CPU"),
             ("rm_launcher_wall_ms", "  same, CLI by python -S launcher"),
             ("rm_launcher_cli_ms", "  same, launcher: after imports"),
             ("rm_launcher_cpu_ms", "  same, launcher: CPU"),
             ("base_rm_launcher_wall_ms", "--base CLI rm, launcher: wall"),
             ("base_rm_launcher_cpu_ms", "--base CLI rm, launcher: CPU"),
             ("rm_restack_ms", "layers rm: shim-side restack"), ("restart_ms", "restart (kill+rm+run -d)"),
             ("lookups_cold_ms", "AddImages' lookups, nothing kept"),
             ("lookups_shared_ms", "  same, a new shim: run dir's facts"),
             ("lookups_warm_ms", "  same, with what the shim keeps")]
    for key, label in names:
        if key not in s:
            continue
        v = s[key]
        lines.append(f"{label:<34}{v['median']:>9.1f}{v['p90']:>9.1f}{v['min']:>9.1f}{v['max']:>9.1f}")
    u = s["shim_uss_mb_after_add"]
    lines.append(f"shim daemon USS after an add (MB): median {u['median']:.1f}, max {u['max']:.1f} (goal <= 40)")
    goals = []
    for key, label in (("add_restack_ms", "shim-side restack"), ("add_cli_ms", "CLI after imports"),
                       ("add_wall_ms", "CLI wall time"), ("add_launcher_wall_ms", "CLI wall time, launcher"),
                       ("rm_launcher_wall_ms", "rm: CLI wall time, launcher")):
        med = s[key]["median"]
        ratio = med / restart
        ok = ratio <= GOAL_RATIO and med < GOAL_MS
        goals.append((label, ok, f"{label}: {med:.1f} ms = {ratio:.3f}x restart "
                                 f"(goal <= {GOAL_RATIO}x and < {GOAL_MS:.0f} ms): {'met' if ok else 'MISSED'}"))
    lines += [g[2] for g in goals]
    old = s["add_via_containerd_wall_ms"]["median"]
    lines.append(f"CLI wall, shim does the lookups vs the CLI: {s['add_wall_ms']['median']:.1f} / {old:.1f} ms "
                 f"= {s['add_wall_ms']['median'] / old:.2f}x; python3 floor {s['python_floor_ms']['median']:.1f} ms")
    lines.append(f"command: {result['command']}")
    m = result["machine"]
    lines.append("machine: " + ", ".join(f"{k}={v}" for k, v in m.items()))
    return "\n".join(lines), goals


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10, help="rounds of each (default 10)")
    ap.add_argument("--agent", choices=["inproc", "process"], default=os.environ.get("FRACTAL_AGENT", "inproc"))
    ap.add_argument("--json", type=Path, metavar="FILE")
    ap.add_argument("--no-compile", action="store_true", help="do not byte-compile ccpu/ and shim/ first")
    ap.add_argument("--base", type=Path, metavar="DIR",
                    help="an older checkout (e.g. `git archive BASE | tar -x -C DIR`) whose CLI is also "
                         "timed each round through the launcher, against this checkout's shim")
    args = ap.parse_args(argv)
    if args.base:
        import compileall

        BASE.append(str(args.base.resolve()))
        compileall.compile_dir(BASE[0], quiet=1)
    if not require_root():
        return 2
    os.environ["FRACTAL_AGENT"] = args.agent
    # the shims (containerd's environment) and the CLI run this checkout's code, not an install's
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    if not args.no_compile:
        byte_compile()

    result: dict[str, Any] = {
        "command": command_line("hack/bench/layers.py", argv),
        "machine": machine_info(), "agent": args.agent, "runs": args.runs, "image": "tools",
        "goals": {"ratio_max": GOAL_RATIO, "ms_max": GOAL_MS},
    }
    rounds: list[dict[str, float]] = []
    lookups: dict[str, list[float]] = {}

    def measure() -> None:
        with bench_env("busybox", "tools") as (env, refs):
            for ref in refs.values():
                env.pull(ref, namespace=NS)
            log(f"env {env.id} up; images {refs}")
            with dump_logs_on_failure(env):
                live_round(env, refs["busybox"], refs["tools"], "warm-l")  # untimed warm-up of both
                restart_round(env, refs["busybox"], refs["tools"], "warm-r")
                for i in range(args.runs):
                    r: dict[str, float] = {}
                    order = (live_round, restart_round) if i % 2 == 0 else (restart_round, live_round)
                    for fn in order:
                        r.update(fn(env, refs["busybox"], refs["tools"], f"b{i}{fn.__name__[0]}"))
                    rounds.append(r)
                    log(f"round {i + 1}/{args.runs}: add {r['add_wall_ms']:.0f} ms (restack "
                        f"{r['add_restack_ms']:.1f}), restart {r['restart_ms']:.0f} ms")
                lookups.update(lookup_rounds(env, refs["busybox"], refs["tools"], "lk", 4 * args.runs))
            env.remove_namespace(NS)

    rc = guarded(measure)
    if rc:
        return rc
    result["rounds"] = rounds
    result["summary"] = {k: summary([r[k] for r in rounds]) for k in rounds[0]}
    result["summary"].update({k: summary(v) for k, v in lookups.items()})
    return finish(result, report, args.json)


if __name__ == "__main__":
    sys.exit(main())
