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
from ccpu.agent.warmup import WARM_ARGS, WARM_BASE, WARM_LOWER
from shim import pool
from shim.poold import Pool
from shim.vm import warm_verdict

ROOT = Path(__file__).resolve().parents[2]
RUNC = shutil.which("runc")


BUSYBOX = os.path.join(WARM_LOWER, WARM_ARGS[0].lstrip("/"))


def _warm_leftovers() -> list[str]:
    """What of any warm-up container is on this host now, looked at independently of the agent's
    own check: a private dir in /run, a mount with ``fractal-warm`` in its path."""
    dirs = [d for d in os.listdir(WARM_BASE) if d.startswith("fractal-warm-")]
    with open("/proc/self/mountinfo") as f:
        mounts = [ln.split()[4] for ln in f if "fractal-warm" in ln.split()[4]]
    return dirs + mounts


def _agent_warm(tmp_path: Path, runc: str, *calls: dict[str, Any]) -> tuple[bool, list[dict[str, Any]], list[str]]:
    """A real agent process (``runc``: its runc binary) answering ``warm`` once per ``calls``
    entry (its arguments): (its runc root existed before, the answers, its runc root's entries)."""
    ours, theirs = socket.socketpair()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ccpu.agent", "--fd", str(theirs.fileno()), "--runc-root", str(tmp_path / "runc"),
         "--runc", runc, "--bundle-root", str(tmp_path)],
        pass_fds=(theirs.fileno(),), env=env, stderr=subprocess.PIPE, text=True)
    theirs.close()

    async def go() -> tuple[bool, list[dict[str, Any]]]:
        client = await AgentClient.connect_socket(ours)
        try:
            await asyncio.wait_for(client.hello(), 60)
            before = (tmp_path / "runc").exists()
            answers = []
            for args in calls:
                answers.append(await asyncio.wait_for(client.call("warm", args), 120))
                with pytest.raises(protocol.NotFound):  # no container of the client's came of it
                    await asyncio.wait_for(client.call("state", {"container": answers[-1]["container"].get(
                        "container", "warm")}), 60)
            return before, answers
        finally:
            await client.close()

    try:
        before, answers = asyncio.run(go())
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return before, answers, os.listdir(tmp_path / "runc")


