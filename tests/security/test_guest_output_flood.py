"""Guest → shim output: a process (or a hostile agent) writing faster than containerd reads.

* through real containerd (ctr) and the real agent: a 62.5 MiB stdout that nobody reads blocks
  the writing process instead of growing the shim; another exec's output and control RPCs of
  the same sandbox keep flowing; once read, every byte arrives;
* a hostile agent that ignores flow control (agentpeer.py, no `flow`): the shim holds at most
  the cap per stream, drops the rest and counts it -- RSS measured in a fresh process;
* an honest agent with flow control never has output dropped: the shim grants window back
  exactly as the FIFO's reader takes the bytes.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ccpu.agent import wire
from hack.containerd_env import FractalEnv
from tests.harness import wait_for

from .agentpeer import Shim

REPO = Path(__file__).resolve().parents[2]
RUNTIME = "io.containerd.fractal.v1"
BLOCKS = 1000  # dd blocks of 64 KiB: 62.5 MiB


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def shim_pids(env: FractalEnv) -> set[int]:
    from shim import procs

    return set(procs.daemon_pids(str(env.address)))


def flooder() -> tuple[int, bool] | None:
    """(pid, blocked in write(2) on its stdout) of our dd, if it runs."""
    want = str(BLOCKS).encode()  # busybox dd rewrites its argv: "count=1000" -> "count", "1000"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if cmd[0] == b"dd" and want in b" ".join(cmd) and b"65536" in b" ".join(cmd):
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                syscall = Path(f"/proc/{pid}/syscall").read_text().split()
                # sleeping in write(2) (x86_64 nr 1) on fd 1
                return int(pid), state == "S" and syscall[:2] == ["1", "0x1"]
        except (OSError, IndexError):
            continue
    return None


def wchar(pid: int) -> int:
    """Bytes `pid` has written so far."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError(f"no wchar for {pid}")


def describe(pid: int) -> str:
    try:
        return " | ".join(Path(f"/proc/{pid}/{f}").read_text().strip()[:200] for f in ("stat", "syscall", "io", "stack"))
    except OSError as exc:
        return str(exc)


@pytest.fixture
def image(fenv: FractalEnv, registry, namespace: str) -> str:  # noqa: ANN001
    ref = registry.ref("busybox")
    fenv.pull(ref, namespace=namespace)
    return ref


