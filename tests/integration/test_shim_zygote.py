"""The warm fork-server (the default; shim/zygote.py) through a real containerd: it forks
daemons that outlive it, a ``kill -9`` of it loses no sandbox and leaks no process, ``start``
falls back to forking itself (and starts a new zygote) when it is gone, and the one rule of
shim/procs.py finds every daemon and its socket whoever forked it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

from hack.containerd_env import FractalEnv, shim_sockets_for
from shim import procs, zygote
from tests.harness import wait_for

RUNTIME = "io.containerd.fractal.v1"


def cmdline(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def stat_fields(pid: int) -> list[str]:
    try:
        st = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    return st[st.rindex(")") + 2:].split()  # state, ppid, ...


def alive(pid: int) -> bool:
    f = stat_fields(pid)
    return bool(f) and f[0] != "Z"


def ours(env: FractalEnv) -> list[int]:
    """Processes whose command line names this env's containerd: zygotes and shim daemons."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit() and str(env.address).encode() in cmdline(int(d)):
            out.append(int(d))
    return sorted(out)


def comm(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/comm").read_bytes().strip()
    except OSError:
        return b""


def zygotes(env: FractalEnv) -> list[int]:
    """Live zygotes of this env (shim/procs.py's rule)."""
    return [p for p in procs.zygote_pids(str(env.address)) if alive(p)]


def uss_mb(pid: int) -> float:
    """Unique set size: the pages only this process has (shared ones are the zygote's)."""
    kb = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith(("Private_Clean:", "Private_Dirty:")):
            kb += int(line.split()[1])
    return kb / 1024


def wait_ready(path: str) -> None:
    """The zygote accepts only once it has imported the daemon's modules: a connection it
    accepted and closed (an empty request) means it is ready."""
    def ready() -> bool:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(30)
        try:
            s.connect(path)
            s.sendall(b"\0\0\0\0")
            return s.recv(1) == b""
        except OSError:
            return False
        finally:
            s.close()
    wait_for(ready, what="zygote ready", timeout=60)


def task_status(env: FractalEnv, ns: str, cid: str) -> str:
    for line in env.ctr("tasks", "ls", namespace=ns).stdout.splitlines()[1:]:
        parts = line.split()
        if parts and parts[0] == cid:
            return parts[-1]
    return ""


def record(env: FractalEnv, ns: str, cid: str) -> dict:
    import json

    f = env.fractal_run_dir / "sandboxes" / ns / f"{cid}.json"
    wait_for(f.exists, what=f"sandbox record of {cid}")
    return json.loads(f.read_text())


def shim_pid(env: FractalEnv, ns: str, cid: str) -> int:
    return int(record(env, ns, cid)["shim_pid"])


def start(env: FractalEnv, ns: str, ref: str, cid: str) -> None:
    env.ctr("run", "-d", "--snapshotter", "fractal", "--fifo-dir", str(env.fifo_dir), "--runtime", RUNTIME,
            ref, cid, "sleep", "600", namespace=ns)
    wait_for(lambda: task_status(env, ns, cid) == "RUNNING", what=f"{cid} running")


def remove(env: FractalEnv, ns: str, cid: str) -> None:
    env.ctr("tasks", "kill", "-s", "SIGKILL", cid, namespace=ns, check=False)
    wait_for(lambda: task_status(env, ns, cid) in ("STOPPED", ""), what=f"{cid} stopped")
    env.ctr("tasks", "delete", cid, namespace=ns, check=False)
    env.ctr("containers", "rm", cid, namespace=ns, check=False)


def test_zygote_killed_9_loses_no_sandbox_and_leaks_nothing(registry) -> None:  # noqa: ANN001
    env = FractalEnv()
    env.containerd.extra_env.pop("FRACTAL_SHIM_SPAWN", None)  # the default
    with env:
        ns = env.new_namespace()
        ref = registry.ref("busybox")
        env.pull(ref, namespace=ns)
        path = zygote.socket_path(str(env.address))
        assert zygotes(env) == []

        # 1st sandbox: no zygote yet -> start forks the daemon itself and starts a zygote
        start(env, ns, ref, "first")
        first = shim_pid(env, ns, "first")
        assert b"start" in cmdline(first)  # forked by start: keeps start's command line
        wait_for(lambda: len(zygotes(env)) == 1, what="a zygote started")
        (zyg,) = zygotes(env)
        wait_ready(path)

        # 2nd sandbox: forked by the zygote, and no child of it
        start(env, ns, ref, "second")
        second = shim_pid(env, ns, "second")
        assert b"shim.zygote" in cmdline(second), cmdline(second)
        assert comm(second).decode() == procs.DAEMON_COMM == comm(first).decode()
        assert stat_fields(second)[1] != str(zyg)
        assert second not in [int(p) for p in Path(f"/proc/{zyg}/task/{zyg}/children").read_text().split()]
        # the one rule finds both daemons and their sockets, whoever forked them (not the zygote)
        assert procs.daemon_pids(str(env.address)) == sorted([first, second])
        socks = {p.pid: p.socket for p in procs.find(str(env.address))}
        for pid, cid in ((first, "first"), (second, "second")):
            assert "unix://" + socks[pid] == record(env, ns, cid)["address"]
        assert sorted(map(str, shim_sockets_for(env.address))) == sorted(socks.values())
        assert uss_mb(second) <= 40, uss_mb(second)  # the bound per sandbox

        os.kill(zyg, signal.SIGKILL)
        wait_for(lambda: not alive(zyg), what="zygote gone")
        try:
            for cid in ("first", "second"):  # both sandboxes still serve
                assert task_status(env, ns, cid) == "RUNNING"
                r = env.ctr("tasks", "exec", "--exec-id", "probe", cid, "echo", "hi", namespace=ns)
                assert r.stdout == "hi\n"
            assert alive(first) and alive(second)

            # no zygote: start falls back to forking and starts a new zygote
            r = env.run(ref, "third", "true", namespace=ns, runtime=RUNTIME)
            assert r.returncode == 0
            wait_for(lambda: len(zygotes(env)) == 1, what="a new zygote")
            (zyg2,) = zygotes(env)
            assert zyg2 != zyg

            # kill -9 of a daemon the zygote forked: containerd's `delete` cleans up as ever
            victim = int(env.ctr("tasks", "ls", namespace=ns).stdout.split("second", 1)[1].split()[0])
            os.kill(second, signal.SIGKILL)
            wait_for(lambda: task_status(env, ns, "second") == "", what="second cleaned up")
            wait_for(lambda: not alive(victim), what="second's container process killed")
        finally:
            remove(env, ns, "first")
            remove(env, ns, "second")
        # the sandboxes' daemons leave with their last container; nothing else of ours is left
        # but the new zygote (which would leave when idle), and no zombie
        wait_for(lambda: not alive(first) and not alive(second), what="daemons gone")
        left = [p for p in ours(env) if p != zyg2]
        assert left == [], [(p, cmdline(p), stat_fields(p)[:2]) for p in left]
        os.kill(zyg2, signal.SIGTERM)  # no handler: it just goes
        wait_for(lambda: not alive(zyg2), what="new zygote gone")
        assert not Path(path).exists() or not zygote_answers(path)
        assert env.remove_namespace(ns) == []


def zygote_answers(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def test_zygote_of_other_code_refuses_and_start_falls_back(registry, tmp_path) -> None:  # noqa: ANN001
    """A request of another code version gets `no`, the zygote leaves; no daemon is started."""
    sock_dir = Path("/tmp") / f"zt{os.getpid()}"
    sock_dir.mkdir(exist_ok=True)
    path = str(sock_dir / "z")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([os.sys.executable, "-m", "shim.zygote", "-address", "/x", "-socket", path,
                             "-listen-fd", str(listener.fileno())], pass_fds=(listener.fileno(),), env=env,
                            stdin=subprocess.DEVNULL)
    listener.close()
    try:
        dummy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        req = {"version": "not this one", "env": {}}
        try:
            zygote.spawn_daemon(path, req, dummy, timeout=60)
            raise AssertionError("a zygote of other code started a daemon")
        except zygote.Unavailable as exc:
            assert exc.restart and "version" in str(exc)
        finally:
            dummy.close()
        assert proc.wait(timeout=30) == 0
        assert not Path(path).exists()  # it removed its own socket
    finally:
        proc.kill()
        proc.wait()
        import shutil

        shutil.rmtree(sock_dir, ignore_errors=True)


def test_opt_outs_start_no_zygote_and_a_bad_mode_is_refused_clearly(registry) -> None:  # noqa: ANN001
    """FRACTAL_SHIM_SPAWN=fork and =exec: no fork-server is started, the one rule still finds
    the daemon and its socket; an unknown value fails `ctr run` with the shim's reason."""
    env = FractalEnv()
    with env:
        ns = env.new_namespace()
        ref = registry.ref("busybox")
        env.pull(ref, namespace=ns)
        for mode in ("fork", "exec"):
            env.containerd.extra_env["FRACTAL_SHIM_SPAWN"] = mode
            env.containerd.restart()
            cid = f"opt-{mode}"
            start(env, ns, ref, cid)
            try:
                pid = shim_pid(env, ns, cid)
                found = procs.find(str(env.address))
                assert [p.pid for p in found] == [pid], (mode, found)
                assert "unix://" + found[0].socket == record(env, ns, cid)["address"]
                assert zygotes(env) == [], mode
            finally:
                remove(env, ns, cid)
            wait_for(lambda: not alive(pid), what=f"{mode} daemon gone")
        env.containerd.extra_env["FRACTAL_SHIM_SPAWN"] = "forkk"
        env.containerd.restart()
        r = env.run(ref, "bad-mode", "true", namespace=ns, runtime=RUNTIME, check=False)
        assert r.returncode != 0
        assert "FRACTAL_SHIM_SPAWN='forkk': want one of zygote, fork, exec" in r.stderr, r.stderr
        assert procs.find(str(env.address), kinds=(procs.DAEMON, procs.ZYGOTE)) == []
        env.ctr("containers", "rm", "bad-mode", namespace=ns, check=False)
        assert env.remove_namespace(ns) == []


def test_relayed_start_runs_in_a_worker_and_the_daemon_outlives_the_zygote(tmp_path) -> None:  # noqa: ANN001
    """The default ``start`` (shim/relay.py) against a real fork-server: its worker binds the
    group's socket and forks the daemon, which is no child of the zygote, listens before the
    answer comes, and a second start of the group joins it; a request of another code version
    is refused (the verb then falls back) and the zygote leaves, the daemon serving on."""
    from shim import address as addr
    from shim import relay

    sock_dir = Path("/tmp") / f"zr{os.getpid()}"
    sock_dir.mkdir(exist_ok=True)
    path = str(sock_dir / "z")
    containerd = str(sock_dir / "containerd.sock")  # nothing listens: the daemon never calls it here
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    root = str(Path(__file__).resolve().parents[2])
    proc = subprocess.Popen([os.sys.executable, "-m", "shim.zygote", "-address", containerd, "-socket", path,
                             "-listen-fd", str(listener.fileno())], pass_fds=(listener.fileno(),),
                            env={**os.environ, "PYTHONPATH": root}, stdin=subprocess.DEVNULL)
    listener.close()
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text('{"annotations": {"io.fractal.mode": "host"}}')
    daemon = 0
    try:
        wait_ready(path)
        env = {**os.environ, "PYTHONPATH": root, "FRACTAL_RUN_DIR": str(tmp_path / "run")}
        argv = ["-namespace", "zr", "-address", containerd, "-publish-binary", "/bin/true", "-id", "c1", "start"]
        answer = relay.ask(path, relay.encode(relay.code_version(), str(bundle), b"", argv, env), timeout=60)
        want = addr.socket_address(containerd, "zr", "c1")
        assert answer == b"ok " + want.encode(), answer
        assert (bundle / "address").read_text() == want
        sock = addr.strip_scheme(want)
        assert addr.can_connect(sock)  # listening before the answer
        (daemon,) = [p.pid for p in procs.find(containerd)]
        assert comm(daemon).decode() == procs.DAEMON_COMM
        assert stat_fields(daemon)[1] != str(proc.pid)  # reparented: the worker has left
        assert daemon not in [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        # a second start of the group joins the daemon (the worker's check under the flock)
        again = relay.ask(path, relay.encode(relay.code_version(), str(bundle), b"", argv, env), timeout=60)
        assert again == answer and [p.pid for p in procs.find(containerd)] == [daemon]
        # a request of another code version: refused, nothing started, the zygote leaves
        other = relay.ask(path, relay.encode("not this one", str(bundle), b"", argv, env), timeout=60)
        assert other == b"no version"
        assert proc.wait(timeout=30) == 0
        assert alive(daemon) and addr.can_connect(sock)  # the daemon does not depend on it
    finally:
        proc.kill()
        proc.wait()
        if daemon and alive(daemon):
            os.kill(daemon, signal.SIGTERM)
            wait_for(lambda: not alive(daemon), what="relayed daemon gone")
        import shutil

        shutil.rmtree(sock_dir, ignore_errors=True)
    assert not Path(addr.strip_scheme(addr.socket_address(containerd, "zr", "c1"))).exists()