@pytest.mark.skipif(RUNC is None or os.geteuid() != 0, reason="needs runc and root")
@pytest.mark.skipif(not os.path.isfile(BUSYBOX), reason=f"no {BUSYBOX}")
def test_warm_builds_the_machinery_runs_runc_and_a_throw_away_container_leaving_nothing(tmp_path: Path) -> None:
    """The real agent process and runc: `warm` answers with runc's version and the bytes of the
    binary it read, the Supervisor exists afterwards (its runc root made), and a throw-away
    container ran its whole life cycle (exit 0) and left nothing: no runc state, no mount, no
    dir -- each time (idempotent); ``container: false`` skips it (the warm-up before it)."""
    assert RUNC is not None
    assert _warm_leftovers() == []
    before, (warm, again, runc_only), runc_root = _agent_warm(tmp_path, RUNC, {}, {}, {"container": False})
    version = subprocess.run([RUNC, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    assert not before and (tmp_path / "runc").is_dir()  # the Supervisor was built by `warm`
    assert warm["runc"] == version and again["runc"] == version
    assert warm["read_bytes"] == os.path.getsize(RUNC)
    for w in (warm, again):
        c = w["container"]
        assert c["ok"] is True and c["status"] == 0 and c["left"] == [], w
        assert c["container"].startswith("fractal-warm-")
    assert warm["container"]["container"] != again["container"]["container"]
    assert runc_only["container"] == {"ok": False, "skipped": "not asked for", "left": []}
    assert runc_root == []  # runc's state dir: no container
    assert _warm_leftovers() == []


@pytest.mark.skipif(RUNC is None or os.geteuid() != 0, reason="needs runc and root")
@pytest.mark.skipif(not os.path.isfile(BUSYBOX), reason=f"no {BUSYBOX}")
def test_a_failed_warm_up_container_is_reported_and_cleaned_up(tmp_path: Path) -> None:
    """runc says its `create` failed after it made the container (runc state, cgroup, the rootfs
    and scratch mounts are there): the answer says the life cycle failed and why, and everything
    is still removed (``left`` empty, and nothing seen independently); the pool then offers the
    guest unwarmed (shim/vm.py warm_verdict)."""
    assert RUNC is not None
    broken = tmp_path / "runc-no-start"
    # runc itself, but its `create` exits 1 once the container exists
    broken.write_text(f"""#!/bin/sh
for a in "$@"; do [ "$a" = create ] && {{ "{RUNC}" "$@"; rc=$?; echo 'not this time' >&2; exit 1; }}; done
exec "{RUNC}" "$@"
""")
    broken.chmod(0o755)
    assert _warm_leftovers() == []
    _before, (warm,), runc_root = _agent_warm(tmp_path, str(broken), {})
    c = warm["container"]
    assert c["ok"] is False and "runc create" in c["error"] and c["left"] == [], warm
    assert runc_root == []
    assert _warm_leftovers() == []


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


def test_the_warm_up_containers_arguments_pass_the_agents_own_checks(tmp_path: Path) -> None:
    """The throw-away container's create arguments are what a VM sandbox's are (inline spec, a
    `layers` rootfs with upper/work on its scratch tmpfs, no stdio) and pass the Supervisor's own
    validation with the roots the warm-up gives it (its private dir, and the lower's parent)."""
    from ccpu.agent import limits, mounts
    from ccpu.agent.warmup import WARM_SCRATCH_SIZE, create_args

    base = str(tmp_path)
    args = create_args("fractal-warm-x", base)
    plan = mounts.rootfs_plan(args["rootfs"], [base, os.path.dirname(WARM_LOWER)])
    assert plan.stack is not None and plan.stack.lowers == (os.path.realpath(WARM_LOWER),)
    assert limits.scratch_arg(args, [base]) == (os.path.join(base, "scratch"), WARM_SCRATCH_SIZE)
    assert all(os.path.dirname(d) == os.path.join(base, "scratch") for d in (plan.stack.upper, plan.stack.work))
    assert protocol.resolve_inside(args["bundle"], [base]) == os.path.join(base, "bundle")
    spec = args["spec"]
    assert spec["process"]["args"] == list(WARM_ARGS) and spec["process"]["terminal"] is False
    assert {ns["type"] for ns in spec["linux"]["namespaces"]} == {"pid", "ipc", "uts", "mount", "network"}
    assert not any(m["type"] == "bind" or "bind" in m.get("options", []) for m in spec["mounts"])  # nothing of the host's
    assert (args["stdin"], args["stdout"], args["stderr"]) == (0, 0, 0)


def test_mounts_below_are_undone_deepest_first() -> None:
    from ccpu.linux import mountinfo
    from ccpu.agent.warmup import mounts_below

    lines = [f"{i} 1 0:1 / {mp} rw - tmpfs x rw" for i, mp in enumerate(
        ["/run", "/run/fractal-warm-a", "/run/fractal-warm-a/scratch", "/run/fractal-warm-ab",
         "/run/fractal-warm-a/bundle/rootfs"], start=10)]
    assert mounts_below("/run/fractal-warm-a/", mountinfo.parse(lines)) == [
        "/run/fractal-warm-a/bundle/rootfs", "/run/fractal-warm-a/scratch", "/run/fractal-warm-a"]


def test_the_pool_judges_the_warm_answer() -> None:
    """shim/vm.py warm_verdict: leftovers mean the guest is not offered (``left ...``), a failed
    or skipped container only logged, an answer without the container (an older agent, or the
    runc-only warm-up asked for) fine; a malformed answer is a leftover (not trusted)."""
    from shim.vm import warm_verdict

    ok = {"runc": "runc version 1", "container": {"ok": True, "status": 0, "left": []}}
    assert warm_verdict(ok) is None
    assert warm_verdict({"runc": "runc version 1"}) is None
    assert warm_verdict({"container": {"ok": False, "skipped": "not asked for", "left": []}}, asked=False) is None
    left = warm_verdict({"container": {"ok": True, "status": 0, "left": ["mount /run/x"] * 50}})
    assert left is not None and left.startswith("left mount /run/x") and len(left) <= 1005
    assert warm_verdict({"container": {"ok": False, "error": "boom", "left": []}}) == "failed: boom"
    assert warm_verdict({"container": {"ok": False, "status": 3, "left": []}}) == "failed: exit status 3"
    huge = warm_verdict({"container": {"ok": False, "error": "e" * 100000, "left": []}})
    assert huge is not None and huge.startswith("failed: e") and len(huge) <= 310
    assert (warm_verdict({"container": {"ok": False, "skipped": "no /bin/busybox", "left": []}})
            == "was skipped: no /bin/busybox")
    for bad in ({"container": "x"}, {"container": {"ok": True}}, {"container": {"ok": True, "left": "none"}},
                "not a dict", ["x"]):
        verdict = warm_verdict(bad)
        assert verdict is not None and verdict.startswith("left "), bad


def test_bench_pool_warm_values() -> None:
    from hack.bench.vm import warm_mode

    assert [warm_mode(v) for v in ("0", "runc", "1", "container", "no", " RUNC ")] == [
        "none", "runc", "container", "container", "none", "runc"]
    with pytest.raises(ValueError):
        warm_mode("2")


@pytest.mark.skipif(RUNC is None or os.geteuid() != 0, reason="needs runc and root")
@pytest.mark.skipif(not os.path.isfile(BUSYBOX), reason=f"no {BUSYBOX}")
def test_a_timed_out_warm_up_counts_as_left_so_the_pool_discards_the_guest(tmp_path: Path) -> None:
    """The life cycle's bound cancels the runc call it is in, but runc itself goes on (Runc never
    kills on cancel) and may make state after the clean-up: a timeout must be reported as
    something left, so warm_verdict discards the guest instead of offering it."""
    from ccpu.agent.container import Supervisor
    from ccpu.agent.runc import Runc
    from ccpu.agent.warmup import _NoEvents, container_life_cycle
    from ccpu.linux.reaper import Reaper

    assert RUNC is not None
    slow = tmp_path / "runc-slow"
    slow.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = create ] && sleep 3; done\nexec "{RUNC}" "$@"\n')
    slow.chmod(0o755)

    async def go() -> dict[str, Any]:
        reaper = Reaper()
        reaper.start(asyncio.get_running_loop())
        try:
            sup = Supervisor(Runc(reaper, str(tmp_path / "runc"), str(slow)), reaper, _NoEvents(),
                             [str(tmp_path)], [str(tmp_path)], 5.0)
            out = await container_life_cycle(sup, timeout=0.5)
            await asyncio.sleep(4)  # the slow create's own end, before the reaper stops
            return out
        finally:
            reaper.stop()

    (tmp_path / "runc").mkdir(mode=0o700)
    out = asyncio.run(go())
    assert out["ok"] is False and "timed out" in out["error"], out
    assert any("timed out" in x for x in out["left"]), out
    assert warm_verdict({"container": out}) is not None and "left" in warm_verdict({"container": out})
    subprocess.run([RUNC, "--root", str(tmp_path / "runc"), "delete", "--force", out["container"]],
                   capture_output=True)


def test_the_host_keeps_a_bounded_summary_of_the_warm_answer() -> None:
    """shim/vm.py warm_summary: the guest's answer (up to a 1 MiB frame) goes into the pool's
    status, the handover message (≤ 64 KiB, shim.pool.send) and the sandbox record: only known
    fields, bounded, survive -- a huge answer cannot strand a pooled VM at its handover."""
    import json

    from shim.vm import warm_summary

    huge = {"runc": "r" * 100000, "read_bytes": 12, "seconds": 1.5, "junk": "j" * 500000,
            "container": {"ok": True, "status": 0, "container": "c" * 1000, "error": "e" * 100000,
                          "left": ["l" * 1000] * 10000, "more": "m" * 100000}}
    out = warm_summary(huge)
    assert len(json.dumps(out)) < 4096
    assert out["runc"] == "r" * 200 and out["read_bytes"] == 12 and out["seconds"] == 1.5 and "junk" not in out
    c = out["container"]
    assert c["ok"] is True and c["status"] == 0 and len(c["left"]) == 8 and "more" not in c
    assert warm_summary("x") == {} and warm_summary({"seconds": True, "container": []}) == {}
