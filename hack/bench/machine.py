#!/usr/bin/env python3
"""Benchmark the attested machine (issue 15 item 5, docs/hardware.md) against a local VM.

The machine is hack/machine.py's QEMU guest (OVMF + fractal.efi + swtpm, reached only over a
NIC in a network namespace), booted once; the host runs containerd 1.6 in a private FractalEnv.

1. **Container start**, wall time of ``ctr run --rm --runtime io.containerd.fractal.v1
   --annotation io.fractal.mode=M IMAGE idN true`` for M = ``remote`` (a new sandbox on the
   machine: TCP + TLS 1.3 with its boot key, the TPM attestation bound to that key, then the
   container; the image's layer is in the machine's cache after the warm-up) and ``vm`` (a new
   local VM: qboot + kernel + initramfs, ``pool = 0``, not attested), same image, alternating
   ``--runs`` times after one untimed warm-up each; median, min, max and the ratio remote / vm.
2. **Attestation cost**, nonce to verified: ``ccpu.attest.attest`` over a fresh TLS connection
   to the machine's agent, ``--attest-runs`` times (EK + AK made in the guest's TPM, the EK
   certificate checked, credential made and activated, the quote over sha256(nonce || SPKI
   hash) made and checked); ms median, min, max.  Also the TLS connection + hello alone.

    python3 hack/bench/machine.py [--runs 3] [--attest-runs 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from hack.bench.common import (  # noqa: E402
    Goals, bench_env, byte_compile, command_line, dump_logs_on_failure, finish, guarded, log,
    machine_info, require_root,
)

RUNTIME = "io.containerd.fractal.v1"


def timed_run(env: Any, ns: str, ref: str, mode: str, cid: str) -> float:
    t0 = time.monotonic()
    env.ctr("run", "--rm", "--snapshotter", "fractal", "--fifo-dir", str(env.fifo_dir), "--runtime", RUNTIME,
            "--annotation", f"io.fractal.mode={mode}", ref, cid, "true", namespace=ns, timeout=600)
    return time.monotonic() - t0


def attest_cost(m: Any, guest: Any, tls_dir: Path, runs: int) -> dict[str, list[float]]:
    """ms per TLS connect + hello, and per attestation (nonce -> verified) on that connection."""
    from ccpu import attest
    from ccpu.agent import tls
    from ccpu.agent.client import AgentClient

    async def go() -> dict[str, list[float]]:
        ctx = tls.attested_client_context(str(tls_dir / "host.pem"), str(tls_dir / "host.key"))
        host, port = m.endpoint.rsplit(":", 1)
        want = attest.expected(guest.manifest, m.cmdline)
        out: dict[str, list[float]] = {"connect_ms": [], "attest_ms": []}
        for _ in range(runs):
            t0 = time.monotonic()
            client = await AgentClient.connect_tls(host, int(port), ctx, timeout=30)
            await client.hello()
            out["connect_ms"].append((time.monotonic() - t0) * 1000)
            key = attest.spki_sha256(client.peer_certificate())
            t0 = time.monotonic()
            await attest.attest(client.call, m.ek_ca, want, tls_key=key)
            out["attest_ms"].append((time.monotonic() - t0) * 1000)
            await client.call("shutdown")
            await client.close()
            log(f"attestation {out['attest_ms'][-1]:.0f} ms (connect + hello {out['connect_ms'][-1]:.0f} ms)")
        return out

    return asyncio.run(go())


def report(result: dict[str, Any]) -> tuple[str, Goals]:
    lines = [f"attested machine benchmark ({result['runs']} runs; {result['command']})",
             f"machine: {result['machine']}", f"the machine booted (QEMU start to agent listening) in "
             f"{result['machine_boot_s']:.1f} s", "",
             f"{'ctr run --rm ... true':<34} {'median s':>9} {'min s':>7} {'max s':>7}"]
    med = {}
    for mode, times in result["start"].items():
        med[mode] = statistics.median(times)
        label = "remote (attested machine)" if mode == "remote" else "vm (local, pool 0)"
        lines.append(f"{label:<34} {med[mode]:>9.2f} {min(times):>7.2f} {max(times):>7.2f}")
    lines.append(f"ratio machine / local VM: {med['remote'] / med['vm']:.2f}")
    first = result["first_run"]
    lines.append(f"first run (warm-up; the machine receives the image's layer): remote {first['remote']:.2f} s, "
                 f"vm {first['vm']:.2f} s")
    lines += ["", f"{'on the machine':<34} {'median ms':>9} {'min ms':>7} {'max ms':>7}"]
    for key, label in (("connect_ms", "TCP + TLS 1.3 (boot key) + hello"),
                       ("attest_ms", "attestation, nonce -> verified")):
        v = result["attest"][key]
        lines.append(f"{label:<34} {statistics.median(v):>9.0f} {min(v):>7.0f} {max(v):>7.0f}")
    goals: Goals = [("a container on the attested machine starts within 3x of a new local VM's",
                     med["remote"] <= 3 * med["vm"], f"{med['remote'] / med['vm']:.2f}x")]
    return "\n".join(lines), goals


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--attest-runs", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if not require_root("network namespaces, QEMU and containerd"):
        return 2
    byte_compile()
    from ccpu import pki
    from ccpu.guest import initramfs
    from hack import machine

    modes = ["remote", "vm"]
    result: dict[str, Any] = {"runs": args.runs, "command": command_line("hack/bench/machine.py", argv),
                              "machine": machine_info(), "start": {m: [] for m in modes}}

    def measure() -> None:
        guest = initramfs.build(offline=True)
        with tempfile.TemporaryDirectory(prefix="fractal-bench-machine-") as tmp, \
                bench_env("busybox") as (env, refs), dump_logs_on_failure(env):
            tls_dir = Path(tmp) / "pki"
            pki.init(str(tls_dir), ["127.0.0.1"])
            t0 = time.monotonic()
            with machine.boot(guest, (tls_dir / "ca.pem").read_bytes(), Path(tmp) / "m") as m:
                m.wait_listening(600)
                result["machine_boot_s"] = time.monotonic() - t0
                env.fractal_config.write_text(m.config_toml(tls_dir, "[vm]\npool = 0\nboot_timeout = 600\n"))
                ns = env.new_namespace("bench")
                ref = refs["busybox"]
                env.pull(ref, namespace=ns)
                result["first_run"] = {mode: timed_run(env, ns, ref, mode, f"warm-{mode}") for mode in modes}
                for i in range(args.runs):
                    order = modes[i % 2:] + modes[:i % 2]
                    for mode in order:
                        result["start"][mode].append(timed_run(env, ns, ref, mode, f"r{i}-{mode}"))
                    log(f"round {i + 1}/{args.runs}: " + ", ".join(
                        f"{mode} {result['start'][mode][-1]:.2f}s" for mode in modes))
                result["attest"] = attest_cost(m, guest, tls_dir, args.attest_runs)
                env.remove_namespace(ns)

    rc = guarded(measure)
    return rc if rc else finish(result, report, args.json)


if __name__ == "__main__":
    sys.exit(main())
