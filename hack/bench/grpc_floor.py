"""The floor of a Python gRPC snapshotter: a grpc.aio server of containerd's Snapshots service that
does no work at all (canned answers, nothing stored), for ``hack/bench/snapshotter.py``'s latency
step to measure with the same clients as fractal's snapshotter.

Why: issue 13 asks for a direct p99 <= 5 ms with 8 concurrent clients, and fractal's server was
measured at ~1 ms of CPU per call, two thirds of it grpc.aio's own.  Whether any change of the
handlers can reach the goal on a machine is what this server shows: it is the same gRPC stack
with the handlers taken away, the way the bare kernel is the reference for the VM's boot.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SERVER = r"""
import asyncio, sys
import grpc
from ccpu.api.gen.containerd.services.snapshots.v1 import snapshots_pb2 as pb, snapshots_pb2_grpc as pb_grpc
from ccpu.api.gen.containerd.types import mount_pb2
from google.protobuf import empty_pb2

MOUNTS = [mount_pb2.Mount(type="bind", source="/var/empty", options=["rbind", "ro"])]

class Canned(pb_grpc.SnapshotsServicer):
    async def Prepare(self, req, ctx):
        return pb.PrepareSnapshotResponse(mounts=MOUNTS)
    async def Mounts(self, req, ctx):
        return pb.MountsResponse(mounts=MOUNTS)
    async def Stat(self, req, ctx):
        return pb.StatSnapshotResponse(info=pb.Info(name=req.key, kind=pb.ACTIVE))
    async def Remove(self, req, ctx):
        return empty_pb2.Empty()

async def main(address):
    server = grpc.aio.server()
    pb_grpc.add_SnapshotsServicer_to_server(Canned(), server)
    server.add_insecure_port("unix:" + address)
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()

asyncio.run(main(sys.argv[1]))
"""


@contextlib.contextmanager
def floor_server() -> Iterator[tuple[Path, int]]:
    """(socket, pid) of a canned Snapshots server, stopped on exit."""
    with tempfile.TemporaryDirectory(prefix="fractal-grpc-floor-") as tmp:
        address = Path(tmp, "floor.sock")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        proc = subprocess.Popen([sys.executable, "-c", SERVER, str(address)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            line = proc.stdout.readline() if proc.stdout else ""
            if line.strip() != "ready":
                proc.kill()
                raise RuntimeError(f"grpc floor server did not start: {proc.communicate(timeout=10)[1][-2000:]}")
            deadline = time.monotonic() + 10
            while not address.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            yield address, proc.pid
        finally:
            proc.kill()
            proc.wait(timeout=10)
