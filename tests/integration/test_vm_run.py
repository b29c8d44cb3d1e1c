"""`fractal vm run` against real QEMU (TCG here): guest kernel, shares, exit codes, no leftovers.

Three boots in all (~4-5 s each under TCG), one shared guest build.  Each boot
checks several things so the file stays fast.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs qemu-system-x86_64")


def qemu_processes(needle: str) -> list[str]:
    """Command lines of running QEMU processes that mention `needle` (ours only, not other sessions')."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmd.startswith("qemu-system-x86_64") and needle in cmd:
            found.append(f"{pid}: {cmd[:200]}")
    return found


@pytest.fixture(scope="session")
def guest() -> Path:
    """Build (or reuse) the guest once for the session."""
    out = subprocess.run([sys.executable, "-m", "ccpu.cli", "guest", "build", "--json"], cwd=REPO,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    return Path(out.stdout.split('"initramfs": "')[1].split('"')[0])


@pytest.fixture
def dirs(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    work, repo = tmp_path / "work", tmp_path / "repo"
    work.mkdir()
    repo.mkdir()
    (work / "marker-7f3a").write_text("hello from the host\n")
    (repo / "layer-file").write_text("layer\n")
    yield work, repo
    assert qemu_processes(str(tmp_path)) == [], "QEMU outlived fractal vm run"


def vm_run(work: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ccpu.cli", "vm", "run", *args], cwd=work, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_command_sees_shares_guest_kernel_and_a_read_only_repo(guest: Path, dirs: tuple[Path, Path]) -> None:
    work, repo = dirs
    script = (
        "ls /work; uname -r; cat /repo/layer-file; "
        "echo written-in-guest > /work/from-guest; "
        "if touch /repo/intruder 2>/dev/null; then echo REPO-WRITABLE; else echo repo-ro; fi; "
        "echo to-stderr >&2"
    )
    res = vm_run(work, "--share-type", "9p", "--repo", str(repo), "--", "sh", "-c", script)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert "marker-7f3a" in lines
    host_release = os.uname().release
    guest_release = lines[lines.index("marker-7f3a") + 1]
    assert guest_release != host_release and guest_release.startswith("6.1."), lines
    assert "layer" in lines
    assert "repo-ro" in lines and "REPO-WRITABLE" not in res.stdout
    assert not (repo / "intruder").exists()
    assert (work / "from-guest").read_text() == "written-in-guest\n"  # user shares are read-write
    assert "to-stderr" in res.stderr and "to-stderr" not in res.stdout


def test_exit_code_propagates_and_pivot_root_works(guest: Path, dirs: tuple[Path, Path]) -> None:
    work, _ = dirs
    # runc pivot_roots into container rootfs; the guest's root must allow it (it is not the bare initramfs)
    script = ("unshare -m sh -c 'mkdir -p /tmp/nr && mount -t tmpfs t /tmp/nr && mkdir /tmp/nr/old && "
              "cd /tmp/nr && pivot_root . old && echo pivot-ok'; exit 7")
    res = vm_run(work, "--share-type", "9p", "--", "sh", "-c", script)
    assert res.returncode == 7, res.stderr
    assert "pivot-ok" in res.stdout, res.stderr


def test_virtiofs_shares(guest: Path, dirs: tuple[Path, Path]) -> None:
    sys.path.insert(0, str(REPO))
    from ccpu.vm.shares import find_virtiofsd

    if find_virtiofsd() is None:
        pytest.skip("no virtiofsd (hack/setup.sh builds it into $FRACTAL_CACHE/virtiofsd)")
    work, repo = dirs
    script = ("ls /work; grep -E ' /(work|repo) ' /proc/mounts | cut -d' ' -f3,4 | cut -d, -f1; "
              "echo v > /work/vfs-out; touch /repo/intruder 2>/dev/null && echo REPO-WRITABLE; exit 3")
    res = vm_run(work, "--share-type", "virtiofs", "--repo", str(repo), "--", "sh", "-c", script)
    assert res.returncode == 3, res.stderr
    assert "marker-7f3a" in res.stdout
    assert "virtiofs rw" in res.stdout and "virtiofs ro" in res.stdout
    assert "REPO-WRITABLE" not in res.stdout and not (repo / "intruder").exists()
    assert (work / "vfs-out").read_text() == "v\n"


def test_stdin_with_i_reaches_the_command_and_ends_it(guest: Path, dirs: tuple[Path, Path], tmp_path: Path) -> None:
    """`vm run -i` without -t (docker run -i): the host's stdin, pipe or file, is the command's, its
    end the command's EOF; output flows while input is still pending (`cat` echoes 512 KiB back: a
    pump that blocked on the guest's input would deadlock on its output).  Without -i: /dev/null."""
    work, _ = dirs
    data = os.urandom(512 * 1024)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    echo = subprocess.run([sys.executable, "-m", "ccpu.cli", "vm", "run", "-i", "--", "cat"], cwd=work,
                          input=data, capture_output=True, timeout=300, env=env)
    assert echo.returncode == 0, echo.stderr[-2000:]
    assert echo.stdout == data
    src = tmp_path / "input.bin"
    src.write_bytes(data)
    with src.open("rb") as f:  # a regular file: epoll cannot watch it
        digest = subprocess.run([sys.executable, "-m", "ccpu.cli", "vm", "run", "-i", "--", "sha256sum"], cwd=work,
                                stdin=f, capture_output=True, timeout=300, env=env)
    assert digest.returncode == 0, digest.stderr[-2000:]
    import hashlib
    assert digest.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    closed = subprocess.run([sys.executable, "-m", "ccpu.cli", "vm", "run", "--", "sh", "-c", "cat; echo end"],
                            cwd=work, input=b"not for the guest\n", capture_output=True, timeout=300, env=env)
    assert closed.returncode == 0 and closed.stdout == b"end\n", closed


def test_small_guest_ready_path_zip_and_modules(guest: Path, dirs: tuple[Path, Path]) -> None:
    """The boot path (docs/vm.md "The guest's boot timeline"): the agent's ready-path modules are
    imported from the one stored zip the manifest names (with its hash), a zipped package's other
    modules still import, and every module of the build is loaded -- the later ones through links
    into the system image (layout "image")."""
    manifest = json.loads((guest.parent / "manifest.json").read_text())
    z = manifest["ready_zip"]
    mods = [m for m in z["modules"] if m != "__main__"]
    assert "ccpu.agent.hello" in mods and "json" in mods
    work, _ = dirs
    code = (f"import sys, importlib; [importlib.import_module(m) for m in {mods!r}]; import ccpu.agent.container; "
            "print(*(f'FILE {n} {sys.modules[n].__file__}' for n in [*sys.argv[1:], 'ccpu.agent.container']), "
            "sep=chr(10))")
    rel = manifest["kernel"]["release"]
    names = [ko.rsplit("/", 1)[-1].removesuffix(".xz").removesuffix(".ko").replace("-", "_")
             for ko in manifest["modules"]]
    # a kernel built for the guest (FRACTAL_GUEST_KERNEL=built, ccpu/guest/kbuild.py) has everything
    # built in: no module shipped, none to load, and the kernel has no module support at all
    built = not manifest["modules"]
    later = "" if built else manifest["modules_later"][0].removesuffix(".xz")
    script = (f"sha256sum {z['path']}; \"$(cat /etc/fractal/python)\" -S -I -c \"$0\" {' '.join(mods)}; "
              f"for m in {' '.join(names)}; do [ -d /sys/module/$m ] && echo LOADED $m; done; "
              f"echo LATER $(readlink -f /lib/modules/{rel}/{later}); [ -e /proc/modules ] || echo NO-MODULES")
    res = vm_run(work, "--share-type", "9p", "--", "sh", "-c", script, code)
    assert res.returncode == 0, res.stderr
    assert f"{z['sha256']}  {z['path']}" in res.stdout
    files = dict(line.split()[1:] for line in res.stdout.splitlines() if line.startswith("FILE "))
    assert set(files) == {*mods, "ccpu.agent.container"}
    assert all(f.startswith(z["path"] + "/") for f in files.values()), files
    loaded = {line.split()[1] for line in res.stdout.splitlines() if line.startswith("LOADED ")}
    assert loaded == set(names)
    if built:
        assert manifest["kernel"]["package"].endswith("(built)") and "NO-MODULES" in res.stdout
    elif manifest["layout"] == "image":
        assert f"LATER /.image/lib/modules/{rel}/{later}" in res.stdout


#: issue 12's goal for the initramfs (unpacked into guest RAM at every boot): init, busybox and
#: the modules the agent's start needs, at most this many bytes
INITRAMFS_MAX = 8 * 1000 * 1000


def test_small_guest_initramfs_is_init_busybox_and_modules(guest: Path) -> None:
    """The built guest's initramfs (read from the cpio itself, no boot) is ≤ 8 MB and holds only
    the init, busybox (and its links), a few /etc files and kernel modules: no python interpreter,
    no .py/.pyc/zip of the stdlib or the agent -- those live in the read-only system image
    (layout "image", docs/vm.md "The small guest"); the manifest says so truthfully."""
    import gzip
    import hashlib
    import stat

    sys.path.insert(0, str(REPO))
    from ccpu.guest import cpio
    from ccpu.guest.initramfs import LAYOUT_ENV

    if os.environ.get(LAYOUT_ENV) == "initramfs":
        pytest.skip(f"{LAYOUT_ENV}=initramfs asks for the old all-in-RAM layout")
    manifest = json.loads((guest.parent / "manifest.json").read_text())
    assert manifest["layout"] == "image", "the default build must be the small guest (erofs-utils: hack/setup.sh)"
    data = guest.read_bytes()
    assert hashlib.sha256(data).hexdigest() == manifest["initramfs"]["sha256"]
    assert len(data) == manifest["initramfs"]["size"] <= INITRAMFS_MAX, len(data)
    entries = list(cpio.read(data))
    raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    assert len(raw) == manifest["initramfs"]["uncompressed_size"] <= INITRAMFS_MAX, len(raw)
    files = {e.path: e for e in entries if stat.S_ISREG(e.mode)}
    rel = manifest["kernel"]["release"]
    other = sorted(p for p in files if p not in ("init", "bin/busybox") and not p.startswith("etc/")
                   and not (p.startswith(f"lib/modules/{rel}/") and (p.endswith(".ko") or "/modules." in p)))
    assert other == [], other
    pythonish = sorted(e.path for e in entries if not e.path.startswith("etc/")
                       and ("python" in e.path.rsplit("/", 1)[-1] or e.path.endswith((".py", ".pyc", ".zip"))))
    assert pythonish == [], pythonish
    # no file is an interpreter under another name: the ELF files are busybox and nothing else
    assert [p for p, e in files.items() if e.data[:4] == b"\x7fELF" and not p.endswith(".ko")] == ["bin/busybox"]
    # the interpreter and the agent's zip are in the image instead, behind the links the initramfs has
    py = manifest["binaries"]["python"]
    assert py.startswith("/usr/") and manifest["ready_zip"]["path"].startswith("/usr/")
    assert files["etc/fractal/python"].data.decode().strip() == py  # the init's note of where it is
    assert next(e for e in entries if e.path == "usr").data == b"/.image/usr"


def test_the_guest_build_is_reproducible(guest: Path, tmp_path: Path) -> None:
    """Issue 12 "Must hold": same inputs, same hashes.  hack/guest_repro.py builds the guest twice,
    each in a fresh scratch cache of its own (the kernel already downloaded is shared), and compares
    every hash the manifest records and every file of the build; run in CI so a change that makes
    the build depend on time, order or path fails here, not in a user's attestation."""
    report = tmp_path / "repro.json"
    r = subprocess.run([sys.executable, str(REPO / "hack" / "guest_repro.py"), "--scratch", str(tmp_path),
                        "--json", str(report)], cwd=REPO, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    one, two = json.loads(report.read_text())["builds"]
    assert one == two
    for part in ("initramfs", "image", "manifest.json"):
        assert any(part in key for key in one), (part, sorted(one))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("fractal-repro-")], "scratch caches left"
