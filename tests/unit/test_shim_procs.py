"""shim/procs.py: the one rule that tells our shim daemons and fork-servers from any process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from shim import address as addr
from shim import procs

ROOT = Path(__file__).resolve().parents[2]
CD = "/run/x/containerd.sock"


@pytest.mark.parametrize("comm, argv, want", [
    # forked by start: keeps start's command line (console script run by its interpreter)
    ("containerd-shim", ["/usr/bin/python3", "/usr/local/bin/containerd-shim-fractal-v1", "-namespace",
                         "default", "-address", CD, "-publish-binary", "/usr/bin/containerd", "-id", "c1",
                         "start", ""], ("daemon", CD)),
    # forked by the zygote: the zygote's command line, comm set back to containerd-shim
    ("containerd-shim", ["/usr/bin/python3", "-m", "shim.zygote", "-address", CD, "-socket", "/s/z",
                         "-listen-fd", "3"], ("daemon", CD)),
    # FRACTAL_SHIM_SPAWN=exec
    ("containerd-shim", ["/usr/bin/python3", "-m", "shim.daemon", "-namespace", "n", "-address", CD],
     ("daemon", CD)),
    ("fractal-zygote", ["/usr/bin/python3", "-m", "shim.zygote", "-address", CD], ("zygote", CD)),
    # a relayed start's worker (forked by the zygote, leaves at once): neither
    ("fractal-start", ["/usr/bin/python3", "-m", "shim.zygote", "-address", CD, "-socket", "/s/z",
                       "-listen-fd", "3"], None),
    # containerd's runc shim: same comm, not ours
    ("containerd-shim", ["/usr/bin/containerd-shim-runc-v2", "-namespace", "n", "-id", "c", "-address", CD],
     None),
    # ours by command line but another comm: a child of the daemon that exec'd (runc, a container)
    ("python3", ["/usr/bin/python3", "-m", "shim.daemon", "-address", CD], None),
    # a zygote's comm on a foreign program, or ours without a containerd address
    ("fractal-zygote", ["/usr/bin/python3", "-m", "shim.daemon", "-address", CD], None),
    ("containerd-shim", ["/usr/bin/python3", "-m", "shim.daemon"], None),
])
def test_classify(comm: str, argv: list[str], want: tuple[str, str] | None) -> None:
    assert procs.classify(comm, argv) == want


def test_parse_net_unix_keeps_listening_sockets_in_the_shim_dir() -> None:
    text = ("Num       RefCount Protocol Flags    Type St Inode Path\n"
            "0000000000000000: 00000002 00000000 00010000 0001 01 1001 /run/containerd/s/aa\n"
            "0000000000000000: 00000003 00000000 00000000 0001 03 1002 /run/containerd/s/aa\n"
            "0000000000000000: 00000002 00000000 00010000 0001 01 1003 /run/other.sock\n"
            "0000000000000000: 00000002 00000000 00010000 0001 01 1004\n"
            "garbage line\n")
    assert procs.parse_net_unix(text, "/run/containerd/s") == {1001: "/run/containerd/s/aa"}


#: a stand-in daemon: names itself as a daemon does, listens on a socket in the (temporary)
#: shim socket dir, forks a child that never execs (it looks like its parent) and waits
FAKE_DAEMON = r"""
import os, socket, sys, time
sys.path.insert(0, sys.argv[1])
from shim import procs
procs.set_comm(procs.DAEMON_COMM)
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[2]); s.listen(1)
if os.fork() == 0:
    time.sleep(60); os._exit(0)
print("ready", flush=True)
time.sleep(60)
"""


def test_find_names_the_daemon_and_its_socket_not_its_unexeced_child() -> None:
    sockdir = tempfile.mkdtemp(prefix="s", dir="/tmp")
    sock = f"{sockdir}/abc"
    old = addr.SOCKET_DIR
    addr.SOCKET_DIR = sockdir
    p = subprocess.Popen([sys.executable, "-c", FAKE_DAEMON, str(ROOT), sock, "-m", "shim.daemon",
                          "-address", f"{sockdir}/cd.sock"], stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert p.stdout is not None and p.stdout.readline() == b"ready\n"
        found = procs.find(f"{sockdir}/cd.sock")
        assert found == [procs.ShimProcess(pid=p.pid, kind="daemon", containerd=f"{sockdir}/cd.sock",
                                           socket=sock)]
        assert procs.daemon_pids(f"{sockdir}/cd.sock") == [p.pid]
        assert procs.find(f"{sockdir}/other.sock") == []
        assert p.pid in procs.daemon_pids()  # of any containerd
        assert procs.zygote_pids(f"{sockdir}/cd.sock") == []
    finally:
        addr.SOCKET_DIR = old
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        import shutil

        shutil.rmtree(sockdir, ignore_errors=True)

