#!/usr/bin/env python3
"""Benchmark vm.attest (docs/hardware.md): what an attested VM sandbox costs against a plain one.

Through containerd (one private FractalEnv, containerd 1.6): ``ctr run --rm`` of a new VM sandbox
running ``true``, alternating ``--runs`` times between

- **plain**: ``mode = "vm"``, ``pool = 0`` (qboot + kernel + initramfs, the usual boot), and
- **attested**: the same with ``attest = true`` (OVMF + the UKI + a new swtpm TPM, then the TPM
  quote checked before the container: ccpu/attest.py),

each from its runtime config file.  Printed: wall time of each (median, min, max), the ratio, and
from the shim's log the attestation itself, nonce-to-verified ("VM attested in X s": EK/AK
creation, credential activation and quote in the guest, the host's checks) and the boot to the
agent ("VM agent up in X s", which includes the attestation for attested VMs).

    python3 hack/bench/attest.py [--runs 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from hack.bench.common import (bench_env, byte_compile, command_line, dump_logs_on_failure,  # noqa: E402
                               finish, guarded, log, machine_info, require_root)
from hack.bench.vm import NS, ctr_argv, timed  # noqa: E402

_ATTESTED = re.compile(r"VM attested in ([\d.]+)s")
_AGENT_UP = re.compile(r"VM agent up in ([\d.]+)s")
_SANDBOX = re.compile(r"\bsandbox=(\S+)")


def shim_times(log_text: str, pattern: re.Pattern[str]) -> dict[str, float]:
    out = {}
    for line in log_text.splitlines():
        m, sb = pattern.search(line), _SANDBOX.search(line)
        if m and sb:
            out[sb.group(1)] = float(m.group(1))
    return out


def stats(vals: list[float]) -> dict[str, float]:
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def report(r: dict[str, Any]) -> tuple[str, list[tuple[str, bool, str]]]:
    p, a = r["plain"], r["attested"]
    lines = [f"# vm.attest ({r['command']})",
             f"plain VM sandbox, ctr run --rm true:    median {p['median']:.2f}s (min {p['min']:.2f}, max {p['max']:.2f})",
             f"attested VM sandbox, ctr run --rm true: median {a['median']:.2f}s (min {a['min']:.2f}, max {a['max']:.2f})",
             f"ratio attested / plain: {r['ratio']:.2f}",
             f"attestation, nonce -> verified (shim log): median {r['attest']['median'] * 1000:.0f} ms "
             f"(min {r['attest']['min'] * 1000:.0f}, max {r['attest']['max'] * 1000:.0f})",
             f"agent up (shim log): plain median {r['agent_up_plain']['median']:.2f}s, attested median "
             f"{r['agent_up_attested']['median']:.2f}s (incl. the attestation)"]
    return "\n".join(lines), []


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", type=Path, metavar="FILE")
    args = ap.parse_args(argv)
    if not require_root():
        return 2
    byte_compile()
    from ccpu.guest import initramfs

    guest = initramfs.build(offline=True)
    if guest.uki is None:
        print("bench: the guest build has no UKI (apt-get install systemd-boot-efi)", file=sys.stderr)
        return 2
    result: dict[str, Any] = {"command": command_line("hack/bench/attest.py", argv), "machine": machine_info(),
                              "uki_sha256": guest.manifest["uki"]["sha256"]}

    def measure() -> None:
        with tempfile.TemporaryDirectory(prefix="fractal-bench-attest-") as d, bench_env("busybox") as (env, refs):
            plain, attested = Path(d, "plain.toml"), Path(d, "attest.toml")
            plain.write_text('mode = "vm"\n[vm]\npool = 0\n')
            attested.write_text('mode = "vm"\n[vm]\npool = 0\nattest = true\nboot_timeout = 300\n')
            ref = refs["busybox"]
            env.pull(ref, namespace=NS)
            times: dict[str, list[float]] = {"plain": [], "attested": []}
            with dump_logs_on_failure(env):
                for i in range(args.runs):
                    for kind, cfg in (("plain", plain), ("attested", attested)):
                        dt = timed(ctr_argv(env, ref, f"{kind}{i}", "--runtime-config-path", str(cfg)))
                        times[kind].append(dt)
                        log(f"{kind} {i}: {dt:.2f}s")
                text = (env.log_dir / "containerd.log").read_text(errors="replace")
            up = shim_times(text, _AGENT_UP)
            att = shim_times(text, _ATTESTED)
            result["plain"], result["attested"] = stats(times["plain"]), stats(times["attested"])
            result["ratio"] = result["attested"]["median"] / result["plain"]["median"]
            result["attest"] = stats(list(att.values()))
            result["agent_up_plain"] = stats([v for k, v in up.items() if k.startswith("plain")])
            result["agent_up_attested"] = stats([v for k, v in up.items() if k.startswith("attested")])

    t0 = time.monotonic()
    rc = guarded(measure)
    if rc:
        return rc
    result["seconds"] = time.monotonic() - t0
    return finish(result, report, args.json)


if __name__ == "__main__":
    sys.exit(main())
