"""What makes a pooled VM's first container cheap (issue 12): the agent's ``warm`` op (the pool
warms a guest's create path before offering it) and the pool's refill hold (the refill boots once
the adopter's first container runs, not during its create).  The same through containerd and
QEMU: tests/integration/test_vm_pool.py."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from ccpu.agent import protocol
from ccpu.agent.client import AgentClient
from shim import pool
from shim.poold import Pool

ROOT = Path(__file__).resolve().parents[2]
RUNC = shutil.which("runc")


@pytest.mark.skipif(RUNC is None, reason="no runc on this host")
def test_warm_builds_the_machinery_and_runs_runc_once_touching_no_container(tmp_path: Path) -> None:
    """The real agent process: `warm` answers with runc's version and the bytes of the binary it
    read, the Supervisor exists afterwards (its runc root made), and no container does."""
    assert RUNC is not None
    ours, theirs = socket.socketpair()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ccpu.agent", "--fd", str(theirs.fileno()), "--runc-root", str(tmp_path / "runc"),
         "--runc", RUNC, "--bundle-root", str(tmp_path)],
        pass_fds=(theirs.fileno(),), env=env, stderr=subprocess.PIPE, text=True)
    theirs.close()

    async def go() -> tuple[dict[str, Any], bool, dict[str, Any]]:
        client = await AgentClient.connect_socket(ours)
        try:
            await asyncio.wait_for(client.hello(), 60)
            before = (tmp_path / "runc").exists()
            warm = await asyncio.wait_for(client.call("warm"), 120)
            with pytest.raises(protocol.NotFound):  # no container came of it
                await asyncio.wait_for(client.call("state", {"container": "warm"}), 60)
            return warm, before, await asyncio.wait_for(client.call("warm"), 120)  # idempotent
        finally:
            await client.close()

    try:
        warm, before, again = asyncio.run(go())
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    version = subprocess.run([RUNC, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    assert not before and (tmp_path / "runc").is_dir()  # the Supervisor was built by `warm`
    assert warm["runc"] == version and again["runc"] == version
    assert warm["read_bytes"] == os.path.getsize(RUNC)
    assert os.listdir(tmp_path / "runc") == []  # runc's state dir: no container


def _pool(tmp_path: Path, hold: float) -> tuple[Pool, list[str]]:
    cfg = SimpleNamespace(vm=SimpleNamespace(memory_mb=512, cpus=2, accel="auto", share="9p",
                                             memory_reserve_mb=64, qemu_uid_base=0))
    p = Pool(str(tmp_path), 1, cfg, str(tmp_path / "repo"), refill_hold=hold)
    boots: list[str] = []

    async def boot_one() -> None:  # the fill loop's decisions only: no VM
        boots.append(f"vm{len(boots)}")
        p.ready.append((boots[-1], None))

    p._boot_one = boot_one  # type: ignore[method-assign]
    return p, boots


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def test_the_refill_waits_for_the_adopters_word(tmp_path: Path) -> None:
    """After a handover the pool boots no refill until the adopter says `refill` over the
    socket (shim/pool.py refill); an unknown id releases nothing, a bad one is refused."""

    async def go() -> tuple[list[str], ...]:
        p, boots = _pool(tmp_path, hold=3600)
        os.makedirs(pool.pool_dir(str(tmp_path)), mode=0o700)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(pool.socket_path(str(tmp_path)))
        listener.listen(4)
        listener.setblocking(False)
        tasks = [asyncio.ensure_future(p.fill()), asyncio.ensure_future(p.serve(listener))]
        try:
            await _settle()
            first = list(boots)
            vid, _ = p.ready.pop(0)  # what _adopt does at a handover
            p._hold(vid)
            p.changed.set()
            await _settle()
            held = list(boots)
            status = await asyncio.to_thread(pool.status, str(tmp_path))
            other = await asyncio.to_thread(pool.refill, str(tmp_path), "not-that-vm")
            await _settle()
            after_other = list(boots)
            told = await asyncio.to_thread(pool.refill, str(tmp_path), vid)
            await _settle()
            bad = await asyncio.to_thread(pool._ask, str(tmp_path), {"op": "refill", "id": ["x"]}, 5)
            return first, held, status["held"], [str(other)], after_other, [str(told)], list(boots), [bad[0]["ok"]]
        finally:
            for t in tasks:
                t.cancel()
            listener.close()

    first, held, status_held, other, after_other, told, final, bad = asyncio.run(go())
    assert first == ["vm0"]
    assert held == ["vm0"] and status_held == ["vm0"]  # handed over: no refill yet
    assert other == ["False"] and after_other == ["vm0"]  # someone else's word: still held
    assert told == ["True"] and final == ["vm0", "vm1"]  # the adopter's word: the refill boots
    assert bad == [False]


def test_the_hold_ends_by_itself(tmp_path: Path) -> None:
    """An adopter that never says it (it died, or an older shim): the refill boots when the
    hold expires; a hold of 0 refills at the handover."""

    async def go(hold: float) -> list[str]:
        p, boots = _pool(tmp_path, hold=hold)
        task = asyncio.ensure_future(p.fill())
        try:
            await _settle()
            vid, _ = p.ready.pop(0)
            p._hold(vid)
            p.changed.set()
            for _ in range(200):
                if len(boots) == 2:
                    break
                await asyncio.sleep(0.01)
            return boots
        finally:
            task.cancel()

    assert asyncio.run(go(0.05)) == ["vm0", "vm1"]
    assert asyncio.run(go(0)) == ["vm0", "vm1"]
