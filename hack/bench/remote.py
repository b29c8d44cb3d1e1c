#!/usr/bin/env python3
"""Benchmark remote mode (docs/remote.md) against the local modes, same containerd, same run.

1. **Start-to-exit wall time** of ``ctr run --rm --runtime io.containerd.fractal.v1
   --annotation io.fractal.mode=M IMAGE idN true`` for M in ``remote`` (the agent in a network +
   PID + mount namespace on this host, reached over TCP with mutual TLS: hack/remote_machine.py),
   ``host`` (the agent in the shim's process) and, unless ``--no-vm``, ``vm`` (a local QEMU
   guest).  ``--runs`` rounds, the order of the modes rotating every round, after one untimed
   warm-up each; median, p90 and the ratios remote/host and remote/vm.
   The machine has its own repo (``--repo``): the warm-up run streams the image's layer to it,
   the timed runs find it in the machine's cache (docs/remote.md).
2. **Connection cost**: TCP connect + TLS 1.3 handshake (ECDSA P-256, mutual) + ``hello`` to
   the machine's agent, vs ``hello`` over a unix socketpair to an in-process agent, ``--runs``
   times each, in ms (what remote mode adds to a sandbox's start before its first container).
3. **First use of a layer on the machine vs its size**: a gzip layer of one file of N MiB
   (random bytes: the blob is as big as the data) sent with ``layers_pull`` over the TLS link
   to the machine's agent, answered once verified (digest, diff ID), unpacked, fsynced and
   renamed; vs ``tar -xzf`` of the same blob into a local dir (what unpacking it costs without
   the network and the checks), for ``--layer-sizes`` (MiB).

Must run as root (network namespaces, containerd).  Prints a table, the command and the
machine; ``--json FILE`` writes the figures.

    python3 hack/bench/remote.py [--runs 7] [--no-vm] [--layer-sizes 1,8,32] [--json FILE]
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
    machine_info, percentile, require_root,
)
from hack.remote_machine import PORT, RemoteAgent, machine_netns, remote_config  # noqa: E402

RUNTIME = "io.containerd.fractal.v1"


def timed_run(env: Any, ns: str, ref: str, mode: str, cid: str) -> float:
    t0 = time.monotonic()
    env.ctr("run", "--rm", "--snapshotter", "fractal", "--fifo-dir", str(env.fifo_dir), "--runtime", RUNTIME,
            "--annotation", f"io.fractal.mode={mode}", ref, cid, "true", namespace=ns, timeout=300)
    return time.monotonic() - t0


def connect_cost(agent_ip: str, tls_dir: Path, runs: int) -> dict[str, list[float]]:
    """ms per TCP + mutual TLS + hello, and per socketpair hello to an in-process agent."""
    from ccpu.agent import tls
    from ccpu.agent.client import AgentClient
    from ccpu.agent.embed import EmbeddedAgent
    from ccpu.linux.reaper import Reaper

    async def go() -> dict[str, list[float]]:
        ctx = tls.client_context(tls.TlsFiles.in_dir(str(tls_dir), "host"))
        out: dict[str, list[float]] = {"tls": [], "socketpair": []}
        reaper = Reaper()
        reaper.start(asyncio.get_running_loop())
        with tempfile.TemporaryDirectory() as d:
            embedded = EmbeddedAgent(reaper, runc_root=d, bundle_roots=[d], layer_roots=[d])
            for _ in range(runs):
                t0 = time.monotonic()
                client = await AgentClient.connect_tls(agent_ip, PORT, ctx, timeout=10)
                await client.hello()
                out["tls"].append((time.monotonic() - t0) * 1000)
                await client.call("shutdown")
                await client.close()
                t0 = time.monotonic()
                local = await embedded.connect()
                await local.hello()
                out["socketpair"].append((time.monotonic() - t0) * 1000)
                await local.close()
            await embedded.close()
        reaper.stop()
        return out

    return asyncio.run(go())


def first_use(agent_ip: str, tls_dir: Path, sizes_mb: list[int]) -> list[dict[str, float]]:
    """Per size: ms for layers_pull of a fresh layer (stream + verify + unpack on the machine)
    and ms for a local ``tar -xzf`` of the same blob."""
    import gzip
    import hashlib
    import io
    import os
    import subprocess
    import tarfile

    from ccpu.agent import tls
    from ccpu.agent.client import AgentClient

    def layer(mb: int) -> tuple[bytes, dict[str, Any]]:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as t:
            data = os.urandom(mb << 20)
            info = tarfile.TarInfo(f"bench/blob-{mb}")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        raw = buf.getvalue()
        gz = gzip.compress(raw, compresslevel=1)
        diff = "sha256:" + hashlib.sha256(raw).hexdigest()
        return gz, {"chain_id": diff, "diff_id": diff, "digest": "sha256:" + hashlib.sha256(gz).hexdigest(),
                    "media_type": "application/vnd.oci.image.layer.v1.tar+gzip", "size": len(gz)}

    async def pull(client: AgentClient, gz: bytes, desc: dict[str, Any]) -> float:
        ch = client.open_channel()
        t0 = time.monotonic()
        call = asyncio.ensure_future(client.call("layers_pull", {**desc, "container": "bench", "channel": ch.number}))
        await asyncio.sleep(0)
        for i in range(0, len(gz), 1 << 19):
            await ch.write(gz[i:i + (1 << 19)])
        await ch.close_write()
        await call
        ms = (time.monotonic() - t0) * 1000
        ch.release()
        return ms

    async def go() -> list[dict[str, float]]:
        ctx = tls.client_context(tls.TlsFiles.in_dir(str(tls_dir), "host"))
        client = await AgentClient.connect_tls(agent_ip, PORT, ctx, timeout=10)
        await client.hello()
        out = []
        for mb in sizes_mb:
            gz, desc = layer(mb)
            remote_ms = await pull(client, gz, desc)
            with tempfile.TemporaryDirectory(prefix="fractal-bench-untar-") as d:
                Path(d, "blob.tgz").write_bytes(gz)
                Path(d, "out").mkdir()
                t0 = time.monotonic()
                subprocess.run(["tar", "-xzf", str(Path(d, "blob.tgz")), "-C", str(Path(d, "out"))], check=True)
                subprocess.run(["sync"], check=True)
                local_ms = (time.monotonic() - t0) * 1000
            out.append({"mb": mb, "blob_bytes": len(gz), "remote_ms": remote_ms, "local_untar_ms": local_ms})
            log(f"layer {mb} MiB: first use on the machine {remote_ms:.0f} ms, local tar -xzf {local_ms:.0f} ms")
        await client.call("layers_release", {"container": "bench"})
        await client.call("shutdown")
        await client.close()
        return out

    return asyncio.run(go())


def report(result: dict[str, Any]) -> tuple[str, Goals]:
    lines = [f"remote mode benchmark ({result['runs']} runs; {result['command']})",
             f"machine: {result['machine']}", "",
             f"{'ctr run --rm ... true':<28} {'median s':>9} {'p90 s':>8}"]
    med = {}
    for mode, times in result["start"].items():
        med[mode] = statistics.median(times)
        lines.append(f"{'mode ' + mode:<28} {med[mode]:>9.3f} {percentile(times, 90):>8.3f}")
    if "host" in med:
        lines.append(f"ratio remote / host: {med['remote'] / med['host']:.2f}")
    first = result.get("first_run") or {}
    if "remote" in first and "host" in first:
        lines.append(f"first run (untimed warm-up; remote streams the image's layer): remote "
                     f"{first['remote']:.3f} s, host {first['host']:.3f} s, ratio "
                     f"{first['remote'] / first['host']:.2f}")
    if "vm" in med:
        lines.append(f"ratio remote / vm:   {med['remote'] / med['vm']:.2f}")
    conn = result["connect_ms"]
    lines += ["", f"{'agent connection + hello':<28} {'median ms':>9} {'p90 ms':>8}"]
    for what, label in (("tls", "TCP + mutual TLS 1.3"), ("socketpair", "socketpair (in-process)")):
        lines.append(f"{label:<28} {statistics.median(conn[what]):>9.2f} {percentile(conn[what], 90):>8.2f}")
    if result.get("first_use"):
        lines += ["", f"{'first use of a layer':<28} {'machine ms':>10} {'tar -xzf ms':>11} {'ratio':>6} {'MiB/s':>6}"]
        for row in result["first_use"]:
            lines.append(f"{str(row['mb']) + ' MiB (gzip, random)':<28} {row['remote_ms']:>10.0f} "
                         f"{row['local_untar_ms']:>11.0f} {row['remote_ms'] / row['local_untar_ms']:>6.2f} "
                         f"{row['blob_bytes'] / (1 << 20) / (row['remote_ms'] / 1000):>6.1f}")
    goals: Goals = [("remote start within 2x of host mode (same machine, the layer cached there)",
                     med["remote"] <= 2 * med["host"], f"{med['remote'] / med['host']:.2f}x")]
    return "\n".join(lines), goals


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--no-vm", action="store_true", help="skip the local VM mode (TCG boots are slow)")
    ap.add_argument("--layer-sizes", default="1,8,32", help="MiB, comma-separated (first use of a layer)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if not require_root("network namespaces and containerd"):
        return 2
    byte_compile()
    from ccpu import pki

    modes = ["remote", "host"] + ([] if args.no_vm else ["vm"])
    result: dict[str, Any] = {"runs": args.runs, "command": command_line("hack/bench/remote.py", argv),
                              "machine": machine_info(), "start": {m: [] for m in modes}}

    def measure() -> None:
        with tempfile.TemporaryDirectory(prefix="fractal-bench-pki-") as tmp, machine_netns() as m, \
                bench_env("busybox") as (env, refs), dump_logs_on_failure(env):
            tls_dir = Path(tmp) / "pki"
            pki.init(str(tls_dir), [m.agent_ip])
            remote_config(env, m, tls_dir, extra="[vm]\nboot_timeout = 600\n")  # TCG on a busy host
            agent = RemoteAgent(env, m, tls_dir)
            try:
                ns = env.new_namespace("bench")
                ref = refs["busybox"]
                env.pull(ref, namespace=ns)
                result["first_run"] = {}
                for mode in modes:  # warm-up (the VM's guest build, page cache; remote: the layer streamed)
                    result["first_run"][mode] = timed_run(env, ns, ref, mode, f"warm-{mode}")
                for i in range(args.runs):
                    order = modes[i % len(modes):] + modes[:i % len(modes)]
                    for mode in order:
                        result["start"][mode].append(timed_run(env, ns, ref, mode, f"r{i}-{mode}"))
                    log(f"round {i + 1}/{args.runs}: " + ", ".join(
                        f"{mode} {result['start'][mode][-1]:.3f}s" for mode in modes))
                result["connect_ms"] = connect_cost(m.agent_ip, tls_dir, max(args.runs, 10))
                result["first_use"] = first_use(m.agent_ip, tls_dir,
                                                [int(x) for x in args.layer_sizes.split(",") if x])
                env.remove_namespace(ns)
            finally:
                agent.stop()

    rc = guarded(measure)
    return rc if rc else finish(result, report, args.json)


if __name__ == "__main__":
    sys.exit(main())
