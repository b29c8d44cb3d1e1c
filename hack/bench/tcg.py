#!/usr/bin/env python3
"""Benchmark the TCG settings and the balloon (issue 12 items 1 and 4) on one guest workload.

Each configuration boots ``fractal vm run`` (ccpu/vm/run.py: same kernel, guest build and QEMU
flags as a sandbox, apart from what is varied) and runs, in the guest:

1. ``--runs`` times ``runc run`` + ``runc delete`` of a busybox bundle (``/bin/true``) straight
   on the share: the guest-side cost of a container under this TCG configuration;
2. writes ``--touch`` MiB to the guest's /tmp (tmpfs), then deletes the file: what a container
   that touches memory and exits leaves on the host.

Milestones go to the guest console; the host samples, at each, the RSS of QEMU (+ virtiofsd: its
children) and QEMU's CPU time.  Figures per configuration: wall time of the runc loop (guest
clock), QEMU CPU seconds for it, RSS idle / after the runc loop / with the file / ``--settle``
seconds after deleting it (free page reporting returns the freed pages then, if on).
Configurations are alternated round by round (the machine is shared: read medians).

    python3 hack/bench/tcg.py [--rounds 3] [--runs 6] [--touch 200]
                              [--config LABEL:CPUS:FRACTAL_TCG[:EXTRA[,EXTRA]...]]... [--json FILE]

``EXTRA``: ``noballoon``; ``pr=ORDER`` (the guest's free page reporting order, set in the guest
before the workload); ``drop`` (``echo 3 > drop_caches`` in the guest before the workload: what
the runc loop pays to read back what was dropped); ``env.NAME=VALUE`` (in QEMU's environment, e.g.
``env.MALLOC_ARENA_MAX=1``: measured, not shipped -- docs/vm.md "Host memory per VM").  The last
sample also breaks QEMU's RSS down by kind (hack/vm_rss.py): guest RAM, TCG buffer, files, heap.

Default configurations: the shipped settings against each lever turned back (balloon off, QEMU's
own tb-size, a bigger and smaller tb-size, 2 vCPUs and thread=multi).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO))

from hack.bench.common import command_line, log, machine_info, require_root  # noqa: E402

GUEST_SCRIPT = r"""
{prefix}
m() { read -r up _ </proc/uptime; echo "bench: $1 $up" >/dev/console; sleep "${2:-0}"; }
m idle 3
i=0
while [ $i -lt {runs} ]; do
    runc --root /run/runc run -b /work/bundle c$i >/dev/null 2>&1 || echo "runc run $i failed" >&2
    runc --root /run/runc delete -f c$i >/dev/null 2>&1
    i=$((i + 1))
done
m runs_done 3
dd if=/dev/zero of=/tmp/big bs=1M count={touch} 2>/dev/null
m touched 3
rm -f /tmp/big
sleep {settle}
m settled 3
"""


@dataclass(frozen=True)
class Config:
    label: str
    cpus: int
    tcg: str  # FRACTAL_TCG
    balloon: bool = True
    report_order: int | None = None  # the guest's page_reporting_order (None: the kernel's default)
    drop_caches: bool = False
    env: tuple[tuple[str, str], ...] = ()  # in QEMU's environment


DEFAULT_CONFIGS = (
    "shipped:1:",
    "no-balloon:1::noballoon",
    "tb-default:1:tb-size=default",
    "tb-32:1:tb-size=32",
    "tb-256:1:tb-size=256",
    "2cpu-single:2:thread=single",
    "2cpu-multi:2:thread=multi",
)


def parse_config(text: str) -> Config:
    """``LABEL:CPUS:FRACTAL_TCG[:EXTRA[,EXTRA]...]`` (the module's docstring says what EXTRA is)."""
    usage = f"{text!r}: expected LABEL:CPUS:FRACTAL_TCG[:noballoon|pr=ORDER|drop|env.NAME=VALUE[,...]]"
    parts = text.split(":")
    if len(parts) not in (3, 4) or not parts[1].isdigit():
        raise argparse.ArgumentTypeError(usage)
    balloon, order, drop, env = True, None, False, []
    for item in (parts[3].split(",") if len(parts) == 4 and parts[3] else []):
        if item == "noballoon":
            balloon = False
        elif item == "drop":
            drop = True
        elif m := re.fullmatch(r"pr=(\d{1,2})", item):
            order = int(m.group(1))
        elif m := re.fullmatch(r"env\.([A-Z_][A-Z0-9_]*)=([\w.-]*)", item):
            env.append((m.group(1), m.group(2)))
        else:
            raise argparse.ArgumentTypeError(usage)
    return Config(parts[0], int(parts[1]), parts[2], balloon, order, drop, tuple(env))


def make_bundle(root: Path) -> None:
    from ccpu.guest import initramfs

    rootfs = root / "bundle" / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    for d in ("proc", "dev", "sys"):
        (rootfs / d).mkdir()
    (rootfs / "bin" / "busybox").write_bytes(Path(initramfs.BUSYBOX).read_bytes())
    (rootfs / "bin" / "busybox").chmod(0o755)
    (rootfs / "bin" / "true").symlink_to("busybox")
    subprocess.run(["runc", "spec"], cwd=root / "bundle", check=True)
    spec = json.loads((root / "bundle" / "config.json").read_text())
    spec["process"].update(terminal=False, args=["/bin/true"])
    spec["root"]["readonly"] = True
    (root / "bundle" / "config.json").write_text(json.dumps(spec))


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(d.name))
    return out


