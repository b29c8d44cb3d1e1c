"""A simulated remote machine for remote mode's tests and benchmark (docs/remote.md).

The "machine" is a network namespace made here, joined to the host by one veth pair with
link-local 169.254.X.0/30 addresses on its two ends only, and the fractal agent runs there in a
PID and mount namespace of its own (`nsenter --net` + `unshare --pid --mount`): reached only over
TCP with mutual TLS, and killing it (the PID namespace's init) takes its containers and mounts
with it, as a machine that dies.  It has a layer repo of its own (`--repo`: layers arrive as
containerd's blobs streamed by the shim), and in its mount namespace a tmpfs is mounted over the
host's fractal repo and containerd's bundle dir: it cannot see them, as a separate machine
would not.  `ip netns exec` is not used: it remounts /sys, which hides the cgroup hierarchies
runc needs.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hack.containerd_env import FractalEnv

PORT = 7443
REPO = Path(__file__).resolve().parents[1]


def _sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=30)


@dataclass
class Machine:
    """A network namespace with one veth link to the host: the remote machine's network."""

    netns: str
    host_ip: str
    agent_ip: str
    host_link: str


@contextlib.contextmanager
def machine_netns() -> Iterator[Machine]:
    """A network namespace joined to the host by a veth pair, 169.254.X.1/30 (host end) and
    .2/30 (the machine's end), X free on this host; removed on exit."""
    tag = secrets.token_hex(3)
    used = _sh("ip", "-o", "addr").stdout
    third = next(x for x in random.sample(range(100, 250), 150) if f"169.254.{x}." not in used)
    m = Machine(f"fr15-{tag}", f"169.254.{third}.1", f"169.254.{third}.2", f"fr15h{tag}")
    peer = f"fr15a{tag}"
    _sh("ip", "netns", "add", m.netns)
    try:
        _sh("ip", "link", "add", m.host_link, "type", "veth", "peer", "name", peer)
        _sh("ip", "link", "set", peer, "netns", m.netns)
        _sh("ip", "addr", "add", f"{m.host_ip}/30", "dev", m.host_link)
        _sh("ip", "link", "set", m.host_link, "up")
        for cmd in (("addr", "add", f"{m.agent_ip}/30", "dev", peer), ("link", "set", peer, "up"),
                    ("link", "set", "lo", "up")):
            _sh("ip", "-n", m.netns, *cmd)
        yield m
    finally:
        _sh("ip", "link", "del", m.host_link, check=False)
        _sh("ip", "netns", "del", m.netns, check=False)


class RemoteAgent:
    """`python3 -m ccpu.agent --listen tcp:...` in the machine's namespaces (net, pid, mount)."""

    def __init__(self, env: FractalEnv, m: Machine, tls_dir: Path, port: int = PORT,
                 orphan_grace: float = 30.0) -> None:
        self.runc_root = env.run_dir / f"remote-runc-{port}"
        self.log = env.log_dir / f"remote-agent-{port}.log"
        self.repo = env.root_dir / f"machine-repo-{port}"  # the machine's own (--repo)
        self.hidden = [env.snapshotter_root, env.run_dir / "st"]  # the host's repo and bundles
        r, w = os.pipe()
        agent = [sys.executable, "-m", "ccpu.agent", "--listen", f"tcp:{m.agent_ip}:{port}",
                 "--tls-dir", str(tls_dir), "--runc-root", str(self.runc_root),
                 "--runc", shutil.which("runc") or "runc", "--repo", str(self.repo),
                 "--orphan-grace", str(orphan_grace), "--ready-fd", str(w), "--log", str(self.log), "--debug"]
        hide = " && ".join(f"mkdir -p {shlex.quote(str(d))} && mount -t tmpfs -o size=1m,mode=0700 "
                           f"fractal-machine-hides-this {shlex.quote(str(d))}" for d in self.hidden)
        cmd = ["nsenter", f"--net=/run/netns/{m.netns}", "--",
               "unshare", "--pid", "--fork", "--mount", "--mount-proc", "--propagation", "slave", "--kill-child",
               "sh", "-c", f'{hide} && exec "$@"', "machine", *agent]
        envvars = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(cmd, pass_fds=(w,), stdin=subprocess.DEVNULL, env=envvars)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            ready = f.read(6)
        assert ready == b"ready\n", f"remote agent did not come up: {self._tail()}"

    def _tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text()[-3000:]
        return "(no log)"

    def layers(self) -> list[str]:
        """The machine repo's published layers (chain ID hex names)."""
        with contextlib.suppress(FileNotFoundError):
            return sorted(os.listdir(self.repo / "layers"))
        return []

    def received(self) -> int:
        """How many layers the agent received (its log's count of pulls)."""
        with contextlib.suppress(OSError):
            return self.log.read_text().count(" received (")
        return 0

    def agent_pid(self) -> int:
        """The agent's host pid: the init of its PID namespace, unshare's child."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        assert len(children) == 1, children
        return int(children[0])

    def kill_machine(self) -> None:
        os.kill(self.agent_pid(), signal.SIGKILL)  # the namespace's init: everything in it dies
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        # what a dead machine leaves in this host's shared dirs (on a real one: gone at reboot)
        runc = shutil.which("runc") or "runc"
        if self.runc_root.is_dir():
            for cid in os.listdir(self.runc_root):
                _sh(runc, "--root", str(self.runc_root), "delete", "--force", cid, check=False)


def remote_config(env: FractalEnv, m: Machine, tls_dir: Path, port: int = PORT, extra: str = "") -> None:
    """The env's fractal config with ``[remote]`` pointing at the machine's agent (``extra``:
    more TOML tables, e.g. ``[vm]``)."""
    env.fractal_config.write_text(
        'mode = "host"\nallowed_annotations = [".*"]\n'
        f'[remote]\nendpoints = ["{m.agent_ip}:{port}"]\ntls_dir = "{tls_dir}"\nconnect_timeout = 10\n{extra}')
