"""The init's system image step (ccpu/guest/init.sh section 1b) and its fractal.sysimage /
fractal.sysdev options: run under busybox sh, the section's own text, with its paths moved into a
temp dir and mount / find_dev / load_modules recorded instead of done.  The options exist for
hack/bench/sysimage.py's candidates (docs/vm.md "The candidates, measured"); the default must be
today's mount: erofs, read-only, on the virtio-blk disk with serial fractal-sys."""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ccpu.guest import initramfs

INIT = Path(__file__).resolve().parents[2] / "ccpu" / "guest" / "init.sh"
pytestmark = pytest.mark.skipif(not os.path.exists(initramfs.BUSYBOX), reason="busybox-static not installed")

#: The init's text runs on the test machine: as root it would act on the machine itself (a
#: `reboot`, a `mount` or a sysctl the stubs miss).  So it runs as nobody (setpriv), where any
#: such slip is refused, in a scratch dir nobody can read (pytest's own tmp dirs are 0700 root's).
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []


def sh(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NOBODY, initramfs.BUSYBOX, "sh", "-c", script], capture_output=True, text=True,
                          timeout=60)


@pytest.fixture
def box() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="fractal-init-test-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


STUBS = r"""
milestone() { echo "milestone $*"; }
step() { :; }
die() { echo "die $*"; exit 1; }
find_dev() { echo "find_dev $*" >&2; echo /dev/vda; }
load_modules() { echo "load_modules ${1##*/}"; }
mount() { echo "mount $*"; }
sha256sum() { echo "cafe  $1"; }
"""


def section() -> str:
    text = INIT.read_text()
    start = text.index("# --- 1b.")
    return text[start:text.index("# --- 2.", start)]


def run(box: Path, args: dict[str, str], image: bool = True, sysmods: bool = True,
        pmem: bool = True) -> tuple[int, str]:
    etc = box / "etc"
    etc.mkdir(exist_ok=True)
    if image:
        (etc / "image").write_text("erofs cafe\n")
    if sysmods:
        (etc / "modules.sysimage").write_text("kernel/drivers/nvdimm/libnvdimm.ko\n")
    dev = box / "pmem0"
    if pmem and not dev.exists() and os.geteuid() == 0:  # a block device node (`[ -b ]`) stands in
        os.mknod(dev, 0o600 | stat.S_IFBLK, os.makedev(7, 250))
    body = (section().replace("/etc/fractal/", f"{etc}/").replace("/dev/pmem0", str(dev))
            .replace("/sys/block/", f"{box}/sys/").replace("/proc/mounts", f"{box}/mounts"))
    (box / "mounts").write_text("none /.image erofs ro,dax=always 0 0\n")
    defaults = {"sysimage": "erofs", "sysdev": "blk", "verify_image": "0"}
    defaults.update(args)
    script = STUBS + "".join(f"{k}={shlex.quote(v)}\n" for k, v in defaults.items()) + body.replace("sleep 0.02", ":")
    r = sh(script)
    return r.returncode, r.stdout


def test_the_default_mounts_erofs_read_only_from_the_virtio_blk_disk(box: Path) -> None:
    rc, out = run(box, {})
    assert rc == 0, out
    assert "mount -t erofs -o ro /dev/vda /.image" in out
    assert "load_modules" not in out and "milestone system image:" not in out


def test_no_image_marker_mounts_nothing(box: Path) -> None:
    rc, out = run(box, {"sysdev": "bogus"}, image=False)
    assert rc == 0 and "mount" not in out


@pytest.mark.parametrize("args, msg", [
    ({"sysimage": "ext4"}, "die fractal.sysimage=ext4: expected erofs or squashfs"),
    ({"sysimage": "erofs -o rw"}, "expected erofs or squashfs"),  # no options smuggled in
    ({"sysdev": "nvme"}, "die fractal.sysdev=nvme: expected blk, pmem or virtiofs"),
    ({"sysdev": "virtiofs", "verify_image": "1"}, "die fractal.verify_image=1 needs fractal.sysdev=blk"),
    ({"sysdev": "pmem", "verify_image": "1"}, "die fractal.verify_image=1 needs fractal.sysdev=blk"),
])
def test_bad_options_stop_the_boot_with_a_clear_message(box: Path, args: dict, msg: str) -> None:
    rc, out = run(box, args)
    assert rc == 1 and msg in out and "mount -t" not in out


