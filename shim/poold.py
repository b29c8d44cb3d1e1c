"""The pool daemon: ``vm.pool`` guests booted with the agent ready, handed to VM sandboxes.

Why a daemon of its own (``python3 -m shim.poold``, the ``fractal-pool`` systemd unit that
``fractal install`` writes) and not the snapshotter or a shim: a ready VM must outlive the
process that asks for it (shims come and go with their sandboxes), the snapshotter must stay
small and free of QEMU (it serves every image pull), and a crash here costs only the warm VMs --
never a running sandbox, since an adopted VM is no longer the pool's (below).  One pool per
``FRACTAL_RUN_DIR`` (a lock file); its protocol and the handover are :mod:`shim.pool`'s.

Each pooled VM is booted exactly as a sandbox's (:class:`shim.vm.VmSandbox`, namespace
``pool``, run dir ``<run dir>/pool/vms/pool/<id>``): an empty layer view (a tmpfs mounted before
virtiofsd starts, so binds made under it at adoption reach the guest), an empty volume view, no
NIC, the agent said hello.  QEMU and virtiofsd are started *without* PR_SET_PDEATHSIG: they must
survive the pool once a shim adopted them.  Handing over renames the run dir to the sandbox's
(``rename(2)``: the mounts, the process record ``pids``, the console log move with it, atomically)
and passes the fds; from then on the VM is the shim's and a dead shim's ``delete`` cleans it up
from the same records as any other.  A used VM never comes back: the shim stops it when its
sandbox ends.

Two things keep an adopter's first container as cheap as its Nth (docs/vm.md "Where a new
sandbox's time went"): a VM is offered only once the agent's ``warm`` op answered (container
modules imported, the Supervisor built, runc read and run once, a throw-away container's whole
life cycle run -- ccpu/agent/warmup.py -- before any sandbox exists in that guest, nothing of one
touched: what it leaves is what any first container would leave; a guest the throw-away container
left anything in is discarded, shim/vm.py warm_verdict), and
the refill after a handover is held until the adopter's shim says its first container runs
(``refill``), at most :data:`REFILL_HOLD` seconds, so that first create does not share the cores
with a whole boot.

What never leaks:

* an un-adopted VM at pool stop (SIGTERM): stopped and its dir removed, like a sandbox's;
* the pool killed -9: the host end of each un-adopted VM's agent port closes with the process,
  the agent sees EOF with no container and exits, the guest powers off, QEMU exits, virtiofsd
  follows (its one connection closed).  What is left on the host (the run dirs, their mounts) is
  removed from the records by the next pool's start (or ``python3 -m shim.poold cleanup``, the
  unit's ExecStopPost), which also kills any process still recorded (pid AND start time match);
* a VM that dies while waiting: dropped and cleaned up, another booted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import socket
import sys
import time
from typing import Any

from shim import pool

log = logging.getLogger("shim.poold")

NAMESPACE = "pool"
LOCK = "pool.lock"
#: a pooled boot delays no sandbox: on a loaded machine it gets at least this long (s) before
#: it is given up (vm.boot_timeout, 90 s, bounds what a sandbox waits for its own boot)
POOL_BOOT_TIMEOUT = 300.0
#: a pooled VM boots at this nice value (QEMU + virtiofsd, every thread from exec on) and is set
#: back to 0 once ready: a refill starts right when a sandbox adopts a VM and would otherwise
#: take half the cores from that sandbox's first container (docs/vm.md "The pool").  Not
#: SCHED_IDLE: on a machine kept busy by others a refill would never finish.
POOL_BOOT_NICE = 10
#: after a handover the refill waits for the adopter's word (``refill``: its first container
#: runs) at most this long (s): the adopting sandbox's first create then has the cores to itself
#: instead of sharing them with a whole boot.  The bound keeps a pool whose adopter died (or
#: never says it) from staying empty.
REFILL_HOLD = 30.0
#: how long a pooled guest's warm-up (the agent's ``warm``) may take before the VM is given up
POOL_WARM_TIMEOUT = 120.0
VIEWS = "views"  # <pool dir>/views/<id>: each pooled VM's layer view (shim/layerview.py)


def vms_dir(run_dir: str) -> str:
    return os.path.join(pool.pool_dir(run_dir), "vms", NAMESPACE)


def cleanup(run_dir: str) -> list[str]:
    """Remove every VM a dead pool left (processes recorded in each dir, then its mounts and
    the dir).  Returns the dirs cleaned."""
    from shim.leftovers import cleanup_dead

    base = vms_dir(run_dir)
    try:
        names = sorted(os.listdir(base))
    except FileNotFoundError:
        return []
    done = []
    for name in names:
        d = os.path.join(base, name)
        killed = cleanup_dead(d)
        log.info("removed a dead pool's VM %s%s", d, f" (killed {killed})" if killed else "")
        done.append(d)
    return done


def remove_empty_dirs(run_dir: str) -> None:
    """The pool's dirs once no VM is left in them (a view still in use by a sandbox keeps
    ``views``)."""
    p = pool.pool_dir(run_dir)
    for d in (vms_dir(run_dir), os.path.join(p, "vms"), os.path.join(p, VIEWS)):
        with contextlib.suppress(OSError):
            os.rmdir(d)


class Pool:
    def __init__(self, run_dir: str, size: int, cfg: Any, repo_root: str, boot_nice: int = POOL_BOOT_NICE,
                 warm: bool = True, refill_hold: float = REFILL_HOLD, warm_container: bool = True) -> None:
        self.run_dir = run_dir
        self.refill_hold = refill_hold  # 0: refill at the handover (the old behaviour)
        self.held: dict[str, asyncio.TimerHandle] = {}  # adopted VM id -> its refill's deadline
        self.warm = warm  # offer only guests whose create path was warmed (agent `warm`)
        self.warm_container = warm_container  # ... by a throw-away container too (ccpu/agent/warmup.py)
        self.boot_nice = boot_nice
        self.size = size
        self.cfg = cfg
        self.repo_root = repo_root
        self.ready: list[tuple[str, Any]] = []  # (id, VmSandbox), oldest first
        self.booting: dict[str, Any] = {}
        self.changed = asyncio.Event()
        self.stopping = False
        self.reaper: Any = None
        self.boot_failures = 0
        self.share = pool.share_of(cfg.vm)

    # -- filling ------------------------------------------------------------------------------

    async def fill(self) -> None:
        """Keep ``size`` VMs ready, booting one at a time (boots compete for the same cores as
        the sandboxes)."""
        while not self.stopping:
            if len(self.ready) + len(self.booting) + len(self.held) < self.size:
                log.info("booting a refill (%d ready, %d booting, %d held)", len(self.ready), len(self.booting),
                         len(self.held))
                await self._boot_one()
                continue
            self.changed.clear()
            await self.changed.wait()

    async def _boot_one(self) -> None:
        from shim.layerview import LayerView
        from shim.vm import VmSandbox

        vid = f"{time.strftime('%Y%m%d%H%M%S')}-{os.urandom(4).hex()}"
        import dataclasses

        settings = dataclasses.replace(self.cfg.vm, boot_timeout=max(self.cfg.vm.boot_timeout, POOL_BOOT_TIMEOUT))
        sb = VmSandbox(reaper=self.reaper, namespace=NAMESPACE, group=vid, repo_root=self.repo_root,
                       run_dir=pool.pool_dir(self.run_dir), settings=settings, timeouts=self.cfg.timeouts)
        sb.die_with_shim = False
        sb.boot_nice = self.boot_nice
        # the view stays at this path for the VM's life (its run dir is renamed at adoption):
        # virtiofsd finds each layer's bind mount by the path it was started with
        sb.view = LayerView(sb.dir, sb.host_layers, at=os.path.join(pool.pool_dir(self.run_dir), VIEWS, vid))
        sb.on_lost = lambda reason, vid=vid: self._lost(vid, reason)
        self.booting[vid] = sb
        t0 = time.monotonic()
        try:
            await sb.start()
            if self.warm:  # before the VM is offered: its adopter's first create finds it hot
                await sb.warm(POOL_WARM_TIMEOUT, container=self.warm_container)
        except Exception as exc:  # noqa: BLE001 - logged; retried after a pause
            self.booting.pop(vid, None)
            self.boot_failures += 1
            log.error("pooled VM %s did not boot: %s", vid, exc)
            await sb.stop()
            await asyncio.sleep(min(60.0, 2.0 * self.boot_failures))
            return
        self.booting.pop(vid, None)
        if self.stopping:
            await sb.stop()
            return
        sb.renice(0)  # ready: adopted, it runs a sandbox at the sandboxes' priority
        self.boot_failures = 0
        self.ready.append((vid, sb))
        log.info("pooled VM %s ready (QEMU pid %s) in %.2fs (agent up %.2fs, %s); %d ready", vid, sb.pid,
                 time.monotonic() - t0, sb.timings.get("agent_ready") or 0.0,
                 f"warmed in {sb.warmed.get('seconds')}s: {sb.warmed.get('runc')}" if sb.warmed else "not warmed",
                 len(self.ready))

    def _hold(self, vid: str) -> None:
        """The refill for the VM ``vid`` just handed over waits (:data:`REFILL_HOLD`)."""
        if self.refill_hold > 0:
            self.held[vid] = asyncio.get_running_loop().call_later(self.refill_hold, self._release, vid, "hold expired")

    def _release(self, vid: str | None, why: str) -> bool:
        """Let the refill for ``vid`` (None: the oldest held) boot now."""
        if vid is None:
            vid = next(iter(self.held), None)
        timer = self.held.pop(vid, None) if vid is not None else None
        if timer is None:
            return False
        timer.cancel()
        log.info("refill for %s released: %s", vid, why)
        self.changed.set()
        return True

    def _lost(self, vid: str, reason: str) -> None:
        for i, (v, sb) in enumerate(self.ready):
            if v == vid:
                del self.ready[i]
                log.error("pooled VM %s ended while waiting: %s", vid, reason)
                asyncio.get_running_loop().create_task(sb.stop())
                self.changed.set()
                return

    # -- serving ------------------------------------------------------------------------------

    async def serve(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(listener)
            loop.create_task(self._serve_one(conn))

    async def _serve_one(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            buf = b""
            while not buf.endswith(b"\n"):
                data = await asyncio.wait_for(loop.sock_recv(conn, pool.MAX_MESSAGE), 10)
                if not data or len(buf) + len(data) > pool.MAX_MESSAGE:
                    return
                buf += data
            import json

            try:
                req = json.loads(buf)
            except ValueError:
                req = None
            if not isinstance(req, dict):
                await self._reply(conn, {"ok": False, "why": "not a JSON object"})
            elif req.get("op") == "status":
                await self._reply(conn, self.status())
            elif req.get("op") == "adopt":
                await self._adopt(conn, req)
            elif req.get("op") == "refill":
                vid = req.get("id")
                if vid is not None and (not isinstance(vid, str) or len(vid) > 64):
                    await self._reply(conn, {"ok": False, "why": "id: a VM id"})
                else:
                    released = self._release(vid, "its adopter's first container runs")
                    await self._reply(conn, {"ok": True, "released": released})
            else:
                await self._reply(conn, {"ok": False, "why": f"unknown op {req.get('op')!r}"})
        except (OSError, asyncio.TimeoutError, TimeoutError) as exc:
            log.warning("pool client: %s", exc)
        finally:
            conn.close()

    async def _reply(self, conn: socket.socket, msg: dict[str, Any], fds: list[int] = ()) -> None:  # type: ignore[assignment]
        conn.setblocking(True)
        conn.settimeout(5)
        try:
            pool.send(conn, msg, fds)
        finally:
            conn.setblocking(False)

    def status(self) -> dict[str, Any]:
        return {"ok": True, "size": self.size, "booting": len(self.booting), "held": sorted(self.held),
                "key": pool.vm_key(self.cfg.vm, self.share),
                "ready": [{"id": v, "qemu_pid": sb.pid, "run_dir": sb.dir,
                           "boot_seconds": sb.timings.get("agent_ready"), "warm": sb.warmed}
                          for v, sb in self.ready]}

    async def _adopt(self, conn: socket.socket, req: dict[str, Any]) -> None:
        from shim.leftovers import cleanup_dead

        want = pool.vm_key(self.cfg.vm, self.share)
        target = req.get("dir")
        if req.get("key") != want:
            return await self._reply(conn, {"ok": False, "why": f"the pool's VMs are {want}, not {req.get('key')}"})
        if not isinstance(target, str) or not pool.target_ok(self.run_dir, target):
            return await self._reply(conn, {"ok": False, "why": f"{target!r} is not a sandbox run dir"})
        if os.path.lexists(target):
            return await self._reply(conn, {"ok": False, "why": f"{target} exists"})
        if not self.ready:
            return await self._reply(conn, {"ok": False, "why": "no ready VM (booting %d)" % len(self.booting)})
        vid, sb = self.ready.pop(0)
        self._hold(vid)  # the refill waits for the adopter's first container (or the hold's end)
        self.changed.set()
        try:
            vm, names, fds = sb.handover_fds()
        except Exception as exc:  # noqa: BLE001
            log.error("pooled VM %s: cannot hand over: %s", vid, exc)
            self._release(vid, "not handed over")
            await sb.stop()
            return await self._reply(conn, {"ok": False, "why": f"pooled VM broken: {exc}"})
        try:
            try:
                os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
                os.rename(sb.dir, target)
            except OSError as exc:
                log.error("pooled VM %s: cannot move it to %s: %s", vid, target, exc)
                self._release(vid, "not handed over")
                await sb.stop()
                return await self._reply(conn, {"ok": False, "why": f"cannot move the VM's dir: {exc}"})
            try:
                await self._reply(conn, {"ok": True, "vm": {**vm, "id": vid}, "fds": names}, fds)
            except (OSError, pool.PoolError) as exc:  # the shim went away (or the message was refused): end the VM
                log.error("pooled VM %s: handover to %s failed (%s): ending it", vid, target, exc)
                self._release(vid, "not handed over")
                await sb.forget()
                cleanup_dead(target)
                return
            await sb.forget()
            log.info("pooled VM %s (QEMU pid %s) handed over to %s", vid, vm["qemu_pid"], target)
        finally:
            for fd in fds:
                os.close(fd)

    async def stop(self) -> None:
        self.stopping = True
        for timer in self.held.values():
            timer.cancel()
        self.held.clear()
        self.changed.set()
        vms = [sb for _v, sb in self.ready] + list(self.booting.values())
        self.ready.clear()
        await asyncio.gather(*(sb.stop() for sb in vms), return_exceptions=True)


def _lock(run_dir: str) -> int:
    d = pool.pool_dir(run_dir)
    os.makedirs(d, mode=0o700, exist_ok=True)
    os.chmod(d, 0o700)
    fd = os.open(os.path.join(d, LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SystemExit(f"fractal-pool: another pool runs for {run_dir} ({os.path.join(d, LOCK)} is locked)")
    return fd


async def amain(ns: argparse.Namespace) -> int:
    from ccpu.linux.reaper import Reaper
    from shim import address, config

    run_dir = address.run_dir()
    lock = _lock(run_dir)
    if ns.command == "cleanup":
        cleanup(run_dir)
        remove_empty_dirs(run_dir)
        os.close(lock)
        return 0
    cfg = config.load({})
    size = cfg.vm.pool if ns.size is None else ns.size
    if cfg.vm.attest:  # attested sandboxes boot their own VM (shim/vm.py _adopt)
        size = 0
    cleanup(run_dir)  # what a dead predecessor left
    p = Pool(run_dir, size, cfg, config.repo_root().path, boot_nice=ns.boot_nice, warm=not ns.no_warm,
             warm_container=not ns.no_warm_container,
             refill_hold=ns.refill_hold)
    loop = asyncio.get_running_loop()
    p.reaper = Reaper()
    p.reaper.start(loop, subreaper=False)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    path = pool.socket_path(run_dir)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        listener.bind(path)
    finally:
        os.umask(old)
    listener.listen(16)
    listener.setblocking(False)
    log.info("pool of %d VM(s) (%s) for %s, repo %s, listening on %s", size, cfg.vm.memory_mb, run_dir,
             p.repo_root, path)
    tasks = [loop.create_task(p.serve(listener)), loop.create_task(p.fill())]
    await stop.wait()
    log.info("stopping: %d ready VM(s), %d booting", len(p.ready), len(p.booting))
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(BaseException):
            await t
    listener.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    await p.stop()
    cleanup(run_dir)
    remove_empty_dirs(run_dir)
    os.close(lock)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fractal-pool", description="keep VMs booted for new VM sandboxes")
    ap.add_argument("command", nargs="?", choices=("run", "cleanup"), default="run",
                    help="run the pool (default), or remove what a dead pool left and exit")
    ap.add_argument("--size", type=int, default=None, help="ready VMs (default: vm.pool of the config)")
    ap.add_argument("--boot-nice", type=int, default=POOL_BOOT_NICE,
                    help=f"nice value a VM boots at, 0 once ready (default {POOL_BOOT_NICE}; 0: as a sandbox's)")
    ap.add_argument("--no-warm", action="store_true",
                    help="offer guests as soon as the agent answers, without warming their create path "
                         "(for comparison: hack/bench/vm.py --pool-warm)")
    ap.add_argument("--no-warm-container", action="store_true",
                    help="warm without the throw-away container life cycle (runc read and run only, as "
                         "before it; for comparison: hack/bench/vm.py --pool-warm runc)")
    ap.add_argument("--refill-hold", type=float, default=REFILL_HOLD,
                    help=f"seconds a refill waits after a handover for the adopter's first container "
                         f"(default {REFILL_HOLD:g}; 0: refill at once)")
    ap.add_argument("--debug", action="store_true")
    ns = ap.parse_args(argv)
    if ns.size is not None and not 0 <= ns.size <= 16:
        ap.error("--size: 0 to 16")
    if not 0 <= ns.refill_hold <= 3600:
        ap.error("--refill-hold: 0 to 3600")
    if not 0 <= ns.boot_nice <= 19:
        ap.error("--boot-nice: 0 to 19")
    logging.basicConfig(level=logging.DEBUG if ns.debug else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return asyncio.run(amain(ns))


if __name__ == "__main__":
    sys.exit(main())
