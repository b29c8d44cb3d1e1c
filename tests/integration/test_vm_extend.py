"""The cpud variant (issue 17 part 3): a guest extended with `fractal guest build --add/--run-at-boot`.

The real u-root cpu/cpud pair is not obtainable here, so a stand-in plays cpud: a small static C
server compiled by the test (gcc -static), added to the guest with --add, started at boot by the
init's supervisor (--run-at-boot), and reached from the host through the VM's network namespace.
It serves one connection and exits, so a second connection proves the supervisor restarted it;
its output and the supervisor's lines must be on the console.

The test builds into a private $FRACTAL_CACHE (the kernel cache linked in): the extensions are
recorded per cache, and other tests must keep the plain guest.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.integration.test_vm_net import Pod, _prerequisites, pod, qemu_with  # noqa: F401 -- fixtures

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from ccpu.guest.kernel import cache_root  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None or shutil.which("gcc") is None,
                                reason="needs qemu-system-x86_64 and gcc")

STANDIN_C = r"""
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

/* cpud's stand-in: listen, serve one connection with our pid, exit (the init restarts us). */
int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 7070, one = 1;
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 4)) { perror("standin"); return 1; }
    printf("standin: listening on %d\n", port);
    fflush(stdout);
    int c = accept(s, 0, 0);
    if (c < 0) { perror("standin: accept"); return 1; }
    char buf[64];
    int n = snprintf(buf, sizeof buf, "standin pid %d\n", (int)getpid());
    if (write(c, buf, n) != n) return 1;
    close(c);
    printf("standin: served one, exiting\n");
    return 0;
}
"""

PORT = 7070


def fractal(cache: Path, *args: str, cwd: Path = REPO, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ccpu.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO), "FRACTAL_CACHE": str(cache)})


def test_added_static_binary_runs_at_boot_supervised_and_is_reached_through_the_netns(
        pod: Pod, tmp_path: Path) -> None:  # noqa: F811
    kernels = cache_root() / "kernel"
    if not kernels.is_dir():
        pytest.skip(f"no kernel cached in {kernels} (fractal guest build fetches it)")
    cache = tmp_path / "cache"
    (cache / "guest").mkdir(parents=True)
    (cache / "guest" / "kernel").symlink_to(kernels)
    src, binary = tmp_path / "standin.c", tmp_path / "standin"
    src.write_text(STANDIN_C)
    subprocess.run(["gcc", "-static", "-O2", "-o", str(binary), str(src)], check=True)
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "note.txt").write_text("added tree\n")
    (tree / "link").symlink_to("sub/note.txt")

    built = fractal(cache, "guest", "build", "--json", "--add", f"{binary}:/usr/local/bin/standin",
                    "--add", f"{tree}:/opt/standin", "--run-at-boot", f"/usr/local/bin/standin {PORT}")
    assert built.returncode == 0, built.stderr
    info = json.loads(built.stdout)
    adds = {a["guest"]: a for a in info["extensions"]["add"]}
    assert set(adds) == {"/usr/local/bin/standin", "/opt/standin"}
    assert info["extensions"]["run_at_boot"] == [f"/usr/local/bin/standin {PORT}"]
    # recorded: a plain build (what the shim and vm run do) gives the same guest, hash for hash
    again = fractal(cache, "guest", "build", "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["sha256"] == info["sha256"]

    work = tmp_path / "work"
    work.mkdir()
    console = tmp_path / "console.log"
    got: dict[str, object] = {"pids": []}

    def host() -> None:  # two connections: the second one only succeeds if the supervisor restarted it
        deadline = time.monotonic() + 150
        pids = got["pids"]
        assert isinstance(pids, list)
        try:
            while len(pids) < 2 and time.monotonic() < deadline:
                try:
                    with socket.create_connection((pod.pod_ip, PORT), timeout=5) as c:
                        line = c.makefile().readline().strip()
                    if line:
                        pids.append(line)
                except OSError:
                    time.sleep(0.2)
        finally:
            (work / "done").write_text("")

    t = threading.Thread(target=host, daemon=True)
    t.start()
    script = ("ls -l /usr/local/bin/standin; cat /opt/standin/link; "
              "while [ ! -e /work/done ]; do sleep 0.2; done; echo host-done")
    try:
        res = fractal(cache, "vm", "run", "--share-type", "9p", "--share", str(work), "--netns", pod.path,
                      "--console-log", str(console), "--", "sh", "-c", script, cwd=work, timeout=240)
    finally:
        (work / "done").write_text("")
        t.join(timeout=10)
    log = console.read_text(errors="replace") if console.exists() else ""
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr}\n{log[-3000:]}"
    assert "/usr/local/bin/standin" in res.stdout and "added tree" in res.stdout
    pids = got["pids"]
    assert isinstance(pids, list) and len(pids) == 2, f"{got}\n{log[-3000:]}"
    assert all(p.startswith("standin pid ") for p in pids) and pids[0] != pids[1], pids
    # its output and the supervisor's account are on the console
    assert f"fractal-run-at-boot[1]: start: /usr/local/bin/standin {PORT}" in log
    assert f"standin: listening on {PORT}" in log
    assert "standin: served one, exiting" in log
    assert "fractal-run-at-boot[1]: exited 0; restart in 1s" in log
    assert qemu_with(pod.path) == []

    # cleared: the plain guest again, and a different hash
    plain = fractal(cache, "guest", "build", "--json", "--clear-extensions")
    assert plain.returncode == 0, plain.stderr
    assert json.loads(plain.stdout)["extensions"] is None
    assert json.loads(plain.stdout)["sha256"] != info["sha256"]
    assert not (cache / "guest" / "extensions.json").exists()
