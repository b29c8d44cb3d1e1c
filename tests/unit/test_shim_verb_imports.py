"""What the ``start`` and ``delete`` verbs import: the import graph of containerd's critical path.

containerd runs ``containerd-shim-fractal-v1 start`` before every new sandbox and ``delete`` after
every shim exit (containerd 1.6's clean-up of a closed shim connection; ``ctr run --rm`` waits
for it), each in a fresh interpreter.  Every module those processes import is paid on every
``ctr run`` (issue 13).  So each verb runs here for real, in a fresh ``python3 -X importtime``
process, and the test asserts *which* modules got loaded -- never how long that took (the
importtime figures are only shown, in the failure message and with ``pytest -s``):

* never grpc, protobuf, asyncio, ssl or the daemon (``start`` forks the daemon, which imports
  them in the child: the verb's own process must not);
* of the project, only the modules the verb needs (:data:`START_MAY_LOAD`,
  :data:`DELETE_MAY_LOAD`);
* ``delete`` after a clean exit (runc has no state, nothing mounted) needs neither subprocess
  nor ctypes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: stdlib/third-party packages no verb may load (checked as a name or a dotted prefix)
FORBIDDEN = ("grpc", "google.protobuf", "asyncio", "ssl", "_ssl", "shim.daemon", "shim.task",
             "shim.config", "ccpu.ttrpc", "ccpu.api")
START_MAY_LOAD = {"shim", "shim.main", "shim.args", "shim.start", "shim.address", "shim.sha", "ccpu",
                  "ccpu.agent", "ccpu.agent.jsonbound", "ccpu.grouping"}
#: by default (FRACTAL_SHIM_SPAWN unset = zygote) start also asks the fork-server (its client half)
ZYGOTE_START_MAY_LOAD = START_MAY_LOAD | {"shim.relay", "shim.zygoteclient"}
DELETE_MAY_LOAD = {"shim", "shim.main", "shim.args", "shim.delete", "shim.address", "shim.sha", "ccpu",
                   "ccpu.agent", "ccpu.agent.jsonbound", "ccpu.grouping"}

#: Runs in the fresh interpreter: one verb through shim.main.main, as containerd runs it, with
#: the socket dir moved to a temp dir and the fork of the daemon recorded instead of done
#: (the verb's own process never imports the daemon; its forked child does).
SCRIPT = r"""
import os, sys
out, sockdir, verb = sys.argv[1], sys.argv[2], sys.argv[3]
before = set(sys.modules)
from shim import main as shim_main
from shim import address as addr
addr.SOCKET_DIR = sockdir
if verb == "start":
    from shim import start
    def fake_fork(opts, group, bundle, sock_path, sock, lock_fd, close=()):
        sock.close()
    start._fork_daemon = fake_fork
    if os.environ.get("FRACTAL_SHIM_SPAWN", "zygote") == "zygote":  # no zygote there: no new one
        from shim import zygoteclient
        zygoteclient.start_zygote = lambda address: None
code = shim_main.main(sys.argv[4:], fast_exit=False)
loaded = sorted(set(sys.modules) - before)  # before this script's own json
import json
with open(out, "w") as f:
    json.dump({"code": code, "loaded": loaded}, f)
