#!/usr/bin/env python3
"""Benchmark VM mode of containerd-shim-fractal-v1 (one QEMU guest per sandbox) through containerd.

One private :class:`~hack.containerd_env.FractalEnv` (fractal snapshotter + containerd 1.6, the
harness's config says ``mode = "host"``; VM sandboxes ask with ``io.fractal.mode=vm``) fed by a
:class:`~hack.registry.LocalRegistry`:

1. **VM boot**: ``ctr run --rm --annotation io.fractal.mode=vm IMAGE idN echo hi`` in a sandbox
   of its own, ``--boots`` times: wall time to the first output line and to ``ctr``'s exit, and
   the shim's own "VM agent up in X s" (QEMU start -> agent ``hello``; from containerd's log).
2. **Nth container in a running VM vs host mode**: a VM sandbox is kept running with a
   ``sleep`` container; then ``ctr run --rm --annotation io.fractal.sandbox=<it> IMAGE idN true``
   (joins the VM) alternates with a host-mode ``ctr run --rm IMAGE idN true``, ``--runs`` each
   after one warm-up each.  Goal: VM / host median <= 1.5.
3. **A new sandbox with the pool warm** (``--pool-runs``, issue 12 item 2): a pool daemon
   (``python3 -m shim.poold --size 1``, shim/poold.py) keeps one VM ready; ``ctr run --rm`` of
   a NEW VM sandbox (it adopts the ready VM) alternates with ``ctr run --rm`` of the Nth
   container in a running VM sandbox (itself on the first pooled VM).  Before EVERY run the pool
   is waited for until it is full (no boot running when a run starts): a new sandbox's run then
   contains its own refill (as a new sandbox in use does), the Nth container's none.  Each
   adoption is checked in containerd's log.  Goal: new sandbox / Nth <= 1.5.  Printed with it,
   per phase (hack/bench/phases.py, from the shim's and the pool's logs): the new shim's start,
   the adoption, create, start, exit, delete, ``ctr``'s exit, the VM's stop, and how long the
   refill boot ran during each kind of run.
4. **Memory**: host side, RSS of QEMU + virtiofsd of the sandbox (VmRSS; PSS too), and of
   everything per VM: those + the sandbox's shim daemon (its record's ``shim_pid``; PSS is the fair
   figure for it: it is forked from the shared fork-server, shim/zygote.py, and shares pages with it), with 1 and
   with 1 + ``--extra`` sleep containers; guest side, ``MemTotal - MemAvailable`` of the
   guest's /proc/meminfo read through ``ctr tasks exec`` in the first container, before and
   after the extra containers: growth per extra container.  Goal: <= 10 MB.  Between the two,
   ``--settle`` seconds idle, then the **idle sandbox** (issue 12's host RSS goal): QEMU's RSS by
   kind (hack/vm_rss.py) beside the guest's reserved and not-free memory and its free page
   reporting order.

5. **Nth container / runc run in the same guest** (``--runc-runs``, issue 12: the agent's and
   the host side's overhead, apart from TCG's): in ONE sandbox, ``ctr run --rm`` of its Nth
   container alternates with ``runc run`` of a copy of its first container's bundle in its guest
   (``bench_guest_runc``: through a helper container of the sandbox that joined the guest's pid
   namespace, nsenter; timed on the guest's clock).  Goal: <= 1.3.

The accelerator is whatever ``ccpu.vm.accel`` picks (TCG when KVM is unusable, as on the build
VM: then every guest-side figure is ~10x what KVM gives) and is printed.

    python3 hack/bench/vm.py [--image busybox] [--boots 3] [--runs 10] [--extra 4] [--settle 20]
                             [--pool-runs 3] [--runc-runs 10] [--pool-nice 0,10] [--pool-warm 0,runc,1] [--pool-hold 0,30]
                             [--baseline DIR] [--share auto|9p|virtiofs] [--json FILE]
                             [--plot DIR]

``--pool-nice 0,10``: step 3 once per pool ``--boot-nice`` value (a pool daemon each), to compare
the refill's priority in one run.  ``--pool-warm 0,runc,1`` likewise with the pool's guests offered
unwarmed (``--no-warm``), warmed by runc only (``--no-warm-container``: the warm-up before the
throw-away container, i.e. main's, as the A side of an A/B in one run) and warmed by a throw-away
container life cycle (the default); a value may repeat (``runc,1,runc,1``: the passes alternate), ``--pool-hold 0,30`` with the refill at the
handover and held until the adopter's first container runs (``--refill-hold``); the lists are
crossed, one pass (and pool daemon) per combination.

``--baseline DIR`` (another checkout, e.g. ``git worktree add --detach DIR main``): every pool pass is
run twice, on this tree and on DIR -- a second containerd env started with ``PYTHONPATH=DIR`` (so its
shims are DIR's), DIR's pool daemon, and so DIR's guest (the guest build is keyed by its inputs) --
in the order A B, B A, ... so that neither side always runs first.

``--plot DIR`` draws ``DIR/vm-boot.svg``: the boot of the sandbox of step 2 on the shim's clock
(guest found, QEMU spawned, agent hello) and on the guest's (console milestones), with step 1's
median to first output (hack/bench/plots.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
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
from hack.bench.shim import _kb, _status, pss_kb, remove, wait_running  # noqa: E402
from hack.containerd_env import FractalEnv  # noqa: E402

RT = "io.containerd.fractal.v1"
NS = "bench"
VM = ("--annotation", "io.fractal.mode=vm")
GOAL_NTH_RATIO = 1.5
GOAL_GUEST_MB_PER_CONTAINER = 10.0
GOAL_POOL_RATIO = 1.5
GOAL_RUNC_RATIO = 1.3
#: the pool's warm-up of a guest before it offers it (``--pool-warm``): none, runc only, runc + a
#: throw-away container life cycle (ccpu/agent/warmup.py; the default)
WARM_MODES = ("none", "runc", "container")


def warm_mode(value: str) -> str:
    """A ``--pool-warm`` list item: 0/no/false -> none, runc, 1/yes/true/container -> container."""
    v = value.strip().lower()
    if v in ("0", "no", "false", "none"):
        return "none"
    if v == "runc":
        return "runc"
    if v in ("1", "yes", "true", "container"):
        return "container"
    raise ValueError(f"--pool-warm: {value!r} is not 0, runc or 1")


def ctr_argv(env: FractalEnv, ref: str, cid: str, *extra: str, detach: bool = False,
             cmd: tuple[str, ...] = ("true",)) -> list[str]:
    return env.containerd.ctr_argv("run", "-d" if detach else "--rm", "--snapshotter", "fractal",
                                   "--fifo-dir", str(env.fifo_dir), "--runtime", RT, *extra, ref,
                                   cid, *cmd, namespace=NS)


def timed(argv: list[str]) -> float:
    t0 = time.monotonic()
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    dt = time.monotonic() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
    return dt


def stats(vals: list[float]) -> dict[str, float]:
    return {"median": statistics.median(vals), "p90": percentile(vals, 90), "min": min(vals),
            "max": max(vals)}


_AGENT_UP = re.compile(r"VM agent up in ([\d.]+)s \(guest ([\d.]+)s, qemu ([\d.]+)s, connected ([\d.]+)s\)")
_SANDBOX = re.compile(r"\bsandbox=(\S+)")


def boot_phases_by_sandbox(log_text: str) -> dict[str, dict[str, float]]:
    """The shim's clock of each VM boot in containerd's log (seconds from the boot's start): guest
    found, QEMU spawned, agent connected, agent ``hello`` answered.  The shim logs in logfmt
    (ccpu/logfmt.py) and containerd copies the line with the fields after the message:
    ``msg="VM agent up in 13.01s (guest 0.61s, qemu 0.67s, connected 0.67s): ..." ... sandbox=X``."""
    out: dict[str, dict[str, float]] = {}
    for line in log_text.splitlines():
        m, sb = _AGENT_UP.search(line), _SANDBOX.search(line)
        if m and sb:
            up, guest, qemu, conn = (float(g) for g in m.groups())
            out[sb.group(1)] = {"guest": guest, "qemu_started": qemu, "connected": conn, "agent_ready": up}
    return out


def agent_up_times(env: FractalEnv) -> dict[str, float]:
    text = (env.log_dir / "containerd.log").read_text(errors="replace")
    return {sb: p["agent_ready"] for sb, p in boot_phases_by_sandbox(text).items()}


def boot_timeline(env: FractalEnv, sandbox: str) -> dict[str, Any] | None:
    """One boot of ``sandbox``'s VM: the shim's phases and the guest's console milestones
    (``fractal-init: <uptime> <what>``, ccpu/guest/init.sh), for the timeline figure."""
    from ccpu.vm.run import console_milestones

    host = boot_phases_by_sandbox((env.log_dir / "containerd.log").read_text(errors="replace")).get(sandbox)
    try:
        console = (env.fractal_run_dir / "vms" / NS / sandbox / "console.log").read_text(errors="replace")
    except OSError:
        return None
    return {"host": host, "guest": console_milestones(console)} if host else None


# ---------------------------------------------------------------------------------------------


def bench_boot(env: FractalEnv, ref: str, boots: int, share: tuple[str, ...]) -> dict[str, Any]:
    first, total = [], []
    for i in range(boots):
        cid = f"boot{i}"
        argv = ctr_argv(env, ref, cid, *VM, *share, cmd=("echo", "hi"))
        t0 = time.monotonic()
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert p.stdout is not None
        line = p.stdout.readline()
        t_first = time.monotonic() - t0
        _, err = p.communicate(timeout=300)
        t_total = time.monotonic() - t0
        if p.returncode != 0 or line != "hi\n":
            raise RuntimeError(f"boot run failed ({p.returncode}, {line!r}): {err.strip()}")
        first.append(t_first)
        total.append(t_total)
        log(f"boot {i}: first output {t_first:.2f}s, ctr exit {t_total:.2f}s")
    time.sleep(0.5)  # the log line is written before containerd's copy reaches the file
    ups = agent_up_times(env)
    agent = [ups[f"boot{i}"] for i in range(boots) if f"boot{i}" in ups]
    return {"first_output": stats(first), "ctr_exit": stats(total),
            "agent_ready": stats(agent) if agent else None,
            "raw": {"first_output": first, "ctr_exit": total, "agent_ready": agent}}


def bench_nth(env: FractalEnv, ref: str, runs: int, share: tuple[str, ...]) -> dict[str, Any]:
    sb = "nth"
    ann = ("--annotation", f"io.fractal.sandbox={sb}", *VM, *share)
    subprocess.run(ctr_argv(env, ref, sb, *ann, detach=True, cmd=("sleep", "3600")),
                   check=True, capture_output=True, timeout=300)
    wait_running(env, sb, timeout=120)
    time.sleep(0.5)  # the shim's log line reaches containerd's log file a little later
    timeline = boot_timeline(env, sb)
    try:
        configs = {"vm": ann, "host": ()}
        times: dict[str, list[float]] = {k: [] for k in configs}
        for k, extra in configs.items():
            timed(ctr_argv(env, ref, f"warm-{k}", *extra))
        n = 0
        for i in range(runs):
            for k in (("vm", "host") if i % 2 == 0 else ("host", "vm")):
                n += 1
                times[k].append(timed(ctr_argv(env, ref, f"n{n}", *configs[k])))
        out: dict[str, Any] = {k: stats(v) for k, v in times.items()}
        out["raw"] = times
        out["runs"] = runs
        out["ratio"] = out["vm"]["median"] / out["host"]["median"]
        out["timeline"] = timeline
        return out
    finally:
        remove(env, sb)


def bench_pool(env: FractalEnv, ref: str, runs: int, share: tuple[str, ...], nice: int | None = None,
               tag: str = "", warm: str = "container", hold: float | None = None,
               baseline: Path | None = None) -> dict[str, Any]:
    """``nice``: the pool's ``--boot-nice`` (None: its default); ``warm``: ``none`` runs the pool
    with ``--no-warm`` (guests offered unwarmed), ``runc`` with ``--no-warm-container`` (runc
    read and run once, no throw-away container: main's warm-up before it), ``container`` the
    default (:data:`WARM_MODES`); ``tag``: names of this pass; ``baseline``: the pool daemon runs
    from that checkout (PYTHONPATH; ``env``'s containerd, and so its shims, must be that tree's
    too: :func:`main` ``--baseline``), where only ``none`` is passed on (an older pool has
    ``--no-warm`` only: any other mode is its default warm-up)."""
    from hack.bench import phases
    from shim import pool

    sb = f"pnth{tag}"
    ann = ("--annotation", f"io.fractal.sandbox={sb}", *VM, *share)
    penv = {**os.environ, "FRACTAL_RUN_DIR": str(env.fractal_run_dir), "FRACTAL_CONFIG": str(env.fractal_config),
            "FRACTAL_ROOT": str(env.snapshotter_root)}
    argv = [sys.executable, "-m", "shim.poold", "--size", "1"]
    if nice is not None:
        argv += ["--boot-nice", str(nice)]
    if warm not in WARM_MODES:
        raise ValueError(f"warm mode {warm!r} is not one of {', '.join(WARM_MODES)}")
    if baseline is not None:
        penv["PYTHONPATH"] = str(baseline)
        warm = "none" if warm == "none" else "default"
    if warm == "none":
        argv += ["--no-warm"]
    elif warm == "runc":
        argv += ["--no-warm-container"]
    if hold is not None:
        argv += ["--refill-hold", f"{hold:g}"]
    pool_log = env.log_dir / f"pool{tag}.log"
    with open(pool_log, "wb") as out:
        proc = subprocess.Popen(argv, env=penv, stdout=out, stderr=subprocess.STDOUT)

    def ready() -> list[dict[str, Any]]:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the pool exited with {proc.returncode} (see {pool_log})")
            try:
                r = pool.status(str(env.fractal_run_dir)).get("ready") or []
            except OSError:
                r = []
            if r:
                return r
            time.sleep(0.5)
        raise RuntimeError("the pool has no ready VM after 600 s")

    def run(kind: str, cid: str, group: str, argv: list[str]) -> None:
        t0 = time.time()
        dt = timed(argv)
        times[kind].append(dt)
        marked.append(phases.Run(kind, cid, group, t0, t0 + dt))

    try:
        # the running VM is a pooled one too (a pooled boot may take longer than vm.boot_timeout
        # on a loaded machine); which one it is does not change the Nth container's figure
        ready()
        subprocess.run(ctr_argv(env, ref, sb, *ann, detach=True, cmd=("sleep", "3600")),
                       check=True, capture_output=True, timeout=300)
        wait_running(env, sb, timeout=120)
        times: dict[str, list[float]] = {"pooled": [], "nth": []}
        marked: list[phases.Run] = []
        timed(ctr_argv(env, ref, f"pwarm{tag}", *ann))
        adopted = []
        for i in range(runs):
            for k in (("pooled", "nth") if i % 2 == 0 else ("nth", "pooled")):
                # every run starts with the pool full (no boot running): a new sandbox's run
                # then contains its own refill, and the Nth container's none
                (vm,) = ready()[:1]
                if k == "pooled":
                    adopted.append(vm["id"])
                    run(k, f"p{tag}{i}", f"p{tag}{i}", ctr_argv(env, ref, f"p{tag}{i}", *VM, *share))
                else:
                    run(k, f"pn{tag}{i}", sb, ctr_argv(env, ref, f"pn{tag}{i}", *ann))
        time.sleep(1.0)  # the last records reach containerd's log file a little later
        log_text = (env.log_dir / "containerd.log").read_text(errors="replace")
        missing = [v for v in adopted if f"adopted pooled VM {v}" not in log_text]
        if missing:
            raise RuntimeError(f"new sandboxes did not adopt the pooled VMs {missing}: not a pool figure")
        unwarmed = [v for v in adopted
                    if re.search(rf"adopted pooled VM {re.escape(v)} \(QEMU pid \d+, booted in [\d.]+s, not warmed\)",
                                 log_text)]
        phases.mark_runs(log_text, marked)
        pool_text = pool_log.read_text(errors="replace")
        phases.overlap(marked, phases.refills(pool_text))
        phases.vm_stops(pool_text, marked)
        out: dict[str, Any] = {k: stats(v) for k, v in times.items()}
        out["raw"] = times
        out["runs"] = runs
        out["ratio"] = out["pooled"]["median"] / out["nth"]["median"]
        out["boot_nice"] = nice
        out["warm"] = warm
        out["tree"] = str(baseline) if baseline is not None else "this tree"
        out["refill_hold"] = hold
        out["load_average"] = os.getloadavg()
        out["phases"] = phases.table(marked)
        out["marks"] = [{"kind": r.kind, "cid": r.cid, "marks": r.marks, "vm_stopped": r.vm_stopped,
                         "refill_overlap": r.refill_overlap} for r in marked]
        if warm != "none" and unwarmed:
            raise RuntimeError(f"adopted VM(s) {unwarmed} were not warmed by a warming pool")
        return out
    finally:
        proc.terminate()
        proc.wait(timeout=120)
        remove(env, sb)


#: Step 5's in-guest side: one ``runc run`` of a copy of a running container's bundle (its spec as
#: the agent wrote it, args ``true``, its rootfs shared), timed on the guest's clock by the guest's
#: python.  Run in the guest's namespaces (nsenter from a container that shares the guest's pid
#: namespace), so runc is the guest's own, as the agent's is.  Prints one JSON line.
GUEST_RUNC = r"""
import json, os, shutil, subprocess, sys, time
src, rid = sys.argv[1], sys.argv[2]
spec = json.load(open(os.path.join(src, "config.json")))
spec["process"]["args"] = ["true"]
spec["process"]["terminal"] = False
spec["root"]["path"] = os.path.join(src, spec["root"]["path"])
spec.pop("hooks", None)
spec.setdefault("linux", {})["cgroupsPath"] = "/fractal-bench/" + rid
bundle = "/run/fractal-bench/" + rid
os.makedirs(bundle)
with open(bundle + "/config.json", "w") as f:
    json.dump(spec, f)
runc = shutil.which("runc") or "/usr/sbin/runc"
t0 = time.monotonic()
r = subprocess.run([runc, "--root", "/run/fractal-bench/runc", "run", "--bundle", bundle, rid],
                   stdin=subprocess.DEVNULL, capture_output=True, text=True)
dt = time.monotonic() - t0
shutil.rmtree(bundle, ignore_errors=True)
print(json.dumps({"s": dt, "rc": r.returncode, "err": r.stderr[-400:]}))
"""
#: the helper container: privileged (nsenter needs SYS_ADMIN, SYS_CHROOT and SYS_PTRACE; with only those
#: added, ``runc run`` from it failed in runc's init with EPERM -- cause not pinned down: the helper's
#: bounding set or no_new_privs -- so all of it, as a privileged workload of the sandbox may ask)
HELPER_FLAGS = ("--privileged", "--allow-new-privs")


def bench_guest_runc(env: FractalEnv, ref: str, runs: int, share: tuple[str, ...], python: str) -> dict[str, Any]:
    """Step 5 (issue 12: Nth container in a running VM / ``runc run`` of the same bundle directly in
    the same guest): ONE sandbox, rounds alternating ``ctr run --rm`` of its Nth container (timed on
    the host, through containerd: what a user waits for) with one ``runc run`` in its guest of a copy
    of the bundle of the sandbox's first container (the same image and ctr's same default spec as the
    Nth container's, args ``true``; timed in the guest).  The in-guest run goes through ``ctr tasks
    exec`` of a helper container of the sandbox that joined the guest's pid namespace
    (``--with-ns pid:/proc/1/ns/pid``: a /proc/<pid>/ns path, kept as the guest's own by
    shim/guestspec.py), privileged (nsenter and runc's init need it): no new way into the guest,
    only what any workload of the sandbox may ask for.  The runc side leaves out making the rootfs (the bundle's is
    reused): the Nth container's own snapshot and overlay are the agent path's, and counted in it."""
    sb = "grunc"
    helper = f"{sb}-ns"
    ann = ("--annotation", f"io.fractal.sandbox={sb}", *VM, *share)
    try:
        subprocess.run(ctr_argv(env, ref, sb, *ann, detach=True, cmd=("sleep", "3600")),
                       check=True, capture_output=True, timeout=300)
        wait_running(env, sb, timeout=120)
        subprocess.run(ctr_argv(env, ref, helper, *ann, "--with-ns", "pid:/proc/1/ns/pid", *HELPER_FLAGS, detach=True,
                                cmd=("sleep", "3600")), check=True, capture_output=True, timeout=300)
        wait_running(env, helper, timeout=120)

        def runc_once(rid: str) -> tuple[float, float]:
            t0 = time.monotonic()
            r = env.ctr("tasks", "exec", "--exec-id", rid, helper, "nsenter", "-t", "1", "-m", "-u", "-i", "-n",
                        "-p", "--", python, "-S", "-I", "-c", GUEST_RUNC, f"/run/fractal/bundles/{sb}", rid,
                        namespace=NS, timeout=300)
            wall = time.monotonic() - t0
            got = json.loads(r.stdout.strip().splitlines()[-1])
            if got["rc"] != 0:
                raise RuntimeError(f"runc run in the guest failed ({got['rc']}): {got['err']}")
            return float(got["s"]), wall

        timed(ctr_argv(env, ref, "gwarm", *ann))  # one warm-up each
        runc_once("rwarm")
        times: dict[str, list[float]] = {"nth": [], "runc": [], "exec_wall": []}
        loads: list[float] = []
        for i in range(runs):
            for k in (("nth", "runc") if i % 2 == 0 else ("runc", "nth")):
                if k == "nth":
                    times["nth"].append(timed(ctr_argv(env, ref, f"g{i}", *ann)))
                else:
                    guest_s, wall = runc_once(f"r{i}")
                    times["runc"].append(guest_s)
                    times["exec_wall"].append(wall)
            loads.append(os.getloadavg()[0])
        out: dict[str, Any] = {k: stats(v) for k, v in times.items()}
        out.update(raw=times, runs=runs, load_1min=loads, ratio=out["nth"]["median"] / out["runc"]["median"],
                   ratio_min=out["nth"]["min"] / out["runc"]["min"],  # load only adds: the floors' ratio
                   # each round's two runs are seconds apart, under about the same load: their ratio's median
                   ratio_paired=statistics.median(a / b for a, b in zip(times["nth"], times["runc"])))
        return out
    finally:
        remove(env, helper)
        remove(env, sb)


def _vm_pids(env: FractalEnv, group: str) -> dict[str, int]:
    out = {}
    pids = env.fractal_run_dir / "vms" / NS / group / "pids"
    for line in pids.read_text().splitlines():
        name, pid, _ = line.split()
        out[f"{name}:{pid}"] = int(pid)
    return out


def _shim_pid(env: FractalEnv, group: str) -> int | None:
    """The sandbox's shim daemon (its record, ccpu/sandboxes.py): one Python process per sandbox,
    forked by the fork-server (shim/zygote.py), which all sandboxes share and is not counted."""
    import json

    try:
        rec = json.loads((env.fractal_run_dir / "sandboxes" / NS / f"{group}.json").read_text())
        return int(rec["shim_pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def host_totals(detail: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Totals of a sandbox's host processes by name (``qemu:PID``, ``virtiofsd:PID``, ``shim:PID``):
    ``rss_mb``/``pss_mb`` the VM's own (QEMU + virtiofsd (+ swtpm): the figure printed before the
    shim was counted), ``all_rss_mb``/``all_pss_mb`` everything per VM (the shim daemon too).  Pure."""
    vm_only = [d for name, d in detail.items() if not name.startswith("shim:")]
    return {"rss_mb": sum(d["rss_kb"] for d in vm_only) / 1024,
            "pss_mb": sum(d["pss_kb"] for d in vm_only) / 1024,
            "all_rss_mb": sum(d["rss_kb"] for d in detail.values()) / 1024,
            "all_pss_mb": sum(d["pss_kb"] for d in detail.values()) / 1024}


def _host_mem(env: FractalEnv, group: str) -> dict[str, Any]:
    from hack import vm_rss

    detail: dict[str, Any] = {}
    pids = _vm_pids(env, group)
    shim = _shim_pid(env, group)
    if shim is not None:
        pids[f"shim:{shim}"] = shim
    for name, pid in pids.items():
        st = _status(pid)
        detail[name] = {"rss_kb": _kb(st.get("VmRSS", "")), "pss_kb": pss_kb(pid),
                        "hwm_kb": _kb(st.get("VmHWM", ""))}
        if name.startswith("qemu"):  # where QEMU's RSS is (hack/vm_rss.py)
            b = vm_rss.breakdown(pid)
            detail[name]["parts"] = {k: {"rss_kb": p.rss_kb, "pss_kb": p.pss_kb} for k, p in b.parts.items()}
            detail[name]["breakdown"] = vm_rss.render(b, top_files=4)
    return {**host_totals(detail), "detail": detail, "load_average": os.getloadavg()}


def _guest_used_kb(env: FractalEnv, cid: str, tag: str) -> tuple[int, dict[str, int]]:
    r = env.ctr("tasks", "exec", "--exec-id", f"mem-{tag}", cid, "cat", "/proc/meminfo",
                namespace=NS, timeout=120)
    info = {k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in r.stdout.splitlines()) if v}
    return info["MemTotal"] - info["MemAvailable"], info


def _guest_idle(env: FractalEnv, cid: str, sb: str) -> dict[str, Any]:
    """The idle sandbox (issue 12's RSS goal): host RSS by kind, and the guest's own view of it --
    not free (MemTotal - MemFree: page cache included) and the free page reporting order it runs
    with -- read at the same moment."""
    r = env.ctr("tasks", "exec", "--exec-id", "mem-idle", cid, "sh", "-c",
                "cat /sys/module/page_reporting/parameters/page_reporting_order; cat /proc/meminfo",
                namespace=NS, timeout=120)
    order, _, rest = r.stdout.partition("\n")
    info = {k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in rest.splitlines()) if v}
    return {"host": _host_mem(env, sb), "page_reporting_order": int(order),
            "guest_not_free_mb": (info["MemTotal"] - info["MemFree"]) / 1024,
            "guest_reserved_mb": 512 - info["MemTotal"] / 1024,
            "guest_anon_huge_mb": info.get("AnonHugePages", 0) / 1024, "guest_cached_mb": info.get("Cached", 0) / 1024}


def bench_memory(env: FractalEnv, ref: str, extra: int, share: tuple[str, ...], settle: float = 20) -> dict[str, Any]:
    sb = "mem"
    ann = ("--annotation", f"io.fractal.sandbox={sb}", *VM, *share)
    cids = [f"{sb}-{i}" for i in range(1 + extra)]
    try:
        subprocess.run(ctr_argv(env, ref, cids[0], *ann, detach=True, cmd=("sleep", "3600")),
                       check=True, capture_output=True, timeout=300)
        wait_running(env, cids[0], timeout=120)
        time.sleep(3)  # let the guest settle (agent imports, page cache of the first image)
        host1 = _host_mem(env, sb)
        used1, info1 = _guest_used_kb(env, cids[0], "1")
        time.sleep(settle)  # idle: what the sandbox holds once the guest reported what it freed
        idle = _guest_idle(env, cids[0], sb)
        for cid in cids[1:]:
            subprocess.run(ctr_argv(env, ref, cid, *ann, detach=True, cmd=("sleep", "3600")),
                           check=True, capture_output=True, timeout=300)
            wait_running(env, cid, timeout=120)
        time.sleep(3)
        hostn = _host_mem(env, sb)
        usedn, infon = _guest_used_kb(env, cids[0], "n")
        return {
            "extra": extra,
            "host_1": host1, "host_n": hostn, "idle": idle, "settle_s": settle,
            "host_per_container_mb": (hostn["rss_mb"] - host1["rss_mb"]) / extra,
            "host_all_per_container_mb": (hostn["all_rss_mb"] - host1["all_rss_mb"]) / extra,
            "guest_used_1_mb": used1 / 1024, "guest_used_n_mb": usedn / 1024,
            "guest_per_container_mb": (usedn - used1) / 1024 / extra,
            "guest_memtotal_mb": info1["MemTotal"] / 1024,
            "guest_shmem_delta_mb": (infon.get("Shmem", 0) - info1.get("Shmem", 0)) / 1024,
            # with the page cache (image files read, runc) counted: an upper bound
            "guest_nonfree_per_container_mb":
                ((infon["MemTotal"] - infon["MemFree"]) - (info1["MemTotal"] - info1["MemFree"]))
                / 1024 / extra,
        }
    finally:
        for cid in cids:
            remove(env, cid)


# ---------------------------------------------------------------------------------------------


def _per_vm(v: dict[str, Any]) -> str:
    """One host-memory sample: QEMU + virtiofsd (the VM's processes), then everything per VM."""
    text = f"QEMU + virtiofsd {v['rss_mb']:.0f} MB (PSS {v['pss_mb']:.0f})"
    if "all_rss_mb" in v:  # results of before the shim was counted have no such total
        text += f"; everything per VM (+ the shim daemon) {v['all_rss_mb']:.0f} MB (PSS {v['all_pss_mb']:.0f})"
    return text


def _load(v: dict[str, Any]) -> str:
    return " ".join(f"{x:.1f}" for x in v.get("load_average", ())) or "?"


def report(result: dict[str, Any]) -> tuple[str, list[tuple[str, bool, str]]]:
    lines = []
    m = result["machine"]
    lines.append(f"command: {result['command']}")
    lines.append(f"machine: {m['nproc']} CPU {m['cpu']}, {m['mem_total']}, kernel {m['kernel']}, "
                 f"{m['containerd']}, python {m['python']}")
    lines.append(f"image: {result['image_ref']}; accel {result['accel']} ({result['accel_reason']}); "
                 f"share {result['share']}; guest {result.get('guest_kernel', '?')}, 512M, 2 vCPU")
    goals: list[tuple[str, bool, str]] = []
    b = result.get("boot")
    if b:
        lines.append("")
        lines.append(f"VM boot: ctr run --rm (own sandbox) IMAGE idN echo hi  ({len(b['raw']['ctr_exit'])} runs)")
        lines.append(f"  {'':<34}{'median s':>10}{'p90 s':>10}{'min s':>10}{'max s':>10}")
        for k, label in (("agent_ready", "QEMU start -> agent hello (shim)"),
                         ("first_output", "ctr run -> first output"), ("ctr_exit", "ctr run -> exit (VM stopped)")):
            v = b.get(k)
            if v:
                lines.append(f"  {label:<34}{v['median']:>10.2f}{v['p90']:>10.2f}{v['min']:>10.2f}{v['max']:>10.2f}")
    n = result.get("nth")
    if n:
        lines.append("")
        lines.append(f"Nth container: ctr run --rm IMAGE idN true  ({n['runs']} runs each, alternating)")
        lines.append(f"  {'':<34}{'median s':>10}{'p90 s':>10}{'min s':>10}{'max s':>10}")
        for k, label in (("vm", "in the running VM"), ("host", "host mode")):
            v = n[k]
            lines.append(f"  {label:<34}{v['median']:>10.3f}{v['p90']:>10.3f}{v['min']:>10.3f}{v['max']:>10.3f}")
        lines.append(f"  {'ratio vm/host':<34}{n['ratio']:>10.2f}")
        goals.append((f"Nth container start vm/host <= {GOAL_NTH_RATIO}", n["ratio"] <= GOAL_NTH_RATIO,
                      f"{n['ratio']:.2f}x"))
    for pl in result.get("pool_passes") or ([result["pool"]] if result.get("pool") else []):
        lines.append("")
        nice = "" if pl.get("boot_nice") is None else f", pool --boot-nice {pl['boot_nice']}"
        nice += {"none": ", pool --no-warm", False: ", pool --no-warm",
                 "runc": ", pool --no-warm-container (runc-only warm-up)"}.get(pl.get("warm", True), "")
        nice += f", tree {pl['tree']}" if pl.get("tree", "this tree") != "this tree" else ""
        nice += "" if pl.get("refill_hold") is None else f", pool --refill-hold {pl['refill_hold']:g}"
        load = " ".join(f"{x:.1f}" for x in pl.get("load_average", ()))
        lines.append(f"pool warm: ctr run --rm IMAGE idN true  ({pl['runs']} runs each, alternating{nice}; "
                     f"load average {load})")
        lines.append(f"  {'':<34}{'median s':>10}{'p90 s':>10}{'min s':>10}{'max s':>10}")
        for k, label in (("pooled", "NEW sandbox, pooled VM"), ("nth", "Nth container in a running VM")):
            v = pl[k]
            lines.append(f"  {label:<34}{v['median']:>10.3f}{v['p90']:>10.3f}{v['min']:>10.3f}{v['max']:>10.3f}")
        lines.append(f"  {'ratio new/Nth':<34}{pl['ratio']:>10.2f}")
        lines.extend(pl.get("phases") or [])
        goals.append((f"new sandbox (pool warm) / Nth container <= {GOAL_POOL_RATIO}", pl["ratio"] <= GOAL_POOL_RATIO,
                      f"{pl['ratio']:.2f}x"))
    gr = result.get("guest_runc")
    if gr:
        lines.append("")
        load = " ".join(f"{x:.1f}" for x in gr.get("load_1min", ()))
        lines.append(f"Nth container vs runc run in the same guest  ({gr['runs']} rounds, alternating; "
                     f"load average per round {load})")
        lines.append(f"  {'':<44}{'median s':>10}{'p90 s':>10}{'min s':>10}{'max s':>10}")
        for k, label in (("nth", "ctr run --rm, Nth container (host clock)"),
                         ("runc", "runc run, same bundle, in the guest"),
                         ("exec_wall", "  (ctr tasks exec carrying it, host clock)")):
            v = gr[k]
            lines.append(f"  {label:<44}{v['median']:>10.3f}{v['p90']:>10.3f}{v['min']:>10.3f}{v['max']:>10.3f}")
        lines.append(f"  {'ratio Nth / runc run':<44}{gr['ratio']:>10.2f}"
                     + (f"   (of the minima: {gr['ratio_min']:.2f}; median of the rounds' own ratios: "
                        f"{gr['ratio_paired']:.2f})" if "ratio_paired" in gr else ""))
        goals.append((f"Nth container / runc run in the same guest <= {GOAL_RUNC_RATIO}",
                      gr["ratio"] <= GOAL_RUNC_RATIO, f"{gr['ratio']:.2f}x"))
    mem = result.get("memory")
    if mem:
        lines.append("")
        lines.append("memory")
        for k in ("host_1", "host_n"):
            v = mem[k]
            who = ", ".join(f"{name} {d['rss_kb'] / 1024:.0f} (PSS {d['pss_kb'] / 1024:.0f})"
                            for name, d in v["detail"].items())
            cnt = 1 if k == "host_1" else 1 + mem["extra"]
            lines.append(f"  host RSS with {cnt} container(s): {_per_vm(v)}; load {_load(v)} [{who}]")
            lines += ["    " + ln for d in v["detail"].values() for ln in d.get("breakdown", "").splitlines()]
            if k == "host_1" and "idle" in mem:
                idle = mem["idle"]
                parts = next(d["parts"] for d in idle["host"]["detail"].values() if "parts" in d)
                lines.append(f"  idle ({mem['settle_s']:.0f} s later, load {_load(idle['host'])}): "
                             f"{_per_vm(idle['host'])}; QEMU's guest RAM "
                             f"{parts['guest_ram']['rss_kb'] / 1024:.1f} / TCG buffer "
                             f"{parts['tcg_buffer']['rss_kb'] / 1024:.1f} / files {parts['file']['rss_kb'] / 1024:.1f} "
                             f"(PSS {parts['file']['pss_kb'] / 1024:.1f}) / heap {parts['heap_anon']['rss_kb'] / 1024:.1f} MB")
                lines.append(f"    guest: reserved {idle['guest_reserved_mb']:.1f} + not free (MemTotal-MemFree) "
                             f"{idle['guest_not_free_mb']:.1f} MB (page cache {idle.get('guest_cached_mb', 0):.1f}, "
                             f"anon in THPs {idle.get('guest_anon_huge_mb', 0):.1f}); "
                             f"page_reporting_order {idle['page_reporting_order']}")
        lines.append(f"  host RSS growth per extra container: {mem['host_per_container_mb']:.1f} MB"
                     + (f" (with the shim daemon: {mem['host_all_per_container_mb']:.1f} MB)"
                        if "host_all_per_container_mb" in mem else ""))
        lines.append(f"  guest used (MemTotal-MemAvailable of {mem['guest_memtotal_mb']:.0f} MB): "
                     f"{mem['guest_used_1_mb']:.1f} MB -> {mem['guest_used_n_mb']:.1f} MB with "
                     f"{mem['extra']} more containers (Shmem {mem['guest_shmem_delta_mb']:+.1f} MB)")
        v = mem["guest_per_container_mb"]
        lines.append(f"  guest growth per extra container: {v:.1f} MB "
                     f"(MemTotal-MemFree, page cache included: {mem['guest_nonfree_per_container_mb']:.1f} MB)")
        goals.append((f"guest memory per extra container <= {GOAL_GUEST_MB_PER_CONTAINER:.0f} MB",
                      v <= GOAL_GUEST_MB_PER_CONTAINER, f"{v:.1f} MB"))
    lines.append("")
    for what, ok, val in goals:
        lines.append(f"goal {'MET   ' if ok else 'MISSED'} {what}: {val}")
    return "\n".join(lines), goals


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image", default="busybox", choices=["busybox", "edge"])
    ap.add_argument("--boots", type=int, default=3, help="VM boots (own sandbox each; default 3)")
    ap.add_argument("--runs", type=int, default=10, help="Nth-container runs per mode (default 10)")
    ap.add_argument("--extra", type=int, default=4, help="extra containers for memory (default 4)")
    ap.add_argument("--settle", type=float, default=20,
                    help="memory: seconds idle after the first container before the idle sample (default 20)")
    ap.add_argument("--share", choices=["auto", "9p", "virtiofs"], default="auto")
    ap.add_argument("--pool-runs", type=int, default=3, help="new-sandbox runs with the pool warm (default 3)")
    ap.add_argument("--pool-nice", default="",
                    help="comma-separated pool --boot-nice values, one pool pass each (default: the pool's)")
    ap.add_argument("--pool-warm", default="",
                    help="comma-separated 1/runc/0: a pool pass warming its guests with a throw-away container "
                         "(default), with runc only (--no-warm-container, the warm-up before it) or not at all "
                         "(--no-warm), crossed with --pool-nice; repeat values to alternate passes (1,runc,1,runc)")
    ap.add_argument("--pool-hold", default="",
                    help="comma-separated pool --refill-hold values (s; 0: refill at the handover), crossed "
                         "with the others")
    ap.add_argument("--baseline", type=Path, metavar="DIR",
                    help="another checkout (e.g. `git worktree add --detach DIR main`): each pool pass is run "
                         "twice, on this tree and on DIR (its shims, pool daemon and guest: a second containerd "
                         "env started with PYTHONPATH=DIR), alternating A B B A ...")
    ap.add_argument("--runc-runs", type=int, default=10,
                    help="step 5: rounds of Nth container vs runc run in the same guest (default 10)")
    ap.add_argument("--skip", action="append", default=[], choices=["boot", "nth", "pool", "memory", "runc"])
    ap.add_argument("--json", type=Path, metavar="FILE")
    ap.add_argument("--plot", type=Path, metavar="DIR", help="draw the boot timeline as DIR/vm-boot.svg")
    ap.add_argument("--no-compile", action="store_true", help="do not byte-compile ccpu/ and shim/ first")
    args = ap.parse_args(argv)
    if args.plot:
        from hack.bench import plots

        plots.require(ap.error)
    if not require_root():
        return 2
    if not args.no_compile:
        byte_compile()

    from ccpu.guest import initramfs
    from ccpu.vm import accel, shares

    guest = initramfs.build(offline=True)  # not part of any timing
    choice = accel.choose()
    share_type = args.share if args.share != "auto" else \
        shares.decide(None, os.environ.get("FRACTAL_SHARE") or None, shares.find_virtiofsd())[0]
    share = ("--annotation", f"io.fractal.share={share_type}")
    result: dict[str, Any] = {
        "command": command_line("hack/bench/vm.py", argv),
        "machine": machine_info(), "accel": choice.accel, "accel_reason": choice.reason,
        "share": share_type, "guest_kernel": guest.manifest.get("kernel", {}).get("version"),
        "goals": {"nth_ratio_max": GOAL_NTH_RATIO, "pool_ratio_max": GOAL_POOL_RATIO, "guest_mb_per_container_max": GOAL_GUEST_MB_PER_CONTAINER},
    }
    t_all = time.monotonic()

    def baseline_env(stack: contextlib.ExitStack) -> FractalEnv | None:
        """A second env whose containerd (so its shims) runs the baseline checkout's code."""
        if args.baseline is None:
            return None
        saved = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = str(args.baseline.resolve())
        try:
            benv, brefs = stack.enter_context(bench_env(args.image))
        finally:
            if saved is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = saved
        log(f"baseline env {benv.id} up ({args.baseline}); pulling {brefs[args.image]}")
        benv.pull(brefs[args.image], namespace=NS)
        result["baseline"] = {"dir": str(args.baseline), "image_ref": brefs[args.image],
                              "commit": subprocess.run(["git", "-C", str(args.baseline), "rev-parse", "HEAD"],
                                                       capture_output=True, text=True).stdout.strip()}
        return benv

    def measure() -> None:
        with bench_env(args.image) as (env, refs), contextlib.ExitStack() as stack:
            ref = result["image_ref"] = refs[args.image]
            log(f"env {env.id} up; pulling {ref}")
            env.pull(ref, namespace=NS)
            with dump_logs_on_failure(env):
                if "boot" not in args.skip:
                    result["boot"] = bench_boot(env, ref, args.boots, share)
                if "nth" not in args.skip:
                    result["nth"] = bench_nth(env, ref, args.runs, share)
                    log(f"nth done: ratio {result['nth']['ratio']:.2f}")
                if "pool" not in args.skip:
                    nices = [int(x) for x in args.pool_nice.split(",") if x] or [None]
                    warms = [warm_mode(x) for x in args.pool_warm.split(",") if x] or ["container"]
                    holds = [float(x) for x in args.pool_hold.split(",") if x] or [None]
                    passes = []
                    benv = baseline_env(stack)
                    for j, (nice, warm, hold) in enumerate((n, w, h) for n in nices for w in warms for h in holds):
                        trees: list[tuple[FractalEnv, str, Path | None]] = [(env, ref, None)]
                        if benv is not None:  # A B, then B A, ...: neither side always goes first
                            trees.append((benv, result["baseline"]["image_ref"], args.baseline.resolve()))
                            trees = trees if j % 2 == 0 else trees[::-1]
                        for e, r, base in trees:
                            passes.append(bench_pool(e, r, args.pool_runs, share, nice=nice, warm=warm, hold=hold,
                                                     tag=f"{'b' if base else ''}{j}" if j or base else "",
                                                     baseline=base))
                            log(f"pool done ({passes[-1]['tree']}; boot nice {nice}, warm {warm}, refill hold "
                                f"{hold}): ratio {passes[-1]['ratio']:.2f}")
                    result["pool"] = passes[-1]
                    if len(passes) > 1:
                        result["pool_passes"] = passes
                if "runc" not in args.skip:
                    result["guest_runc"] = bench_guest_runc(env, ref, args.runc_runs, share,
                                                            guest.manifest["binaries"]["python"])
                    log(f"guest runc done: ratio {result['guest_runc']['ratio']:.2f}")
                if "memory" not in args.skip:
                    result["memory"] = bench_memory(env, ref, args.extra, share, args.settle)
                    log("memory done")
            env.remove_namespace(NS)

    rc = guarded(measure)
    if rc:
        return rc
    result["seconds"] = time.monotonic() - t_all
    rc = finish(result, report, args.json)
    timeline = (result.get("nth") or {}).get("timeline")
    if args.plot and timeline:
        from hack.bench import plots

        boot = result.get("boot")
        timeline["first_output"] = boot["first_output"]["median"] if boot else None
        out = plots.plot_timeline(plots.timeline_rows(timeline), args.plot / 'vm-boot.svg', plots.boot_title(result))
        print(f"wrote {out}")
    elif args.plot:
        print("no boot timeline measured (step nth skipped, or its log line/console not found)", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