def test_unread_stdout_blocks_the_writer_not_the_shim(fenv: FractalEnv, namespace: str, image: str) -> None:
    before = shim_pids(fenv)
    fenv.ctr("run", "-d", "--snapshotter", "fractal", "--fifo-dir", str(fenv.fifo_dir),
             "--runtime", RUNTIME, image, "fl", "sleep", "300", namespace=namespace)
    flood = None
    try:
        shim = wait_for(lambda: (shim_pids(fenv) - before) or None, 60, what="the shim").pop()
        base = rss_kib(shim)
        # stdout goes to a pipe we do not read: ctr blocks on it and stops reading the FIFO
        flood = subprocess.Popen(
            fenv.containerd.ctr_argv("tasks", "exec", "--exec-id", "flood", "fl", "dd",
                                     "if=/dev/zero", "bs=65536", f"count={BLOCKS}", namespace=namespace),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        # the writer must end up blocked on its pipe (the old shim read everything: dd finished)
        try:
            started = wait_for(flooder, 60, what="dd running")
        except AssertionError:
            flood.kill()
            raise AssertionError(f"no dd: ctr said {flood.communicate()[1]!r}") from None
        try:
            blocked = wait_for(lambda: (f := flooder()) is None or f[1], 60, what="dd blocked or gone")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {describe(started[0])}") from None
        assert blocked is True and flooder() is not None, \
            "dd finished while nobody read its output: the shim buffered all of it"
        written = wchar(started[0])
        assert written < 8 << 20, f"dd wrote {written} bytes before it blocked"
        grown = rss_kib(shim) - base
        assert grown < 16 * 1024, f"shim RSS grew by {grown} KiB while output was not read"
        # the rest of the sandbox is not stalled: another exec's output and control RPCs flow
        r = fenv.ctr("tasks", "exec", "--exec-id", "other", "fl", "echo", "still here",
                     namespace=namespace, timeout=60)
        assert r.stdout == "still here\n"
        assert "fl" in fenv.ctr("tasks", "ls", namespace=namespace).stdout
        # ... while dd is still held where it was: blocked, not a moment's pause
        assert flooder() == (started[0], True) and wchar(started[0]) == written
        # once read, nothing was lost
        assert flood.stdout is not None
        data = flood.stdout.read()
        assert flood.wait(timeout=120) == 0
        assert len(data) == BLOCKS * 65536 and data.count(0) == len(data)
    finally:
        if flood is not None and flood.poll() is None:
            flood.kill()
            flood.wait()
        fenv.ctr("tasks", "kill", "-s", "SIGKILL", "fl", namespace=namespace, check=False)
        wait_for(lambda: "RUNNING" not in fenv.ctr("tasks", "ls", namespace=namespace).stdout,
                 60, what="fl stopped")
        fenv.ctr("tasks", "delete", "fl", namespace=namespace, check=False)
        fenv.ctr("containers", "rm", "fl", namespace=namespace, check=False)


def test_hostile_agent_ignoring_flow_control_is_capped_in_a_fresh_process() -> None:
    """128 MiB of output to a FIFO nobody reads, from an agent that ignores the window: the old
    shim buffered all of it (+125 MiB); now at most the cap is held and the rest is counted."""
    out = subprocess.run([sys.executable, "-m", "tests.security.agentpeer", "output", "2048"],
                         cwd=REPO, capture_output=True, text=True, timeout=600, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["growth_kib"] < 16 * 1024, result
    assert "bytes of output dropped over the cap" in out.stderr


def test_hostile_agent_writing_to_a_stdin_channel_is_not_buffered() -> None:
    """Data frames on a process's stdin channel (shim -> agent only): dropped, not kept in the
    channel's buffer that nobody reads (the old shim buffered all 128 MiB)."""
    out = subprocess.run([sys.executable, "-m", "tests.security.agentpeer", "stdin", "2048"],
                         cwd=REPO, capture_output=True, text=True, timeout=600, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["growth_kib"] < 16 * 1024, result


def test_honest_agent_gets_window_back_as_the_reader_reads() -> None:
    from shim.stdio import OUTPUT_CAP

    async def go() -> None:
        shim = await Shim.start(flow=True)
        assert shim.client.window == OUTPUT_CAP
        with tempfile.TemporaryDirectory() as tmp:
            fifo = os.path.join(tmp, "out")
            os.mkfifo(fifo)
            rfd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
            try:
                await shim.create("c1", stdout=fifo)
                await shim.start_task("c1")
                ch = shim.svc.tasks.process("c1").io.channels["stdout"]
                writer = shim.svc.tasks.process("c1").io.writers[ch]
                sent = 0
                got = bytearray()
                # the agent's side: never more than the window ahead of the grants
                for _ in range(400):
                    room = OUTPUT_CAP + shim.peer.grants.get(ch, 0) - sent
                    if room > 0:
                        n = min(room, 65536)
                        shim.peer.send(wire.encode_data(ch, bytes([sent % 251]) * n))
                        sent += n
                        await shim.peer.drain()
                    await asyncio.sleep(0.002)
                    assert len(writer._buf) <= OUTPUT_CAP
                    try:
                        got += os.read(rfd, 8192)  # a slow reader
                    except BlockingIOError:
                        pass
                assert writer.dropped == 0
                assert sent > OUTPUT_CAP  # the window moved on as the reader read
                assert len(got) <= shim.peer.grants.get(ch, 0) + 65536 * 2
            finally:
                await shim.close()
                os.close(rfd)

    asyncio.run(go())
