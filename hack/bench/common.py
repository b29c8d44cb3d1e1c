"""Boilerplate shared by the benchmark scripts in hack/bench/ (snapshotter, shim, vm, layers).

Why this exists: every benchmark script needs the same scaffolding around its own measurements --
a root check and a SIGTERM handler that unwinds the cleanup, byte-compiling ccpu/ and shim/,
machine info and a log line format, the test image(s) pushed to a private
:class:`~hack.registry.LocalRegistry` feeding one private :class:`~hack.containerd_env.FractalEnv`,
the env's logs dumped when a measurement fails, the exit codes (130 interrupted, 1 failed), and
the tail that records ``goals_met``, prints the report and writes ``--json``.  It lives here once
so the scripts differ only in what they measure and how they report it.  Plain functions and
context managers, no framework:

    if not require_root():
        return 2
    def measure() -> None:
        with bench_env("busybox") as (env, refs), dump_logs_on_failure(env):
            result["x"] = bench_x(env, refs["busybox"])
    rc = guarded(measure)
    return rc if rc else finish(result, report, args.json)
"""

from __future__ import annotations

import compileall
import contextlib
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from hack.containerd_env import FractalEnv, tail

REPO = Path(__file__).resolve().parent.parent.parent

# (description, met?, figure) per goal, as every script's report() returns them
Goals = list[tuple[str, bool, str]]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty list."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(p / 100.0 * len(s) + 0.5)) - 1))
    return s[k]


def launcher_paths(python: str) -> list[str]:
    """The paths a ``python -S`` launcher appends (ccpu/cli/launcher.py's ``site_paths``), or,
    where this interpreter cannot import fractal without ``PYTHONPATH`` (no install, or an
    editable install whose checkout moved), just what ``site`` adds: the benchmarks put the
    checkout first on ``PYTHONPATH`` anyway, so the launcher still runs this tree."""
    from ccpu.cli import launcher

    try:
        return launcher.site_paths(python)
    except launcher.LauncherError:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
        out = subprocess.run([python, "-c", "import json, sys; print(json.dumps(sys.path))"], env=env,
                             cwd="/", capture_output=True, text=True, check=True, timeout=30).stdout
        return [p for p in json.loads(out) if p and os.path.isabs(p)]


def machine_info() -> dict[str, Any]:
    def cmd(*argv: str) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
        except OSError:
            return "?"

    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    fs = cmd("findmnt", "-n", "-o", "FSTYPE,SOURCE", "--target", "/var/tmp")
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "containerd": cmd(os.environ.get("FRACTAL_CONTAINERD", "containerd"), "--version"),
        "python": platform.python_version(),
        "filesystem": fs,
        "mem_total": cmd("sh", "-c", "awk '/MemTotal/ {print $2\" kB\"}' /proc/meminfo"),
    }


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """The command as recorded in the report: ``script`` + the arguments given."""
    return shlex.join([script, *(sys.argv[1:] if argv is None else argv)])


def require_root(why: str = "") -> bool:
    """False (after saying so) unless root; else make SIGTERM (make/CI timeouts) raise SystemExit(143),
    which unwinds through the context managers -> full cleanup."""
    if os.geteuid() != 0:
        print(f"bench: must run as root{f' ({why})' if why else ''}", file=sys.stderr)
        return False
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    return True


def byte_compile() -> None:
    """Compile ccpu/ and shim/ to byte code, as an installed package has it: the environment may set
    PYTHONDONTWRITEBYTECODE, which would otherwise make every shim start compile its modules."""
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    for d in ("ccpu", "shim"):
        compileall.compile_dir(str(REPO / d), quiet=1)


@contextlib.contextmanager
def bench_env(*images: str, **env_kwargs: Any) -> Iterator[tuple[FractalEnv, dict[str, str]]]:
    """Build (or find) the test ``images``, push them to a private registry as ``bench/NAME:latest``
    and start a :class:`FractalEnv` (``env_kwargs`` passed on); yields ``(env, {name: ref})``.
    Everything is torn down on exit, in every case."""
    from hack import testimages
    from hack.registry import LocalRegistry

    with contextlib.ExitStack() as stack:
        layouts = {name: testimages.build(name) for name in images}
        reg_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fractal-bench-reg-")))
        reg = stack.enter_context(LocalRegistry(reg_dir))
        refs = {name: reg.push(layout, f"bench/{name}", "latest") for name, layout in layouts.items()}
        env = stack.enter_context(FractalEnv(**env_kwargs))
        yield env, refs


