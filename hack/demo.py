#!/usr/bin/env python3
"""The ``make run`` demo: images pulled through the fractal snapshotter into a private containerd.

What it shows, step by step with timings:
  1. test images (busybox, edge, tools) built into the cache and served by a local registry;
  2. a private containerd wired to the fractal proxy snapshotter (never the host's containerd),
     with its CRI plugin on (runtime handler ``fractal``, a CNI bridge of its own); the pool of
     ready VMs (``python3 -m shim.poold --size 1``) started on its run dir, booting in the background;
  3. ``ctr images pull --snapshotter fractal`` of the images into namespace ``fractal-demo``;
  4. ``ctr run --rm --snapshotter fractal --runtime io.containerd.fractal.v1`` of the edge image in
     host mode (whiteouts, opaque dirs ... applied), its shim daemon forked by the fork-server;
  5. ONE fractal VM with two containers (same sandbox, ``io.fractal.mode=vm``): the sandbox ADOPTS
     the pool's ready VM (same QEMU pid; adoption time vs the boot it saved, from ``fractal ps``);
     the tools image's layers added LIVE to one of them (``fractal layers add``) and removed again;
     then the pool is stopped, ending the VM it refilled;
  6. a Kubernetes-style pod through CRI (``crictl runp`` on handler ``fractal``, VM mode): one VM,
     the pod IP connected to the guest, an HTTP server in the VM answering the host;
  7. remote mode: ``fractal pki init``, the agent serving TLS 1.3 in a network namespace "machine"
     (hack/remote_machine.py), ``ctr run --annotation io.fractal.mode=remote`` on it, with the
     endpoint and both identities (certificate fingerprints) that served it;
  8. ``vm.attest``: a VM booted through OVMF from fractal.efi with its own swtpm; the shim checks
     the guest's TPM quote (PCR 11 predicted from the build manifest) before the first container;
     then ``fractal boot`` of the machine image: its layers booted as a whole machine, its own
     init as PID 1, a one-shot service reporting what it sees, then poweroff;
  9. the same images pulled into a second namespace: the layer repo does not grow, because layers
     are stored once and shared -- the figures are printed (compare ``--snapshotter overlayfs``,
     where every namespace unpacks its own copy);
  10. ``ctr snapshots ls``, ``fractal repo ls/du``; then everything is removed and GC empties the repo.

Exits non-zero with the failing step named if anything goes wrong.  ``--snapshotter overlayfs``
runs the same story on containerd's built-in snapshotter (baseline, and a harness check).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script: make `hack` importable
    sys.path.insert(0, str(REPO))

from hack.containerd_env import (  # noqa: E402
    CNI_PLUGIN_DIR, CriConfig, FractalEnv, HarnessError, dir_size, http_get, peer_bin_dir, peer_missing, tail)

NS1 = "fractal-demo"
NS2 = "fractal-demo2"
IMAGES = ("busybox", "edge", "tools")
#: Booted as a whole machine by `fractal boot` (busybox init + an inittab one-shot that reports).
BOOT_IMAGES = ("machine",)
#: Growth of the fractal repo tolerated on the second pull (metadata, not layer data).
SHARED_SLACK = 1024 * 1024
RUN_SCRIPT = (
    'echo "hostname: $(hostname)"; '
    'echo "kernel:   $(uname -r)"; '
    'echo "/edge:    $(ls /edge | tr "\\n" " ")"; '
    'echo "/edge/opaque: $(ls /edge/opaque | tr "\\n" " ")(a, b hidden by a later layer\'s opaque marker)"; '
    'echo "modified: $(cat /edge/modified)  (v2 = upper layer wins)"; '
    'test ! -e /edge/deleted && echo "deleted:  whited out, as expected"'
)


class StepFailed(RuntimeError):
    """A demo step failed; carries the step title for the final message."""

    def __init__(self, title: str, cause: BaseException) -> None:
        super().__init__(f"step '{title}' failed: {cause}")
        self.title = title
        self.cause = cause


class Narrator:
    """Numbered steps with wall-clock timings, so the output reads as a short story."""

    def __init__(self) -> None:
        self.n = 0
        self.t0 = time.monotonic()
        self.failed: list[StepFailed] = []

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[None]:
        self.n += 1
        print(f"[{self.n}] {title}", flush=True)
        t = time.monotonic()
        try:
            yield
        except (StepFailed, KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - any failure ends the demo with its step named
            failure = StepFailed(title, exc)
            self.failed.append(failure)
            raise failure from exc
        print(f"    ({time.monotonic() - t:.2f}s)", flush=True)

    def say(self, text: str) -> None:
        for line in text.rstrip("\n").splitlines():
            print(f"    {line}", flush=True)


def human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def storage_dir(env: FractalEnv, snapshotter: str) -> Path:
    """Where the snapshotter keeps layer data: fractal's repo, or containerd's overlayfs dir."""
    if snapshotter == "fractal":
        return env.snapshotter_root
    return env.containerd.config.root / f"io.containerd.snapshotter.v1.{snapshotter}"


def _dump_logs_on_failure(env: FractalEnv, failed: list[StepFailed]) -> None:
    """Runs before the env is torn down (its logs are deleted with it) if a step failed."""
    if not failed or not env.log_dir.exists():
        return
    for log in sorted(env.log_dir.glob("*.log")):
        print(f"--- last lines of {log} ---\n{tail(log, 20)}", file=sys.stderr)


FRACTAL_RUNTIME = "io.containerd.fractal.v1"


def _count_processes(name: str, mentioning: str) -> int:
    """Processes called `name` whose command line mentions `mentioning` (this env's QEMU)."""
    n = 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            cmd = open(f"/proc/{d}/cmdline", "rb").read().decode(errors="replace")
        except OSError:
            continue
        if cmd.startswith(name) or f"/{name}\0" in cmd or cmd.split("\0", 1)[0].endswith(name):
            if mentioning in cmd:
                n += 1
    return n


def _sandbox_qemus(env: FractalEnv) -> int:
    """This env's QEMU processes that sandboxes booted: not the pool's (booted under
    ``<run dir>/pool``; an adopted pooled VM keeps that command line, so it is watched by pid)."""
    pool_dir = str(env.fractal_run_dir / "pool") + "/"
    n = 0
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError):
                cmd = Path(f"/proc/{d}/cmdline").read_bytes().decode(errors="replace")
                if "qemu-system-x86_64" in cmd.split("\0", 1)[0] and str(env.run_dir) in cmd and pool_dir not in cmd:
                    n += 1
    return n


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _task_pid(env: FractalEnv, cid: str, ns: str) -> int:
    for line in env.ctr("tasks", "ls", namespace=ns).stdout.splitlines()[1:]:
        f = line.split()
        if f and f[0] == cid:
            return int(f[1])
    raise RuntimeError(f"no task {cid}")