def _sample(pids: list[int]) -> dict[str, float]:
    rss = 0
    cpu = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        rss += int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
        if "qemu" in Path(f"/proc/{pid}/comm").read_text():
            cpu += (int(fields[11]) + int(fields[12])) / tick
    return {"rss_mb": rss / 1024, "qemu_cpu_s": cpu}


def one(cfg: Config, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    from ccpu.guest import initramfs
    from ccpu.vm import run as vmrun

    guest = initramfs.build(offline=True)
    os.environ["FRACTAL_TCG"] = cfg.tcg
    console = tmp / f"console-{cfg.label}.log"
    console.unlink(missing_ok=True)  # a later round must not read this one's milestones
    prefix = ("" if cfg.report_order is None else
              f"echo {cfg.report_order} > /sys/module/page_reporting/parameters/page_reporting_order\n")
    if cfg.drop_caches:
        prefix += "sync; echo 3 > /proc/sys/vm/drop_caches; sleep 3\n"
    saved = {k: os.environ.get(k) for k, _ in cfg.env}
    os.environ.update(dict(cfg.env))  # QEMU inherits the bench's environment; restored below
    script = (GUEST_SCRIPT.replace("{prefix}", prefix).replace("{runs}", str(args.runs)).replace("{touch}", str(args.touch))
              .replace("{settle}", str(args.settle)))
    (tmp / "bench.sh").write_text(script)
    err: list[BaseException] = []

    def body() -> None:
        try:
            vmrun.run(guest, ["sh", "/work/bench.sh"], share_dirs=[vmrun.ShareSpec(str(tmp), "/work", False)],
                      cpus=cfg.cpus, console_log=str(console), timeout=1800, balloon=cfg.balloon,
                      stdout=open(os.devnull, "wb"), stderr=sys.stderr.buffer)
        except BaseException as e:  # noqa: BLE001 - reported by the caller
            err.append(e)

    th = threading.Thread(target=body, daemon=True)  # SIGTERM (SystemExit) ends the bench and, with it, QEMU
    th.start()
    samples: dict[str, dict[str, float]] = {}
    guest_t: dict[str, float] = {}
    parts: dict[str, float] = {}
    try:
        while th.is_alive():
            text = console.read_text(errors="replace") if console.exists() else ""
            for name, up in re.findall(r"bench: (\w+) (\d+\.\d+)", text):
                if name not in samples:
                    pids = _children(os.getpid())
                    pids += [c for p in pids for c in _children(p)]
                    samples[name] = _sample(pids)
                    guest_t[name] = float(up)
                    if name == "settled":
                        parts = _parts(pids)
            time.sleep(0.1)
        th.join()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if err:
        raise err[0]
    missing = {"idle", "runs_done", "touched", "settled"} - set(samples)
    if missing:
        raise RuntimeError(f"{cfg.label}: milestones {sorted(missing)} not seen (console {console})")
    return {
        "runc_loop_s": guest_t["runs_done"] - guest_t["idle"] - 3,
        "runc_loop_qemu_cpu_s": samples["runs_done"]["qemu_cpu_s"] - samples["idle"]["qemu_cpu_s"],
        "rss_idle_mb": samples["idle"]["rss_mb"], "rss_after_runs_mb": samples["runs_done"]["rss_mb"],
        "rss_touched_mb": samples["touched"]["rss_mb"], "rss_settled_mb": samples["settled"]["rss_mb"],
        **parts,
    }


def _parts(pids: list[int]) -> dict[str, float]:
    """QEMU's RSS by kind (hack/vm_rss.py), MB: where the settled figure is."""
    from hack import vm_rss

    for pid in pids:
        try:
            if "qemu" in Path(f"/proc/{pid}/comm").read_text():
                b = vm_rss.breakdown(pid)
                return {f"{k}_mb": b.parts[k].rss_kb / 1024 for k in ("guest_ram", "tcg_buffer", "file", "heap_anon")}
        except OSError:
            continue
    return {}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=6, help="runc run+delete per boot (default 6)")
    ap.add_argument("--touch", type=int, default=200, help="MiB written to the guest's /tmp, then deleted")
    ap.add_argument("--settle", type=int, default=8, help="seconds after the delete before the last sample")
    ap.add_argument("--config", action="append", type=parse_config)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if not require_root():
        return 2
    configs = args.config or [parse_config(c) for c in DEFAULT_CONFIGS]
    results: dict[str, list[dict[str, Any]]] = {c.label: [] for c in configs}
    loads = []
    with tempfile.TemporaryDirectory(prefix="fractal-bench-tcg-") as t:
        tmp = Path(t)
        make_bundle(tmp)
        for r in range(args.rounds):
            order = configs if r % 2 == 0 else list(reversed(configs))
            for cfg in order:
                loads.append(os.getloadavg()[0])
                res = one(cfg, tmp, args)
                log(f"round {r + 1} {cfg.label}: {res}")
                results[cfg.label].append(res)
    keys = ("runc_loop_s", "runc_loop_qemu_cpu_s", "rss_idle_mb", "rss_after_runs_mb", "rss_touched_mb",
            "rss_settled_mb", "guest_ram_mb", "tcg_buffer_mb", "file_mb", "heap_anon_mb")
    med = {label: {k: statistics.median(r.get(k, 0.0) for r in rs) for k in keys} for label, rs in results.items()}
    out = {"command": command_line("hack/bench/tcg.py", argv), "machine": machine_info(),
           "load_during": [min(loads), max(loads)], "configs": [c.__dict__ for c in configs],
           "medians": med, "raw": results}
    ref = med[configs[0].label]
    print(f"medians of {args.rounds} rounds ({args.runs} runc run+delete per boot; {args.touch} MiB touched "
          f"then freed; load average {min(loads):.1f}-{max(loads):.1f}); ratios vs {configs[0].label}")
    print(f"{'config':<14} {'runc loop s':>12} {'QEMU cpu s':>11} {'RSS idle':>9} {'after runs':>11} "
          f"{'touched':>8} {'freed+' + str(args.settle) + 's':>9}   then QEMU: guest RAM / TCG / files / heap")
    for c in configs:
        m = med[c.label]
        print(f"{c.label:<14} {m['runc_loop_s']:>7.1f} {m['runc_loop_s'] / ref['runc_loop_s']:>4.2f}x "
              f"{m['runc_loop_qemu_cpu_s']:>10.1f} {m['rss_idle_mb']:>8.0f}M {m['rss_after_runs_mb']:>10.0f}M "
              f"{m['rss_touched_mb']:>7.0f}M {m['rss_settled_mb']:>8.0f}M   {m['guest_ram_mb']:.1f} / "
              f"{m['tcg_buffer_mb']:.1f} / {m['file_mb']:.1f} / {m['heap_anon_mb']:.1f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