def test_a_non_default_candidate_needs_the_shipped_module_list(box: Path) -> None:
    rc, out = run(box, {"sysimage": "squashfs"}, sysmods=False)
    assert rc == 1 and "ships no" in out and "mount -t" not in out


def test_squashfs_on_virtio_blk(box: Path) -> None:
    rc, out = run(box, {"sysimage": "squashfs"})
    assert rc == 0, out
    assert out.index("load_modules modules.sysimage") < out.index("mount -t squashfs -o ro /dev/vda /.image")


@pytest.mark.skipif(os.geteuid() != 0, reason="the pmem stand-in is a block device node (root)")
def test_erofs_on_virtio_pmem_is_mounted_with_dax(box: Path) -> None:
    rc, out = run(box, {"sysdev": "pmem"})
    assert rc == 0, out
    assert f"mount -t erofs -o ro,dax=always {box}/pmem0 /.image" in out
    assert "milestone system image: erofs" in out and "dax=always" in out
    rc, out = run(box, {"sysdev": "pmem", "sysimage": "squashfs"})  # squashfs has no DAX
    assert rc == 0 and f"mount -t squashfs -o ro {box}/pmem0 /.image" in out


def test_no_pmem_device_stops_the_boot(box: Path) -> None:
    rc, out = run(box, {"sysdev": "pmem"}, pmem=False)
    assert rc == 1 and "die no system image on virtio-pmem" in out


def test_the_tree_over_virtiofs_mounts_the_reserved_share_read_only(box: Path) -> None:
    rc, out = run(box, {"sysdev": "virtiofs"})
    assert rc == 0, out
    assert out.index("load_modules modules.sysimage") < out.index("mount -t virtiofs -o ro fractalsys /.image")
    assert "find_dev" not in out


def test_the_share_list_skips_the_system_tree_only_when_it_is_mounted_as_the_image() -> None:
    """mount_shares (section 2) must not mount tag fractalsys a second time over /.image."""
    text = INIT.read_text()
    start = text.index("mount_shares() {")
    body = text[start:text.index("\n}\n", start) + 3]
    script = (STUBS + 'mount_share() { echo "share $*"; }\nrepo=none\n'
              'shares="fractalsys:virtiofs:ro:/.image vol:9p:rw:/v"\n' + body)
    for sysdev, want in (("virtiofs", ["share vol 9p rw /v"]),
                         ("blk", ["share fractalsys virtiofs ro /.image", "share vol 9p rw /v"])):
        r = sh(script + f"sysdev={sysdev}\nmount_shares\n")
        assert [x for x in r.stdout.splitlines() if x.startswith("share ")] == want, r.stdout


def test_the_measured_boot_still_hashes_the_disk_before_mounting_it(box: Path) -> None:
    rc, out = run(box, {"verify_image": "1"})  # the stub's sha256sum says "cafe", as the marker
    assert rc == 0, out
    assert out.index("milestone system image verified (sha256 cafe)") < out.index("mount -t erofs -o ro /dev/vda")
    (box / "etc" / "image").write_text("erofs beef\n")
    rc, out = run(box, {"verify_image": "1"}, image=False)
    assert rc == 1 and "the initramfs names beef: refused" in out and "mount -t" not in out


@pytest.mark.skipif(os.geteuid() != 0, reason="as a user the text cannot act on the machine anyway")
def test_the_inits_text_runs_without_privilege() -> None:
    """The harness's own guard: what a stub misses is refused, not done to this machine."""
    r = sh("id -u; mount -t tmpfs none /mnt 2>/dev/null || echo refused")
    assert r.stdout.split() == ["65534", "refused"], r.stdout + r.stderr