def _delete_when_stopped(env: FractalEnv, cid: str, ns: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while env.ctr("tasks", "delete", cid, namespace=ns, check=False).returncode != 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"task {cid} did not stop")
        time.sleep(0.1)
    env.ctr("containers", "delete", cid, namespace=ns)


def _fractal_cli(*args: str, env: dict[str, str] | None = None) -> str:
    """Run the `fractal` CLI as a user would (module form: works before console scripts are on PATH)."""
    r = subprocess.run([sys.executable, "-m", "ccpu.cli", *args], capture_output=True, text=True,
                       cwd=REPO, check=False, env={**os.environ, **(env or {})})
    if r.returncode != 0:
        raise RuntimeError(f"fractal {' '.join(args)} failed: {r.stderr.strip()}")
    return r.stdout.rstrip()


def _cri_pod_in_vm(env: FractalEnv, nar: Narrator, image: str, work: Path) -> None:
    """A pod through CRI (what kubelet does for a RuntimeClass with handler ``fractal``)."""
    import json

    sock = f"unix://{env.address}"
    base = [str(peer_bin_dir("cri-tools") / "crictl"), "--runtime-endpoint", sock, "--image-endpoint", sock,
            "--timeout", "120s"]
    cenv = {k: v for k, v in os.environ.items() if k not in ("CONTAINER_RUNTIME_ENDPOINT", "IMAGE_SERVICE_ENDPOINT")}

    def crictl(*a: str) -> str:
        r = subprocess.run([*base, *a], capture_output=True, text=True, env=cenv, timeout=300, cwd=work)
        if r.returncode != 0:
            raise RuntimeError(f"crictl {' '.join(a)}: {r.stderr.strip()}")
        return r.stdout.strip()

    crictl("pull", image)
    pod = work / "pod.json"
    pod.write_text(json.dumps({
        "metadata": {"name": "demo-pod", "namespace": "default", "uid": "demo-pod-uid", "attempt": 0},
        "hostname": "demo-pod", "log_directory": str(work), "annotations": {"io.fractal.mode": "vm"}}))
    ctr = work / "web.json"
    ctr.write_text(json.dumps({
        "metadata": {"name": "web"}, "image": {"image": image}, "log_path": "web.log",
        "command": ["sh", "-c", "mkdir -p /www && echo \"hello from $(hostname), kernel $(uname -r)\" "
                                "> /www/index.html && exec httpd -f -p 8080 -h /www"]}))
    t0 = time.monotonic()
    pod_id = crictl("runp", "--runtime", "fractal", str(pod))
    try:
        nar.say(f"pod {pod_id[:12]} up in {time.monotonic() - t0:.1f}s; its QEMU processes: "
                f"{_sandbox_qemus(env)} (a pod with a network boots its own VM, not a pooled one)")
        cid = crictl("create", pod_id, str(ctr), str(pod))
        crictl("start", cid)
        ip = json.loads(crictl("inspectp", "-o", "json", pod_id))["status"]["network"]["ip"]
        if ip:
            body = http_get(ip, 8080, timeout=60).split("\r\n\r\n", 1)[-1].strip()
            nar.say(f"pod IP {ip} (CNI bridge); GET http://{ip}:8080/ from the host -> {body!r}")
        else:
            nar.say("no CNI plugins: the pod has no IP (host-network fallback)")
        nar.say(f"crictl exec web uname -r -> {crictl('exec', cid, 'uname', '-r')} (host: {os.uname().release})")
        crictl("stop", "-t", "2", cid)
        crictl("rm", cid)
    finally:
        subprocess.run([*base, "stopp", pod_id], capture_output=True, env=cenv, timeout=300)
        subprocess.run([*base, "rmp", "-f", pod_id], capture_output=True, env=cenv, timeout=300)
    deadline = time.monotonic() + 30
    while _sandbox_qemus(env) and time.monotonic() < deadline:
        time.sleep(0.2)
    nar.say(f"crictl stopp/rmp: the pod's QEMU processes left: {_sandbox_qemus(env)}")


