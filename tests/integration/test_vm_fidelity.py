"""Issue 16: inside a VM a container sees exactly the filesystem runc shows.

One probe (hack/fsprobe.c, built into the `fidelity` test image) prints every entry under /fid
with its type, mode, owner, link count, size, sparseness, device number, symlink target,
hardlink group, every xattr and a content hash.  The reference is the SAME image run by runc on
containerd's own overlayfs snapshotter; fractal host mode, VM mode over virtiofs and over 9p,
and a VM container whose upper layers were added live (`fractal layers add`) must print the
same bytes.  The image (hack/testimages.py `fidelity`): opaque dirs (one re-populated by a
later layer, one with a subdir under it), a whiteout, hardlinks, absolute/relative/dangling
symlinks, setuid/setgid/sticky, non-root owners, char and block devices, file capabilities,
user.* xattrs, POSIX ACLs (access + default), a sparse-able and a large file, a 255-byte name
and a unicode name.
"""

from __future__ import annotations

import difflib
import os
import re
import subprocess
import sys
import time
from typing import Iterator

import pytest

from hack.containerd_env import FractalEnv

RUNTIME = "io.containerd.fractal.v1"
PROBE = ("/probe", "/fid")
IMAGES = ("fidelity", "fidelity-base")


def _virtiofsd() -> bool:
    from ccpu.vm import shares

    return shares.find_virtiofsd() is not None


SHARES = ["9p", pytest.param("virtiofs", marks=pytest.mark.skipif(
    not _virtiofsd(), reason="no virtiofsd (hack/setup.sh builds one)"))]


@pytest.fixture(scope="module")
def refs(registry) -> dict[str, str]:  # noqa: ANN001
    """The fidelity images in the session registry (built on demand; not in the default set)."""
    from hack import testimages

    out = {}
    for name in IMAGES:
        testimages.build(name)
        if registry.server is not None:
            registry.server.push(testimages.layout_path(name), f"fractal/{name}", "latest")
        out[name] = registry.ref(name)
    return out


@pytest.fixture(scope="module")
def reference(plain_env: FractalEnv, refs: dict[str, str]) -> Iterator[str]:
    """What runc on containerd's overlayfs snapshotter shows: the expectation for every other run."""
    ns = plain_env.new_namespace()
    try:
        plain_env.pull(refs["fidelity"], namespace=ns, snapshotter="overlayfs")
        out = plain_env.run(refs["fidelity"], "fid-runc", *PROBE, snapshotter="overlayfs", namespace=ns).stdout
    finally:
        problems = plain_env.remove_namespace(ns)
    assert not problems, problems
    # the image really has what the comparison is about (else identical outputs prove nothing)
    assert "/fid/d/c f" in out and "/fid/d/a " not in out and "/fid/x " not in out, out
    assert "x:security.capability=" in out and "x:system.posix_acl_default=" in out, out
    assert "x:user.fidelity=" in out and "hardlink=/fid/hard1" in out, out
    yield out


#: what a share cannot carry at all (docs/vm.md, "Layer fidelity"): QEMU's 9p `local` backend
#: passes no security.* xattr, so file capabilities do not reach a 9p guest.  The outputs are
#: compared without it, then the test is reported as an expected failure while they differ.
KNOWN_GAPS = {"9p": "security.capability"}


def same(reference: str, got: str, what: str) -> None:
    if got != reference:
        diff = "\n".join(difflib.unified_diff(reference.splitlines(), got.splitlines(), "runc/overlayfs", what,
                                              lineterm=""))
        pytest.fail(f"{what} shows a different filesystem than runc:\n{diff}", pytrace=False)


def same_over(share: str, reference: str, got: str, what: str) -> None:
    gap = KNOWN_GAPS.get(share)
    if gap is not None and got != reference:
        drop = re.compile(rf" x:{re.escape(gap)}=[0-9a-f]*")
        same(drop.sub("", reference), drop.sub("", got), f"{what} (without {gap})")
        pytest.xfail(f"{what}: no {gap} xattrs (QEMU's 9p passes none; docs/vm.md)")
    same(reference, got, what)


def test_host_mode_matches_runc(fenv: FractalEnv, namespace: str, refs: dict[str, str], reference: str) -> None:
    fenv.pull(refs["fidelity"], namespace=namespace)
    out = fenv.run(refs["fidelity"], "fid-host", *PROBE, namespace=namespace, runtime=RUNTIME,
                   extra=["--annotation", "io.fractal.mode=host"]).stdout
    same(reference, out, "fractal host mode")


@pytest.mark.parametrize("share", SHARES)
def test_vm_matches_runc(fenv: FractalEnv, namespace: str, refs: dict[str, str], reference: str,
                         share: str) -> None:
    fenv.pull(refs["fidelity"], namespace=namespace)
    out = fenv.run(refs["fidelity"], f"fid-vm-{share}", *PROBE, namespace=namespace, runtime=RUNTIME,
                   extra=["--annotation", "io.fractal.mode=vm", "--annotation", f"io.fractal.share={share}"],
                   timeout=300).stdout
    same_over(share, reference, out, f"fractal VM mode over {share}")


def _fractal(env: FractalEnv, *args: str) -> subprocess.CompletedProcess[str]:
    e = {**os.environ, "FRACTAL_RUN_DIR": str(env.fractal_run_dir), "FRACTAL_ROOT": str(env.snapshotter_root)}
    return subprocess.run([sys.executable, "-m", "ccpu.cli", *args], capture_output=True, text=True, env=e,
                          timeout=300)


@pytest.mark.parametrize("share", SHARES)
def test_vm_live_layers_match_runc(fenv: FractalEnv, namespace: str, refs: dict[str, str], reference: str,
                                   share: str) -> None:
    """The container starts on the image's first layers; the opaque/whiteout layers are added live."""
    cid = f"fid-live-{share}"
    fenv.pull(refs["fidelity-base"], namespace=namespace)
    fenv.pull(refs["fidelity"], namespace=namespace)
    fenv.run(refs["fidelity-base"], cid, "sleep", "600", rm=False, namespace=namespace, runtime=RUNTIME,
             extra=["-d", "--annotation", "io.fractal.mode=vm", "--annotation", f"io.fractal.share={share}"],
             timeout=300)
    try:
        r = _fractal(fenv, "layers", "add", "-a", str(fenv.address), "-n", namespace, cid, refs["fidelity"])
        assert r.returncode == 0, r.stderr
        assert "added 2 layer(s)" in r.stdout, r.stdout
        out = fenv.ctr("tasks", "exec", "--exec-id", "probe", cid, *PROBE, namespace=namespace, timeout=120).stdout
        # a dir of the layers replaced in the guest's upper: overlayfs marks the new one opaque there
        r = fenv.ctr("tasks", "exec", "--exec-id", "mkdir", cid, "sh", "-c",
                     "rm -rf /fid/e && mkdir /fid/e && touch /fid/e/mine && ls -A /fid/e", namespace=namespace)
        assert r.stdout == "mine\n", r
        same_over(share, reference, out, f"fractal VM over {share} after a live `layers add`")
    finally:
        fenv.ctr("tasks", "kill", "-s", "SIGKILL", cid, namespace=namespace, check=False)
        deadline = time.monotonic() + 60
        while fenv.ctr("tasks", "delete", cid, namespace=namespace, check=False).returncode != 0:
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        fenv.ctr("containers", "delete", cid, namespace=namespace, check=False)