"""


def run_verb(tmp_path: Path, verb: str, *, bundle: Path | None = None,
             env_extra: dict[str, str] | None = None,
             base_env: dict[str, str] | None = None,
             no_site: bool = False, recorded: bool = False) -> tuple[set[str], str, bytes]:
    """Run ``verb`` in a fresh ``python3 -X importtime``; (modules it loaded, its importtime
    report for the project's and the forbidden modules, its stdout).  ``no_site``: as the
    launcher `fractal install` writes runs it (``python3 -S``, site-packages put on the path by
    hand), so that the stdlib modules ``site`` would have loaded count too.  ``recorded``: the
    bundle has the ``address`` file ``start`` writes (a socket in the test's socket dir)."""
    bundle = bundle or tmp_path / "bundle"
    bundle.mkdir(exist_ok=True)
    (bundle / "config.json").write_text(json.dumps({"annotations": {"io.fractal.mode": "host"}}))
    out = tmp_path / f"{verb}.json"
    sockdir = tempfile.mkdtemp(prefix="s", dir="/tmp")  # socket paths must stay < 108 bytes
    if recorded:
        (bundle / "address").write_text(f"unix://{sockdir}/{'ab' * 32}")
    argv = ["-namespace", "ns", "-address", str(tmp_path / "containerd.sock"), "-publish-binary",
            "/usr/bin/containerd", "-id", "c1", "-bundle", str(bundle), verb]
    pythonpath = [str(ROOT)]
    if no_site:
        import sysconfig

        pythonpath += [sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]
    env = {**(os.environ if base_env is None else base_env), "PYTHONPATH": os.pathsep.join(pythonpath),
           "FRACTAL_RUN_DIR": str(tmp_path / "run"), **(env_extra or {})}
    flags = ["-S"] if no_site else []
    try:
        r = subprocess.run([sys.executable, *flags, "-X", "importtime", "-c", SCRIPT, str(out), sockdir, verb,
                            *argv], capture_output=True, env=env, stdin=subprocess.DEVNULL, timeout=60)
    finally:
        import shutil

        shutil.rmtree(sockdir, ignore_errors=True)
    stderr = r.stderr.decode(errors="replace")
    lines = [ln for ln in stderr.splitlines() if not ln.startswith("import time:")]
    assert r.returncode == 0 and out.exists(), f"{verb} failed ({r.returncode}): {lines}"
    result = json.loads(out.read_text())
    assert result["code"] == 0, f"{verb} exited {result['code']}: {lines}"
    report = "\n".join(ln for ln in stderr.splitlines()
                       if ln.startswith("import time:") and any(
                           f" {p}" in ln for p in ("shim", "ccpu", "json", "socket", "grpc", "google",
                                                   "asyncio", "subprocess", "ctypes")))
    print(f"\n{verb}: importtime of the verb's modules (us):\n{report}")
    return set(result["loaded"]), report, r.stdout


def forbidden(loaded: set[str]) -> list[str]:
    return sorted(m for m in loaded if any(m == f or m.startswith(f + ".") for f in FORBIDDEN))


def project(loaded: set[str]) -> set[str]:
    return {m for m in loaded if m.split(".")[0] in ("shim", "ccpu", "snapshotter")}


def test_start_imports_no_grpc_protobuf_asyncio_or_daemon(tmp_path: Path) -> None:
    loaded, report, stdout = run_verb(tmp_path, "start", env_extra={"FRACTAL_SHIM_SPAWN": "fork"})
    assert stdout.startswith(b"unix://")
    assert forbidden(loaded) == [], report
    assert project(loaded) <= START_MAY_LOAD, (sorted(project(loaded) - START_MAY_LOAD), report)
    assert "shim.start" in loaded  # the verb really ran


def test_start_with_the_fork_server_imports_only_its_client(tmp_path: Path) -> None:
    """The default: no zygote answers here, so start falls back to forking (recorded)."""
    env = {k: v for k, v in os.environ.items() if k != "FRACTAL_SHIM_SPAWN"}
    loaded, report, stdout = run_verb(tmp_path, "start", env_extra=None, base_env=env)
    assert stdout.startswith(b"unix://")
    assert forbidden(loaded) == [], report
    assert project(loaded) <= ZYGOTE_START_MAY_LOAD, (sorted(project(loaded) - ZYGOTE_START_MAY_LOAD), report)
    assert "shim.zygoteclient" in loaded and "shim.zygote" not in loaded


def test_delete_after_a_clean_exit_needs_only_the_stdlib_basics(tmp_path: Path) -> None:
    loaded, report, stdout = run_verb(tmp_path, "delete")
    assert stdout.startswith(b"\x10\x89\x01")  # DeleteResponse{exit_status=137, ...}
    assert forbidden(loaded) == [], report
    assert project(loaded) <= DELETE_MAY_LOAD, (sorted(project(loaded) - DELETE_MAY_LOAD), report)
    # runc has no state and nothing is mounted: no runc to run, no umount2 to call
    assert "subprocess" not in loaded and "ctypes" not in loaded, report


def test_delete_after_a_crash_runs_runc_but_imports_no_more_of_the_project(tmp_path: Path) -> None:
    """A dead shim's container: runc still has state, so ``runc delete --force`` runs (a stand-in
    runc here); that needs subprocess, still nothing heavy."""
    state = tmp_path / "run" / "runc" / "ns" / "c1"
    state.mkdir(parents=True)
    (state / "state.json").write_text(json.dumps({"init_process_pid": 4242}))
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "runc").write_text("#!/bin/sh\nexit 0\n")
    (fake / "runc").chmod(0o755)
    loaded, report, stdout = run_verb(tmp_path, "delete",
                                      env_extra={"PATH": f"{fake}:{os.environ.get('PATH', '')}"})
    assert stdout.startswith(b"\x08\x92\x21")  # pid 4242 reported
    assert "subprocess" in loaded
    assert forbidden(loaded) == [], report
    assert project(loaded) <= DELETE_MAY_LOAD, (sorted(project(loaded) - DELETE_MAY_LOAD), report)



# ---------------------------------------------------------------------------------------------
# As the launcher runs them (`python3 -S`, ccpu/cli/launcher.py): nothing of `site` loaded
# beforehand, so the stdlib the verbs pull in is theirs, and pinned here too.

#: stdlib modules that only cost time here: typing (with contextlib, warnings), logging,
#: dataclasses/inspect, subprocess; and site's own
NO_SITE_FORBIDDEN = ("typing", "contextlib", "warnings", "logging", "dataclasses", "inspect",
                     "subprocess", "site", "hashlib", "_hashlib", "pathlib", "tempfile")


def no_site_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "FRACTAL_SHIM_SPAWN"}