class Pool:
    """``python3 -m shim.poold --size 1`` in the demo env's run dir/config/repo (as the tests do):
    it boots a VM in the background, which the first VM sandbox adopts instead of booting."""

    def __init__(self, env: FractalEnv) -> None:
        self.run_dir = str(env.fractal_run_dir)
        self.log = env.log_dir / "pool.log"
        penv = {**os.environ, "FRACTAL_RUN_DIR": str(env.fractal_run_dir),
                "FRACTAL_CONFIG": str(env.fractal_config), "FRACTAL_ROOT": str(env.snapshotter_root)}
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "shim.poold", "--size", "1"], env=penv,
                                         stdout=out, stderr=subprocess.STDOUT, cwd=REPO)

    def ready(self, timeout: float = 600) -> dict:
        """The pool's first ready VM, waiting for its boot (a failure names the pool's log)."""
        from shim import pool

        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the pool exited ({self.proc.returncode}): {tail(self.log, 20)}")
            with contextlib.suppress(OSError):
                ready = pool.status(self.run_dir).get("ready") or []
                if ready:
                    return ready[0]
            if time.monotonic() > deadline:
                raise RuntimeError(f"no pooled VM ready after {timeout:.0f}s: {tail(self.log, 20)}")
            time.sleep(0.5)

    def stop(self) -> None:
        """SIGTERM: the pool stops its un-adopted VM and removes its dirs and mounts."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _sandbox_vm(env: FractalEnv, ns: str, sandbox: str, cli_env: dict[str, str]) -> dict:
    import json

    for entry in json.loads(_fractal_cli("ps", "--json", "-a", str(env.address), "-n", ns, env=cli_env)):
        if entry["sandbox"] == sandbox and entry.get("vm"):
            return entry["vm"]
    raise RuntimeError(f"fractal ps shows no VM for sandbox {sandbox}")


def _zygotes(env: FractalEnv) -> list[int]:
    """The shim fork-server(s) of this env's containerd (``python -m shim.zygote -address A``)."""
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError):
                cmd = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
                if b"shim.zygote" in cmd and str(env.address).encode() in cmd:
                    found.append(int(d))
    return found


