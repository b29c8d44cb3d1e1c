#!/usr/bin/env python3
"""CRI pod start/stop through crictl: runc vs fractal host mode vs fractal VM mode.

What a kubelet waits for: ``crictl runp`` (sandbox + CNI) then ``create`` + ``start`` of one
busybox container until it runs, and the teardown (``stopp`` + ``rmp``).  The baseline is
containerd's own runc handler (``io.containerd.runc.v2``) in the same containerd 1.6 with the same
CNI bridge; 1.6 has one CRI snapshotter, so all three unpack into fractal (the comparison is of
the runtimes).  Pods have their own netns; in VM mode that includes attaching it to the VM.
The fractal shim is the launcher ``fractal install`` writes (``python -S``, no ``site``).
Under TCG (no usable KVM here) the VM figures are dominated by the guest boot.

``--pool``: one more variant, "fractal vm pooled": VM-mode pods with a pool daemon
(``python3 -m shim.poold --size 1``) keeping a VM ready; each pod adopts it (checked in
containerd's log) and the pool is waited for until it has refilled before the next pod (the
refill is not in the figure, as in hack/bench/vm.py).

    python3 hack/bench/cri.py [--runs N] [--pool] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import Any

REPO = Path(__file__).resolve().parent.parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO))

from hack.bench.common import (  # noqa: E402
    byte_compile, command_line, dump_logs_on_failure, finish, guarded, install_shim_launcher, log, machine_info, percentile, require_root)
from hack.containerd_env import CNI_PLUGIN_DIR, CriConfig, FractalEnv, peer_bin_dir, peer_missing  # noqa: E402

#: (label, handler, pod annotations)
VARIANTS = (("runc", "runc", {}),
            ("fractal host", "fractal", {"io.fractal.mode": "host"}),
            ("fractal vm", "fractal", {"io.fractal.mode": "vm"}))


class Crictl:
    def __init__(self, env: FractalEnv, work: Path) -> None:
        sock = f"unix://{env.address}"
        self.base = [str(peer_bin_dir("cri-tools") / "crictl"), "--runtime-endpoint", sock,
                     "--image-endpoint", sock, "--timeout", "300s"]
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("CONTAINER_RUNTIME_ENDPOINT", "IMAGE_SERVICE_ENDPOINT")}
        self.work = work

    def __call__(self, *args: str) -> str:
        r = subprocess.run([*self.base, *args], capture_output=True, text=True, env=self.env,
                           timeout=600, cwd=self.work)
        if r.returncode != 0:
            raise RuntimeError(f"crictl {' '.join(args)}: {r.stderr.strip()}")
        return r.stdout.strip()


def one_pod(crictl: Crictl, image: str, handler: str, annotations: dict[str, str], i: int) -> dict[str, float]:
    name = f"bench-{handler}-{i}-{time.monotonic_ns()}"
    pod = crictl.work / f"{name}.pod.json"
    pod.write_text(json.dumps({"metadata": {"name": name, "namespace": "default", "uid": name, "attempt": 0},
                               "log_directory": str(crictl.work), "annotations": annotations}))
    ctr = crictl.work / f"{name}.ctr.json"
    ctr.write_text(json.dumps({"metadata": {"name": "c"}, "image": {"image": image},
                               "command": ["sleep", "3600"], "log_path": f"{name}.log"}))
    t0 = time.monotonic()
    pod_id = crictl("runp", "--runtime", handler, str(pod))
    try:
        t_pod = time.monotonic()
        cid = crictl("create", pod_id, str(ctr), str(pod))
        crictl("start", cid)
        deadline = time.monotonic() + 120
        while json.loads(crictl("inspect", "-o", "json", cid))["status"]["state"] != "CONTAINER_RUNNING":
            if time.monotonic() > deadline:
                raise RuntimeError(f"{cid} not running after 120 s")
            time.sleep(0.02)
        t_run = time.monotonic()
    finally:
        t_stop0 = time.monotonic()
        crictl("stopp", pod_id)
        crictl("rmp", pod_id)
    t_end = time.monotonic()
    return {"runp_s": t_pod - t0, "to_running_s": t_run - t0, "teardown_s": t_end - t_stop0}


def use_installed_launcher(env: FractalEnv, work: Path) -> str:
    """The shim on containerd's PATH as `fractal install` leaves it: its ``python -S``
    launcher (ccpu/cli/launcher.py), rendered by install's own ``shim_change``; containerd is
    restarted to pick it up."""
    shim = install_shim_launcher(env, work / "bin")
    env.containerd.stop()
    env.containerd.start()
    return shim


POOLED = ("fractal vm pooled", "fractal", {"io.fractal.mode": "vm"})


@contextlib.contextmanager
def pool_daemon(env: FractalEnv) -> Iterator[Callable[[], str]]:
    """A pool of one ready VM for ``env``; yields ``ready()``: waits for a ready VM, its id."""
    from shim import pool

    penv = {**os.environ, "FRACTAL_RUN_DIR": str(env.fractal_run_dir), "FRACTAL_CONFIG": str(env.fractal_config),
            "FRACTAL_ROOT": str(env.snapshotter_root)}
    with open(env.log_dir / "pool.log", "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "shim.poold", "--size", "1"], env=penv, stdout=out,
                                stderr=subprocess.STDOUT)

    def ready() -> str:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the pool exited with {proc.returncode} (see {env.log_dir / 'pool.log'})")
            with contextlib.suppress(OSError):
                r = pool.status(str(env.fractal_run_dir)).get("ready") or []
                if r:
                    return str(r[0]["id"])
            time.sleep(0.5)
        raise RuntimeError("the pool has no ready VM after 600 s")

    try:
        yield ready
    finally:
        proc.terminate()
        proc.wait(timeout=120)


def bench(env: FractalEnv, image: str, runs: int, work: Path, pooled: bool = False) -> dict[str, Any]:
    crictl = Crictl(env, work)
    crictl("pull", image)
    out: dict[str, Any] = {}
    for label, handler, ann in VARIANTS:
        one_pod(crictl, image, handler, ann, -1)  # warm-up (page cache, guest build check)
        samples = [one_pod(crictl, image, handler, ann, i) for i in range(runs)]
        out[label] = {k: {"median": percentile([s[k] for s in samples], 50),
                          "max": max(s[k] for s in samples)} for k in samples[0]}
        log(f"{label}: to running {out[label]['to_running_s']['median']:.2f} s (median of {runs})")
    if pooled:
        label, handler, ann = POOLED
        with pool_daemon(env) as ready:
            adopted, samples = [], []
            for i in range(-1, runs):
                adopted.append(ready())
                s = one_pod(crictl, image, handler, ann, i)
                if i >= 0:
                    samples.append(s)
        log_text = (env.log_dir / "containerd.log").read_text(errors="replace")
        missing = [v for v in adopted if f"adopted pooled VM {v}" not in log_text]
        if missing:
            raise RuntimeError(f"pods did not adopt the pooled VMs {missing}: not a pool figure")
        out[label] = {k: {"median": percentile([s[k] for s in samples], 50),
                          "max": max(s[k] for s in samples)} for k in samples[0]}
        log(f"{label}: to running {out[label]['to_running_s']['median']:.2f} s (median of {runs})")
    return out


def report(result: dict[str, Any]) -> tuple[str, list[tuple[str, bool, str]]]:
    p = result["pods"]
    base = p["runc"]
    lines = [f"CRI pod (runp + 1 container to running, then stopp + rmp), {result['runs']} runs each, "
             f"containerd 1.6, CNI bridge",
             f"{'':<16}{'runp':>9}{'running':>9}{'teardown':>10}{'vs runc':>9}  (s, median)"]
    for label in [v[0] for v in VARIANTS] + ([POOLED[0]] if POOLED[0] in p else []):
        v = p[label]
        ratio = v["to_running_s"]["median"] / base["to_running_s"]["median"]
        lines.append(f"{label:<16}{v['runp_s']['median']:>9.2f}{v['to_running_s']['median']:>9.2f}"
                     f"{v['teardown_s']['median']:>10.2f}{ratio:>8.2f}x")
    lines.append(f"command: {result['command']}")
    lines.append("machine: " + ", ".join(f"{k}={v}" for k, v in result["machine"].items()))
    return "\n".join(lines), []  # no goal in the issue for pods: figures only


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="pods per variant (default 3)")
    ap.add_argument("--pool", action="store_true", help="also VM mode with a warm pool (shim.poold)")
    ap.add_argument("--json", type=Path, metavar="FILE")
    ap.add_argument("--no-compile", action="store_true", help="do not byte-compile ccpu/ and shim/ first")
    args = ap.parse_args(argv)
    if not require_root():
        return 2
    for why in (peer_missing("cri-tools"), None if (CNI_PLUGIN_DIR / "bridge").is_file() else "no CNI plugins",
                None if shutil.which("umoci") else "no umoci"):
        if why:
            print(f"bench: {why} (make setup)", file=sys.stderr)
            return 2
    if not args.no_compile:
        byte_compile()
    result: dict[str, Any] = {"command": command_line("hack/bench/cri.py", argv), "machine": machine_info(),
                              "runs": args.runs}

    def measure() -> None:
        from hack import testimages
        from hack.registry import LocalRegistry

        with contextlib.ExitStack() as stack:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fractal-bench-cri-")))
            reg = stack.enter_context(LocalRegistry(work / "registry"))
            busybox = testimages.build("busybox")
            image = reg.push(busybox, "bench/busybox", "latest")
            pause = work / "pause"
            shutil.copytree(busybox, pause)
            subprocess.run(["umoci", "config", "--image", f"{pause}:latest", "--config.cmd", "/bin/sleep",
                            "--config.cmd", "2147483647"], check=True)
            cri = CriConfig(sandbox_image=reg.push(pause, "bench/pause", "latest"),
                            insecure_registries=(reg.address,), network="bridge", runc_handler=True)
            env = stack.enter_context(FractalEnv(cri=cri))
            result["shim"] = use_installed_launcher(env, work)
            with dump_logs_on_failure(env):
                result["pods"] = bench(env, image, args.runs, work, pooled=args.pool)

    rc = guarded(measure)
    return rc if rc else finish(result, report, args.json)


if __name__ == "__main__":
    sys.exit(main())