@contextlib.contextmanager
def dump_logs_on_failure(env: FractalEnv, lines: int = 30) -> Iterator[None]:
    """On any exception (incl. Ctrl-C / SIGTERM) print the last ``lines`` of each of the env's logs
    to stderr, then re-raise: used inside ``bench_env``, before teardown removes the logs."""
    try:
        yield
    except BaseException:
        if env.log_dir.exists():
            for lg in sorted(env.log_dir.glob("*.log")):
                print(f"--- last lines of {lg} ---\n{tail(lg, lines)}", file=sys.stderr)
        raise


def guarded(body: Callable[[], None]) -> int:
    """Run ``body``; 0 if it returns, 130 on Ctrl-C, 1 (traceback + "bench FAILED") on any error.
    The env is torn down by then in every case."""
    try:
        body()
    except KeyboardInterrupt:
        print("bench: interrupted; cleaned up", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - any failure: message + non-zero exit
        traceback.print_exc()
        print(f"bench FAILED: {exc}", file=sys.stderr)
        return 1
    return 0


def finish(result: dict[str, Any], report: Callable[[dict[str, Any]], tuple[str, Goals]],
           json_path: Path | None, strict: bool = False) -> int:
    """Report ``result``: record ``goals_met``, print the report, write ``json_path`` if given.
    Returns the exit code: 0, or 3 if ``strict`` and a goal was missed."""
    text, goals = report(result)
    result["goals_met"] = {what: ok for what, ok, _ in goals}
    print(text, flush=True)
    if json_path:
        json_path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return 3 if strict and not all(ok for _, ok, _ in goals) else 0


def install_shim_launcher(env: FractalEnv, bindir: Path) -> str:
    """Put the shim on containerd's PATH as `fractal install` leaves it: its ``python -S``
    launcher (ccpu/cli/launcher.py), rendered by install's own ``shim_change`` so the benchmark
    measures exactly what users get.  The caller restarts containerd to pick it up."""
    from ccpu.cli import install

    bindir.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    ch = install.shim_change(install.Options(bin_dir=str(bindir)), notes)
    if ch.link_to is not None:
        raise RuntimeError(f"fractal install would write no launcher here: {notes}")
    Path(ch.path).write_text(ch.content or "")
    Path(ch.path).chmod(ch.mode)
    env.containerd.path_prepend = [str(bindir), *env.containerd.path_prepend]
    return f"{ch.path} ({ch.what})"


def run_in_guest(guest: Any, work: str, args: str, timeout: float = 1800) -> dict[str, Any]:
    """Run ``WORK/bench.py ARGS`` with the guest's own python in a `vm run` of ``guest``, WORK
    shared at /work, and return the JSON it printed after ``RESULT``; a failed run exits with both
    streams, since a benchmark without its figure has nothing else to say."""
    import io
    import re

    from ccpu.vm import run as vmrun

    out, err = io.BytesIO(), io.BytesIO()
    t0 = time.monotonic()
    res = vmrun.run(guest, ["sh", "-c", f'"$(cat /etc/fractal/python)" -S -I /work/bench.py {args}'],
                    share_dirs=[vmrun.ShareSpec(work, "/work", False)], stdout=out, stderr=err, timeout=timeout)
    log(f"vm run: exit {res.exit_code} in {time.monotonic() - t0:.1f} s")
    m = re.search(rb"RESULT (.*)", out.getvalue())
    if res.exit_code != 0 or not m:
        raise SystemExit(f"in-guest benchmark failed (exit {res.exit_code}):\n{out.getvalue().decode(errors='replace')}"
                         f"\n{err.getvalue().decode(errors='replace')[-3000:]}")
    return json.loads(m.group(1))


def agent_hello(sock: Any, timeout: float) -> None:
    """Wait until a booted guest's agent answers `hello` on its port (``sock``, the machine's
    socket; a dup of it is used and closed, so the VM keeps its own)."""
    import asyncio

    from ccpu.agent.client import AgentClient

    async def hello() -> None:
        client = await AgentClient.connect_fd(os.dup(sock.fileno()))
        try:
            await asyncio.wait_for(client.hello(), timeout)
        finally:
            await client.close()

    asyncio.run(hello())