def _remote_step(env: FractalEnv, nar: Narrator, ref: str, work: Path) -> None:
    """Remote mode: `fractal pki init`, the agent in a network namespace "machine" reached over
    TCP + mutual TLS only, `ctr run` with io.fractal.mode=remote on it."""
    import re

    from ccpu import pki
    from hack.remote_machine import RemoteAgent, machine_netns

    with machine_netns() as m:
        pki_dir = work / "pki"
        _fractal_cli("pki", "init", str(pki_dir), "--agent-name", m.agent_ip)
        nar.say(f"fractal pki init {pki_dir} --agent-name {m.agent_ip} -> "
                f"{' '.join(sorted(p.name for p in pki_dir.iterdir()))}")
        agent_id = pki.fingerprint((pki_dir / "agent.pem").read_bytes())
        host_id = pki.fingerprint((pki_dir / "host.pem").read_bytes())
        # keep the env's config, add where remote sandboxes go
        cfg = env.fractal_config.read_text()
        env.fractal_config.write_text(cfg + f'[remote]\nendpoints = ["{m.agent_ip}:7443"]\n'
                                            f'tls_dir = "{pki_dir}"\nconnect_timeout = 10\n')
        agent = RemoteAgent(env, m, pki_dir)
        try:
            nar.say(f"agent serving TLS 1.3 on {m.agent_ip}:7443 in netns {m.netns} (own PID + mount "
                    f"namespaces; the host reaches it at {m.host_ip} -> {m.agent_ip} only)")
            r = env.run(ref, "remote1", "sh", "-c", 'echo "hello from remote1 (pid $$ in its container), '
                        'run by the remote agent"',
                        namespace=NS1, runtime=FRACTAL_RUNTIME, extra=["--annotation", "io.fractal.mode=remote"])
            nar.say(f"output: {r.stdout.strip()}")
            served = re.findall(r"connected \(identity (sha256:[0-9a-f]+)\)", agent.log.read_text())
            if host_id not in served or "create {'container': 'remote1'" not in agent.log.read_text():
                raise RuntimeError(f"the agent's log shows no session of the host's identity that created "
                                   f"remote1: {agent._tail()}")
            shim_line = [ln for ln in (env.log_dir / "containerd.log").read_text().splitlines()
                         if "remote agent" in ln and " up (identity " in ln]
            nar.say(f"the agent's log: host identity {host_id[:23]}... (host.pem, verified against ca.pem) "
                    "connected and created remote1 there")
            up = r"remote agent (\S+) up \(identity (sha256:[0-9a-f]+)\)"
            m2 = re.search(up, shim_line[-1]) if shim_line else None
            if m2 is None or m2.group(2) != agent_id:
                raise RuntimeError(f"the shim's log (in containerd's) names no agent of identity {agent_id}: "
                                   f"{shim_line[-1:] or 'no remote agent line'}")
            nar.say(f"the shim's log: it dialled endpoint {m2.group(1)}, agent identity {m2.group(2)[:23]}... "
                    "(= agent.pem's)")
        finally:
            agent.stop()


def _attest_step(env: FractalEnv, nar: Narrator, ref: str, sn: str, work: Path, cli_env: dict[str, str]) -> None:
    """vm.attest: the sandbox's VM boots fractal.efi through OVMF with its own swtpm, and the shim
    checks the guest's TPM quote against the build manifest before the first container."""
    from ccpu.guest import initramfs, uki

    guest = initramfs.build(offline=True)
    cfg = work / "attest.toml"
    cfg.write_text('mode = "vm"\n[vm]\nattest = true\npool = 0\nboot_timeout = 240\n')
    t0 = time.monotonic()
    env.run(ref, "attested", "sleep", "600", rm=False, snapshotter=sn, namespace=NS1, runtime=FRACTAL_RUNTIME,
            extra=["-d", "--runtime-config-path", str(cfg), "--annotation", "io.fractal.sandbox=attested"],
            timeout=400)
    try:
        nar.say(f"container running {time.monotonic() - t0:.1f}s after ctr run (UEFI boot under TCG, "
                "quote checked before the container was created)")
        vm = _sandbox_vm(env, NS1, "attested", cli_env)
        att = vm.get("attested") or {}
        want11 = uki.pcr11(guest.manifest["uki"]["sections"]).hex()
        pcrs = att.get("pcrs") or {}
        if pcrs.get("11") != want11 or att.get("uki_sha256") != guest.manifest["uki"]["sha256"]:
            raise RuntimeError(f"the sandbox records no quote matching the build: {att} (PCR 11 predicted {want11})")
        nar.say(f"verified quote: PCR 11 {pcrs['11'][:16]}... = predicted from the manifest's UKI sections; "
                f"PCR 12 {pcrs.get('12', '?')[:16]}... (the command line); fractal.efi sha256 "
                f"{att['uki_sha256'][:16]}... (fractal ps --json: vm.attested)")
        kernel = env.ctr("tasks", "exec", "--exec-id", "a1", "attested", "uname", "-r", namespace=NS1).stdout.strip()
        nar.say(f"uname -r in the attested VM: {kernel}")
    finally:
        env.ctr("tasks", "kill", "-s", "SIGKILL", "attested", namespace=NS1, check=False)
        _delete_when_stopped(env, "attested", NS1, timeout=60)