def test_start_under_the_launcher_loads_no_typing_or_other_heavy_stdlib(tmp_path: Path) -> None:
    loaded, report, stdout = run_verb(tmp_path, "start", base_env=no_site_env(), no_site=True)
    assert stdout.startswith(b"unix://")
    assert "site" not in loaded and "shim.start" in loaded
    assert forbidden(loaded) == [], report
    assert project(loaded) <= ZYGOTE_START_MAY_LOAD, (sorted(project(loaded) - ZYGOTE_START_MAY_LOAD), report)
    assert sorted(loaded & set(NO_SITE_FORBIDDEN)) == [], report


def test_delete_after_a_clean_exit_under_the_launcher_parses_nothing(tmp_path: Path) -> None:
    """containerd's `delete` after every shim exit: the socket comes from the bundle's `address`
    file, no VM dir exists, so not even json (and re) is loaded."""
    loaded, report, stdout = run_verb(tmp_path, "delete", base_env=no_site_env(), no_site=True,
                                      recorded=True)
    assert stdout.startswith(b"\x10\x89\x01")
    assert "shim.delete" in loaded and "site" not in loaded
    assert forbidden(loaded) == [], report
    assert sorted(loaded & {"json", "re", "ccpu.agent.jsonbound", *NO_SITE_FORBIDDEN}) == [], report
    # nor socket (enum, selectors) or collections: the socket probe uses _socket, and grouping
    # needs collections.abc only for annotations
    assert sorted(loaded & {"socket", "enum", "selectors", "collections"}) == [], report
    assert project(loaded) <= DELETE_MAY_LOAD, (sorted(project(loaded) - DELETE_MAY_LOAD), report)


def test_delete_without_the_recorded_address_still_finds_the_group_from_the_spec(tmp_path: Path) -> None:
    """No `address` file (start never finished): the stale socket of the spec's group is found
    and removed, so the fast path did not drop the clean-up."""
    sockdir = Path(tempfile.mkdtemp(prefix="s", dir="/tmp"))
    try:
        from shim import address as addr

        (tmp_path / "bundle").mkdir()
        old = addr.SOCKET_DIR
        addr.SOCKET_DIR = str(sockdir)
        try:
            sock = Path(addr.socket_path(str(tmp_path / "containerd.sock"), "ns", "grp"))
        finally:
            addr.SOCKET_DIR = old
        sock.write_text("")  # a stale socket file: nothing listens
        from shim import delete

        spec = {"annotations": {"io.fractal.sandbox": "grp"}}
        (tmp_path / "bundle" / "config.json").write_text(json.dumps(spec))
        import unittest.mock as um

        with um.patch.object(addr, "SOCKET_DIR", str(sockdir)), \
                um.patch.dict(os.environ, {"FRACTAL_RUN_DIR": str(tmp_path / "run")}):
            delete.cleanup("ns", "c1", str(tmp_path / "bundle"), str(tmp_path / "containerd.sock"))
            assert not sock.exists()
            # and with the address recorded (a socket of the same dir), that one is cleaned
            sock.write_text("")
            (tmp_path / "bundle" / "config.json").write_text("{}")  # the spec no longer names it
            (tmp_path / "bundle" / "address").write_text(f"unix://{sock}")
            delete.cleanup("ns", "c1", str(tmp_path / "bundle"), str(tmp_path / "containerd.sock"))
            assert not sock.exists()
    finally:
        import shutil

        shutil.rmtree(sockdir, ignore_errors=True)


def test_a_recorded_address_outside_the_socket_dir_is_not_trusted(tmp_path: Path) -> None:
    from shim import address as addr

    for text in ("unix:///etc/passwd", f"unix://{addr.SOCKET_DIR}/../x/{'a' * 64}",
                 f"unix://{addr.SOCKET_DIR}/{'A' * 64}", f"unix://{addr.SOCKET_DIR}/{'a' * 63}", "\xff"):
        (tmp_path / "address").write_text(text, errors="surrogateescape")
        assert addr.read_recorded_socket(str(tmp_path)) is None, text
    (tmp_path / "address").write_text(f"unix://{addr.SOCKET_DIR}/{'0f' * 32}")
    assert addr.read_recorded_socket(str(tmp_path)) == f"{addr.SOCKET_DIR}/{'0f' * 32}"