def _boot_step(env: FractalEnv, nar: Narrator, ref: str, cli_env: dict[str, str]) -> None:
    """`fractal boot`: the machine image (busybox init + an inittab one-shot) booted as a whole
    machine from the repo's layers, its own init as PID 1."""
    env.pull(ref, namespace=NS1)
    t0 = time.monotonic()
    out = _fractal_cli("boot", "-a", str(env.address), "-n", NS1, ref,
                       env={**cli_env, "FRACTAL_CONFIG": str(env.fractal_config)})
    lines = [ln.strip() for ln in out.splitlines() if "fractal-boot-oneshot:" in ln]
    if not any("pid1=init" in ln for ln in lines):
        raise RuntimeError(f"the machine's one-shot service did not report: {out[-800:]}")
    nar.say(f"booted to its own init and powered off in {time.monotonic() - t0:.1f}s; its one-shot service said:\n"
            + "\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--snapshotter", default="fractal", choices=["fractal", "overlayfs", "native"],
                    help="snapshotter to demo (default fractal; overlayfs = baseline without fractal)")
    ap.add_argument("--allow-growth", action="store_true",
                    help="only warn (not fail) if the fractal repo grows on the second pull")
    ap.add_argument("--debug", action="store_true", help="debug logs for containerd and the snapshotter")
    args = ap.parse_args(argv)
    sn = args.snapshotter

    if os.geteuid() != 0:
        print("demo: must run as root (containerd, mounts)", file=sys.stderr)
        return 2
    # SIGTERM (e.g. from make/CI timeouts) unwinds through the context managers -> full cleanup.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from hack import testimages
    from hack.registry import LocalRegistry

    nar = Narrator()
    print(f"fractal demo: snapshotter = {sn}\n")
    env: FractalEnv | None = None
    try:
        with contextlib.ExitStack() as stack:
            layouts: dict[str, Path] = {}
            with nar.step(f"build test images {', '.join(IMAGES)} (cached in {testimages.cache_dir()})"):
                for name in (*IMAGES, *(BOOT_IMAGES if sn == "fractal" else ())):
                    layouts[name] = testimages.build(name)

            reg_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fractal-demo-reg-")))
            refs: dict[str, str] = {}
            with nar.step("start a local registry and push the images"):
                reg = stack.enter_context(LocalRegistry(reg_dir))
                for name in layouts:
                    refs[name] = reg.push(layouts[name], f"fractal/{name}", "latest")
                nar.say("\n".join(refs.values()))

            cri: CriConfig | None = None
            if sn == "fractal" and peer_missing("crictl") is None and shutil.which("umoci"):
                with nar.step("make a pause image for Kubernetes pods (busybox + sleep) and push it"):
                    pause = reg_dir / "pause-layout"
                    shutil.copytree(layouts["busybox"], pause)
                    subprocess.run(["umoci", "config", "--image", f"{pause}:latest", "--config.cmd",
                                    "/bin/sleep", "--config.cmd", "2147483647"], check=True)
                    refs["pause"] = reg.push(pause, "fractal/pause", "latest")
                cri = CriConfig(sandbox_image=refs["pause"], insecure_registries=(reg.address,),
                                network="bridge" if (CNI_PLUGIN_DIR / "bridge").is_file() else None)
            with nar.step("start the private containerd" + (" + fractal snapshotter" if sn == "fractal" else "")
                          + (" + CRI" if cri else "")):
                env = FractalEnv(snapshotter=(sn == "fractal"),
                                 snapshotter_args=["--debug"] if args.debug else (),
                                 log_level="debug" if args.debug else "info", cri=cri)
                stack.enter_context(env)
                nar.say(f"containerd at {env.address} (up in {env.start_seconds:.2f}s)")
                if env.snapshotter is not None:
                    nar.say(f"snapshotter repo {env.snapshotter_root}")
            assert env is not None
            store = storage_dir(env, sn)
            stack.callback(_dump_logs_on_failure, env, nar.failed)

            rt = FRACTAL_RUNTIME if sn == "fractal" else None
            pool: Pool | None = None
            if rt:
                with nar.step("start the pool of ready VMs (python3 -m shim.poold --size 1): it boots one "
                              "in the background"):
                    pool = Pool(env)
                    stack.callback(pool.stop)  # before the env's teardown: its VM's mounts are in the run dir
                    nar.say(f"pool pid {pool.proc.pid}, socket {env.fractal_run_dir}/pool/pool.sock; "
                            "the next steps run while it boots")

            for name in IMAGES:
                with nar.step(f"pull {name} into namespace {NS1} with --snapshotter {sn}"):
                    env.pull(refs[name], namespace=NS1, snapshotter=sn)
                    nar.say(f"layer storage now {human(dir_size(store))}")

            rt_flag = f" --runtime {rt}" if rt else ""
            with nar.step(f"ctr run --rm{rt_flag} --snapshotter {sn} edge demo1 sh -c ..."):
                r = env.run(refs["edge"], "demo1", "sh", "-c", RUN_SCRIPT, snapshotter=sn, namespace=NS1, runtime=rt)
                nar.say(r.stdout)
                if rt:
                    nar.say("the fractal shim ran it through the fractal agent (host mode), which stacked the\n"
                            "repo's layers into the container's overlay itself")
                    zyg = _zygotes(env)
                    nar.say(f"its shim daemon was forked by the shim fork-server (python -m shim.zygote, pid "
                            f"{', '.join(map(str, zyg)) or 'none: fell back to fork'}), which keeps the imports warm")

            if rt:
                cli_env = {"FRACTAL_RUN_DIR": str(env.fractal_run_dir), "FRACTAL_ROOT": str(env.snapshotter_root)}
                vm_ann = ["--annotation", "io.fractal.sandbox=demo", "--annotation", "io.fractal.mode=vm"]
                assert pool is not None
                with nar.step("ONE fractal VM, two containers in it (--annotation io.fractal.mode=vm, same sandbox); "
                              "the VM is the pool's, adopted"):
                    ready = pool.ready()
                    nar.say(f"pool: VM {ready['id']} ready (QEMU pid {ready['qemu_pid']}, booted in "
                            f"{float(ready.get('boot_seconds') or 0):.1f}s)")
                    env.run(refs["edge"], "web", "sleep", "600", rm=False, snapshotter=sn, namespace=NS1,
                            runtime=rt, extra=["-d", *vm_ann], timeout=300)
                    env.run(refs["busybox"], "shell", "sleep", "600", rm=False, snapshotter=sn, namespace=NS1,
                            runtime=rt, extra=["-d", *vm_ann], timeout=300)
                    guest = env.ctr("tasks", "exec", "--exec-id", "k1", "web", "uname", "-r", namespace=NS1).stdout.strip()
                    nar.say(f"kernel inside the containers: {guest} (the guest's; the host runs {os.uname().release})")
                    qemus = _count_processes("qemu-system-x86_64", str(env.run_dir))
                    nar.say(f"QEMU processes of this env: {qemus} (the sandbox's, and the pool booting its refill)")
                    vm = _sandbox_vm(env, NS1, "demo", cli_env)
                    adopted = vm.get("pooled") or {}
                    if vm.get("pid") != ready["qemu_pid"] or adopted.get("id") != ready["id"]:
                        raise RuntimeError(f"the sandbox did not adopt the pooled VM: {vm} (pool: {ready})")
                    adopted_qemu = int(vm["pid"])
                    nar.say(f"sandbox demo ADOPTED pooled VM {adopted['id']} (QEMU pid {vm['pid']}) in "
                            f"{float(adopted.get('adopt_seconds') or 0):.2f}s instead of a "
                            f"{float(adopted.get('boot_seconds') or 0):.1f}s boot (fractal ps --json: vm.pooled)")
                    nar.say(_fractal_cli("ps", "-a", str(env.address), "-n", NS1, env=cli_env))
                    lowers = env.ctr("tasks", "exec", "--exec-id", "k2", "web", "sh", "-c",
                                     "grep -o 'lowerdir=[^,]*' /proc/mounts | head -1", namespace=NS1).stdout.strip()
                    nar.say(f"the container's root inside the VM: {lowers[:90]}\n"
                            "(a read-only overlay of the repo share's layers, under the guest-side upper)")
                    in_vm = env.ctr("tasks", "exec", "--exec-id", "k4", "web", "ls", "/edge/opaque",
                                    namespace=NS1).stdout.split()
                    on_host = env.run(refs["edge"], "opaque-runc", "ls", "/edge/opaque", snapshotter=sn,
                                      namespace=NS1).stdout.split()
                    nar.say(f"ls /edge/opaque: in the VM {in_vm}, under runc on the host {on_host}")
                    if in_vm != on_host:
                        raise RuntimeError("the VM shows the opaque directory differently from runc")
                pid_before = _task_pid(env, "web", NS1)
                with nar.step(f"fractal layers add web {refs['tools']}  (live, into the running container in the VM)"):
                    nar.say(_fractal_cli("layers", "add", "-a", str(env.address), "-n", NS1, "web", refs["tools"],
                                         "--plain-http", env=cli_env))
                    out = env.ctr("tasks", "exec", "--exec-id", "k3", "web", "cat", "/opt/tools/hello.txt",
                                  namespace=NS1).stdout.strip()
                    nar.say(f"web now reads /opt/tools/hello.txt -> {out!r}; its pid {pid_before} -> "
                            f"{_task_pid(env, 'web', NS1)} (no restart)")
                    if out != "hello from tools" or _task_pid(env, "web", NS1) != pid_before:
                        raise RuntimeError("the live layer did not show up in the running container")
                    nar.say(_fractal_cli("layers", "ls", "-a", str(env.address), "-n", NS1, "web", env=cli_env))
                with nar.step("fractal layers rm web tools, then stop both containers: the VM goes with the last"):
                    _fractal_cli("layers", "rm", "-a", str(env.address), "-n", NS1, "web", refs["tools"], env=cli_env)
                    r = env.ctr("tasks", "exec", "--exec-id", "k4", "web", "test", "-e", "/opt/tools/hello.txt",
                                namespace=NS1, check=False)
                    nar.say(f"/opt/tools/hello.txt after rm: {'gone' if r.returncode else 'STILL THERE'}")
                    if r.returncode == 0:
                        raise RuntimeError("the removed layer is still visible")
                    for cid in ("web", "shell"):
                        env.ctr("tasks", "kill", "-s", "SIGKILL", cid, namespace=NS1)
                    for cid in ("web", "shell"):
                        _delete_when_stopped(env, cid, NS1, timeout=60)
                    deadline = time.monotonic() + 30
                    while _alive(adopted_qemu) and time.monotonic() < deadline:
                        time.sleep(0.2)
                    if _alive(adopted_qemu):
                        raise RuntimeError(f"the sandbox's VM (QEMU pid {adopted_qemu}) outlived its containers")
                    nar.say(f"the sandbox's VM (QEMU pid {adopted_qemu}) ended with its last container "
                            "(the pool boots its refill meanwhile)")

            if pool is not None:
                with nar.step("stop the pool (SIGTERM): it ends the refill VM it booted after the adoption"):
                    pool.stop()
                    deadline = time.monotonic() + 30
                    while _count_processes("qemu-system-x86_64", str(env.run_dir)) and time.monotonic() < deadline:
                        time.sleep(0.2)
                    left = _count_processes("qemu-system-x86_64", str(env.run_dir))
                    nar.say(f"pool exit status {pool.proc.returncode}; QEMU processes left: {left}")
                    if left:
                        raise RuntimeError(f"{left} QEMU processes outlived the pool: {tail(pool.log, 20)}")

            if rt and cri is not None:
                with nar.step("Kubernetes: crictl runp on RuntimeClass handler `fractal` -> ONE VM for the pod, "
                              "its pod IP served from inside the VM"):
                    _cri_pod_in_vm(env, nar, refs["busybox"], reg_dir)

            if rt:
                with nar.step("remote mode: fractal pki init, an agent on a \"machine\" (netns) over mutual TLS, "
                              "ctr run --annotation io.fractal.mode=remote"):
                    _remote_step(env, nar, refs["busybox"], reg_dir)
                from ccpu.vm import tpm

                missing = tpm.missing_tools()
                if missing or not os.path.exists("/usr/lib/systemd/boot/efi/linuxx64.efi.stub"):
                    nar.say(f"vm.attest step left out: needs {', '.join(missing) or 'systemd-boot-efi'} "
                            "(hack/setup.sh installs them)")
                else:
                    with nar.step("vm.attest: the VM boots fractal.efi through OVMF with its own swtpm; the shim "
                                  "checks its TPM quote before the first container"):
                        _attest_step(env, nar, refs["busybox"], sn, reg_dir, cli_env)
                with nar.step("fractal boot: the machine image booted as a whole machine (its own init as PID 1)"):
                    _boot_step(env, nar, refs["machine"], cli_env)

            before = dir_size(store)
            with nar.step(f"pull the same images into a second namespace {NS2}"):
                for name in IMAGES:
                    env.pull(refs[name], namespace=NS2, snapshotter=sn)
                after = dir_size(store)
                growth = after - before
                nar.say(f"layer storage before {human(before)}, after {human(after)}: "
                        f"grew by {human(growth)}")
                if sn == "fractal":
                    if growth < SHARED_SLACK:
                        nar.say("layers are stored once in the repo and shared by both namespaces")
                    elif args.allow_growth:
                        nar.say("WARNING: the repo grew -- layers were not shared (--allow-growth)")
                    else:
                        raise RuntimeError(
                            f"the fractal repo grew by {human(growth)} when the same image was pulled "
                            f"into a second namespace: layers are not shared (expected < "
                            f"{human(SHARED_SLACK)}; --allow-growth turns this into a warning)")
                else:
                    nar.say(f"{sn} unpacks every layer again per namespace (baseline)")
                r = env.run(refs["edge"], "demo2", "cat", "/edge/opaque/c", snapshotter=sn, namespace=NS2)
                nar.say(f"container in {NS2} reads /edge/opaque/c = {r.stdout.strip()!r}")

            with nar.step(f"ctr -n {NS1} snapshots --snapshotter {sn} ls"):
                nar.say(env.ctr("snapshots", "--snapshotter", sn, "ls", namespace=NS1).stdout)

            if sn == "fractal":
                with nar.step(f"fractal repo ls --root {env.snapshotter_root}  (one row per stored layer)"):
                    nar.say(_fractal_cli("repo", "ls", "--root", str(env.snapshotter_root)))
                    nar.say(_fractal_cli("repo", "du", "--root", str(env.snapshotter_root)))

            with nar.step("remove the images from both namespaces; containerd's GC empties the repo"):
                for ns in (NS1, NS2, *(["k8s.io"] if cri else [])):
                    problems = env.remove_namespace(ns)
                    if problems:
                        raise RuntimeError("; ".join(problems))
                if sn == "fractal":
                    deadline = time.monotonic() + 15
                    while any((env.snapshotter_root / "layers").iterdir()) and time.monotonic() < deadline:
                        time.sleep(0.1)
                    left = len(list((env.snapshotter_root / "layers").iterdir()))
                    if left:
                        raise RuntimeError(f"{left} layers still in the repo after GC")
                    nar.say("repo holds no layers any more: reference counting followed containerd's GC")

            with nar.step("clean up: stop containerd/snapshotter/registry"):
                stack.close()  # env + registry + temp dir, in reverse order
                nar.say("no daemons, mounts or dirs left")
    except StepFailed as exc:
        print(f"\ndemo FAILED at step '{exc.title}':\n{exc.cause}", file=sys.stderr)
        print("(set FRACTAL_KEEP=1 to keep the env's dirs and logs)", file=sys.stderr)
        return 1
    except HarnessError as exc:  # e.g. teardown found something it could not clean
        print(f"\ndemo FAILED during cleanup: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ndemo interrupted; cleaned up", file=sys.stderr)
        return 130
    print(f"\ndemo finished OK in {time.monotonic() - nar.t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
